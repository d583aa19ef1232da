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

from jaxtal import _validate
from jaxtal.boxes import aspect_angle, box_iou, gaussian, gaussian_overlap, xywhr_corners
from jaxtal.labels import COORD_LIMIT


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


# ------------------------------------------------------------------------------------------------
# Keypoints (YOLO26 pose): axis-aligned GT boxes, overlap the keypoint OKS, a pyramid-level gate.

# The OKS's object area is the GT box's area times this (COCO's segment-area to box-area ratio,
# which Ultralytics' pose validator and its YOLO26 assigner use).
OKS_AREA_SCALE = 0.53
# The OKS denominator's floor: (2 sigma)^2 (area + eps) 2 never rounds to 0 (no 0 / 0).
_TINY = float(jnp.finfo(jnp.float32).tiny)


class _OksGt(NamedTuple):
  """Per-GT data of the keypoint geometry; every leaf ``(M, ...)``."""

  box: _XyxyGt  # the box data (candidate rectangle, CIoU of GTs without visible keypoints)
  keypoints: jax.Array  # (M, K, 2) pixels, 0 where not visible
  visible: jax.Array  # (M, K) float32 1 / 0
  count: jax.Array  # (M,) float32 number of visible keypoints
  scale: jax.Array  # (M, K) the OKS denominator (2 sigma_k)^2 (area + eps) 2, area = box area * OKS_AREA_SCALE
  side: jax.Array  # (M,) sqrt of the (unwidened) box area, pixels: the level gate's size


class _OksPred(NamedTuple):
  """Per-anchor data of the keypoint geometry; every leaf ``(A, ...)``."""

  box: _XyxyPred
  keypoints: jax.Array  # (A, K, 2) predicted keypoints, pixels (0 where not finite)
  finite: jax.Array  # (A,) bool: every predicted keypoint finite (else every OKS of the anchor is 0)
  stride: jax.Array  # (A,) the anchor's stride
  finest: jax.Array  # (A,) bool: the anchor is on the finest level (the gate is open below)
  coarsest: jax.Array  # (A,) bool: the anchor is on the coarsest level (the gate is open above)


def _oks_gt_data(sigmas: tuple[float, ...], eps: float, boxes: jax.Array, valid: jax.Array, min_box_side: float, keypoints: jax.Array) -> _OksGt:
  keypoints = jnp.asarray(keypoints, jnp.float32)
  xy = keypoints[..., :2]
  visible = jnp.all(jnp.abs(xy) <= COORD_LIMIT, axis=-1) & valid[..., None]  # False for NaN and inf too
  if keypoints.shape[-1] == 3:
    vis = keypoints[..., 2]
    visible = visible & jnp.isfinite(vis) & (vis > 0)
  wh = boxes[..., 2:] - boxes[..., :2]
  area = wh[..., 0] * wh[..., 1]
  two_sigma = 2.0 * jnp.asarray(sigmas, jnp.float32)
  return _OksGt(
      box=_xyxy_gt_data("ciou", boxes, valid, min_box_side),
      keypoints=jnp.where(visible[..., None], xy, 0.0),
      visible=visible.astype(jnp.float32),
      count=jnp.sum(visible, axis=-1, dtype=jnp.float32),
      scale=jnp.maximum(two_sigma**2 * (area[..., None] * OKS_AREA_SCALE + eps) * 2.0, _TINY),
      side=jnp.sqrt(jnp.maximum(area, 0.0)),
  )


def _oks_pred_data(boxes: jax.Array, anchors: jax.Array, extra) -> _OksPred:
  keypoints, stride = extra
  keypoints = jnp.asarray(keypoints, jnp.float32)
  stride = jnp.asarray(stride, jnp.float32).reshape(anchors.shape[0])
  finite = jnp.all(jnp.isfinite(keypoints), axis=(-2, -1))
  return _OksPred(
      box=_xyxy_pred_data("ciou", boxes, anchors),
      keypoints=jnp.where(finite[..., None, None], keypoints, 0.0),
      finite=finite,
      stride=stride,
      finest=stride == jnp.min(stride),
      coarsest=stride == jnp.max(stride),
  )


def _oks_candidate(g: _OksGt, p: _OksPred, eps: float) -> jax.Array:
  return _xyxy_candidate(g.box, p.box, eps)


def _oks_gate(level_range: tuple[float, float], g: _OksGt, p: _OksPred) -> jax.Array:
  """The GT's size within ``[lo, hi]`` strides of the anchor's level; the finest level is open
  below and the coarsest above."""
  lo, hi = level_range
  return ((g.side >= lo * p.stride) | p.finest) & ((g.side <= hi * p.stride) | p.coarsest)


def _oks_overlap(g: _OksGt, p: _OksPred) -> jax.Array:
  """OKS of the visible keypoints; the box CIoU for a GT without visible keypoints."""
  # One (GT, anchor) term per keypoint, summed in a static loop over K: each term is a plain (..., A) array, which
  # XLA fuses and vectorises along the anchors (a reduction over a trailing K axis runs about 10x slower on CPU).
  total = 0.0
  for k in range(g.keypoints.shape[-2]):
    dx = p.keypoints[..., k, 0] - g.keypoints[..., k, 0]
    dy = p.keypoints[..., k, 1] - g.keypoints[..., k, 1]
    total = total + jnp.exp(-(dx * dx + dy * dy) / g.scale[..., k]) * g.visible[..., k]
  oks = jnp.where(p.finite, total / jnp.maximum(g.count, 1.0), 0.0)
  return jnp.where(g.count > 0, oks, _xyxy_overlap("ciou", g.box, p.box))


def keypoint_oks(sigmas, *, level_range=(2.0, 12.0), eps: float = 1e-9) -> Geometry:
  """Keypoints of axis-aligned GT boxes, overlap OKS, with a pyramid-level gate (YOLO26 pose's assigner).

  Ultralytics 8.4.190's ``PoseTaskAlignedAssigner`` as a geometry:

  * candidate: the anchor centre strictly inside the GT box (sides widened to ``min_box_side``), as
    :func:`axis_aligned`, **and** the level gate: the anchor's stride ``s`` has ``lo * s <= sqrt(box
    area) <= hi * s`` (``level_range = (lo, hi)``, the unwidened box, pixels), the finest level open
    below and the coarsest above. A GT the gate leaves no candidate keeps its ungated ones (the
    assigner's rule for every gate).
  * overlap: ``OKS = sum_k v_k exp(-d_k^2 / ((2 sigma_k)^2 (area + eps) 2)) / max(sum_k v_k, 1)`` of
    the predicted keypoints against the GT's visible ones (``v_k``: visibility > 0, finite, within
    ``COORD_LIMIT``), ``d_k`` in pixels, ``area`` the GT box's area times :data:`OKS_AREA_SCALE`;
    a GT with no visible keypoint keeps the box CIoU. An anchor with a non-finite predicted
    keypoint has OKS 0 with every GT (its box CIoU still counts for GTs without keypoints).

  The assigner calls it with :class:`GeometryExtra` ``gt = (b, M, K, 2 or 3)`` GT keypoints in pixels
  (``Dg = 2``: all visible) and ``pred = ((b, A, K, 2) predicted keypoints in pixels, (b, A)
  anchor strides)``.

  Args:
    sigmas: the ``K`` per-keypoint OKS sigmas.
    level_range: ``(lo, hi)``, the GT size range of a level in its strides; ``(0, inf)`` turns
      the gate off.
    eps: the area's guard (the assigner's ``eps``).

  Returns:
    A :class:`Geometry` (one value per arguments, cached) with ``box_dim = 4``.

  References:
    COCO keypoint evaluation (OKS), https://cocodataset.org/#keypoints-eval; Tian et al., 2019,
    "FCOS" (a size range per pyramid level), https://arxiv.org/abs/1904.01355.
  """
  sigmas = tuple(float(s) for s in sigmas)
  if not sigmas or not all(0 < s < float("inf") for s in sigmas):
    raise ValueError(f"keypoint_oks: sigmas must be positive finite numbers, one per keypoint, got {sigmas!r}")
  try:
    level_range = _validate.level_range(level_range)
  except ValueError as e:
    raise ValueError(f"keypoint_oks: {e}") from None
  return _keypoint_oks(sigmas, level_range, float(eps))


@functools.cache
def _keypoint_oks(sigmas: tuple[float, ...], level_range: tuple[float, float], eps: float) -> Geometry:
  return Geometry(
      name=f"xyxy/oks/K={len(sigmas)}",
      box_dim=4,
      box_ok=_xyxy_box_ok,
      on_image=_xyxy_on_image,
      gt_data=functools.partial(_oks_gt_data, sigmas, eps),
      pred_data=_oks_pred_data,
      candidate=_oks_candidate,
      overlap=_oks_overlap,
      gate=functools.partial(_oks_gate, level_range),
      bounds=_oks_bounds,
  )


def _oks_bounds(g: _OksGt) -> jax.Array:
  """The candidate rectangle of the keypoint geometry is its box's: the windowed pass reads it."""
  return xyxy_bounds(g.box)
