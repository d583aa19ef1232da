"""From raw head maps to per-anchor predictions: what a model hands the loss, and the one decode path.

:class:`Predictions` is the one calling convention of every task loss: the per-level maps a
YOLO head produces (box bins and class logits in ``feats``, and the task's side maps). The
loss decodes them with :func:`decode_head`: per level it views the map as ``(b, H * W, C)``
anchor rows, splits box bins from class logits, and takes each side's DFL expectation (and the
log-sum-exp DFL's cross-entropy needs) with :func:`jaxtal.kernels.softmax_stats`. The step
functions of the seed walkthrough, :func:`flatten_head` and :func:`decode_boxes`, are thin
wrappers over the same pieces, so the step-by-step code of docs/detection.md computes the same floats
as training does; :func:`decode_rotated_boxes` and :func:`decode_keypoints` decode the OBB and pose
side maps for inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import _validate
from jaxtal import kernels
from jaxtal.anchors import make_anchors
from jaxtal.boxes import ltrb_to_xywhr, ltrb_to_xyxy
from jaxtal.config import Layout, LossConfig


class Head(NamedTuple):
  """Per-anchor predictions of a detection head, decoded (anchors ordered level by level).

  Attributes:
    logits: per level ``(b, A_l, nc)`` float32 class logits.
    dist: per level ``(b, A_l, 4, R)`` float32 box-bin logits (``R = 1``: the ltrb distances).
    ltrb: ``(b, A, 4)`` decoded left/top/right/bottom distances, grid units of each anchor's level.
    lse: ``(b, A, 4)`` log-sum-exp of each side's bins (DFL's cross-entropy); None when ``R == 1``.
    boxes: ``(b, A, D)`` decoded boxes, grid units: xyxy (``D = 4``), or for oriented boxes
      xywhr with the predicted angle (``D = 5``, :func:`jaxtal.obb_targets`); times ``strides``
      for pixels (the angle unchanged).
    anchors: ``(A, 2)`` anchor centres, grid units.
    strides: ``(A, 1)`` stride of each anchor.
  """

  logits: tuple[jax.Array, ...]
  dist: tuple[jax.Array, ...]
  ltrb: jax.Array
  lse: jax.Array | None
  boxes: jax.Array
  anchors: jax.Array
  strides: jax.Array


class Predictions(NamedTuple):
  """What a YOLO head hands its loss: per-level maps, the same container for every task.

  Every task loss, ``*_targets``, ``*_loss_from_targets``, checked form, NNX module and
  :func:`~jaxtal.end_to_end_loss` takes one of these, so a training loop treats every task alike
  (``total, parts = loss_fn(model(x), gt)``). A task reads the fields it needs and rejects
  the ones it does not. Each map is ``(b, H_l, W_l, C)`` (``layout="NHWC"``) or ``(b, C, H_l,
  W_l)`` (``"NCHW"``), one per head level, in the order of ``strides``; any float dtype.

  Attributes:
    feats: per-level head maps of ``C = 4 * reg_max + nc`` channels: box-bin logits, then class
      logits (every task).
    angles: per-level predicted angles in radians, ``C = 1``, after the head's own activation
      (oriented boxes, :func:`~jaxtal.obb_loss`).
    keypoints: per-level raw keypoints, ``C = K * D``, channel ``k * D + d`` (pose,
      :func:`~jaxtal.pose_loss`).
    mask_coefs: per-level mask coefficients, ``C = nm`` (segmentation, :func:`~jaxtal.segment_loss`).
    proto: the prototype masks ``(b, mh, mw, nm)`` (NHWC) or ``(b, nm, mh, mw)`` (NCHW), one
      array, not per level (segmentation).
    keypoint_sigmas: per-level sigma logits of the keypoints, ``C = 2 K``, channel ``k * 2 + c``
      (YOLO26 pose's RLE term, :func:`~jaxtal.pose26_loss`).
    semantic: semantic-segmentation logits ``(b, h, w, nc)`` (NHWC) or ``(b, nc, h, w)`` (NCHW),
      one array (YOLO26's prototype branch, :func:`~jaxtal.segment26_loss`).

  The detection loss also takes a plain list of head maps as ``Predictions(feats=maps)``.
  """

  feats: Sequence[jax.Array]
  angles: Sequence[jax.Array] | None = None
  keypoints: Sequence[jax.Array] | None = None
  mask_coefs: Sequence[jax.Array] | None = None
  proto: jax.Array | None = None
  keypoint_sigmas: Sequence[jax.Array] | None = None
  semantic: jax.Array | None = None


def level_rows(feats: Sequence[jax.Array], layout: Layout) -> list[jax.Array]:
  """Each level's map as ``(b, H * W, C)`` anchor rows (a reshape for NHWC, a transpose for NCHW)."""
  rows = []
  for f in feats:
    if layout == "NCHW":
      f = jnp.transpose(f, (0, 2, 3, 1))
    rows.append(f.reshape(f.shape[0], -1, f.shape[-1]))
  return rows


def _distances(dist: jax.Array, plain: tuple[str, ...] = ()) -> tuple[jax.Array, jax.Array | None]:
  """``(..., 4, R)`` bin logits -> expected distance ``(..., 4)`` and log-sum-exp (None for ``R == 1``)."""
  if dist.shape[-1] == 1:
    return dist[..., 0], None
  return kernels.select("softmax_stats", plain)(dist)


def decode_head(feats: Sequence[jax.Array], config: LossConfig) -> Head:
  """Decodes per-level raw head maps into per-anchor predictions (what the loss runs).

  Args:
    feats: one map per level, ``(b, H, W, 4R + nc)`` for ``"NHWC"`` or ``(b, 4R + nc, H, W)``
      for ``"NCHW"``; channels are ``[4R box-bin logits, nc class logits]``; any float dtype
      (computed in float32).
    config: a :class:`~jaxtal.LossConfig` (``num_classes``, ``strides``, ``reg_max``, ``layout``).

  Returns:
    A :class:`Head`. The big ``(b, A, 4R + nc)`` tensor is never concatenated: class logits and
    bins stay per level.
  """
  _, shapes = _validate.head(feats, config.num_classes, config.reg_max, config.layout, "decode_head")
  _validate.strides_match(shapes, config.strides, "decode_head")
  return decode_maps(feats, config, shapes)


def decode_maps(feats: Sequence[jax.Array], config: LossConfig, shapes: Sequence[tuple[int, int]]) -> Head:
  """:func:`decode_head` of maps already validated against ``config`` (level shapes ``((H_l, W_l), ...)``):
  what the task losses call after :func:`jaxtal.terms.check_head`, so each map is checked once."""
  r = config.reg_max
  logits, dists, ltrb, lse = [], [], [], []
  for x in level_rows(feats, config.layout):
    bins, cls = kernels.select("split_channels", config.plain_kernels)(x.astype(jnp.float32), 4 * r)
    bins = bins.reshape(*bins.shape[:-1], 4, r)  # (b, A_l, 4, R)
    e, s = _distances(bins, config.plain_kernels)
    logits.append(cls)
    dists.append(bins)
    ltrb.append(e)
    lse.append(s)
  anchors, strides = make_anchors(tuple(shapes), config.strides)
  ltrb = jnp.concatenate(ltrb, axis=1)
  lse = None if r == 1 else jnp.concatenate(lse, axis=1)
  return Head(tuple(logits), tuple(dists), ltrb, lse, ltrb_to_xyxy(ltrb, anchors), anchors, strides)


def flatten_head(
    feats: Sequence[jax.Array],
    num_classes: int,
    reg_max: int = 16,
    layout: Layout = "NHWC",
) -> tuple[jax.Array, jax.Array]:
  """Concatenates per-level head maps into per-anchor predictions (seed step "pred_process").

  Args:
    feats: one map per level, ``(b, H, W, 4R + nc)`` for ``"NHWC"`` (Flax) or
      ``(b, 4R + nc, H, W)`` for ``"NCHW"`` (PyTorch).
    num_classes: ``nc``.
    reg_max: ``R``, bins per box side.
    layout: ``"NHWC"`` or ``"NCHW"``.

  Returns:
    ``pred_dist``: ``(b, A, 4R)`` and ``pred_logits``: ``(b, A, nc)``, anchors ordered level by
    level and row-major within a level (the order of :func:`~jaxtal.make_anchors`).
  """
  _validate.whole("reg_max", reg_max, low=1, caller="flatten_head")
  _validate.whole("num_classes", num_classes, low=1, caller="flatten_head")
  _validate.one_of("layout", layout, ("NHWC", "NCHW"))
  _validate.head(feats, num_classes, reg_max, layout, "flatten_head")
  x = jnp.concatenate(level_rows(feats, layout), axis=1)
  return x[..., : 4 * reg_max], x[..., 4 * reg_max :]


def dfl_expectation(pred_dist: jax.Array, reg_max: int = 16) -> jax.Array:
  """Expected ltrb distance of each side: softmax over its ``R`` bins, then ``sum_i p_i * i``.

  Args:
    pred_dist: ``(..., 4R)`` bin logits (sides l, t, r, b, each ``R`` contiguous bins).
    reg_max: ``R``; with ``R == 1`` the input already is the ltrb distance.

  Returns:
    ``(..., 4)`` distances in grid units, float32 (the loss's kernel, the same floats).

  References:
    Li et al., 2020, "Generalized Focal Loss", https://arxiv.org/abs/2006.04388.
  """
  pred_dist = pred_dist.astype(jnp.float32)
  return _distances(pred_dist.reshape(*pred_dist.shape[:-1], 4, reg_max))[0]


def decode_boxes(pred_dist: jax.Array, anchor_points: jax.Array, reg_max: int = 16) -> jax.Array:
  """Decodes DFL bin logits into xyxy boxes around their anchors (seed step "decode").

  Args:
    pred_dist: ``(b, A, 4R)`` bin logits (``(b, A, 4)`` ltrb distances when ``reg_max == 1``).
    anchor_points: ``(A, 2)`` anchor centres in grid units.
    reg_max: ``R``.

  Returns:
    ``(b, A, 4)`` float32 xyxy boxes in grid units (multiply by the anchor strides for pixels).
  """
  if pred_dist.shape[-1] != 4 * reg_max:
    raise ValueError(f"decode_boxes: pred_dist last axis is {pred_dist.shape[-1]}, expected 4 * reg_max = {4 * reg_max}")
  if anchor_points.ndim != 2 or anchor_points.shape[-1] != 2 or anchor_points.shape[0] != pred_dist.shape[-2]:
    raise ValueError(
        f"decode_boxes: anchor_points must be (A, 2) with A = {pred_dist.shape[-2]}, got {anchor_points.shape}"
    )
  return ltrb_to_xyxy(dfl_expectation(pred_dist, reg_max), anchor_points)


def decode_rotated_boxes(pred_dist: jax.Array, pred_angle: jax.Array, anchor_points: jax.Array, reg_max: int = 16) -> jax.Array:
  """Decodes DFL bin logits and predicted angles into rotated xywhr boxes around their anchors.

  Args:
    pred_dist: ``(b, A, 4R)`` bin logits (``(b, A, 4)`` ltrb distances when ``reg_max == 1``),
      distances measured along the box's own axes.
    pred_angle: ``(b, A, 1)`` predicted angle in radians.
    anchor_points: ``(A, 2)`` anchor centres in grid units.
    reg_max: ``R``.

  Returns:
    ``(b, A, 5)`` float32 ``(cx, cy, w, h, angle)`` in grid units (multiply the first four by
    the anchor strides for pixels): see :func:`ltrb_to_xywhr`.
  """
  if pred_dist.shape[-1] != 4 * reg_max:
    raise ValueError(f"decode_rotated_boxes: pred_dist last axis is {pred_dist.shape[-1]}, expected 4 * reg_max = {4 * reg_max}")
  if pred_angle.shape != (*pred_dist.shape[:-1], 1):
    raise ValueError(
        f"decode_rotated_boxes: pred_angle must be {(*pred_dist.shape[:-1], 1)} (one angle per anchor), got {pred_angle.shape}"
    )
  if anchor_points.ndim != 2 or anchor_points.shape[-1] != 2 or anchor_points.shape[0] != pred_dist.shape[-2]:
    raise ValueError(
        f"decode_rotated_boxes: anchor_points must be (A, 2) with A = {pred_dist.shape[-2]}, got {anchor_points.shape}"
    )
  return ltrb_to_xywhr(dfl_expectation(pred_dist, reg_max), jnp.asarray(pred_angle, jnp.float32), anchor_points)


def keypoint_xy(raw_xy: jax.Array, anchors: jax.Array) -> jax.Array:
  """``2 * raw + anchor - 0.5``: keypoint positions in grid units. Shapes ``(..., K, 2)``, ``(..., 2)``."""
  return 2.0 * raw_xy + anchors[..., None, :] - 0.5


def keypoint_xy26(raw_xy: jax.Array, anchors: jax.Array) -> jax.Array:
  """``raw + anchor``: YOLO26's keypoint positions in grid units. Shapes ``(..., K, 2)``, ``(..., 2)``."""
  return raw_xy + anchors[..., None, :]


def decode_keypoints(
    keypoint_maps: Sequence[jax.Array],
    strides: Sequence[float],
    kpt_shape: tuple[int, int],
    layout: Layout = "NHWC",
    *,
    yolo26: bool = False,
) -> jax.Array:
  """Decodes per-level raw keypoint maps into keypoints in input pixels (for inference).

  Args:
    keypoint_maps: one map per level, ``(b, H, W, K * D)`` for ``"NHWC"`` or ``(b, K * D, H, W)``
      for ``"NCHW"``, channel ``k * D + d`` holding value ``d`` of keypoint ``k``; any float dtype.
    strides: one stride per level (input pixels per cell), e.g. ``(8, 16, 32)``.
    kpt_shape: ``(K, D)``, ``D = 2`` (x, y) or 3 (x, y, visibility logit).
    layout: ``"NHWC"`` or ``"NCHW"``.
    yolo26: YOLO26's decode ``x, y = (raw + anchor) * stride`` (:func:`~jaxtal.pose26_loss`'s
      head) instead of YOLOv8's.

  Returns:
    ``(b, A, K, D)`` float32, anchors ordered level by level and row-major within a level (the
    order of :func:`~jaxtal.make_anchors`): ``x, y = (2 * raw + anchor - 0.5) * stride`` in input
    pixels (YOLO26: ``(raw + anchor) * stride``), anchor centres at cell centres in grid units; with ``D = 3`` the visibility stays a
    logit (apply ``jax.nn.sigmoid`` for a probability).
  """
  caller = "decode_keypoints"
  k, d = _validate.kpt_shape(kpt_shape)
  _validate.one_of("layout", layout, ("NHWC", "NCHW"))
  strides = _validate.strides(strides)
  _, shapes = _validate.maps(keypoint_maps, layout, "keypoint_maps", caller, channels=k * d)
  _validate.strides_match(shapes, strides, caller)
  rows = jnp.concatenate(level_rows(keypoint_maps, layout), axis=1).astype(jnp.float32)
  raw = rows.reshape(*rows.shape[:2], k, d)
  anchors, anchor_strides = make_anchors(tuple(shapes), strides)
  xy = (keypoint_xy26 if yolo26 else keypoint_xy)(raw[..., :2], anchors) * anchor_strides[:, None, :]
  return jnp.concatenate([xy, raw[..., 2:]], axis=-1)
