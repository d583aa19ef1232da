"""From raw head maps to per-anchor predictions: the one decode path.

:func:`decode_head` is what the loss runs: per level it views the map as ``(b, H * W, C)``
anchor rows, splits box bins from class logits, and takes each side's DFL expectation (and the
log-sum-exp DFL's cross-entropy needs) with :func:`jaxtal.kernels.softmax_stats`. The step
functions of the seed walkthrough, :func:`flatten_head` and :func:`decode_boxes`, are thin
wrappers over the same pieces, so the README's step-by-step code computes the same floats as
training does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import _validate, kernels
from jaxtal.anchors import make_anchors
from jaxtal.config import Layout, LossConfig


class Head(NamedTuple):
  """Per-anchor predictions of a detection head, decoded (anchors ordered level by level).

  Attributes:
    logits: per level ``(b, A_l, nc)`` float32 class logits.
    dist: per level ``(b, A_l, 4, R)`` float32 box-bin logits (``R = 1``: the ltrb distances).
    ltrb: ``(b, A, 4)`` decoded left/top/right/bottom distances, grid units of each anchor's level.
    lse: ``(b, A, 4)`` log-sum-exp of each side's bins (DFL's cross-entropy); None when ``R == 1``.
    boxes: ``(b, A, 4)`` decoded xyxy boxes, grid units (times ``strides`` for pixels).
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


def _level_rows(feats: Sequence[jax.Array], layout: Layout) -> list[jax.Array]:
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


def ltrb_to_xyxy(ltrb: jax.Array, anchor_points: jax.Array) -> jax.Array:
  """Boxes from left/top/right/bottom distances around anchor points (same units): ``(..., 4)``."""
  return jnp.concatenate([anchor_points - ltrb[..., :2], anchor_points + ltrb[..., 2:]], axis=-1)


def xyxy_to_ltrb(boxes: jax.Array, anchor_points: jax.Array) -> jax.Array:
  """Left/top/right/bottom distances from anchor points to box sides (same units): ``(..., 4)``."""
  return jnp.concatenate([anchor_points - boxes[..., :2], boxes[..., 2:] - anchor_points], axis=-1)


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
  r = config.reg_max
  logits, dists, ltrb, lse = [], [], [], []
  for x in _level_rows(feats, config.layout):
    bins, cls = kernels.select("split_channels", config.plain_kernels)(x.astype(jnp.float32), 4 * r)
    bins = bins.reshape(*bins.shape[:-1], 4, r)  # (b, A_l, 4, R)
    e, s = _distances(bins, config.plain_kernels)
    logits.append(cls)
    dists.append(bins)
    ltrb.append(e)
    lse.append(s)
  anchors, strides = make_anchors(shapes, config.strides)
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
  x = jnp.concatenate(_level_rows(feats, layout), axis=1)
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


def ltrb_to_xywhr(ltrb: jax.Array, angle: jax.Array, anchor_points: jax.Array) -> jax.Array:
  """Rotated boxes from distances measured in the box's own (rotated) frame: ``(..., 5)`` xywhr.

  The centre is the anchor plus the offset ``((r - l) / 2, (b - t) / 2)`` rotated by ``angle``;
  width ``l + r``, height ``t + b`` (same units as the anchors). Shapes: ``(..., 4)``,
  ``(..., 1)``, ``(..., 2)``.
  """
  lt, rb = ltrb[..., :2], ltrb[..., 2:]
  off = (rb - lt) / 2
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x = off[..., :1] * cos - off[..., 1:] * sin
  y = off[..., :1] * sin + off[..., 1:] * cos
  return jnp.concatenate([jnp.concatenate([x, y], axis=-1) + anchor_points, lt + rb, angle], axis=-1)


def xywhr_to_ltrb(boxes: jax.Array, anchor_points: jax.Array) -> jax.Array:
  """Distances from anchor points to the sides of rotated boxes, along each box's own axes: ``(..., 4)``.

  The inverse of :func:`ltrb_to_xywhr` for the box's own angle: with ``(u, v)`` the box centre
  minus the anchor, turned by ``-angle``, ``l = w/2 - u``, ``t = h/2 - v``, ``r = w/2 + u``,
  ``b = h/2 + v``. Shapes: ``(..., 5)`` xywhr, ``(..., 2)`` -> ``(..., 4)``.
  """
  off = boxes[..., :2] - anchor_points
  cos, sin = jnp.cos(boxes[..., 4:5]), jnp.sin(boxes[..., 4:5])
  uv = jnp.concatenate([off[..., :1] * cos + off[..., 1:] * sin, off[..., 1:] * cos - off[..., :1] * sin], axis=-1)
  half = boxes[..., 2:4] / 2
  return jnp.concatenate([half - uv, half + uv], axis=-1)


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
