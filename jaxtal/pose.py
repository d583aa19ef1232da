"""Pose (keypoints): the YOLOv8 pose loss and the keypoint decode.

The detection skeleton (:mod:`jaxtal.loss`) with two more terms read at the foreground entry
list::

    head maps --decode_head--> Head --assign (axis-aligned)--> Targets --box, cls, dfl--+
    keypoint maps --anchor rows--> take_rows at the entries --pose, kobj---------------+--> (total, parts)

The assignment is the detection assignment (keypoints do not take part in it), so ``box``,
``cls`` and ``dfl`` are exactly :func:`~jaxtal.detection_loss`'s parts. Keypoint maps hold
``K * D`` channels per cell, keypoint-major (channel ``k * D + d``); a keypoint decodes to
``x, y = 2 * raw + anchor - 0.5`` in grid units of its level, and with ``D = 3`` its third
channel is a visibility logit. With ``n_fg`` the number of foreground anchors (every one
counts, whatever its target score) and, for a foreground anchor, ``L`` its labelled keypoints:

* ``pose = sum over foreground of K / |L| * sum over k in L of (1 - exp(-d_k^2 / (8 sigma_k^2
  (area + 1e-9)))) / (n_fg K)``, with ``d_k`` the distance of predicted and GT keypoint and
  ``area`` the target box's area, both in grid units of the anchor's level (the OKS of COCO's
  keypoint evaluation, as Ultralytics writes it);
* ``kobj = sum over foreground and keypoints of BCE-with-logits(visibility logit, k in L) /
  (n_fg K)``; only when the head predicts ``D = 3``, else 0.

Both are 0 when no anchor is foreground; ``total = (box + pose + kobj + cls + dfl) * b``.
Every term reads the entry list (``targets.entries`` through :func:`~jaxtal.take_rows`): the
keypoints of ``E`` rows are decoded, never ``(b, A, K, D)``.

Masking inside ``jit`` (no NaN or inf reaches the loss or its gradient, whatever the input): a
GT keypoint counts as labelled when its visibility is non-zero (every keypoint of a ``D = 2``
GT), and as unlabelled when its coordinates or visibility are non-finite or a coordinate is
beyond ``COORD_LIMIT`` pixels; unlabelled keypoints are replaced by 0 before any arithmetic and
their location term is masked out (double ``where``). An anchor whose GT has no labelled
keypoint contributes 0 to ``pose`` (its ``kobj`` targets are all 0). A zero-area target box
keeps ``1e-9`` in the denominator (as the reference), and the denominator is floored at the
smallest normal float32, so a tiny ``sigma`` cannot make it 0: the term stays finite.

Deliberate differences from Ultralytics 8.4.190 (``v8PoseLoss``, ``KeypointLoss``); everything
else matches to float32 rounding:

* the assignment's own deliberate differences (README "Deliberate differences") reach ``pose``
  and ``kobj`` in a way they do not reach the detection parts, because these two terms count
  every foreground anchor, also those whose align metric (and so their box/class weight) is 0:

  - top-k ties: when a GT has fewer in-box anchors with a positive metric than ``topk``, the
    remaining top-k slots go to zero-metric candidates, and which of the tied candidates are
    taken is up to the top-k routine. jaxtal takes the lower anchor index, one legal order of
    the reference's algorithm (the reference's ``torch.topk`` documents none); with such ties
    the foreground set, hence ``n_fg``, ``pose`` and ``kobj``, can differ from the reference's
    native order, and match it under a stable top-k;
  - conflict resolution: an anchor claimed by several GTs whose in-box overlaps are all 0 may
    be handed to GT slot 0 by the reference, possibly a padding slot; jaxtal never lets padding
    own an anchor, so such an anchor's keypoint terms read its real GT's keypoints (or it is
    background), where the reference reads slot 0's;

* a GT keypoint with a NaN visibility counts as labelled in the reference (``NaN != 0``) and
  as unlabelled here, and non-finite or out-of-range coordinates are masked (the reference
  propagates NaN);
* the per-anchor factor ``K / (|L| + 1e-9)`` is computed as ``K / max(|L|, 1)``: the same
  float32 value whenever ``|L| >= 1``, and the term it scales is 0 otherwise.

References:
  Lin et al., 2014, "Microsoft COCO" (keypoint OKS and its per-keypoint sigmas),
  https://cocodataset.org/#keypoints-eval; Maji et al., 2022, "YOLO-Pose",
  https://arxiv.org/abs/2204.06806.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtal import _validate
from jaxtal.anchors import make_anchors
from jaxtal.config import Layout, LossConfig, _make_config
from jaxtal.head import Head, _level_rows, decode_head
from jaxtal.labels import COORD_LIMIT, GroundTruth
from jaxtal.loss import _assign, _check_head, _detection_parts, _finish, _foreground_count, _side_rows, _target_boxes
from jaxtal.module import _TaskLossModule
from jaxtal.targets import Targets, take_rows

# COCO's per-keypoint OKS sigmas of the 17 person keypoints (nose, eyes, ears, shoulders,
# elbows, wrists, hips, knees, ankles), from the COCO keypoint evaluation.
_COCO_SIGMAS = tuple(
    v / 10
    for v in (0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89)
)

# The reference's guard of the box area in the OKS denominator (grid units squared).
_AREA_EPS = 1e-9
# The OKS denominator's floor: 8 sigma^2 (area + eps) never rounds to 0 (no 0 / 0).
_TINY = float(np.finfo(np.float32).tiny)


def _kpt_shape(value) -> tuple[int, int]:
  try:
    k, d = value
  except (TypeError, ValueError):
    raise ValueError(
        f"kpt_shape must be (K, D): K keypoints of D = 2 (x, y) or 3 (x, y, visibility) values, got {value!r}"
    ) from None
  k = _validate.whole("kpt_shape[0] (K, the number of keypoints)", k, low=1)
  d = _validate.whole("kpt_shape[1] (D)", d)
  if d not in (2, 3):
    raise ValueError(f"kpt_shape[1] (D) must be 2 (x, y) or 3 (x, y, visibility logit), got {value!r}")
  return k, d


def _sigmas(value, kpt_shape: tuple[int, int]) -> tuple[float, ...]:
  k = kpt_shape[0]
  if value is None:
    return _COCO_SIGMAS if kpt_shape == (17, 3) else (1.0 / k,) * k
  flat = np.asarray(value, dtype=object).reshape(-1) if not isinstance(value, (str, bytes)) else None
  if flat is None or np.ndim(value) == 0 or flat.size != k:
    raise ValueError(
        f"sigmas must be {k} positive finite numbers, one per keypoint (K = {k} from kpt_shape), or None; got {value!r}"
        " (after changing kpt_shape, give sigmas again or None)"
    )
  out = []
  for i, s in enumerate(flat):
    v = _validate.finite_number(f"sigmas[{i}]", s)
    if v <= 0:
      raise ValueError(f"sigmas[{i}] must be a positive finite number, got {s!r}")
    out.append(v)
  return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoseLossConfig(LossConfig):
  """Settings of the pose loss: :class:`~jaxtal.LossConfig` plus the keypoint terms'.

  Attributes:
    kpt_shape: ``(K, D)``: ``K`` keypoints per object, each predicted as ``D = 3`` values
      ``(x, y, visibility logit)`` or ``D = 2`` ``(x, y)`` (no visibility term).
    sigmas: the ``K`` per-keypoint OKS sigmas (positive), or None: COCO's 17 sigmas when
      ``kpt_shape == (17, 3)``, else ``1 / K`` each (Ultralytics' defaults). Stored as the
      resolved tuple, so after changing ``kpt_shape`` of a config give ``sigmas`` again (or None).
    pose: gain of the keypoint location term (Ultralytics' ``pose`` hyperparameter).
    kobj: gain of the keypoint visibility term (``kobj``).
  """

  kpt_shape: tuple[int, int] = (17, 3)
  sigmas: tuple[float, ...] | None = None
  pose: float = 12.0
  kobj: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "kpt_shape", _kpt_shape(self.kpt_shape))
    object.__setattr__(self, "sigmas", _sigmas(self.sigmas, self.kpt_shape))
    for name in ("pose", "kobj"):
      object.__setattr__(self, name, _validate.finite_number(name, getattr(self, name)))


class PoseLossParts(NamedTuple):
  """Gain-scaled pose loss terms (scalars), in Ultralytics' order.

  Attributes:
    box: ``box_gain * CIoU loss``.
    pose: ``pose_gain * keypoint location (OKS) loss``.
    kobj: ``kobj_gain * keypoint visibility BCE`` (0 when ``D == 2``).
    cls: ``cls_gain * BCE loss``.
    dfl: ``dfl_gain * DFL loss`` (the L1 distance loss when ``reg_max == 1``).
  """

  box: jax.Array
  pose: jax.Array
  kobj: jax.Array
  cls: jax.Array
  dfl: jax.Array


def _keypoint_xy(raw_xy: jax.Array, anchors: jax.Array) -> jax.Array:
  """``2 * raw + anchor - 0.5``: keypoint positions in grid units. Shapes ``(..., K, 2)``, ``(..., 2)``."""
  return 2.0 * raw_xy + anchors[..., None, :] - 0.5


def decode_keypoints(
    keypoint_maps: Sequence[jax.Array],
    strides: Sequence[float],
    kpt_shape: tuple[int, int],
    layout: Layout = "NHWC",
) -> jax.Array:
  """Decodes per-level raw keypoint maps into keypoints in input pixels (for inference).

  Args:
    keypoint_maps: one map per level, ``(b, H, W, K * D)`` for ``"NHWC"`` or ``(b, K * D, H, W)``
      for ``"NCHW"``, channel ``k * D + d`` holding value ``d`` of keypoint ``k``; any float dtype.
    strides: one stride per level (input pixels per cell), e.g. ``(8, 16, 32)``.
    kpt_shape: ``(K, D)``, ``D = 2`` (x, y) or 3 (x, y, visibility logit).
    layout: ``"NHWC"`` or ``"NCHW"``.

  Returns:
    ``(b, A, K, D)`` float32, anchors ordered level by level and row-major within a level (the
    order of :func:`~jaxtal.make_anchors`): ``x, y = (2 * raw + anchor - 0.5) * stride`` in input
    pixels, anchor centres at cell centres in grid units; with ``D = 3`` the visibility stays a
    logit (apply ``jax.nn.sigmoid`` for a probability).
  """
  caller = "decode_keypoints"
  k, d = _kpt_shape(kpt_shape)
  _validate.one_of("layout", layout, ("NHWC", "NCHW"))
  strides = _validate.strides(strides)
  if isinstance(keypoint_maps, jax.Array | np.ndarray) or not isinstance(keypoint_maps, Sequence) or not keypoint_maps:
    raise TypeError(f"{caller}: keypoint_maps must be a non-empty list of per-level maps, one array per level")
  shapes = []
  for i, x in enumerate(keypoint_maps):
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4:
      got = getattr(x, "shape", None)
      raise ValueError(f"{caller}: keypoint_maps[{i}] must be a rank-4 {layout} array, got shape {got}")
    shapes.append(shape[1:3] if layout == "NHWC" else shape[2:4])
  _validate.level_maps(keypoint_maps, shapes, keypoint_maps[0].shape[0], k * d, layout, "keypoint_maps", caller)
  _validate.strides_match(shapes, strides, caller)
  rows = jnp.concatenate(_level_rows(keypoint_maps, layout), axis=1).astype(jnp.float32)
  raw = rows.reshape(*rows.shape[:2], k, d)
  anchors, anchor_strides = make_anchors(tuple(shapes), strides)
  xy = _keypoint_xy(raw[..., :2], anchors) * anchor_strides[:, None, :]
  return jnp.concatenate([xy, raw[..., 2:]], axis=-1)


def _keypoint_terms(head: Head, rows: jax.Array, gt_keypoints: jax.Array, targets: Targets, cfg: PoseLossConfig):
  """``(pose, kobj)`` before gains: the keypoint terms of anchor rows ``(b, A, K * D)`` at the entry list."""
  k, d = cfg.kpt_shape
  e = targets.entries
  b = rows.shape[0]
  pred = take_rows(rows, e.anchor).reshape(b, -1, k, d)  # (b, E, K, D)
  anchors = take_rows(jnp.broadcast_to(head.anchors, (b, *head.anchors.shape)), e.anchor)  # (b, E, 2)
  stride = take_rows(jnp.broadcast_to(head.strides, (b, *head.strides.shape)), e.anchor)  # (b, E, 1)
  box = take_rows(_target_boxes(head, targets), e.anchor)  # (b, E, 4) grid units
  area = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])  # (b, E)

  gt = jax.lax.stop_gradient(take_rows(jnp.asarray(gt_keypoints, jnp.float32), e.gt))  # (b, E, K, Dg) pixels
  gt_xy = gt[..., :2]
  ok = jnp.all(jnp.abs(gt_xy) <= COORD_LIMIT, axis=-1)  # False for NaN and inf too
  if gt.shape[-1] == 3:
    vis = gt[..., 2]
    ok = ok & jnp.isfinite(vis) & (vis != 0)
  labelled = ok & e.valid[..., None]  # (b, E, K)
  gt_xy = jnp.where(labelled[..., None], gt_xy, 0.0) / stride[..., None, :]

  diff = _keypoint_xy(pred[..., :2], anchors) - gt_xy
  d2 = jnp.sum(diff * diff, axis=-1)  # (b, E, K)
  sigmas = jnp.asarray(cfg.sigmas, jnp.float32)
  scale = jnp.maximum(8.0 * sigmas**2 * (area[..., None] + _AREA_EPS), _TINY)
  oks_loss = jnp.where(labelled, -jnp.expm1(-d2 / scale), 0.0)
  count = jnp.sum(labelled, axis=-1, dtype=jnp.float32)
  per_anchor = jnp.sum(oks_loss, axis=-1) * k / jnp.maximum(count, 1.0)

  n = _foreground_count(targets, cfg.axis_name) * k
  pose = jnp.sum(per_anchor) / n
  if d < 3:
    return pose, jnp.zeros((), jnp.float32)
  logit = pred[..., 2]
  target = labelled.astype(jnp.float32)
  bce = -(target * jax.nn.log_sigmoid(logit) + (1.0 - target) * jax.nn.log_sigmoid(-logit))
  kobj = jnp.sum(jnp.where(e.valid[..., None], bce, 0.0)) / n
  return pose, kobj


def pose_loss(
    feats: Sequence[jax.Array],
    keypoints: Sequence[jax.Array],
    gt: GroundTruth,
    config: PoseLossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, PoseLossParts]:
  """YOLOv8 pose loss of raw head maps and keypoint maps against padded ground truth with keypoints.

  The detection loss (:func:`~jaxtal.detection_loss`: same assignment, same ``box``, ``cls``,
  ``dfl``) plus, over the foreground anchors (``n_fg`` of them, each counted whatever its target
  score), the keypoint location term ``pose`` (mean over foreground anchors and keypoints of
  ``1 - exp(-d^2 / (8 sigma^2 (area + 1e-9)))`` on labelled keypoints, rescaled by ``K /
  |labelled|`` per anchor; ``d`` and ``area`` in grid units) and, when ``D = 3``, the visibility
  term ``kobj`` (BCE-with-logits of each visibility logit against "labelled", mean over
  ``n_fg * K``). See :mod:`jaxtal.pose` for the masking rules and the deliberate differences.

  Args:
    feats: per-level raw head maps, ``(b, H, W, 4R + nc)`` (NHWC) or ``(b, 4R + nc, H, W)``
      (NCHW), as for :func:`~jaxtal.detection_loss`.
    keypoints: per-level raw keypoint maps, ``(b, H, W, K * D)`` (NHWC) or ``(b, K * D, H, W)``
      (NCHW), channel ``k * D + d``: ``x, y`` decode to ``2 * raw + anchor - 0.5`` grid units,
      ``D = 3``'s third value is a visibility logit (:func:`decode_keypoints` for inference).
    gt: :class:`~jaxtal.GroundTruth` with boxes in input pixels and ``keypoints (b, M, K, Dg)``
      in input pixels, ``Dg = 3`` (visibility non-zero = labelled) or 2 (all labelled), e.g.
      from :func:`~jaxtal.pack_labels` with ``keypoints=``.
    config: a :class:`~jaxtal.PoseLossConfig`; or its fields as keyword ``overrides``
      (``num_classes``, ``strides`` at least; ``kpt_shape=(17, 3)``, ``sigmas=None``,
      ``pose=12.0``, ``kobj=1.0``).
    class_weights: optional ``(nc,)`` weights of the BCE per class.

  ``axis_name`` works as for :func:`~jaxtal.detection_loss` (``n_fg`` is global too).

  Returns:
    ``(total, PoseLossParts(box, pose, kobj, cls, dfl))`` with gain-scaled parts and ``total =
    sum(parts) * batch_size``, Ultralytics' ``v8PoseLoss`` convention.

  References:
    Maji et al., 2022, "YOLO-Pose", https://arxiv.org/abs/2204.06806; COCO keypoint evaluation
    (OKS), https://cocodataset.org/#keypoints-eval; Feng et al., 2021, "TOOD" (assignment),
    https://arxiv.org/abs/2108.07755.
  """
  caller = "pose_loss"
  cfg = _make_config(PoseLossConfig, config, overrides, caller)
  batch, hw, shapes = _check_head(feats, cfg, caller)
  k, d = cfg.kpt_shape
  rows = _side_rows(keypoints, shapes, batch, k * d, cfg.layout, "keypoints", caller)
  _validate.ground_truth(gt, batch, caller)
  _validate.gt_keypoints(gt, k, caller)
  _validate.class_weights(class_weights, cfg.num_classes, caller)
  head = decode_head(feats, cfg)
  targets = _assign(head, gt, cfg, hw)
  det = _detection_parts(head, targets, cfg, hw, class_weights)
  pose, kobj = _keypoint_terms(head, rows, gt.keypoints, targets, cfg)
  parts = PoseLossParts(det.box, cfg.pose * pose, cfg.kobj * kobj, det.cls, det.dfl)
  return _finish(parts, batch, cfg.axis_name)


class PoseLoss(_TaskLossModule):
  """The YOLOv8 pose loss (:func:`pose_loss`) as an NNX module holding a :class:`PoseLossConfig`.

  Example::

    loss_fn = jaxtal.PoseLoss(num_classes=1, strides=(8, 16, 32), kpt_shape=(17, 3))
    total, parts = loss_fn(feats, keypoints, gt)

  No trainable state; class weights are held as a constant. The class gain is the config's
  ``cls`` field: pass it in a ``PoseLossConfig`` (Flax's constructor reserves the keyword).
  """

  config_class = PoseLossConfig

  def __call__(
      self, feats: Sequence[jax.Array], keypoints: Sequence[jax.Array], gt: GroundTruth
  ) -> tuple[jax.Array, PoseLossParts]:
    """Returns ``(total, PoseLossParts)`` for head maps ``feats``, keypoint maps ``keypoints`` and ``gt``."""
    return self._run(pose_loss, feats, keypoints, gt)
