"""Instance segmentation: the YOLOv8 segmentation loss (box, mask, class and DFL terms).

The detection task (:mod:`jaxtal.detect`) with one more term read at the foreground entry list
(predictions ``Predictions(feats, mask_coefs=..., proto=...)``)::

    head maps --decode--> Head --assign--> Targets --detection parts + mask term at the entries--> (total, parts)

The head predicts, per anchor, ``nm`` mask coefficients, and, per image, ``nm`` prototype masks
``(mh, mw)``; an anchor's mask logits are ``coefs . proto`` (YOLACT). ``box``, ``cls`` and
``dfl`` are exactly the detection parts (same assignment, same normaliser). The mask term
(gain ``box``, as Ultralytics) is, with ``F`` the number of foreground anchors of the batch:

* for each foreground anchor (whatever its target score), the per-pixel BCE-with-logits of its
  mask logits against its GT's mask, zeroed outside the GT box scaled to mask pixels (pixel
  column ``x`` counts when ``x1 <= x < x2`` in mask pixels, pixel row ``y`` likewise: the
  pixel's index, not its centre, is compared with the box), averaged over **all** ``mh * mw``
  pixels, divided by the box's area as a fraction of the image;
* summed over the foreground anchors of the batch and divided by ``max(F, 1)``.

With semantic logits (``Predictions.semantic``, the prototype branch of YOLO26 / YOLOE-26) the loss adds a
fifth part, ``sem`` (:func:`semantic_term`: BCE + Dice against the instances' class map, :func:`class_map`),
and returns :class:`SemanticSegmentLossParts`; without them it returns :class:`SegmentLossParts` (the task
values ``SEGMENT_SEMANTIC`` and ``SEGMENT``, picked by :func:`task_of`). YOLO26's own loss with its
mask-aware assignment is :mod:`jaxtal.segment26`, which reuses these terms.

When the GT masks have another resolution than the prototypes, the prototypes are resized to
the masks' resolution (either direction) bilinearly with half-pixel centres and no
antialiasing (PyTorch's ``interpolate(mode="bilinear", align_corners=False)``, what the
reference does); the masks are never resampled.

Work: only pixels inside the GT boxes count, so on planes of at least ``2 * WINDOW`` pixels a
side (``mask_window`` in :class:`SegmentLossConfig`) the mask logits, the BCE and both gradients
are computed over box windows only (:func:`jaxtal.kernels.mask_windows`): the foreground entries
of one GT share ``WINDOW x WINDOW`` windows that tile its box, visited a chunk of windows at a
time; where the windows would cost more than the whole plane (boxes filling the image), the same
compiled step computes the whole plane instead. Both give the same loss to float32 rounding.

Memory: the mask logits exist only for the ``E = M * topk`` entries of each image, never for
all ``A`` anchors, and are computed a chunk of entries (or windows) at a time (``mask_chunk`` in
:class:`SegmentLossConfig`): a loop over chunks that forms the value and, in the same pass, the
gradients w.r.t. the coefficients and the prototypes (:func:`jaxtal.kernels.mask_bce_sum` over
the whole plane; its plain twin is autodiff over chunks under ``jax.checkpoint``). Peak memory is
then about a few ``(b, chunk, mh, mw)`` float32 arrays whatever ``E`` (``b = 16``, ``M = 100``, a
640 input, 160 x 160 prototypes, ``nm = 32``: under 0.8 GB for the gradient by XLA's memory
analysis, 4.99 GB with all entries in one chunk). The crop is separable (a row mask times a
column mask), never an ``(E, mh, mw)`` box mask.

Everything matches Ultralytics 8.4.190 (``v8SegmentationLoss``) to float32 rounding except the
deliberate differences listed, once for every task, in docs/deviations.md (zero-area boxes,
mask pixels that are not a value in [0, 1], the assignment's top-k ties and conflict resolution).

The einsum producing the mask logits runs at JAX's default matmul precision, which on GPU and
TPU may round float32 inputs (set ``jax_default_matmul_precision`` for full float32).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtal import _validate
from jaxtal import kernels
from jaxtal import task
from jaxtal import terms
from jaxtal.config import LossConfig
from jaxtal.head import Head, Predictions
from jaxtal.labels import GroundTruth
from jaxtal.module import TaskLossModule
from jaxtal.targets import Targets, take_rows

# Automatic chunking: one chunk's (b, chunk, mh, mw) float32 mask logits take at most CHUNK_BYTES, and a
# chunk holds at most CHUNK_ENTRIES entries (finer chunks waste less work past the last foreground entry;
# b = 2, M = 100, 160 x 160 prototypes, XLA:CPU, loss step: 0.117 s at 32 entries, 0.098 s at 64, 0.110 s
# at 128, 0.268 s at 327, the memory bound alone).
CHUNK_BYTES = 64 << 20
CHUNK_ENTRIES = 64
# Automatic windows: the mask term tiles each GT box with WINDOW x WINDOW pixel windows when the mask plane
# is at least 2 * WINDOW on each side (on smaller planes a window would be most of the plane). b = 16,
# M = 50, 160 x 160 masks, XLA:CPU, CPU time of the loss step: 297-308 ms at 16, 305-313 ms at 8 and 12,
# 337 ms at 24, 359-363 ms at 32, 878-1123 ms over the whole plane (a loaded 2-core VM; CPU time, the wall
# time being too noisy there). 16 keeps the window list shorter than 8 or 12 for the same work.
WINDOW = 16
# A GT box covering less of the image than this contributes no mask term (the term divides by it).
MIN_AREA = 1e-20


@dataclasses.dataclass(frozen=True, kw_only=True)
class SegmentLossConfig(LossConfig):
  """Settings of the segmentation loss: :class:`~jaxtal.LossConfig` plus the mask term's chunking.

  Attributes:
    mask_chunk: entries (per image, for all images at once) whose mask logits are computed
      together. ``None`` picks at most 64 entries, fewer if one chunk's ``(b, chunk, mh, mw)``
      float32 logits would take more than 64 MiB (the whole entry list is one chunk when it is
      shorter), which bounds the mask term's memory whatever ``M``; a smaller chunk uses less
      memory and more sequential steps. Over box windows, a chunk of windows takes about as many
      bytes. The loss does not depend on it (to float32 rounding).
    mask_window: side in mask pixels of the windows that tile each GT box for the mask term
      (clipped to the plane). ``None`` uses ``WINDOW = 16`` on planes of at least 32 pixels a side
      and the whole plane on smaller ones. The loss does not depend on it (to float32 rounding);
      ``plain_kernels=("mask_windows",)`` turns the windows off.

  The mask term's gain is ``box`` (Ultralytics uses the box gain for it).
  """

  mask_chunk: int | None = None
  mask_window: int | None = None

  def __post_init__(self):
    super().__post_init__()
    for name in ("mask_chunk", "mask_window"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, _validate.whole(name, getattr(self, name), low=1))


class SegmentLossParts(NamedTuple):
  """Gain-scaled segmentation loss terms (scalars).

  Attributes:
    box: ``box_gain * CIoU loss``.
    seg: ``box_gain * mask loss``.
    cls: ``cls_gain * BCE loss``.
    dfl: ``dfl_gain * DFL loss`` (the L1 distance loss when ``reg_max == 1``).
  """

  box: jax.Array
  seg: jax.Array
  cls: jax.Array
  dfl: jax.Array


class SemanticSegmentLossParts(NamedTuple):
  """Gain-scaled terms (scalars) of a segmentation loss whose model also predicts semantic logits
  (``Predictions.semantic``: YOLO26's and YOLOE-26's prototype branch): :class:`SegmentLossParts`
  plus ``sem``, in Ultralytics' order (``box_loss, seg_loss, cls_loss, dfl_loss, sem_loss``).
  :func:`segment_loss` returns it when ``preds.semantic`` is given, :func:`~jaxtal.segment26_loss`
  always (``Segment26LossParts`` is this class).

  Attributes:
    box: ``box_gain * CIoU loss``.
    seg: ``box_gain * mask loss``.
    cls: ``cls_gain * BCE loss``.
    dfl: ``dfl_gain * DFL loss`` (the L1 distance loss when ``reg_max == 1``).
    sem: ``box_gain * (0.5 * BCE + 0.5 * Dice)`` of the semantic logits (:func:`semantic_term`);
      0 without semantic logits or without a foreground anchor.
  """

  box: jax.Array
  seg: jax.Array
  cls: jax.Array
  dfl: jax.Array
  sem: jax.Array


def _prototypes(proto, batch: int, layout: str, caller: str) -> tuple[jax.Array, int]:
  """``proto`` validated and as ``(b, nm, mh, mw)`` float32; returns it and ``nm``."""
  _validate.float_array(caller, "proto", proto, 4)
  b, nm = (proto.shape[0], proto.shape[3]) if layout == "NHWC" else proto.shape[:2]
  if b != batch:
    raise ValueError(f"{caller}: proto has batch size {b} (shape {tuple(proto.shape)}) but feats have {batch}")
  if nm < 1:
    want = "(b, mh, mw, nm)" if layout == "NHWC" else "(b, nm, mh, mw)"
    raise ValueError(
        f"{caller}: proto must be {want} ({layout}) with nm >= 1 prototype masks, got shape {tuple(proto.shape)}"
    )
  if layout == "NHWC":
    proto = jnp.transpose(proto, (0, 3, 1, 2))
  return proto.astype(jnp.float32), int(nm)


def resize_prototypes(proto: jax.Array, mask_hw) -> jax.Array:
  """``(b, nm, mh, mw)`` -> ``(b, nm, mh', mw')``: bilinear, half-pixel centres, edges clamped, no
  antialiasing (PyTorch's ``interpolate(mode="bilinear", align_corners=False)``); unchanged at ``(mh, mw)``."""
  if tuple(proto.shape[2:]) == tuple(mask_hw):
    return proto
  return jax.image.resize(proto, proto.shape[:2] + tuple(mask_hw), method="linear", antialias=False)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """``(size_out,)`` source index of each output index of a nearest-neighbour resize, PyTorch's
  ``interpolate(mode="nearest")`` rule (static): ``min(floor(i * (size_in / size_out)), size_in - 1)``
  in float32, the identity at equal sizes and ``i // 2`` when doubling."""
  if size_out == size_in:
    return np.arange(size_out)
  if size_out == 2 * size_in:
    return np.arange(size_out) // 2
  scale = np.float32(size_in) / np.float32(size_out)
  return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


def resize_nearest(x: jax.Array, hw) -> jax.Array:
  """``(..., h, w)`` -> ``(..., h', w')``: nearest neighbour, PyTorch's ``interpolate(mode="nearest")``
  (:func:`nearest_indices`, what the reference does to GT masks and semantic targets); any dtype."""
  h, w = x.shape[-2:]
  if (h, w) == tuple(hw):
    return x
  x = jnp.take(x, jnp.asarray(nearest_indices(h, hw[0]), jnp.int32), axis=-2)
  return jnp.take(x, jnp.asarray(nearest_indices(w, hw[1]), jnp.int32), axis=-1)


def semantic_logits(semantic, batch: int, num_classes: int, layout: str, caller: str) -> jax.Array:
  """``preds.semantic`` validated and as ``(b, nc, h, w)`` float32."""
  _validate.float_array(caller, "semantic", semantic, 4)
  b, c = (semantic.shape[0], semantic.shape[3]) if layout == "NHWC" else semantic.shape[:2]
  want = "(b, h, w, nc)" if layout == "NHWC" else "(b, nc, h, w)"
  if b != batch or c != num_classes:
    raise ValueError(
        f"{caller}: semantic must be {want} ({layout}) = ({batch}, ..., nc = {num_classes}) semantic logits, one"
        f" channel per class; got shape {tuple(semantic.shape)}"
    )
  if layout == "NHWC":
    semantic = jnp.transpose(semantic, (0, 3, 1, 2))
  return semantic.astype(jnp.float32)


def class_map(gt: GroundTruth, index_map: bool, num_classes: int) -> jax.Array:
  """``(b, h, w)`` int32: the class of each pixel, -1 where no instance covers it: the semantic term's target.

  ``gt.class_map`` when given (values outside ``[0, nc)`` count as uncovered). Otherwise derived
  from ``gt.masks`` at their resolution, as Ultralytics' data pipeline builds ``sem_masks``: an index
  map gives each pixel the class of the slot it names; per-slot masks the class of the **smallest
  covering** instance (area: its number of covering pixels; the lower slot on ties). Only real rows
  (``gt.mask``) with a class in ``[0, nc)`` cover pixels; a per-slot pixel covers when its value is in
  ``(0, 1]`` (bool: True), so NaN, inf and out-of-range values never do.
  """
  labels = jnp.asarray(gt.labels, jnp.int32)
  counted = jnp.asarray(gt.mask).astype(bool) & (labels >= 0) & (labels < num_classes)
  if gt.class_map is not None:
    cmap = jnp.asarray(gt.class_map).astype(jnp.int32)
    return jnp.where((cmap >= 0) & (cmap < num_classes), cmap, -1)
  masks = jnp.asarray(gt.masks)
  m = labels.shape[1]
  take = jax.vmap(lambda row, idx: row[idx])
  if index_map:
    slot = masks.astype(jnp.int32) - 1
    safe = jnp.clip(slot, 0, max(m - 1, 0))
    b = masks.shape[0]
    flat = safe.reshape(b, -1)
    covered = (slot >= 0) & (slot < m) & take(counted, flat).reshape(slot.shape)
    return jnp.where(covered, take(labels, flat).reshape(slot.shape), -1)
  values = masks if masks.dtype == bool else masks.astype(jnp.float32)
  cover = values if masks.dtype == bool else (values > 0) & (values <= 1)
  cover = cover & counted[:, :, None, None]
  area = jnp.sum(cover, axis=(2, 3), dtype=jnp.int32)  # (b, M)
  key = jnp.where(cover, area[:, :, None, None], jnp.iinfo(jnp.int32).max)
  smallest = jnp.argmin(key, axis=1)  # the first slot on ties
  owner_class = jnp.take_along_axis(labels[:, :, None, None], smallest[:, None], axis=1)[:, 0]
  return jnp.where(jnp.any(cover, axis=1), owner_class, -1)


def semantic_term(logits: jax.Array, cmap: jax.Array, targets: Targets, axis_name: str | None) -> jax.Array:
  """The semantic term before its gain: ``0.5 * BCE + 0.5 * Dice`` of ``(b, nc, h, w)`` logits
  against the one-hot of ``cmap`` (``(b, h', w')`` classes, -1 uncovered: an all-zero target),
  resized nearest to ``(h, w)`` (:func:`resize_nearest`) when the sizes differ.

  BCE-with-logits is the mean over all ``b * nc * h * w`` values; Dice the mean over images and
  classes of ``1 - (2 * sum(sigmoid(x) * t) + 1) / (sum(sigmoid(x)) + sum(t) + 1)`` (smooth 1).
  Both are means over the global batch under ``axis_name``. 0 unless some anchor of the (global)
  batch is foreground (Ultralytics' ``BCEDiceLoss`` inside ``v8SegmentationLoss``).
  """
  b, nc, h, w = logits.shape
  cmap = jax.lax.stop_gradient(resize_nearest(cmap, (h, w)))
  target = (cmap[:, None] == jnp.arange(nc, dtype=cmap.dtype)[None, :, None, None]).astype(jnp.float32)
  e = jnp.exp(-jnp.abs(logits))  # one exp for the softplus and the sigmoid
  bce = jnp.sum(jnp.maximum(logits, 0.0) + jnp.log1p(e) - logits * target)
  p = jnp.where(logits >= 0, 1.0, e) / (1.0 + e)
  dice = 1.0 - (2.0 * jnp.sum(p * target, axis=(2, 3)) + 1.0) / (jnp.sum(p, axis=(2, 3)) + jnp.sum(target, axis=(2, 3)) + 1.0)
  images = jnp.float32(b)
  fg = jnp.sum(targets.entries.valid, dtype=jnp.float32)
  if axis_name is not None:
    images, fg = jax.lax.psum(images, axis_name), jax.lax.psum(fg, axis_name)
  term = 0.5 * bce / (images * nc * h * w) + 0.5 * jnp.sum(dice) / (images * nc)
  return jnp.where(fg > 0, term, 0.0)


def entry_boxes(targets: Targets, image_hw, mask_hw) -> tuple[jax.Array, jax.Array]:
  """Each entry's GT box in mask pixels ``(b, E, 4)`` and its weight ``(b, E)``: ``1 / (mh mw area)``
  with ``area`` the box's fraction of the image, 0 on invalid entries and boxes under ``MIN_AREA``."""
  h, w = image_hw
  mh, mw = mask_hw
  e = targets.entries
  norm = take_rows(targets.boxes, e.anchor) / jnp.array([w, h, w, h], jnp.float32)
  area = (norm[..., 2] - norm[..., 0]) * (norm[..., 3] - norm[..., 1])
  counted = e.valid & (area >= MIN_AREA)
  weight = jnp.where(counted, 1.0 / (mh * mw * jnp.where(counted, area, 1.0)), 0.0)
  return norm * jnp.array([mw, mh, mw, mh], jnp.float32), weight


def chunk_size(mask_chunk: int | None, batch: int, entries: int, pixels: int) -> int:
  if mask_chunk is None:
    mask_chunk = min(CHUNK_ENTRIES, CHUNK_BYTES // (4 * batch * pixels))
  return max(1, min(int(mask_chunk), entries))


def window_tile(mask_window: int | None, mask_hw) -> tuple[int, int] | None:
  """The mask term's window ``(th, tw)``, or None for the full-plane form: ``mask_window`` (clipped to
  the plane) when given, else ``WINDOW`` on planes at least ``2 * WINDOW`` on each side."""
  if mask_window is None:
    return (WINDOW, WINDOW) if min(mask_hw) >= 2 * WINDOW else None
  return (min(mask_window, mask_hw[0]), min(mask_window, mask_hw[1]))


def mask_sum(
    coefs, proto, masks, targets: Targets, image_hw, mask_chunk: int | None, index_map: bool, plain: tuple[str, ...] = (),
    mask_window: int | None = None,
) -> jax.Array:
  """Sum over the foreground entries of the per-anchor mask loss (not yet divided by their number).

  ``coefs (b, A, nm)``, ``proto (b, nm, mh, mw)`` at the masks' resolution, ``masks`` as
  :func:`jaxtal.kernels.mask_bce_sum`. Over box windows (:func:`jaxtal.kernels.mask_windows`, the
  entries of one GT slot sharing theirs) when :func:`window_tile` gives a window and neither
  ``mask_windows`` nor ``mask_bce_sum`` is in ``plain``; else over the whole plane.
  """
  b, _, mh, mw = proto.shape
  e = targets.entries
  size = e.anchor.shape[1]
  if size == 0:
    return jnp.zeros((), jnp.float32)
  box, weight = jax.lax.stop_gradient(entry_boxes(targets, image_hw, (mh, mw)))
  coef = take_rows(coefs, e.anchor)  # (b, E, nm)
  chunk = chunk_size(mask_chunk, b, size, mh * mw)
  tile = window_tile(mask_window, (mh, mw))
  if tile is not None and "mask_bce_sum" not in plain:
    group = max(1, size // targets.positives_per_gt.shape[1])  # topk: the most entries a GT slot usually owns
    return kernels.select("mask_windows", plain)(coef, proto, masks, e.gt, box, weight, chunk, index_map, tile, group, True)
  return kernels.select("mask_bce_sum", plain)(coef, proto, masks, e.gt, box, weight, chunk, index_map)


def _gt_masks(gt: GroundTruth, index_map: bool) -> jax.Array:
  masks = jax.lax.stop_gradient(jnp.asarray(gt.masks))
  if index_map:
    return masks.astype(jnp.int32)
  return masks if masks.dtype == bool else masks.astype(jnp.float32)


class _Side(NamedTuple):
  coefs: jax.Array  # (b, A, nm) anchor rows
  proto: jax.Array  # (b, nm, mh, mw) float32, at the prototypes' own resolution
  semantic: jax.Array | None = None  # (b, nc, h, w) float32 semantic logits, when the model has them


class _MaskInfo(NamedTuple):
  index_map: bool
  mask_hw: tuple[int, int]


def _prepare(preds: Predictions, head: Head, cfg: SegmentLossConfig, batch: int, shapes, caller: str) -> tuple[Head, _Side]:
  given = tuple(getattr(preds.proto, "shape", ()))
  proto, nm = _prototypes(preds.proto, batch, cfg.layout, caller)
  try:
    coefs = task.side_rows(preds.mask_coefs, shapes, batch, nm, cfg.layout, "mask_coefs", caller)
  except ValueError as e:  # say where nm comes from
    raise ValueError(f"{e}; nm = {nm} is the number of prototypes in proto {given} ({cfg.layout})") from None
  semantic = None
  if preds.semantic is not None:
    semantic = semantic_logits(preds.semantic, batch, cfg.num_classes, cfg.layout, caller)
  return head, _Side(coefs, proto, semantic)


def _check_gt(gt: GroundTruth, cfg: SegmentLossConfig, caller: str) -> _MaskInfo:
  info = _MaskInfo(*_validate.gt_masks(gt, caller))
  _validate.gt_class_map(gt, caller)
  return info


def _parts(inputs: task.Inputs, targets: Targets, cfg: SegmentLossConfig, class_weights) -> SegmentLossParts:
  det = terms.detection_parts(inputs.head, targets, cfg, inputs.image_hw, class_weights)
  index_map, mask_hw = inputs.gt_info
  proto = resize_prototypes(inputs.side.proto, mask_hw)
  masks = _gt_masks(inputs.gt, index_map)
  seg = mask_sum(
      inputs.side.coefs, proto, masks, targets, inputs.image_hw, cfg.mask_chunk, index_map, cfg.plain_kernels, cfg.mask_window)
  seg = seg / terms.foreground_count(targets, cfg.axis_name)
  return SegmentLossParts(det.box, cfg.box * seg, det.cls, det.dfl)


def _semantic_parts(inputs: task.Inputs, targets: Targets, cfg: SegmentLossConfig, class_weights) -> SemanticSegmentLossParts:
  """:func:`_parts` and the semantic term (0 when the model gives no semantic logits)."""
  sem = jnp.zeros((), jnp.float32)
  if inputs.side.semantic is not None:
    cmap = class_map(inputs.gt, inputs.gt_info.index_map, cfg.num_classes)
    sem = cfg.box * semantic_term(inputs.side.semantic, cmap, targets, cfg.axis_name)
  return SemanticSegmentLossParts(*_parts(inputs, targets, cfg, class_weights), sem)


SEGMENT = task.Task(
    name="segment", config_class=SegmentLossConfig, needs=("mask_coefs", "proto"), form=terms.AXIS_ALIGNED,
    prepare=_prepare, check_gt=_check_gt, parts=_parts,
)
# The same task for a model whose prototype branch also predicts semantic logits (YOLOE-26): one more part.
SEGMENT_SEMANTIC = SEGMENT._replace(needs=("mask_coefs", "proto", "semantic"), parts=_semantic_parts)


def task_of(preds, plain: task.Task, semantic: task.Task) -> task.Task:
  """``semantic`` when ``preds`` carry semantic logits (``preds.semantic``), else ``plain``: a segmentation
  loss reads the semantic head when the model has one."""
  return semantic if getattr(preds, "semantic", None) is not None else plain


def segment_targets(preds: Predictions, gt: GroundTruth, config: SegmentLossConfig | None = None, **overrides) -> tuple[Head, Targets]:
  """The segmentation loss's first half: decoded predictions and the assignment (the detection
  one: masks take no part in it). Arguments as :func:`segment_loss` (without ``class_weights``).

  Returns:
    ``(Head, Targets)``, as :func:`~jaxtal.detection_targets`.
  """
  return task.targets(task_of(preds, SEGMENT, SEGMENT_SEMANTIC), preds, gt, config, overrides, "segment_targets")


def segment_loss_from_targets(
    preds: Predictions,
    targets: Targets,
    gt: GroundTruth,
    config: SegmentLossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, SegmentLossParts]:
  """The segmentation loss against given targets (e.g. from :func:`segment_targets`), treated as constants.

  Arguments as :func:`segment_loss`, with the targets second; ``gt`` is required (the mask term
  reads ``gt.masks`` at each entry's GT slot).
  """
  return task.loss_from_targets(task_of(preds, SEGMENT, SEGMENT_SEMANTIC), preds, targets, gt, config, class_weights, overrides, "segment_loss_from_targets")


def segment_loss(
    preds: Predictions,
    gt: GroundTruth,
    config: SegmentLossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, SegmentLossParts]:
  """YOLOv8 segmentation loss of raw head maps, mask coefficients and prototypes against ground truth.

  ``box``, ``cls`` and ``dfl`` are :func:`~jaxtal.detection_loss`'s parts (same assignment).
  ``seg = box_gain * sum over foreground anchors of [mean over mask pixels of the BCE-with-logits
  of coefs . proto against the GT's mask, zeroed outside the GT box] / (GT box area / image area)
  / max(number of foreground anchors, 1)``; see the module docstring for the pixel convention,
  the memory bound and the deliberate differences from Ultralytics.

  Args:
    preds: ``Predictions(feats, mask_coefs=..., proto=...)``: ``feats`` the per-level raw head
      maps, ``(b, H, W, 4R + nc)`` (NHWC) or ``(b, 4R + nc, H, W)`` (NCHW), as for
      :func:`~jaxtal.detection_loss`; ``mask_coefs`` the per-level mask coefficients, ``(b, H, W,
      nm)`` (NHWC) or ``(b, nm, H, W)`` (NCHW), one map per level of ``feats`` (raw, as
      Ultralytics' loss receives them); ``proto`` the prototype masks ``(b, mh, mw, nm)`` (NHWC)
      or ``(b, nm, mh, mw)`` (NCHW).
    gt: :class:`~jaxtal.GroundTruth` with xyxy boxes in input pixels and ``masks``: an index map
      ``(b, mh', mw')`` int (pixel value ``j + 1`` marks slot ``j``, 0 background;
      :func:`~jaxtal.pack_masks`) or per-slot masks ``(b, M, mh', mw')`` bool or 0/1 float. When
      ``(mh', mw') != (mh, mw)`` the prototypes are resized bilinearly to ``(mh', mw')``.
    config: a :class:`~jaxtal.SegmentLossConfig`; or its fields as keyword ``overrides``
      (``num_classes``, ``strides`` at least; ``mask_chunk`` sets the chunking).
    class_weights: optional ``(nc,)`` weights of the BCE per class.

  ``axis_name`` works as for :func:`~jaxtal.detection_loss` (the foreground count is global).

  Returns:
    ``(total, SegmentLossParts(box, seg, cls, dfl))`` with gain-scaled parts and
    ``total = (box + seg + cls + dfl) * batch_size``, Ultralytics' ``v8SegmentationLoss`` convention.

  References:
    Bolya et al., 2019, "YOLACT" (prototypes and coefficients), https://arxiv.org/abs/1904.02689;
    Feng et al., 2021, "TOOD" (assignment), https://arxiv.org/abs/2108.07755.
  """
  return task.loss(task_of(preds, SEGMENT, SEGMENT_SEMANTIC), preds, gt, config, class_weights, overrides, "segment_loss")


def checked_segment_loss(
    preds: Predictions, gt: GroundTruth, config: SegmentLossConfig | None = None, *, class_weights=None, **overrides
) -> tuple[jax.Array, SegmentLossParts]:
  """:func:`segment_loss` that raises (through ``checkify``) on invalid values: the checks of
  :func:`~jaxtal.checked_detection_loss` plus masks (per-slot masks of real slots must hold finite
  values in ``[0, 1]``, an index map values in ``[0, M]``; :func:`~jaxtal.check_values`). Use under
  ``checkify.checkify``; identical to :func:`segment_loss` when no check fails."""
  return task.loss(task_of(preds, SEGMENT, SEGMENT_SEMANTIC), preds, gt, config, class_weights, overrides, "checked_segment_loss", checked=True)


for _fn in (segment_loss, checked_segment_loss):
  _fn.config_class = SegmentLossConfig  # read by TaskLossModule and EndToEndLoss


class SegmentLoss(TaskLossModule):
  """The YOLOv8 segmentation loss (:func:`segment_loss`) as an NNX module holding a :class:`SegmentLossConfig`.

  Example::

    loss_fn = jaxtal.SegmentLoss(num_classes=80, strides=(8, 16, 32))
    total, parts = loss_fn(jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto), gt)

  No trainable state; class weights are held as a constant. The class gain is the config's
  ``cls`` field: pass it in a ``SegmentLossConfig`` (Flax's constructor reserves the keyword).
  """

  loss_fn = staticmethod(segment_loss)
