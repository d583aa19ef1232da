"""The detection loss, as the skeleton every YOLO task loss extends.

    head maps --decode_head--> Head --assign--> Targets --terms--> (total, parts)

* :func:`decode_head` (``jaxtal.head``) turns per-level maps into per-anchor predictions;
* :func:`detection_targets` runs the task-aligned assigner with the configured geometry;
* the terms read the :class:`~jaxtal.Targets`: the class term (BCE) over every anchor and
  class; the box terms (CIoU, and DFL or L1) over the *foreground entry list*
  (``targets.entries``, :mod:`jaxtal.targets`), a fixed-size list that holds every foreground
  anchor once, so a term that only foreground anchors contribute to costs ``E`` rows, not ``A``.

A task loss (oriented boxes, pose, segmentation) is this skeleton with another geometry and its
own terms read at the same entry list. :func:`loss_from_targets` is the public entry for an
assignment made elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import _validate, kernels
from jaxtal._parallel import global_sum
from jaxtal.assigner import assign_targets
from jaxtal.boxes import box_iou
from jaxtal.config import LossConfig, _make_config
from jaxtal.geometry import axis_aligned
from jaxtal.head import Head, _level_rows, decode_head, xyxy_to_ltrb
from jaxtal.labels import GroundTruth
from jaxtal.targets import Targets, take_rows


class LossParts(NamedTuple):
  """Gain-scaled loss terms (scalars).

  Attributes:
    box: ``box_gain * CIoU loss``.
    cls: ``cls_gain * BCE loss``.
    dfl: ``dfl_gain * DFL loss`` (the L1 distance loss when ``reg_max == 1``).
  """

  box: jax.Array
  cls: jax.Array
  dfl: jax.Array


def _check_head(feats: Sequence[jax.Array], cfg: LossConfig, caller: str):
  """Validates the maps against the config; returns the batch size, the input ``(H, W)`` in pixels and
  the level shapes ``((H_l, W_l), ...)``."""
  batch, shapes = _validate.head(feats, cfg.num_classes, cfg.reg_max, cfg.layout, caller)
  hw = _validate.strides_match(shapes, cfg.strides, caller)
  _validate.topk_in_range(cfg.topk, cfg.topk2, sum(h * w for h, w in shapes), caller)
  return batch, hw, shapes


# ------------------------------------------------------------------------------------------------
# The skeleton's pieces (a task loss reuses them and adds its own terms at the entry list).


def _assign(head: Head, gt: GroundTruth, cfg: LossConfig, image_hw) -> Targets:
  """Step "assign": sigmoid scores and pixel boxes of ``head`` against ``gt`` (under ``stop_gradient``)."""
  return assign_targets(
      head.logits,
      head.boxes * head.strides,
      head.anchors * head.strides,
      gt,
      cfg,
      geometry=axis_aligned(cfg.overlap),
      from_logits=True,
      image_hw=image_hw,
  )


def _normaliser(targets: Targets, axis_name: str | None) -> jax.Array:
  """``N = max(sum of target scores, 1)``, over the global batch under ``axis_name``."""
  total = jnp.sum(targets.weights)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return jnp.maximum(total, 1.0)


def _class_term(head: Head, targets: Targets, class_weights, plain: tuple[str, ...] = ()) -> jax.Array:
  """Sum of BCE-with-logits over every anchor and class against ``one_hot(labels) * weights``.

  Per level, so no ``(b, A, nc)`` array is concatenated or materialised.
  """
  cw = None if class_weights is None else jax.lax.stop_gradient(jnp.asarray(class_weights, jnp.float32))
  total, lo = 0.0, 0
  for logits in head.logits:
    hi = lo + logits.shape[1]
    total = total + kernels.select("bce_sum", plain)(logits, targets.labels[:, lo:hi], targets.weights[:, lo:hi], cw)
    lo = hi
  return total


def _entry_weights(targets: Targets) -> jax.Array:
  """``(b, E)`` target score of each valid entry's anchor, 0 on invalid entries (no gradient)."""
  e = targets.entries
  return jax.lax.stop_gradient(jnp.where(e.valid, take_rows(targets.weights, e.anchor), 0.0))


def _target_boxes(head: Head, targets: Targets) -> jax.Array:
  """``(b, A, 4)`` target boxes in grid units of each anchor's level.

  Background anchors get a stand-in unit box about the anchor, so no padding value reaches a
  term (double-``where``: their weight is 0 anyway).
  """
  stand_in = jnp.concatenate([head.anchors - 0.5, head.anchors + 0.5], axis=-1)
  return jax.lax.stop_gradient(jnp.where(targets.fg_mask[..., None], targets.boxes / head.strides, stand_in))


def _box_term(head: Head, targets: Targets, target_boxes: jax.Array, w: jax.Array) -> jax.Array:
  """Sum over the entry list of ``(1 - CIoU(pred, target)) * weight``, grid units."""
  rows = targets.entries.anchor
  iou = box_iou(take_rows(head.boxes, rows), take_rows(target_boxes, rows), "ciou")
  return jnp.sum(w * (1.0 - iou))


def _dfl_term(head: Head, targets: Targets, target_ltrb: jax.Array, w: jax.Array, reg_max: int, plain: tuple[str, ...] = ()) -> jax.Array:
  """Sum over the entry list of ``weight * mean over 4 sides of DFL`` (two-bin cross-entropy).

  ``CE = logsumexp(bins) - <two-bin target, bins>``. The log-sum-exp part reads a per-anchor
  coefficient scattered from the entries, and :func:`jaxtal.kernels.two_bin_logit_sum` scatters
  the same coefficients for its dense gradient, so value and gradient agree for any entry list.
  """
  rows = targets.entries.anchor
  row_coef = w / 4
  coef = jax.vmap(lambda r, c: jnp.zeros(head.lse.shape[1], c.dtype).at[r].add(c))(rows, row_coef)
  target = jnp.clip(target_ltrb, 0.0, reg_max - 1 - 0.01)
  total, lo = jnp.sum(coef[..., None] * head.lse), 0
  for dist in head.dist:
    hi = lo + dist.shape[1]
    here = (rows >= lo) & (rows < hi)
    local = jnp.clip(rows - lo, 0, hi - lo - 1)
    total = total - kernels.select("two_bin_logit_sum", plain)(dist, target[:, lo:hi], local, jnp.where(here, row_coef, 0.0))
    lo = hi
  return total


def _l1_term(head: Head, targets: Targets, target_ltrb: jax.Array, w: jax.Array, image_hw) -> jax.Array:
  """``reg_max == 1`` (YOLO26): sum over the entries of ``weight * mean |ltrb - target|``, distances
  in units of the input size."""
  rows = targets.entries.anchor
  h, w_px = image_hw
  scale = take_rows(jnp.broadcast_to(head.strides, head.ltrb.shape[:-1] + (1,)), rows) / jnp.array([w_px, h, w_px, h], jnp.float32)
  diff = jnp.abs(take_rows(head.ltrb, rows) * scale - take_rows(target_ltrb, rows) * scale)
  return jnp.sum(w * jnp.mean(diff, axis=-1))


def _finish(parts: LossParts, batch: int, axis_name: str | None) -> tuple[jax.Array, LossParts]:
  """``total = sum(parts) * batch_size`` (Ultralytics' convention), global under ``axis_name``."""
  batch_size = jnp.float32(batch)
  if axis_name is not None:
    batch_size = jax.lax.psum(batch_size, axis_name)
    parts = jax.tree.map(lambda x: global_sum(x, axis_name), parts)
  return sum(parts) * batch_size, parts


def _side_rows(maps, shapes, batch: int, channels: int, layout: str, name: str, caller: str) -> jax.Array:
  """Per-level maps that ride beside the head maps (OBB angles, pose keypoints, mask coefficients),
  validated against the head's levels; returns their ``(b, A, channels)`` float32 anchor rows in
  the head's anchor order."""
  _validate.level_maps(maps, shapes, batch, channels, layout, name, caller)
  return jnp.concatenate(_level_rows(maps, layout), axis=1).astype(jnp.float32)


def _foreground_count(targets: Targets, axis_name: str | None) -> jax.Array:
  """``max(number of foreground anchors, 1)``, over the global batch under ``axis_name``: the
  denominator of the per-anchor means (pose, segmentation), which count every foreground anchor
  whatever its target score."""
  total = jnp.sum(targets.entries.valid, dtype=jnp.float32)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return jnp.maximum(total, 1.0)


def _detection_parts(head: Head, targets: Targets, cfg: LossConfig, image_hw, class_weights) -> LossParts:
  """The gain-scaled detection terms (not yet finished): the part every axis-aligned task loss shares."""
  n = _normaliser(targets, cfg.axis_name)
  w = _entry_weights(targets)
  target_boxes = _target_boxes(head, targets)
  target_ltrb = xyxy_to_ltrb(target_boxes, head.anchors)
  loss_cls = _class_term(head, targets, class_weights, cfg.plain_kernels) / n
  loss_box = _box_term(head, targets, target_boxes, w) / n
  if cfg.reg_max > 1:
    loss_dfl = _dfl_term(head, targets, target_ltrb, w, cfg.reg_max, cfg.plain_kernels) / n
  else:
    loss_dfl = _l1_term(head, targets, target_ltrb, w, image_hw) / n
  return LossParts(cfg.box * loss_box, cfg.cls * loss_cls, cfg.dfl * loss_dfl)


def _detection_terms(head: Head, targets: Targets, cfg: LossConfig, image_hw, class_weights) -> tuple[jax.Array, LossParts]:
  """``(total, LossParts)`` of the detection terms."""
  return _finish(_detection_parts(head, targets, cfg, image_hw, class_weights), head.ltrb.shape[0], cfg.axis_name)


# ------------------------------------------------------------------------------------------------
# Public entries.


def detection_targets(feats: Sequence[jax.Array], gt: GroundTruth, config: LossConfig | None = None, **overrides) -> tuple[Head, Targets]:
  """The loss's first half: decoded predictions and the assignment it trains against.

  Takes the arguments of :func:`detection_loss` (without ``class_weights``). Use it to inspect
  what the loss sees (``targets.positives_per_gt`` shows which GTs got no anchor) or to build
  the targets once and feed :func:`loss_from_targets`.

  Returns:
    ``(Head, Targets)``: see :class:`~jaxtal.head.Head` and :class:`~jaxtal.Targets`
    (``E = M * topk`` entries).
  """
  cfg = _make_config(LossConfig, config, overrides, "detection_targets")
  batch, hw, _ = _check_head(feats, cfg, "detection_targets")
  _validate.ground_truth(gt, batch, "detection_targets")
  head = decode_head(feats, cfg)
  return head, _assign(head, gt, cfg, hw)


def loss_from_targets(
    feats: Sequence[jax.Array],
    targets: Targets,
    config: LossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, LossParts]:
  """The detection loss of head maps against given targets (an assignment made by any assigner).

  ``targets`` may come from :func:`detection_targets`, or from your own assigner through
  :func:`~jaxtal.targets_from_assignment`. Foreground-only terms (CIoU, DFL / L1) read
  ``targets.entries``; the class term reads ``labels`` and ``weights`` at every anchor. With an
  entry list that breaks its contract (:mod:`jaxtal.targets`) the loss stays finite and its
  gradient exact, but an anchor listed twice counts twice and an unlisted one gets no box term;
  :func:`~jaxtal.checked_loss_from_targets` checks the contract.

  Args:
    feats: per-level raw head maps, as for :func:`detection_loss`.
    targets: :class:`~jaxtal.Targets` with ``labels (b, A)``, ``boxes (b, A, 4)`` xyxy pixels,
      ``weights (b, A)``, ``fg_mask (b, A)``, entries ``(b, E)``. Treated as constants.
    config, class_weights, overrides: as for :func:`detection_loss`.

  Returns:
    ``(total, LossParts)``, as :func:`detection_loss`.
  """
  cfg = _make_config(LossConfig, config, overrides, "loss_from_targets")
  batch, hw, _ = _check_head(feats, cfg, "loss_from_targets")
  _validate.targets(targets, batch, "loss_from_targets")
  _validate.class_weights(class_weights, cfg.num_classes, "loss_from_targets")
  head = decode_head(feats, cfg)
  return _detection_terms(head, jax.lax.stop_gradient(targets), cfg, hw, class_weights)


def detection_loss(
    feats: Sequence[jax.Array],
    gt: GroundTruth,
    config: LossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, LossParts]:
  """YOLOv8 detection loss of raw head maps against padded ground truth.

  The assigner sees sigmoid scores and decoded boxes in pixels under ``stop_gradient``. With
  ``N = max(sum of target scores, 1)`` and per-anchor weight ``w`` = its target score:

  * ``cls = sum over all anchors and classes of BCE-with-logits (times class_weights) / N``;
  * ``box = sum over foreground of (1 - CIoU(pred, target)) * w / N``, CIoU's aspect trade-off
    weight held out of the gradient;
  * ``dfl = sum over foreground of w * mean over 4 sides of the two-bin cross-entropy around the
    target distance (clamped to R - 1 - 0.01) / N``; with ``reg_max == 1`` an L1 loss on ltrb
    distances normalised by the input size replaces it (YOLO26's head).

  Foreground is a weight and a fixed-size entry list, never a boolean index: shapes are fixed
  and the loss and gradients are finite for empty images and degenerate boxes.

  Args:
    feats: per-level raw head maps, ``(b, H, W, 4R + nc)`` (NHWC) or ``(b, 4R + nc, H, W)``
      (NCHW); any float dtype, the loss is computed in float32.
    gt: :class:`~jaxtal.GroundTruth` with boxes in input pixels.
    config: a :class:`~jaxtal.LossConfig`; or give its fields as keyword ``overrides``
      (``num_classes=80, strides=(8, 16, 32)`` at least), which also amend a given config.
    class_weights: optional ``(nc,)`` weights of the BCE per class (an array, not configuration).

  Under ``shard_map``/``pmap`` over the batch with ``axis_name`` set, the normaliser ``N`` and the
  batch size are reduced over it, every device returns the loss *value* of the global batch, and
  the gradient w.r.t. a device's own maps is the global loss's gradient for those maps. For
  replicated parameters: under ``jax.shard_map`` with its default ``check_vma=True`` their
  gradients come back already summed over devices; under ``pmap`` or ``check_vma=False``, ``psum``
  them.

  Returns:
    ``(total, LossParts(box, cls, dfl))`` with gain-scaled parts and
    ``total = (box + cls + dfl) * batch_size``, the convention of Ultralytics'
    ``v8DetectionLoss`` (its optimiser step expects a loss summed over images).

  References:
    Zheng et al., 2020 (CIoU), https://arxiv.org/abs/1911.08287; Li et al., 2020, "Generalized
    Focal Loss" (DFL), https://arxiv.org/abs/2006.04388; Feng et al., 2021, "TOOD" (assignment),
    https://arxiv.org/abs/2108.07755.
  """
  cfg = _make_config(LossConfig, config, overrides, "detection_loss")
  batch, hw, _ = _check_head(feats, cfg, "detection_loss")
  _validate.ground_truth(gt, batch, "detection_loss")
  _validate.class_weights(class_weights, cfg.num_classes, "detection_loss")
  head = decode_head(feats, cfg)
  return _detection_terms(head, _assign(head, gt, cfg, hw), cfg, hw, class_weights)
