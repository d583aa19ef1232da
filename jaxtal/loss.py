"""YOLOv8-style detection loss: BCE (classes) + CIoU (boxes) + DFL (box distributions)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtal.anchors import make_anchors
from jaxtal.assigner import Targets, assign_targets, check_topk
from jaxtal.boxes import box_iou
from jaxtal.head import Layout, check_head, level_rows, ltrb_to_xyxy, xyxy_to_ltrb
from jaxtal.labels import GroundTruth, check_ground_truth
from jaxtal.ops import (
    bce_one_hot_sum,
    side_bin_maxima,
    softmax_expectation,
    split_channels,
    take_rows,
    two_bin_logit_sum,
)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _global_sum(x: jax.Array, axis_name: str) -> jax.Array:
  """``psum`` whose gradient is this device's share only (the cotangent passes through).

  The default transpose of ``psum`` depends on the mapping API (``shard_map`` with or
  without ``check_vma``, ``pmap``); fixing it here makes gradients exact in all of them.
  """
  return jax.lax.psum(x, axis_name)


def _global_sum_fwd(x, axis_name):
  return jax.lax.psum(x, axis_name), x


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def _global_sum_bwd(axis_name, x, ct):
  # Under shard_map's type checking the cotangent must vary over the same axes as x.
  missing = tuple(_varying_axes(x) - _varying_axes(ct))
  if missing:
    ct = jax.lax.pcast(ct, missing, to="varying")
  return (ct,)


_global_sum.defvjp(_global_sum_fwd, _global_sum_bwd)


def check_strides_match(shapes: Sequence[tuple[int, int]], strides: Sequence[float]) -> tuple[int, int]:
  """Checks one stride per level and that every level maps to the same input size; returns (H, W)."""
  if isinstance(strides, (int, float)) or len(strides) != len(shapes):
    raise ValueError(f"strides must give one stride per feature level ({len(shapes)} levels), got {strides!r}")
  for i, s in enumerate(strides):
    if not (np.isfinite(float(s)) and float(s) > 0):
      raise ValueError(f"strides[{i}] must be a finite positive number, got {s!r}")
  h0, w0 = shapes[0][0] * strides[0], shapes[0][1] * strides[0]
  for i, ((h, w), s) in enumerate(zip(shapes, strides)):
    if (h * s, w * s) != (h0, w0):
      raise ValueError(
          f"strides do not match the feature maps: level {i} is {h}x{w} with stride {s}, i.e. an input of"
          f" {h * s}x{w * s} pixels, but level 0 ({shapes[0][0]}x{shapes[0][1]}, stride {strides[0]}) implies"
          f" {h0}x{w0}"
      )
  return h0, w0


def detection_loss(
    feats: Sequence[jax.Array],
    gt: GroundTruth,
    *,
    num_classes: int,
    strides: Sequence[float],
    reg_max: int = 16,
    layout: Layout = "NHWC",
    topk: int = 10,
    topk2: int | None = None,
    alpha: float = 0.5,
    beta: float = 6.0,
    box: float = 7.5,
    cls: float = 0.5,
    dfl: float = 1.5,
    min_box_side: float = 0.0,
    class_weights: jax.Array | None = None,
    gt_chunk: int | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, LossParts]:
  """YOLOv8 detection loss of raw head maps against padded ground truth.

  The assigner sees sigmoid scores and decoded boxes in pixels under ``stop_gradient``.
  With ``N = max(sum of target scores, 1)`` and per-anchor weight ``w = sum of its target
  scores``:

  * ``cls = sum over all anchors and classes of BCE-with-logits (times class_weights) / N``;
  * ``box = sum over foreground of (1 - CIoU(pred, target)) * w / N``, CIoU's aspect
    trade-off weight held out of the gradient;
  * ``dfl = sum over foreground of w * mean over 4 sides of the two-bin cross-entropy
    around the target distance (clamped to R - 1 - 0.01) / N``; with ``reg_max == 1`` an
    L1 loss on ltrb distances normalised by the input size replaces it (YOLO26's head).

  Foreground is a mask that weights terms, never an index: shapes are fixed and the loss
  and gradients are finite for empty images and degenerate boxes.

  Args:
    feats: per-level raw head maps, ``(b, H, W, 4R + nc)`` (NHWC) or ``(b, 4R + nc, H, W)``
      (NCHW); any float dtype, the loss is computed in float32.
    gt: :class:`~jaxtal.GroundTruth` with boxes in input pixels.
    num_classes: ``nc``.
    strides: one stride per level; the input size is level 0's ``(H, W) * strides[0]``.
    reg_max: ``R`` bins per box side (``1``: direct ltrb regression).
    layout: ``"NHWC"`` or ``"NCHW"``.
    topk, topk2, alpha, beta, min_box_side, gt_chunk: assigner settings, see
      :func:`~jaxtal.task_aligned_assign`.
    box, cls, dfl: gains of the three terms.
    class_weights: optional ``(nc,)`` weights of the BCE per class.
    axis_name: inside ``shard_map``/``pmap`` over the batch, the mapped axis name. The
      normaliser ``N`` and the batch size are reduced over it, every device returns the
      loss *value* of the global batch, and the gradient w.r.t. a device's own maps is the
      global loss's gradient for those maps (each device differentiates only its share).
      For replicated parameters: under ``jax.shard_map`` with its default
      ``check_vma=True`` their gradients come back already summed over devices; under
      ``pmap`` or ``check_vma=False``, ``psum`` them.

  Returns:
    ``(total, LossParts(box, cls, dfl))`` with gain-scaled parts and
    ``total = (box + cls + dfl) * batch_size``, the convention of Ultralytics'
    ``v8DetectionLoss`` (its optimiser step expects a loss summed over images).

  References:
    Zheng et al., 2020 (CIoU), https://arxiv.org/abs/1911.08287; Li et al., 2020,
    "Generalized Focal Loss" (DFL), https://arxiv.org/abs/2006.04388; Feng et al., 2021,
    "TOOD" (assignment), https://arxiv.org/abs/2108.07755.
  """
  total, parts, _ = _detection_loss(
      feats,
      gt,
      num_classes=num_classes,
      strides=strides,
      reg_max=reg_max,
      layout=layout,
      topk=topk,
      topk2=topk2,
      alpha=alpha,
      beta=beta,
      box=box,
      cls=cls,
      dfl=dfl,
      min_box_side=min_box_side,
      class_weights=class_weights,
      gt_chunk=gt_chunk,
      axis_name=axis_name,
  )
  return total, parts


def _detection_loss(
    feats: Sequence[jax.Array],
    gt: GroundTruth,
    *,
    num_classes: int,
    strides: Sequence[float],
    reg_max: int = 16,
    layout: Layout = "NHWC",
    topk: int = 10,
    topk2: int | None = None,
    alpha: float = 0.5,
    beta: float = 6.0,
    box: float = 7.5,
    cls: float = 0.5,
    dfl: float = 1.5,
    min_box_side: float = 0.0,
    class_weights: jax.Array | None = None,
    gt_chunk: int | None = None,
    axis_name: str | None = None,
    targets: Targets | None = None,
) -> tuple[jax.Array, LossParts, Targets]:
  """:func:`detection_loss`, also returning the assignment; with ``targets`` given, that assignment is used.

  ``targets`` must be what this function returned for the same head maps and ground truth;
  it lets a benchmark time the loss with the assignment taken out (``benchmarks/bench.py``).
  """
  batch, shapes = check_head(feats, num_classes, reg_max, layout)
  img_h, img_w = check_strides_match(shapes, strides)
  if class_weights is not None and np.shape(class_weights) != (num_classes,):
    raise ValueError(f"class_weights must have shape (nc,) = ({num_classes},), got {np.shape(class_weights)}")
  check_ground_truth(gt, batch, "detection_loss")
  check_topk(topk, topk2, sum(h * w for h, w in shapes), "detection_loss")
  if not (np.isfinite(float(min_box_side)) and min_box_side >= 0):
    raise ValueError(f"detection_loss: min_box_side must be a finite number >= 0 (pixels), got {min_box_side!r}")

  # Work level by level on views of the maps: the big (b, A, 4R + nc) tensor is never concatenated.
  levels = level_rows(feats, layout)
  sizes = [h * w for h, w in shapes]
  levels = [x.astype(jnp.float32) for x in levels]
  tops = [side_bin_maxima(x, reg_max) for x in levels]  # softmax shifts, read without a slice copy
  levels = [split_channels(x, 4 * reg_max) for x in levels]  # (bins, class logits)
  logits = [c for _, c in levels]
  dists = [d.reshape(batch, -1, 4, reg_max) for d, _ in levels]
  if reg_max > 1:
    stats = [softmax_expectation(d, t) for d, t in zip(dists, tops)]  # (expectation, logsumexp) per level
    ltrb = jnp.concatenate([e for e, _ in stats], axis=1)
  else:
    ltrb = jnp.concatenate([d[..., 0] for d in dists], axis=1)
  anchors, anchor_strides = make_anchors(shapes, strides)
  pred_boxes = ltrb_to_xyxy(ltrb, anchors)  # (b, A, 4) grid units

  # A GT box with no overlap with the image is data, not an error: it never owns an anchor
  # (with min_box_side > 0 it could otherwise be widened onto a border anchor).
  boxes_px = jnp.asarray(gt.boxes)
  on_image = (boxes_px[..., 0] < img_w) & (boxes_px[..., 2] > 0) & (boxes_px[..., 1] < img_h) & (boxes_px[..., 3] > 0)
  gt = gt._replace(mask=jnp.asarray(gt.mask).astype(bool) & on_image)
  target = targets if targets is not None else assign_targets(
      tuple(logits),
      pred_boxes * anchor_strides,
      anchors * anchor_strides,
      gt,
      from_logits=True,
      topk=topk,
      topk2=topk2,
      alpha=alpha,
      beta=beta,
      eps=1e-9,
      min_box_side=min_box_side,
      gt_chunk=gt_chunk,
  )
  # Target scores are one_hot(labels) * norm, so their per-anchor sum is norm.
  weight = target.norm  # (b, A)
  scores_sum = jnp.sum(weight)
  if axis_name is not None:
    scores_sum = jax.lax.psum(scores_sum, axis_name)
  normaliser = jnp.maximum(scores_sum, 1.0)

  bounds = np.cumsum([0] + sizes)
  spans = list(zip(bounds[:-1], bounds[1:]))
  cw = None if class_weights is None else jax.lax.stop_gradient(jnp.asarray(class_weights, jnp.float32))
  # BCE against one_hot(labels) * norm, summed without materialising the (b, A, nc) targets.
  loss_cls = sum(bce_one_hot_sum(x, target.labels[:, lo:hi], weight[:, lo:hi], cw) for x, (lo, hi) in zip(logits, spans))
  loss_cls = loss_cls / normaliser

  fg = target.fg_mask
  # Background anchors get a stand-in unit box so no padding value reaches CIoU (double-where).
  stand_in = jnp.concatenate([anchors - 0.5, anchors + 0.5], axis=-1)
  target_boxes = jnp.where(fg[..., None], target.boxes / anchor_strides, stand_in)
  # CIoU only at the assignment's entry list (E = M * topk rows, each foreground anchor marked
  # once): a few hundred boxes per image instead of all A, and its gradient a scatter of E rows.
  entries, first = target.entry_anchor, target.entry_first
  iou = box_iou(take_rows(pred_boxes, entries), take_rows(target_boxes, entries), "ciou")
  loss_box = jnp.sum(jnp.where(first, (1.0 - iou) * take_rows(weight, entries), 0.0)) / normaliser

  target_ltrb = xyxy_to_ltrb(target_boxes, anchors)
  if reg_max > 1:
    target_ltrb = jnp.clip(target_ltrb, 0.0, reg_max - 1 - 0.01)
    left = jnp.floor(target_ltrb)
    w_left = left + 1 - target_ltrb
    left = left.astype(jnp.int32)
    # Two-bin cross-entropy, averaged over the 4 sides and weighted per anchor:
    # coef * (sum of the bins' logsumexp - sum of the target-weighted logit pairs). The pair
    # term is read only at foreground anchors (each listed once by the assignment).
    coef = jax.lax.stop_gradient(jnp.where(fg, weight, 0.0) / 4)
    lse = jnp.concatenate([lse for _, lse in stats], axis=1)
    loss_dfl = jnp.sum(jnp.where(fg, coef * jnp.sum(lse, axis=-1), 0.0))
    for d, (lo, hi) in zip(dists, spans):
      rows = jnp.clip(target.entry_anchor - lo, 0, hi - lo - 1)
      take = target.entry_first & (target.entry_anchor >= lo) & (target.entry_anchor < hi)
      loss_dfl = loss_dfl - two_bin_logit_sum(d, left[:, lo:hi], w_left[:, lo:hi], coef[:, lo:hi], rows, take)
  else:
    scale = anchor_strides / jnp.array([img_w, img_h, img_w, img_h], jnp.float32)
    ce = jnp.abs(ltrb * scale - target_ltrb * scale)
    loss_dfl = jnp.sum(jnp.where(fg, jnp.mean(ce, axis=-1) * weight, 0.0))
  loss_dfl = loss_dfl / normaliser

  parts = LossParts(box * loss_box, cls * loss_cls, dfl * loss_dfl)
  batch_size = jnp.float32(batch)
  if axis_name is not None:
    batch_size = jax.lax.psum(batch_size, axis_name)
    parts = jax.tree.map(lambda x: _global_sum(x, axis_name), parts)
  total = (parts.box + parts.cls + parts.dfl) * batch_size
  return total, parts, target
