"""Box formats, conversions and overlap measures (IoU, GIoU, DIoU, CIoU; ProbIoU for rotated boxes).

Boxes are ``xyxy`` (x1, y1, x2, y2) in the last axis unless a name says otherwise (``xywhr``:
centre, width, height and angle in radians, for :func:`probiou`; ``ltrb``: distances from an
anchor point to the box's four sides, what a YOLO head regresses).
Every division is guarded with the double-``where`` pattern, so degenerate boxes
(zero or negative width or height, identical boxes) give finite values and
finite gradients.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from jaxtal.labels import COORD_LIMIT

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


def _safe_div(num: jax.Array, den: jax.Array, fallback: float = 0.0) -> jax.Array:
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
  return jnp.arctan(_safe_div(w, h))


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
    return iou - _safe_div(c_area - union, c_area)

  c2 = cw**2 + ch**2 + eps
  rho2 = ((b2x1 + b2x2 - b1x1 - b1x2) ** 2 + (b2y1 + b2y2 - b1y1 - b1y2) ** 2) / 4
  diou_penalty = _safe_div(rho2, c2)
  if kind == "diou":
    return iou - diou_penalty

  a1 = aspect_angle(box1, eps) if angle1 is None else angle1
  a2 = aspect_angle(box2, eps) if angle2 is None else angle2
  v = (4 / math.pi**2) * (a2 - a1) ** 2
  trade_off = jax.lax.stop_gradient(_safe_div(v, 1 - iou + v + eps))
  return iou - (diou_penalty + v * trade_off)


# ------------------------------------------------------------------------------------------------
# ltrb distances around anchor points (what the head regresses) <-> boxes.


def ltrb_to_xyxy(ltrb: jax.Array, anchor_points: jax.Array) -> jax.Array:
  """Boxes from left/top/right/bottom distances around anchor points (same units): ``(..., 4)``."""
  return jnp.concatenate([anchor_points - ltrb[..., :2], anchor_points + ltrb[..., 2:]], axis=-1)


def xyxy_to_ltrb(boxes: jax.Array, anchor_points: jax.Array) -> jax.Array:
  """Left/top/right/bottom distances from anchor points to box sides (same units): ``(..., 4)``."""
  return jnp.concatenate([anchor_points - boxes[..., :2], boxes[..., 2:] - anchor_points], axis=-1)


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


# ------------------------------------------------------------------------------------------------
# Rotated boxes (xywhr: centre, width, height, angle in radians) and ProbIoU.


def xywhr_corners(boxes: jax.Array) -> jax.Array:
  """Corners of ``(..., 5)`` xywhr boxes, ``(..., 4, 2)``, in turn around the box.

  With ``u = (w/2) (cos r, sin r)`` (half the width along the box's x axis) and
  ``v = (h/2) (-sin r, cos r)``, the corners are ``c - u - v, c + u - v, c + u + v, c - u + v``.
  """
  ctr, w, h, r = boxes[..., :2], boxes[..., 2:3], boxes[..., 3:4], boxes[..., 4:5]
  cos, sin = jnp.cos(r), jnp.sin(r)
  u = jnp.concatenate([cos, sin], axis=-1) * (w / 2)
  v = jnp.concatenate([-sin, cos], axis=-1) * (h / 2)
  return jnp.stack([ctr - u - v, ctr + u - v, ctr + u + v, ctr - u + v], axis=-2)


class Gaussian(NamedTuple):
  """A rotated box as a 2-D Gaussian: mean ``(x, y)``, covariance ``[[a, c], [c, b]]``; leaves ``(...)``."""

  x: jax.Array
  y: jax.Array
  a: jax.Array
  b: jax.Array
  c: jax.Array
  root_det: jax.Array  # sqrt(max(a b - c^2, 0))
  ok: jax.Array  # bool: the box was finite and within the coordinate limit


def gaussian(boxes: jax.Array, floor: float = 0.0) -> Gaussian:
  """``(..., 5)`` xywhr boxes -> their Gaussians (variances ``w^2 / 12 + floor``, ``h^2 / 12 + floor``).

  A box with a non-finite value or ``|value| > COORD_LIMIT`` is replaced by a unit stand-in and
  flagged (``ok = False``): no inf or NaN enters the arithmetic, so gradients stay finite.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  # Within COORD_LIMIT every covariance product stays far inside float32's range.
  ok = (jnp.abs(boxes) <= COORD_LIMIT).all(axis=-1)  # False for NaN and inf too
  boxes = jnp.where(ok[..., None], boxes, jnp.array([0.0, 0.0, 1.0, 1.0, 0.0], jnp.float32))
  var_w = boxes[..., 2] ** 2 / 12 + floor
  var_h = boxes[..., 3] ** 2 / 12 + floor
  cos, sin = jnp.cos(boxes[..., 4]), jnp.sin(boxes[..., 4])
  cos2, sin2 = cos * cos, sin * sin
  a = var_w * cos2 + var_h * sin2
  b = var_w * sin2 + var_h * cos2
  c = (var_w - var_h) * cos * sin
  det = jnp.maximum(a * b - c * c, 0.0)
  # Double where: sqrt has an infinite slope at 0 (a zero-width box).
  root_det = jnp.where(det > 0, jnp.sqrt(jnp.where(det > 0, det, 1.0)), 0.0)
  return Gaussian(boxes[..., 0], boxes[..., 1], a, b, c, root_det, ok)


def gaussian_overlap(g1: Gaussian, g2: Gaussian, eps: float = 1e-7) -> jax.Array:
  """ProbIoU of two (broadcasting) Gaussians: ``1 - sqrt(1 - exp(-B) + eps)``, in ``[0, 1]``.

  ``B`` is the Bhattacharyya distance, clamped to ``[eps, 100]``: with ``S = S1 + S2``,
  ``B = (1/4) d^T S^{-1} d + (1/2) ln(det S / (4 sqrt(det S1 det S2)))``, ``d`` the difference of
  the means, ``eps`` guarding the divisions and the logarithm as the YOLO reference does.
  """
  a, b, c = g1.a + g2.a, g1.b + g2.b, g1.c + g2.c
  dx, dy = g1.x - g2.x, g1.y - g2.y
  det = a * b - c * c
  den = det + eps
  good = den > 0  # False only when rounding makes a (near) singular S negative
  den = jnp.where(good, den, 1.0)
  t1 = (a * dy * dy + b * dx * dx) / den * 0.25
  t2 = (c * (-dx) * dy) / den * 0.5
  t3 = 0.5 * jnp.log(jnp.maximum(det / (4 * (g1.root_det * g2.root_det) + eps) + eps, eps))
  bd = jnp.where(good, jnp.clip(t1 + t2 + t3, eps, 100.0), 100.0)
  iou = 1.0 - jnp.sqrt(1.0 - jnp.exp(-bd) + eps)
  return jnp.where(g1.ok & g2.ok, jnp.clip(iou, 0.0, 1.0), 0.0)


def probiou(box1: jax.Array, box2: jax.Array, *, eps: float = 1e-7, floor: float = 0.0) -> jax.Array:
  """Broadcasting probabilistic IoU (ProbIoU) of rotated ``xywhr`` boxes.

  Each box is a 2-D Gaussian with the box's centre as mean and covariance
  ``R(r) diag(w^2 / 12 + floor, h^2 / 12 + floor) R(r)^T``; the overlap is one minus the
  Hellinger distance of the two Gaussians, computed from their Bhattacharyya distance ``B``
  (clamped to ``[eps, 100]``): ``1 - sqrt(1 - exp(-B) + eps)``. The ``eps`` terms are the YOLO
  reference's, so identical boxes give about 0.9996, not exactly 1; values match Ultralytics'
  ``probiou`` to float32 rounding. The result is clamped to ``[0, 1]``.

  Degenerate boxes stay finite, with finite gradients: zero sides (a singular covariance) are
  guarded with double ``where``, and a box with a non-finite value or ``|value| >``
  :data:`~jaxtal.COORD_LIMIT` overlaps nothing (0). The value is symmetric in its arguments and
  does not change when an angle moves by ``pi``.

  Args:
    box1: ``(..., 5)`` boxes ``(cx, cy, w, h, angle)``, angle in radians.
    box2: ``(..., 5)`` boxes, broadcastable against ``box1``.
    eps: the guard of the divisions, the logarithm and the square root.
    floor: added to both variances (the OBB box loss uses 0.01 in grid units, so a thin box's
      overlap has a usable gradient).

  Returns:
    The overlap in ``[0, 1]``, shape ``broadcast(box1.shape, box2.shape)[:-1]``, float32.

  References:
    Llerena et al., 2021, "Gaussian Bounding Boxes and Probabilistic Intersection-over-Union
    for Object Detection", https://arxiv.org/abs/2106.06072.
  """
  if jnp.shape(box1)[-1:] != (5,) or jnp.shape(box2)[-1:] != (5,):
    raise ValueError(
        f"probiou: boxes must be xywhr with 5 numbers in the last axis, got shapes {jnp.shape(box1)} and {jnp.shape(box2)}"
    )
  return gaussian_overlap(gaussian(box1, floor), gaussian(box2, floor), eps)
