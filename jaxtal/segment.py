"""Instance segmentation: the YOLOv8 segmentation loss (box, mask, class and DFL terms).

The detection skeleton (:mod:`jaxtal.loss`) with one more term read at the foreground entry list::

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

When the GT masks have another resolution than the prototypes, the prototypes are resized to
the masks' resolution (either direction) bilinearly with half-pixel centres and no
antialiasing (PyTorch's ``interpolate(mode="bilinear", align_corners=False)``, what the
reference does); the masks are never resampled.

Memory: the mask logits exist only for the ``E = M * topk`` entries of each image, never for
all ``A`` anchors, and are computed a chunk of entries at a time (``mask_chunk`` in
:class:`SegmentLossConfig`): a ``lax.scan`` over chunks that forms the value and, in the same
pass, the gradients w.r.t. the coefficients and the prototypes
(:func:`jaxtal.kernels.mask_bce_sum`; its plain twin is autodiff over chunks under
``jax.checkpoint``). Peak memory is then about a few ``(b, chunk, mh, mw)`` float32 arrays
whatever ``E`` (``b = 16``, ``M = 100``, a 640 input, 160 x 160 prototypes, ``nm = 32``: under
0.8 GB for the gradient by XLA's memory analysis, 4.99 GB with all entries in one chunk). The
crop is separable (a row mask times a column mask), never an ``(E, mh, mw)`` box mask.

Deliberate differences from Ultralytics 8.4.190 (``v8SegmentationLoss``); everything else
matches to float32 rounding:

* a GT box covering less than ``1e-20`` of the image (a zero-area box above all) contributes no
  mask term. Such a box never owns an anchor in jaxtal (a box needs a positive area), but the
  reference can hand one anchors (its in-box test widens small sides), and then divides by a
  zero area: its mask term is NaN;
* the mask term counts every foreground anchor, including those with a zero target score, so it
  sees two assignment details that the detection terms never see (their weight there is 0):

  - ties among zero-metric candidates in top-k: jaxtal keeps the lower anchor index; the
    reference's ``torch.topk`` orders ties in no documented way, so when a GT has fewer than
    ``topk`` candidates of non-zero metric, the zero-metric anchors that fill its list (and
    become foreground) can differ, and with them the mask term. The parity tests also run the
    reference with stable ties (``tests/reference.stable_ties``), which jaxtal matches;
  - conflict resolution: an anchor claimed by several GTs whose in-box overlaps are all zero
    goes to the lowest-index valid in-box GT in jaxtal; the reference hands it to GT slot 0
    (possibly padding) and uses GT 0's box and mask for it (NaN when slot 0 is padding: its box
    has no area). jaxtal never lets padding own an anchor;

* padding comes from ``gt.mask`` and invalid GT rows own nothing, as in the detection loss;
  with per-slot masks the slot order is ``gt``'s (the reference takes instance masks in
  label-row order, grouped by image).

The einsum producing the mask logits runs at JAX's default matmul precision, which on GPU and
TPU may round float32 inputs (set ``jax_default_matmul_precision`` for full float32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import _validate, kernels
from jaxtal.config import LossConfig, _make_config
from jaxtal.head import decode_head
from jaxtal.labels import GroundTruth
from jaxtal.loss import _assign, _check_head, _detection_parts, _finish, _foreground_count, _side_rows
from jaxtal.module import _TaskLossModule
from jaxtal.targets import Targets, take_rows

# Automatic chunking: one chunk's (b, chunk, mh, mw) float32 mask logits take at most _CHUNK_BYTES, and a
# chunk holds at most _CHUNK_ENTRIES entries (finer chunks waste less work past the last foreground entry;
# b = 2, M = 100, 160 x 160 prototypes, XLA:CPU, loss step: 0.117 s at 32 entries, 0.098 s at 64, 0.110 s
# at 128, 0.268 s at 327, the memory bound alone).
_CHUNK_BYTES = 64 << 20
_CHUNK_ENTRIES = 64
# A GT box covering less of the image than this contributes no mask term (the term divides by it).
_MIN_AREA = 1e-20


@dataclasses.dataclass(frozen=True, kw_only=True)
class SegmentLossConfig(LossConfig):
  """Settings of the segmentation loss: :class:`~jaxtal.LossConfig` plus the mask term's chunking.

  Attributes:
    mask_chunk: entries (per image, for all images at once) whose mask logits are computed
      together. ``None`` picks at most 64 entries, fewer if one chunk's ``(b, chunk, mh, mw)``
      float32 logits would take more than 64 MiB (the whole entry list is one chunk when it is
      shorter), which bounds the mask term's memory whatever ``M``; a smaller chunk uses less
      memory and more sequential steps. The loss does not depend on it (to float32 rounding).

  The mask term's gain is ``box`` (Ultralytics uses the box gain for it).
  """

  mask_chunk: int | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.mask_chunk is not None:
      object.__setattr__(self, "mask_chunk", _validate.whole("mask_chunk", self.mask_chunk, low=1))


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


def _resize_prototypes(proto: jax.Array, mask_hw) -> jax.Array:
  """``(b, nm, mh, mw)`` -> ``(b, nm, mh', mw')``: bilinear, half-pixel centres, edges clamped, no
  antialiasing (PyTorch's ``interpolate(mode="bilinear", align_corners=False)``); unchanged at ``(mh, mw)``."""
  if tuple(proto.shape[2:]) == tuple(mask_hw):
    return proto
  return jax.image.resize(proto, proto.shape[:2] + tuple(mask_hw), method="linear", antialias=False)


def _entry_boxes(targets: Targets, image_hw, mask_hw) -> tuple[jax.Array, jax.Array]:
  """Each entry's GT box in mask pixels ``(b, E, 4)`` and its weight ``(b, E)``: ``1 / (mh mw area)``
  with ``area`` the box's fraction of the image, 0 on invalid entries and boxes under ``_MIN_AREA``."""
  h, w = image_hw
  mh, mw = mask_hw
  e = targets.entries
  norm = take_rows(targets.boxes, e.anchor) / jnp.array([w, h, w, h], jnp.float32)
  area = (norm[..., 2] - norm[..., 0]) * (norm[..., 3] - norm[..., 1])
  counted = e.valid & (area >= _MIN_AREA)
  weight = jnp.where(counted, 1.0 / (mh * mw * jnp.where(counted, area, 1.0)), 0.0)
  return norm * jnp.array([mw, mh, mw, mh], jnp.float32), weight


def _chunk_size(mask_chunk: int | None, batch: int, entries: int, pixels: int) -> int:
  if mask_chunk is None:
    mask_chunk = min(_CHUNK_ENTRIES, _CHUNK_BYTES // (4 * batch * pixels))
  return max(1, min(int(mask_chunk), entries))


def _mask_sum(coefs, proto, masks, targets: Targets, image_hw, mask_chunk: int | None, index_map: bool, plain: tuple[str, ...] = ()) -> jax.Array:
  """Sum over the foreground entries of the per-anchor mask loss (not yet divided by their number).

  ``coefs (b, A, nm)``, ``proto (b, nm, mh, mw)`` at the masks' resolution, ``masks`` as
  :func:`jaxtal.kernels.mask_bce_sum`.
  """
  b, _, mh, mw = proto.shape
  e = targets.entries
  size = e.anchor.shape[1]
  if size == 0:
    return jnp.zeros((), jnp.float32)
  box, weight = jax.lax.stop_gradient(_entry_boxes(targets, image_hw, (mh, mw)))
  coef = take_rows(coefs, e.anchor)  # (b, E, nm)
  chunk = _chunk_size(mask_chunk, b, size, mh * mw)
  return kernels.select("mask_bce_sum", plain)(coef, proto, masks, e.gt, box, weight, chunk, index_map)


def _gt_masks(gt: GroundTruth, index_map: bool) -> jax.Array:
  masks = jax.lax.stop_gradient(jnp.asarray(gt.masks))
  if index_map:
    return masks.astype(jnp.int32)
  return masks if masks.dtype == bool else masks.astype(jnp.float32)


def segment_loss(
    feats: Sequence[jax.Array],
    mask_coefs: Sequence[jax.Array],
    proto: jax.Array,
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
    feats: per-level raw head maps, ``(b, H, W, 4R + nc)`` (NHWC) or ``(b, 4R + nc, H, W)``
      (NCHW), as for :func:`~jaxtal.detection_loss`.
    mask_coefs: per-level mask coefficients, ``(b, H, W, nm)`` (NHWC) or ``(b, nm, H, W)``
      (NCHW), one map per level of ``feats`` (raw, as Ultralytics' loss receives them).
    proto: prototype masks ``(b, mh, mw, nm)`` (NHWC) or ``(b, nm, mh, mw)`` (NCHW).
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
  caller = "segment_loss"
  cfg = _make_config(SegmentLossConfig, config, overrides, caller)
  batch, hw, shapes = _check_head(feats, cfg, caller)
  _validate.ground_truth(gt, batch, caller)
  index_map, mask_hw = _validate.gt_masks(gt, caller)
  given = tuple(getattr(proto, "shape", ()))
  proto, nm = _prototypes(proto, batch, cfg.layout, caller)
  try:
    coefs = _side_rows(mask_coefs, shapes, batch, nm, cfg.layout, "mask_coefs", caller)
  except ValueError as e:  # say where nm comes from
    raise ValueError(f"{e}; nm = {nm} is the number of prototypes in proto {given} ({cfg.layout})") from None
  _validate.class_weights(class_weights, cfg.num_classes, caller)
  proto = _resize_prototypes(proto, mask_hw)

  head = decode_head(feats, cfg)
  targets = _assign(head, gt, cfg, hw)
  det = _detection_parts(head, targets, cfg, hw, class_weights)
  seg = _mask_sum(coefs, proto, _gt_masks(gt, index_map), targets, hw, cfg.mask_chunk, index_map, cfg.plain_kernels)
  seg = seg / _foreground_count(targets, cfg.axis_name)
  parts = SegmentLossParts(det.box, cfg.box * seg, det.cls, det.dfl)
  return _finish(parts, batch, cfg.axis_name)


class SegmentLoss(_TaskLossModule):
  """The YOLOv8 segmentation loss (:func:`segment_loss`) as an NNX module holding a :class:`SegmentLossConfig`.

  Example::

    loss_fn = jaxtal.SegmentLoss(num_classes=80, strides=(8, 16, 32))
    total, parts = loss_fn(feats, mask_coefs, proto, gt)

  No trainable state; class weights are held as a constant. The class gain is the config's
  ``cls`` field: pass it in a ``SegmentLossConfig`` (Flax's constructor reserves the keyword).
  """

  config_class = SegmentLossConfig

  def __call__(
      self, feats: Sequence[jax.Array], mask_coefs: Sequence[jax.Array], proto: jax.Array, gt: GroundTruth
  ) -> tuple[jax.Array, SegmentLossParts]:
    """Returns ``(total, SegmentLossParts)`` for head maps, mask coefficients, prototypes and ``gt``."""
    return self._run(segment_loss, feats, mask_coefs, proto, gt)
