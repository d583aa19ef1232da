"""From raw head maps to per-anchor predictions: flatten levels, decode DFL boxes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

Layout = Literal["NHWC", "NCHW"]
_LAYOUTS = ("NHWC", "NCHW")


def check_head(
    feats: Sequence[jax.Array], num_classes: int, reg_max: int, layout: str
) -> tuple[int, tuple[tuple[int, int], ...]]:
  """Validates per-level head maps; returns ``(batch, ((H, W), ...))``.

  Raises ValueError / TypeError naming the level, what was expected and what was received.
  """
  if layout not in _LAYOUTS:
    raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
  if int(reg_max) != reg_max or reg_max < 1:
    raise ValueError(f"reg_max must be a whole number >= 1, got {reg_max!r}")
  if int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f"num_classes must be a whole number >= 1, got {num_classes!r}")
  if isinstance(feats, jax.Array) or not isinstance(feats, Sequence) or len(feats) == 0:
    raise TypeError("feats must be a non-empty list of per-level head maps, one array per level")
  channels = 4 * reg_max + num_classes
  batch, shapes = None, []
  for i, f in enumerate(feats):
    shape = getattr(f, "shape", None)
    if shape is None or len(shape) != 4:
      raise ValueError(f"feats[{i}] must be a rank-4 {layout} array, got shape {shape}")
    if not jnp.issubdtype(f.dtype, jnp.floating):
      raise TypeError(f"feats[{i}] must be a float array (logits), got dtype {f.dtype}")
    b, c, h, w = (shape[0], shape[3], shape[1], shape[2]) if layout == "NHWC" else shape
    if c != channels:
      where = "last" if layout == "NHWC" else "second"
      raise ValueError(
          f"feats[{i}] has {c} channels in its {where} axis ({layout}); expected 4 * reg_max + num_classes ="
          f" 4 * {reg_max} + {num_classes} = {channels} (shape {tuple(shape)})"
      )
    if batch is None:
      batch = b
    elif b != batch:
      raise ValueError(f"feats[{i}] has batch size {b} but feats[0] has {batch}")
    shapes.append((int(h), int(w)))
  return int(batch), tuple(shapes)


def flatten_head(
    feats: Sequence[jax.Array],
    num_classes: int,
    reg_max: int = 16,
    layout: Layout = "NHWC",
) -> tuple[jax.Array, jax.Array]:
  """Concatenates per-level head maps into per-anchor predictions.

  Each level's channels are ``[4 * reg_max box-distribution logits, num_classes class logits]``.

  Args:
    feats: one map per level, ``(b, H, W, 4R + nc)`` for ``"NHWC"`` (Flax) or
      ``(b, 4R + nc, H, W)`` for ``"NCHW"`` (PyTorch).
    num_classes: ``nc``.
    reg_max: ``R``, bins per box side.
    layout: ``"NHWC"`` or ``"NCHW"``.

  Returns:
    ``pred_dist``: ``(b, A, 4R)`` and ``pred_logits``: ``(b, A, nc)``, anchors ordered
    level by level and row-major within a level (the order of ``make_anchors``).
  """
  check_head(feats, num_classes, reg_max, layout)
  x = jnp.concatenate(level_rows(feats, layout), axis=1)
  return x[..., : 4 * reg_max], x[..., 4 * reg_max :]


def level_rows(feats: Sequence[jax.Array], layout: Layout) -> list[jax.Array]:
  """Each level's map as ``(b, H * W, C)`` rows of anchors (a reshape for NHWC, a transpose for NCHW)."""
  rows = []
  for f in feats:
    if layout == "NCHW":
      f = jnp.transpose(f, (0, 2, 3, 1))
    rows.append(f.reshape(f.shape[0], -1, f.shape[-1]))
  return rows


def dfl_expectation(pred_dist: jax.Array, reg_max: int = 16) -> jax.Array:
  """Expected ltrb distance of each side: softmax over its ``R`` bins, then ``sum_i p_i * i``.

  Args:
    pred_dist: ``(..., 4R)`` bin logits (sides l, t, r, b, each ``R`` contiguous bins).
    reg_max: ``R``; with ``R == 1`` the input already is the ltrb distance.

  Returns:
    ``(..., 4)`` distances in grid units, computed in float32.

  References:
    Li et al., 2020, "Generalized Focal Loss", https://arxiv.org/abs/2006.04388.
  """
  pred_dist = pred_dist.astype(jnp.float32)
  if reg_max == 1:
    return pred_dist
  # Softmax, then an elementwise weighted sum (not a matmul with a length-R vector): the
  # reference's rounding. The loss uses jaxtal.ops.softmax_expectation, which also returns
  # the log-sum-exp and has a one-pass gradient; the two agree to float32 rounding.
  probs = jax.nn.softmax(pred_dist.reshape(*pred_dist.shape[:-1], 4, reg_max), axis=-1)
  return jnp.sum(probs * jnp.arange(reg_max, dtype=jnp.float32), axis=-1)


def ltrb_to_xyxy(ltrb: jax.Array, anchor_points: jax.Array) -> jax.Array:
  """Boxes from left/top/right/bottom distances around anchor points (same units)."""
  return jnp.concatenate([anchor_points - ltrb[..., :2], anchor_points + ltrb[..., 2:]], axis=-1)


def xyxy_to_ltrb(boxes: jax.Array, anchor_points: jax.Array) -> jax.Array:
  """Left/top/right/bottom distances from anchor points to box sides (same units)."""
  return jnp.concatenate([anchor_points - boxes[..., :2], boxes[..., 2:] - anchor_points], axis=-1)


def decode_boxes(pred_dist: jax.Array, anchor_points: jax.Array, reg_max: int = 16) -> jax.Array:
  """Decodes DFL bin logits into xyxy boxes around their anchors.

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
