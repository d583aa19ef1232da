"""Box formats and overlap measures (IoU, GIoU, DIoU, CIoU).

Boxes are ``xyxy`` (x1, y1, x2, y2) in the last axis unless a name says otherwise.
Every division is guarded with the double-``where`` pattern, so degenerate boxes
(zero or negative width or height, identical boxes) give finite values and
finite gradients.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

IouKind = Literal["iou", "giou", "diou", "ciou"]
_KINDS = ("iou", "giou", "diou", "ciou")


def xywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """Converts ``(cx, cy, w, h)`` boxes to ``(x1, y1, x2, y2)``.

  Args:
    boxes: ``(..., 4)`` centre-size boxes.

  Returns:
    ``(..., 4)`` corner boxes.
  """
  xy, half = boxes[..., :2], boxes[..., 2:] / 2
  return jnp.concatenate([xy - half, xy + half], axis=-1)


def xyxy_to_xywh(boxes: jax.Array) -> jax.Array:
  """Converts ``(x1, y1, x2, y2)`` boxes to ``(cx, cy, w, h)``.

  Args:
    boxes: ``(..., 4)`` corner boxes.

  Returns:
    ``(..., 4)`` centre-size boxes.
  """
  lt, rb = boxes[..., :2], boxes[..., 2:]
  return jnp.concatenate([(lt + rb) / 2, rb - lt], axis=-1)


def safe_div(num: jax.Array, den: jax.Array, fallback: float = 0.0) -> jax.Array:
  """``num / den`` where ``den != 0``, else ``fallback``; gradients stay finite."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)


def aspect_angle(boxes: jax.Array, eps: float = 1e-7) -> jax.Array:
  """``arctan(w / (h + eps))`` of ``(..., 4)`` xyxy boxes, the CIoU shape term.

  Computing it once per box (and broadcasting the difference) is what makes
  pairwise CIoU cheap: ``M + A`` arctangents instead of ``M * A``.
  """
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1] + eps
  return jnp.arctan(safe_div(w, h))


def box_iou(
    box1: jax.Array,
    box2: jax.Array,
    kind: IouKind = "ciou",
    eps: float = 1e-7,
    *,
    angle1: jax.Array | None = None,
    angle2: jax.Array | None = None,
) -> jax.Array:
  """Broadcasting IoU, GIoU, DIoU or CIoU of xyxy boxes.

  Heights carry ``eps`` (as widths do not) and the union and enclosing
  diagonal carry ``eps``, the convention of the YOLO reference, so values match
  it to float32 rounding. For CIoU the trade-off weight ``v / (1 - iou + v)``
  is held out of the gradient, as in the CIoU paper.

  Args:
    box1: ``(..., 4)`` xyxy boxes.
    box2: ``(..., 4)`` xyxy boxes, broadcastable against ``box1``.
    kind: one of ``"iou"``, ``"giou"``, ``"diou"``, ``"ciou"``.
    eps: small constant added to heights, the union and the enclosing diagonal.
    angle1: optional precomputed ``aspect_angle(box1, eps)`` (CIoU only).
    angle2: optional precomputed ``aspect_angle(box2, eps)`` (CIoU only).

  Returns:
    The overlap, shape ``broadcast(box1.shape, box2.shape)[:-1]``.

  References:
    Rezatofighi et al., 2019 (GIoU); Zheng et al., 2020, "Distance-IoU Loss"
    (DIoU and CIoU), https://arxiv.org/abs/1911.08287.
  """
  if kind not in _KINDS:
    raise ValueError(f"box_iou: kind must be one of {_KINDS}, got {kind!r}")
  if box1.shape[-1] != 4 or box2.shape[-1] != 4:
    raise ValueError(
        f"box_iou: boxes must have 4 coordinates in the last axis, got shapes {box1.shape} and {box2.shape}"
    )
  b1x1, b1y1, b1x2, b1y2 = (box1[..., i] for i in range(4))
  b2x1, b2y1, b2x2, b2y2 = (box2[..., i] for i in range(4))
  w1, h1 = b1x2 - b1x1, b1y2 - b1y1 + eps
  w2, h2 = b2x2 - b2x1, b2y2 - b2y1 + eps

  inter = jnp.maximum(jnp.minimum(b1x2, b2x2) - jnp.maximum(b1x1, b2x1), 0) * jnp.maximum(
      jnp.minimum(b1y2, b2y2) - jnp.maximum(b1y1, b2y1), 0
  )
  union = w1 * h1 + w2 * h2 - inter + eps
  # A non-positive union only happens for inverted boxes: call their IoU 0.
  iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
  if kind == "iou":
    return iou

  cw = jnp.maximum(b1x2, b2x2) - jnp.minimum(b1x1, b2x1)
  ch = jnp.maximum(b1y2, b2y2) - jnp.minimum(b1y1, b2y1)
  if kind == "giou":
    c_area = cw * ch + eps
    return iou - safe_div(c_area - union, c_area)

  c2 = cw**2 + ch**2 + eps
  rho2 = ((b2x1 + b2x2 - b1x1 - b1x2) ** 2 + (b2y1 + b2y2 - b1y1 - b1y2) ** 2) / 4
  diou_penalty = safe_div(rho2, c2)
  if kind == "diou":
    return iou - diou_penalty

  a1 = aspect_angle(box1, eps) if angle1 is None else angle1
  a2 = aspect_angle(box2, eps) if angle2 is None else angle2
  v = (4 / math.pi**2) * (a2 - a1) ** 2
  trade_off = jax.lax.stop_gradient(safe_div(v, 1 - iou + v + eps))
  return iou - (diou_penalty + v * trade_off)
