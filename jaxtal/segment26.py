"""YOLO26 instance segmentation: the segmentation loss with a mask-aware assignment and a semantic term.

Ultralytics 8.4.190's ``SegmentLoss26``: the YOLOv8 segmentation terms (:mod:`jaxtal.segment`,
reused as they are: ``box``, ``seg``, ``cls``, ``dfl``) plus the semantic term ``sem``
(:func:`jaxtal.segment.semantic_term`), against an assignment whose overlap also scores each
anchor's predicted mask (predictions ``Predictions(feats, mask_coefs=..., proto=...,
semantic=...)``)::

    head maps --decode--> Head --assign (box CIoU + mask IoU)--> Targets --segment terms + sem--> (total, parts)

**The assignment** is the task-aligned one (:mod:`jaxtal.assigner`) with the geometry
:func:`mask_iou` (a :class:`~jaxtal.Geometry` with a short list): the overlap of a (GT, anchor)
pair is ``(box CIoU + mask IoU) / 2``, used wherever the assigner uses an overlap (align metric,
conflict resolution, target-score normalisation). The mask IoU compares the anchor's predicted
mask, ``coefs . proto > 0`` (prototypes and coefficients detached; a non-finite logit counts as
outside) cropped to the predicted box scaled to prototype pixels by ``mh / H`` (both axes, as the
reference), with the GT's mask at the prototypes' resolution (resized nearest, PyTorch's rule:
:func:`jaxtal.segment.resize_nearest`; an index map's pixel ``j + 1`` marks slot ``j``, a per-slot
pixel is inside when its value is in ``(0.5, 1]``): ``inter / max(union, 1)`` in pixels. It is
computed only for each GT's ``L = min(3 * topk, A)`` best candidates by the box metric
``score^alpha * CIoU^beta + eps``; every other pair's mask IoU is 0 (overlap ``CIoU / 2``).

**Memory and cost**: predicted masks exist only for the listed pairs (never ``(b, M, A, mh,
mw)``, nor ``(b, M, L, mh, mw)``): the candidate pairs of each image are decoded a chunk at a
time in loops that end after the last chunk holding a candidate of any image, so padding GT slots
cost nothing (``checked_segment26_loss`` decodes every chunk of the whole-plane form, ``iou_chunk``
pairs each: ``checkify`` cannot transform a batched ``while_loop``). Each pair is
decoded on its own (``nm`` multiply-adds per prototype pixel), also where two GTs list the same
anchor (about 90% of the listed anchors are distinct), and only over the ``32 x 32`` tiles of the
plane its predicted box touches (:func:`jaxtal.kernels.pair_mask_counts`; the pairs touching a
tile are listed and decoded together against the tile's prototypes). Its two counts, intersection
and predicted area inside its predicted box, come from one integer pass over its logits; each GT's
area is counted once. b = 16, M = 50, 160 x 160 x 32 prototypes, 640 px input, XLA:CPU (2-core VM,
idle): the assignment takes 0.14 s (0.86 s with the counts as separate masked sums over the plane,
0.8 s over windows of each pair's own box, gathered per pair, which this replaced).

**Semantic term** (``Predictions.semantic``, YOLO26's ``Proto26`` semantic logits, optional:
without them ``sem = 0``, as the reference without a semantic head): ``box_gain * (0.5 * BCE +
0.5 * Dice)`` against the one-hot class map of the instances (:func:`jaxtal.segment.class_map`:
``gt.class_map`` when given, else derived from the masks as Ultralytics' data pipeline does), 0
unless some anchor is foreground. :func:`~jaxtal.segment_loss` adds the same term when given
semantic logits (YOLOE-26).

**End-to-end**: YOLO26 trains ``end_to_end_loss(segment26_loss, one2many, one2one, gt,
weight=...)`` (one-to-many ``topk = 10``, one-to-one ``topk = 7, topk2 = 1``). The reference's
model hands the one-to-one head detached features and a detached copy of the prototypes and
semantic logits: that is the model's job in jaxtal (``jax.lax.stop_gradient`` on what the
one-to-one branch reads), not the loss's.

Everything matches Ultralytics 8.4.190 (``SegmentLoss26``, ``SegTaskAlignedAssigner``,
``BCEDiceLoss``; ``E2ELoss`` around it) to float32 rounding except the deliberate differences
listed, once for every task, in docs/deviations.md (the short list's and the top-k's ties, the
segmentation rules).

References:
  Bolya et al., 2019, "YOLACT" (prototypes and coefficients), https://arxiv.org/abs/1904.02689;
  Feng et al., 2021, "TOOD" (assignment), https://arxiv.org/abs/2108.07755.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import _validate
from jaxtal import kernels
from jaxtal import task
from jaxtal import terms
from jaxtal.geometry import Geometry, GeometryExtra, axis_aligned
from jaxtal.head import Head, Predictions
from jaxtal.labels import GroundTruth
from jaxtal.module import TaskLossModule
from jaxtal.segment import (
    SEGMENT_SEMANTIC,
    SegmentLossConfig,
    SemanticSegmentLossParts,
    resize_nearest,
    task_of,
)
from jaxtal.targets import Targets

# Automatic chunking of the assignment's predicted masks: at most this many mask pixels per image per chunk.
IOU_CHUNK_PIXELS = 1 << 20
# Each GT's short list holds SHORTLIST * topk pairs (the reference's 3 * topk).
SHORTLIST = 3

Segment26LossParts = SemanticSegmentLossParts


@dataclasses.dataclass(frozen=True, kw_only=True)
class Segment26LossConfig(SegmentLossConfig):
  """Settings of the YOLO26 segmentation loss: :class:`~jaxtal.SegmentLossConfig` plus the assignment's chunking.

  Attributes:
    iou_chunk: candidate pairs per image whose predicted masks the whole-plane form of the
      assignment decodes together (the checked loss, or ``plain_kernels=("pair_mask_counts",)``;
      the default tiled form decodes ``jaxtal.kernels.yolo26.MASK_TILE_CHUNK`` pairs of a tile at a
      time). ``None`` picks as many as keep one chunk's masks under ``2^20`` pixels per image (one
      pair at least, at most the whole short list). Smaller uses less memory and more sequential
      steps; the result does not depend on it.
  """

  iou_chunk: int | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.iou_chunk is not None:
      object.__setattr__(self, "iou_chunk", _validate.whole("iou_chunk", self.iou_chunk, low=1))


# ------------------------------------------------------------------------------------------------
# The mask-IoU geometry.


class MaskImage(NamedTuple):
  """The mask-IoU geometry's per-image data (``GeometryExtra.image``); every leaf leads with ``b``.

  Attributes:
    proto: ``(b, nm, mh, mw)`` float32 prototypes (detached).
    masks: the GT masks at the prototypes' resolution: an index map ``(b, mh, mw)`` int32 (pixel
      ``j + 1`` marks slot ``j``) or per-slot masks ``(b, M, mh, mw)`` bool.
    scale: ``(b,)`` float32 prototype pixels per input pixel, ``mh / H``.
  """

  proto: jax.Array
  masks: jax.Array
  scale: jax.Array


class _MaskGt(NamedTuple):
  """Per-GT data: the box geometry's, and the weight of the box overlap (every leaf ``(M, ...)``)."""

  box: Any  # the axis-aligned geometry's per-GT data
  weight: jax.Array  # (M,) 1 for ranking the short list, 1/2 once refined: (box + mask IoU) / 2


class _MaskPred(NamedTuple):
  """Per-anchor data: the box geometry's, and the mask coefficients (every leaf ``(A, ...)``)."""

  box: Any  # the axis-aligned geometry's per-anchor data
  coef: jax.Array  # (A, nm) float32


def _gt_areas(masks: jax.Array, m: int) -> jax.Array:
  """``(M,)`` int32 pixel count of each GT slot's mask (an index map ``(h, w)`` or per-slot masks ``(M, h, w)``)."""
  if masks.ndim == 2:
    slot = masks.reshape(-1) - 1
    return jnp.zeros((m,), jnp.int32).at[jnp.where((slot >= 0) & (slot < m), slot, m)].add(1, mode="drop")
  return jnp.sum(masks, axis=(1, 2), dtype=jnp.int32)


def _listed_iou(coef, box, candidate, image: MaskImage, chunk: int | None, early_exit: bool = True, plain_kernels=()) -> jax.Array:
  """``(M, L)`` mask IoU of one image's listed pairs (0 off candidates): the pixel counts of
  :func:`jaxtal.kernels.pair_mask_counts` (the tiles each predicted box touches; ``plain_kernels=
  ("pair_mask_counts",)``: every pair over the whole plane, ``chunk`` pairs at a time), each GT's area
  once. ``early_exit=False`` runs no loop of traced length (what ``checkify`` can transform)."""
  m, size = candidate.shape
  n = m * size
  nm, mh, mw = image.proto.shape
  k = min(n, max(1, IOU_CHUNK_PIXELS // (mh * mw)) if chunk is None else int(chunk))
  owner = jnp.repeat(jnp.arange(m, dtype=jnp.int32), size)
  ok = candidate.reshape(n)
  counts = kernels.select("pair_mask_counts", plain_kernels)
  inter, pred = counts(coef.reshape(n, nm), box.reshape(n, 4) * image.scale, owner, ok, image.proto, image.masks, k, early_exit)
  union = _gt_areas(image.masks, m)[owner] + pred - inter
  iou = inter.astype(jnp.float32) / jnp.maximum(union, 1).astype(jnp.float32)
  return jnp.where(ok, iou, 0.0).reshape(m, size)


def _gt_data(box: Geometry, boxes, valid, min_box_side, extra=None) -> _MaskGt:
  return _MaskGt(box.gt_data(boxes, valid, min_box_side), jnp.ones(boxes.shape[:-1], jnp.float32))


def _pred_data(box: Geometry, boxes, anchors, extra=None) -> _MaskPred:
  if extra is None:
    raise ValueError(
        "the mask-IoU geometry needs the mask coefficients as GeometryExtra.pred (b, A, nm); use it through"
        " jaxtal.segment26_loss, or pass extra=GeometryExtra(pred=coefs, image=MaskImage(...))"
    )
  return _MaskPred(box.pred_data(boxes, anchors), extra)


def _candidate(box: Geometry, g: _MaskGt, p: _MaskPred, eps: float) -> jax.Array:
  return box.candidate(g.box, p.box, eps)


def _bounds(box: Geometry, g: _MaskGt) -> jax.Array:
  return box.bounds(g.box)  # the box geometry's candidates: its bounds (the assigner's windows, jaxtal.windows)


def _overlap(box: Geometry, g: _MaskGt, p: _MaskPred) -> jax.Array:
  """The box overlap (clamped at 0) times the GT's weight: all of the overlap before refinement, half after."""
  return g.weight * jnp.maximum(box.overlap(g.box, p.box), 0.0)


def _refine(box: Geometry, chunk: int | None, early_exit: bool, plain_kernels, g: _MaskGt, p: _MaskPred, listed, candidate, image: MaskImage):
  """``(g', (M, L) overlaps)``: ``(box + mask IoU) / 2`` of the listed pairs; the rest then weigh ``1/2`` of the box's."""
  del listed  # the pairs' own data is in p (leaves (M, L, ...))
  iou = jnp.maximum(box.overlap(jax.tree.map(lambda x: x[:, None], g.box), p.box), 0.0)
  miou = _listed_iou(p.coef, p.box.box, candidate, image, chunk, early_exit, plain_kernels)
  return g._replace(weight=jnp.full_like(g.weight, 0.5)), (iou + miou) / 2


def mask_iou(overlap: str = "ciou", iou_chunk: int | None = None, *, early_exit: bool = True, plain_kernels=()) -> Geometry:
  """Axis-aligned boxes whose overlap also scores the predicted mask (YOLO26 segmentation's assigner).

  Candidates: the box geometry's (:func:`~jaxtal.axis_aligned`, anchor centre inside the GT box).
  Overlap ``(box overlap + mask IoU) / 2`` on each GT's ``L = min(3 * topk, A)`` best candidates by
  ``score^alpha * box overlap^beta + eps`` (the seam's short list), ``box overlap / 2`` elsewhere;
  the mask IoU as the module docstring says. Extras (:class:`~jaxtal.GeometryExtra`): ``pred`` the
  ``(b, A, nm)`` mask coefficients, ``image`` a :class:`MaskImage`. ``early_exit=False`` decodes
  every chunk of the short lists, padding slots' included, with no ``while_loop`` (what ``checkify``
  can transform: :func:`checked_segment26_loss` uses it); the result is the same. ``plain_kernels``:
  a config's; ``"pair_mask_counts"`` decodes every listed pair over the whole plane
  (:func:`jaxtal.kernels.plain_pair_mask_counts`) instead of the tiles its predicted box touches,
  the same counts. One value per arguments (cached).
  """
  if iou_chunk is not None:
    iou_chunk = _validate.whole("iou_chunk", iou_chunk, low=1)
  plain = "pair_mask_counts" in kernels.check_names(plain_kernels, "mask_iou: plain_kernels")
  return _mask_iou(overlap, iou_chunk, bool(early_exit), ("pair_mask_counts",) if plain else ())


@functools.cache
def _mask_iou(overlap: str, iou_chunk: int | None, early_exit: bool, plain_kernels: tuple[str, ...] = ()) -> Geometry:
  box = axis_aligned(overlap)
  return Geometry(
      name=f"{box.name}+mask-iou",
      box_dim=4,
      box_ok=box.box_ok,
      on_image=box.on_image,
      gt_data=functools.partial(_gt_data, box),
      pred_data=functools.partial(_pred_data, box),
      candidate=functools.partial(_candidate, box),
      overlap=functools.partial(_overlap, box),
      shortlist=SHORTLIST,
      refine=functools.partial(_refine, box, iou_chunk, early_exit, plain_kernels),
      bounds=functools.partial(_bounds, box),
  )


MASK_IOU = terms.AXIS_ALIGNED._replace(
    name="xyxy+mask", geometry=lambda cfg: mask_iou(cfg.overlap, cfg.iou_chunk, plain_kernels=cfg.plain_kernels))
# The checked loss's: the same assignment without a batched while_loop, which checkify cannot transform.
MASK_IOU_CHECKED = MASK_IOU._replace(geometry=lambda cfg: mask_iou(cfg.overlap, cfg.iou_chunk, early_exit=False))


def _gt_masks_at(gt: GroundTruth, index_map: bool, hw) -> jax.Array:
  """The GT masks at the prototypes' resolution ``hw`` as the geometry reads them (nearest resize)."""
  masks = jnp.asarray(gt.masks)
  if index_map:
    return resize_nearest(masks.astype(jnp.int32), hw)
  inside = masks if masks.dtype == bool else (masks > 0.5) & (masks <= 1)
  return resize_nearest(inside, hw)


# The widest prototype plane whose packed row counts fit int32 (_pairs_iou).
MAX_PROTO_WIDTH = 32767


def _assign_extra(inputs: task.Inputs, cfg: Segment26LossConfig) -> GeometryExtra:
  proto = jax.lax.stop_gradient(inputs.side.proto)
  mh, mw = proto.shape[2:]
  if mw > MAX_PROTO_WIDTH:
    raise ValueError(f"segment26: prototype planes of at most {MAX_PROTO_WIDTH} pixels a row are supported, got width {mw}")
  masks = jax.lax.stop_gradient(_gt_masks_at(inputs.gt, inputs.gt_info.index_map, (mh, mw)))
  scale = jnp.full((inputs.batch,), mh / inputs.image_hw[0], jnp.float32)
  return GeometryExtra(pred=jax.lax.stop_gradient(inputs.side.coefs), image=MaskImage(proto, masks, scale))


SEGMENT26 = SEGMENT_SEMANTIC._replace(
    name="segment26", config_class=Segment26LossConfig, form=MASK_IOU, assign_extra=_assign_extra
)
# Without semantic logits: the same task, sem = 0.
SEGMENT26_PLAIN = SEGMENT26._replace(needs=("mask_coefs", "proto"))
CHECKED = {t: t._replace(form=MASK_IOU_CHECKED) for t in (SEGMENT26, SEGMENT26_PLAIN)}


def segment26_targets(preds: Predictions, gt: GroundTruth, config: Segment26LossConfig | None = None, **overrides) -> tuple[Head, Targets]:
  """The YOLO26 segmentation loss's first half: decoded predictions and the mask-aware assignment.
  Arguments as :func:`segment26_loss` (without ``class_weights``).

  Returns:
    ``(Head, Targets)``, as :func:`~jaxtal.detection_targets`.
  """
  return task.targets(task_of(preds, SEGMENT26_PLAIN, SEGMENT26), preds, gt, config, overrides, "segment26_targets")


def segment26_loss_from_targets(
    preds: Predictions,
    targets: Targets,
    gt: GroundTruth,
    config: Segment26LossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, Segment26LossParts]:
  """The YOLO26 segmentation loss against given targets (e.g. from :func:`segment26_targets`), treated as
  constants. Arguments as :func:`segment26_loss`, with the targets second; ``gt`` is required."""
  return task.loss_from_targets(
      task_of(preds, SEGMENT26_PLAIN, SEGMENT26), preds, targets, gt, config, class_weights, overrides, "segment26_loss_from_targets"
  )


def segment26_loss(
    preds: Predictions,
    gt: GroundTruth,
    config: Segment26LossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, Segment26LossParts]:
  """YOLO26 segmentation loss (Ultralytics' ``SegmentLoss26``) of raw head maps, mask coefficients,
  prototypes and semantic logits against ground truth.

  ``box``, ``seg``, ``cls``, ``dfl`` are :func:`~jaxtal.segment_loss`'s terms against the mask-aware
  assignment (module docstring); ``sem`` the semantic term (:func:`jaxtal.segment.semantic_term`).

  Args:
    preds: ``Predictions(feats, mask_coefs=..., proto=..., semantic=...)``: ``feats``, ``mask_coefs``
      and ``proto`` as :func:`~jaxtal.segment_loss` takes them; ``semantic`` (optional) the semantic
      logits ``(b, h, w, nc)`` (NHWC) or ``(b, nc, h, w)`` (NCHW), any ``(h, w)``.
    gt: :class:`~jaxtal.GroundTruth` with xyxy boxes in input pixels and ``masks`` (an index map or
      per-slot masks, any resolution, as for :func:`~jaxtal.segment_loss`); optionally ``class_map``,
      the semantic target (else derived from ``masks``).
    config: a :class:`Segment26LossConfig`; or its fields as keyword ``overrides``.
    class_weights: optional ``(nc,)`` weights of the BCE per class.

  Returns:
    ``(total, Segment26LossParts(box, seg, cls, dfl, sem))`` with gain-scaled parts and ``total =
    (box + seg + cls + dfl + sem) * batch_size``, Ultralytics' convention.
  """
  return task.loss(task_of(preds, SEGMENT26_PLAIN, SEGMENT26), preds, gt, config, class_weights, overrides, "segment26_loss")


def checked_segment26_loss(
    preds: Predictions, gt: GroundTruth, config: Segment26LossConfig | None = None, *, class_weights=None, **overrides
) -> tuple[jax.Array, Segment26LossParts]:
  """:func:`segment26_loss` that raises (through ``checkify``) on invalid values, the checks of
  :func:`~jaxtal.checked_segment_loss`. Use under ``checkify.checkify``; identical to
  :func:`segment26_loss` when no check fails (its assignment decodes every chunk of the short lists,
  padding slots' too: ``checkify`` cannot transform the early-exit loop)."""
  return task.loss(
      task_of(preds, CHECKED[SEGMENT26_PLAIN], CHECKED[SEGMENT26]), preds, gt, config, class_weights, overrides, "checked_segment26_loss", checked=True
  )


for _fn in (segment26_loss, checked_segment26_loss):
  _fn.config_class = Segment26LossConfig  # read by TaskLossModule and EndToEndLoss


class Segment26Loss(TaskLossModule):
  """The YOLO26 segmentation loss (:func:`segment26_loss`) as an NNX module holding a :class:`Segment26LossConfig`.

  Example::

    loss_fn = jaxtal.Segment26Loss(num_classes=80, strides=(8, 16, 32), reg_max=1)
    preds = jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto, semantic=semantic)
    total, parts = loss_fn(preds, gt)

  No trainable state; class weights are held as a constant.
  """

  loss_fn = staticmethod(segment26_loss)
