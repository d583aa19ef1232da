"""Geometries of the assigner: what a box is, which anchors it may own, how boxes overlap.

The task-aligned assigner (:mod:`jaxtal.assigner`) is written once against a
:class:`Geometry`, a NamedTuple of pure functions in the spirit of optax's
``GradientTransformation``. A new kind of box (rotated boxes with ProbIoU, keypoints with OKS,
masks with mask IoU) is a new value of this type, not a subclass or a copy of the assigner.

The functions work on per-GT data ``g`` and per-anchor data ``p``: NamedTuples whose every leaf
has the GT (or anchor) axis first. The assigner broadcasts them (``g[:, None]`` against
``p[None]``, or row-aligned entry lists) and calls :attr:`Geometry.candidate` and
:attr:`Geometry.overlap` on the result, so both must broadcast like ``jnp`` arithmetic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxtal.boxes import aspect_angle, box_iou, gaussian, gaussian_overlap, xywhr_corners


class Geometry(NamedTuple):
  """A box geometry: the assigner's only view of what a box is.

  Attributes:
    name: a short name for messages, e.g. ``"xyxy/ciou"``.
    box_dim: ``D``, numbers per box (4 for xyxy, 5 for xywhr).
    box_ok: ``(..., D) boxes -> (...) bool``: the geometry's part of the rule for which GT rows
      count (see :func:`jaxtal.labels.valid_rows`), e.g. a positive area.
    on_image: ``((..., D) boxes, (H, W)) -> (...) bool``: whether a GT box overlaps the
      network input at all (the loss masks rows that do not).
    gt_data: ``((M, D) boxes, (M,) valid, min_box_side[, extra]) -> g``: per-GT data, computed
      once per image (invalid rows hold harmless stand-ins, never NaN). ``extra`` is the image's
      ``GeometryExtra.gt`` (e.g. ``(M, K, 3)`` keypoints), passed only when the caller gives extras.
    pred_data: ``((A, D) predicted boxes, (A, 2) anchor centres[, extra]) -> p``: per-anchor
      data; ``extra`` is the image's ``GeometryExtra.pred`` (e.g. ``(A, K, 2)`` keypoints).
    candidate: ``(g, p, eps) -> bool``: whether an anchor may be assigned to a GT (step 1).
    overlap: ``(g, p) -> float``: the overlap of GT and predicted box (steps 2 and 4); the
      assigner clamps it at 0 and maps non-finite values to 0, so it needs no guard of its own.
    gate: optional ``(g, p) -> bool``, broadcasting: a further candidate condition (e.g. YOLO26
      pose's pyramid-level gate). The assigner applies it per GT only where it leaves the GT some
      candidate: a GT the gate would empty keeps its ungated candidates.
    shortlist: ``0``, or a factor ``f``: the overlap is refined on each GT's ``L = min(f * topk,
      A)`` best pairs only. The assigner ranks each GT's candidates by ``score^alpha *
      overlap(g, p)^beta + eps`` with ``g`` from ``gt_data``, calls ``refine`` once per image,
      and from then on a pair's overlap is the refined one where the pair is listed and
      ``overlap(g', p)`` (``g'`` from ``refine``) elsewhere (e.g. YOLO26 segmentation: box and
      mask IoU on listed pairs, half the box IoU elsewhere).
    refine: with ``shortlist``: ``(g, p_listed, listed (M, L) int32 anchors, listed_candidate
      (M, L) bool, extra_image) -> (g', (M, L) overlap of the listed pairs)``; ``p_listed``'s
      leaves are ``(M, L, ...)``, ``extra_image`` the image's ``GeometryExtra.image``. The
      candidate test of ``g'`` must be that of ``g`` (refining changes overlaps only).
    bounds: optional ``g -> (M, 4)``: per GT, ``x1, y1, x2, y2`` pixels of a rectangle holding
      every anchor centre the candidate test can accept (edges included; float rounding below a
      sixteenth of a cell is allowed for). With it the assigner may visit only the anchors near
      each GT (:mod:`jaxtal.windows`); None: every anchor is visited. Read from ``gt_data``'s
      ``g``, before any refinement.
  """

  name: str
  box_dim: int
  box_ok: Callable[[jax.Array], jax.Array]
  on_image: Callable[[jax.Array, tuple[float, float]], jax.Array]
  gt_data: Callable[[jax.Array, jax.Array, float], Any]
  pred_data: Callable[[jax.Array, jax.Array], Any]
  candidate: Callable[[Any, Any, float], jax.Array]
  overlap: Callable[[Any, Any], jax.Array]
  gate: Callable[[Any, Any], jax.Array] | None = None
  shortlist: int = 0
  refine: Callable[..., tuple[Any, jax.Array]] | None = None
  bounds: Callable[[Any], jax.Array] | None = None


class GeometryExtra(NamedTuple):
  """A geometry's data beyond boxes, for the whole batch; every leaf leads with ``b``.

  The assigner hands each image's slice to the geometry: ``gt`` to ``gt_data`` (per-GT leaves
  ``(b, M, ...)``), ``pred`` to ``pred_data`` (per-anchor ``(b, A, ...)``), ``image`` to
  ``refine`` (anything ``(b, ...)``, e.g. prototypes and GT masks). Any may be None.
  """

  gt: Any = None
  pred: Any = None
  image: Any = None


# ------------------------------------------------------------------------------------------------
# Axis-aligned boxes (xyxy), overlap CIoU (Ultralytics) or IoU (MMYOLO, PP-YOLOE).


class _XyxyGt(NamedTuple):
  """Per-GT data of axis-aligned boxes; every leaf ``(M, ...)``."""

  box: jax.Array  # (M, 4) xyxy pixels (0 on invalid rows)
  lt: jax.Array  # (M, 2) left-top of the candidate rectangle (sides widened to min_box_side)
  rb: jax.Array  # (M, 2) right-bottom of the candidate rectangle
  angle: jax.Array | None  # (M,) CIoU's aspect term arctan(w / h); None for plain IoU


class _XyxyPred(NamedTuple):
  """Per-anchor data of axis-aligned boxes; every leaf ``(A, ...)``."""

  box: jax.Array  # (A, 4) predicted xyxy pixels
  anchor: jax.Array  # (A, 2) anchor centre in pixels
  angle: jax.Array | None  # (A,) CIoU's aspect term; None for plain IoU


def _xyxy_box_ok(boxes: jax.Array) -> jax.Array:
  return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def _xyxy_on_image(boxes: jax.Array, image_hw: tuple[float, float]) -> jax.Array:
  h, w = image_hw
  return (boxes[..., 0] < w) & (boxes[..., 2] > 0) & (boxes[..., 1] < h) & (boxes[..., 3] > 0)


def _xyxy_gt_data(kind: str, boxes: jax.Array, valid: jax.Array, min_box_side: float) -> _XyxyGt:
  ctr = (boxes[..., :2] + boxes[..., 2:]) / 2
  wh = boxes[..., 2:] - boxes[..., :2]
  if min_box_side > 0:
    wh = jnp.where(valid[..., None] & (wh < min_box_side), jnp.asarray(min_box_side, wh.dtype), wh)
  # One arctan per box, not per pair: the CIoU shape term broadcasts as a difference.
  angle = aspect_angle(boxes) if kind == "ciou" else None
  return _XyxyGt(boxes, ctr - wh / 2, ctr + wh / 2, angle)


def _xyxy_pred_data(kind: str, boxes: jax.Array, anchors: jax.Array) -> _XyxyPred:
  return _XyxyPred(boxes, anchors, aspect_angle(boxes) if kind == "ciou" else None)


def _xyxy_candidate(g: _XyxyGt, p: _XyxyPred, eps: float) -> jax.Array:
  """The anchor centre strictly inside the (widened) GT box, by a margin ``eps``."""
  ax, ay = p.anchor[..., 0], p.anchor[..., 1]
  return (ax - g.lt[..., 0] > eps) & (ay - g.lt[..., 1] > eps) & (g.rb[..., 0] - ax > eps) & (g.rb[..., 1] - ay > eps)


def _xyxy_overlap(kind: str, g: _XyxyGt, p: _XyxyPred) -> jax.Array:
  return box_iou(g.box, p.box, kind, angle1=g.angle, angle2=p.angle)


def xyxy_bounds(g: _XyxyGt) -> jax.Array:
  """``(M, 4)`` the widened candidate rectangle of axis-aligned GT data: the :attr:`Geometry.bounds`
  of :func:`axis_aligned` (and of any geometry whose candidates are an axis-aligned box's)."""
  return jnp.concatenate([g.lt, g.rb], axis=-1)


def axis_aligned(overlap: str = "ciou") -> Geometry:
  """Axis-aligned xyxy boxes; ``overlap`` is ``"ciou"`` (Ultralytics' assigner) or ``"iou"``.

  Candidate test: the anchor centre strictly inside the GT box. One value per ``overlap``
  (cached), so configurations that name the same overlap share it.
  """
  if overlap not in ("ciou", "iou"):
    raise ValueError(f"overlap must be one of ('ciou', 'iou') for axis-aligned boxes, got {overlap!r}")
  return _axis_aligned(overlap)


@functools.cache  # keyed on the value alone, so every spelling of a call returns the same object
def _axis_aligned(overlap: str) -> Geometry:
  return Geometry(
      name=f"xyxy/{overlap}",
      box_dim=4,
      box_ok=_xyxy_box_ok,
      on_image=_xyxy_on_image,
      gt_data=functools.partial(_xyxy_gt_data, overlap),
      pred_data=functools.partial(_xyxy_pred_data, overlap),
      candidate=_xyxy_candidate,
      overlap=functools.partial(_xyxy_overlap, overlap),
      bounds=xyxy_bounds,
  )


# ------------------------------------------------------------------------------------------------
# Rotated boxes (xywhr), overlap ProbIoU (Ultralytics' OBB assigner).


class _RotGt(NamedTuple):
  """Per-GT data of rotated boxes; every leaf ``(M, ...)``."""

  gauss: Any  # jaxtal.boxes.Gaussian of the box (no variance floor), leaves (M,)
  corner: jax.Array  # (M, 2) first corner of the candidate rectangle (sides widened to min_box_side)
  edge1: jax.Array  # (M, 2) from it along the box's width
  edge2: jax.Array  # (M, 2) from it along the box's height


class _RotPred(NamedTuple):
  """Per-anchor data of rotated boxes; every leaf ``(A, ...)``."""

  gauss: Any  # jaxtal.boxes.Gaussian of the predicted box, leaves (A,)
  anchor: jax.Array  # (A, 2) anchor centre in pixels


def _rot_box_ok(min_side: float, boxes: jax.Array) -> jax.Array:
  w, h = boxes[..., 2], boxes[..., 3]
  return (w > 0) & (h > 0) & (w >= min_side) & (h >= min_side)


def _rot_on_image(boxes: jax.Array, image_hw: tuple[float, float]) -> jax.Array:
  """Whether the box's axis-aligned bounding box overlaps the input."""
  h, w = image_hw
  cos, sin = jnp.abs(jnp.cos(boxes[..., 4])), jnp.abs(jnp.sin(boxes[..., 4]))
  half_x = (boxes[..., 2] * cos + boxes[..., 3] * sin) / 2
  half_y = (boxes[..., 2] * sin + boxes[..., 3] * cos) / 2
  cx, cy = boxes[..., 0], boxes[..., 1]
  return (cx - half_x < w) & (cx + half_x > 0) & (cy - half_y < h) & (cy + half_y > 0)


def _rot_gt_data(boxes: jax.Array, valid: jax.Array, min_box_side: float) -> _RotGt:
  wide = boxes
  if min_box_side > 0:
    wh = boxes[..., 2:4]
    wh = jnp.where(valid[..., None] & (wh < min_box_side), jnp.asarray(min_box_side, wh.dtype), wh)
    wide = jnp.concatenate([boxes[..., :2], wh, boxes[..., 4:]], axis=-1)
  corners = xywhr_corners(wide)  # (M, 4, 2)
  first = corners[..., 0, :]
  return _RotGt(gaussian(boxes), first, corners[..., 1, :] - first, corners[..., 3, :] - first)


def _rot_pred_data(boxes: jax.Array, anchors: jax.Array) -> _RotPred:
  return _RotPred(gaussian(boxes), anchors)


def _rot_candidate(g: _RotGt, p: _RotPred, eps: float) -> jax.Array:
  """The anchor centre's projections on the box's two edges fall within them, edges included."""
  del eps  # the test is inclusive, as Ultralytics' rotated assigner
  dx, dy = p.anchor[..., 0] - g.corner[..., 0], p.anchor[..., 1] - g.corner[..., 1]
  e1x, e1y, e2x, e2y = g.edge1[..., 0], g.edge1[..., 1], g.edge2[..., 0], g.edge2[..., 1]
  along1, along2 = dx * e1x + dy * e1y, dx * e2x + dy * e2y
  return (along1 >= 0) & (along1 <= e1x * e1x + e1y * e1y) & (along2 >= 0) & (along2 <= e2x * e2x + e2y * e2y)


def _rot_overlap(g: _RotGt, p: _RotPred) -> jax.Array:
  return gaussian_overlap(g.gauss, p.gauss)


def _rot_bounds(g: _RotGt) -> jax.Array:
  """The axis-aligned bounding rectangle of the (widened) candidate parallelogram."""
  corners = jnp.stack([g.corner, g.corner + g.edge1, g.corner + g.edge2, g.corner + g.edge1 + g.edge2], axis=-2)
  return jnp.concatenate([jnp.min(corners, axis=-2), jnp.max(corners, axis=-2)], axis=-1)


def rotated(min_side: float = 0.0) -> Geometry:
  """Rotated ``xywhr`` boxes (centre, width, height in pixels, angle in radians), overlap ProbIoU.

  Candidate test: the anchor centre's projections on the box's two edges fall within them,
  edges included (the axis-aligned test is strict); sides below the assigner's
  ``min_box_side`` are widened to it first. Overlap: :func:`jaxtal.probiou` without a variance
  floor. A box counts (``box_ok``) when both sides are positive and at least ``min_side``
  pixels: the OBB loss uses ``rotated(2.0)``, Ultralytics' rule for dropping tiny boxes;
  ``rotated()`` (its assigner alone) keeps any positive size. One value per ``min_side`` (cached).
  """
  min_side = float(min_side)
  if not (min_side >= 0 and min_side < float("inf")):
    raise ValueError(f"min_side must be a finite number >= 0, got {min_side!r}")
  return _rotated(min_side)


@functools.cache
def _rotated(min_side: float) -> Geometry:
  return Geometry(
      name="xywhr/probiou" if min_side == 0 else f"xywhr/probiou/min_side={min_side:g}",
      box_dim=5,
      box_ok=functools.partial(_rot_box_ok, min_side),
      on_image=_rot_on_image,
      gt_data=_rot_gt_data,
      pred_data=_rot_pred_data,
      candidate=_rot_candidate,
      overlap=_rot_overlap,
      bounds=_rot_bounds,
  )
