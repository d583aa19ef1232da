"""The shared loss terms: what every task loss computes from a decoded head and its targets.

A task loss (:mod:`jaxtal.task` drives it) decodes its :class:`~jaxtal.Head`, assigns
:class:`~jaxtal.Targets`, and then composes these pieces::

    Head, Targets --detection_parts--> LossParts(box, cls, dfl)  (not yet finished)
                  + the task's own terms at the entry list (angle, pose, kobj, seg)
                  --finish--> (total, parts)

The contract of the pieces, written once here:

* **normaliser** ``N = max(sum of target scores, 1)`` divides the class, box and DFL/L1 terms;
  **foreground count** ``max(number of foreground anchors, 1)`` divides the per-anchor means
  that count every foreground anchor whatever its score (pose, segmentation). Both are global
  under ``axis_name`` (``shard_map``/``pmap`` over the batch).
* **entry weights** ``w (b, E)``: each valid entry's target score, 0 on invalid entries; every
  foreground-only term reads the entry list (``targets.entries``, :mod:`jaxtal.targets`)
  through :func:`~jaxtal.take_rows`, so it costs ``E`` rows, not ``A``, with static shapes.
* **box form** (:class:`BoxForm`): what the box terms need to know about a box kind: how its
  grid-unit boxes scale to pixels, the stand-in target of a background anchor, its ``ltrb``
  distances for DFL/L1, its overlap for the box term, and the assigner's geometry. Axis-aligned
  boxes (:data:`AXIS_ALIGNED`, CIoU) are the default; oriented boxes pass theirs
  (:data:`jaxtal.obb.ROTATED`, ProbIoU): the class, box and DFL/L1 terms are written once.
* **class term**: BCE-with-logits over every anchor and class against ``one_hot(labels) *
  weights``, per head level (no ``(b, A, nc)`` array); **box term**: ``sum w * (1 - overlap)``;
  **DFL** (``reg_max > 1``): ``sum w * mean over 4 sides of the two-bin cross-entropy``;
  **L1** (``reg_max == 1``, YOLO26): ``sum w * mean |ltrb - target|`` in units of the input.
* **finish**: ``total = sum(parts) * batch_size`` (Ultralytics' convention), global under
  ``axis_name``; the parts keep Ultralytics' names and order for each task.

The assignment is under ``stop_gradient``; every term here treats targets as constants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import kernels
from jaxtal._parallel import global_sum
from jaxtal.assigner import assign_targets
from jaxtal.boxes import box_iou, xyxy_to_ltrb
from jaxtal.config import AssignerConfig, LossConfig
from jaxtal.geometry import Geometry, GeometryExtra, axis_aligned
from jaxtal.head import Head
from jaxtal.labels import GroundTruth
from jaxtal.targets import Targets, take_rows


class LossParts(NamedTuple):
  """Gain-scaled detection loss terms (scalars): :func:`~jaxtal.detection_loss`'s parts.

  Attributes:
    box: ``box_gain * CIoU loss``.
    cls: ``cls_gain * BCE loss``.
    dfl: ``dfl_gain * DFL loss`` (the L1 distance loss when ``reg_max == 1``).
  """

  box: jax.Array
  cls: jax.Array
  dfl: jax.Array


class BoxForm(NamedTuple):
  """A box kind as the loss's box terms see it (a value, like :class:`~jaxtal.geometry.Geometry`).

  Attributes:
    name: a short name for messages, e.g. ``"xyxy"``.
    dim: ``D``, numbers per box.
    pixel_scale: ``(A, 1) strides -> (A, D) or broadcastable``: multiplies grid-unit boxes into pixels.
    stand_in: ``((A, 2) anchors, (A, 1) strides) -> (A, D)``: the target of a background anchor
      (finite, its weight is 0), so no padding value reaches a term.
    to_ltrb: ``((..., D) boxes, (..., 2) anchors) -> (..., 4)``: distances the DFL/L1 term reads.
    overlap: ``((b, E, D) predicted, (b, E, D) target) -> (b, E)``: the box term's overlap, grid units.
    geometry: ``config -> Geometry``: the assigner's geometry for this kind.
  """

  name: str
  dim: int
  pixel_scale: Callable[[jax.Array], jax.Array]
  stand_in: Callable[[jax.Array, jax.Array], jax.Array]
  to_ltrb: Callable[[jax.Array, jax.Array], jax.Array]
  overlap: Callable[[jax.Array, jax.Array], jax.Array]
  geometry: Callable[[AssignerConfig], Geometry]


AXIS_ALIGNED = BoxForm(
    name="xyxy",
    dim=4,
    pixel_scale=lambda strides: strides,
    stand_in=lambda anchors, strides: jnp.concatenate([anchors - 0.5, anchors + 0.5], axis=-1),  # a unit box
    to_ltrb=xyxy_to_ltrb,
    overlap=lambda pred, target: box_iou(pred, target, "ciou"),
    geometry=lambda cfg: axis_aligned(cfg.overlap),
)


def assign(head: Head, gt: GroundTruth, cfg: LossConfig, image_hw, form: BoxForm = AXIS_ALIGNED, extra: GeometryExtra | None = None) -> Targets:
  """Sigmoid scores and pixel boxes of ``head`` against ``gt`` with ``form``'s geometry (under ``stop_gradient``).

  ``E = M * topk`` entries; GT rows with no overlap with the ``image_hw`` input own nothing.
  ``extra``: the geometry's data beyond boxes (keypoints, masks), when its task gives some.
  """
  h, w = image_hw
  # The head's anchors are its levels' cell centres (make_anchors), so the assigner may use windows.
  grid = tuple((round(h / s), round(w / s), float(s)) for s in cfg.strides)
  return assign_targets(
      head.logits,
      head.boxes * form.pixel_scale(head.strides),
      head.anchors * head.strides,
      gt,
      cfg,
      geometry=form.geometry(cfg),
      from_logits=True,
      image_hw=image_hw,
      extra=extra,
      grid=grid,
  )


def normaliser(targets: Targets, axis_name: str | None) -> jax.Array:
  """``N = max(sum of target scores, 1)``, over the global batch under ``axis_name``."""
  total = jnp.sum(targets.weights)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return jnp.maximum(total, 1.0)


def foreground_count(targets: Targets, axis_name: str | None) -> jax.Array:
  """``max(number of foreground anchors, 1)``, over the global batch under ``axis_name``: the
  denominator of the per-anchor means (pose, segmentation), which count every foreground anchor
  whatever its target score."""
  total = jnp.sum(targets.entries.valid, dtype=jnp.float32)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return jnp.maximum(total, 1.0)


def entry_weights(targets: Targets) -> jax.Array:
  """``(b, E)`` target score of each valid entry's anchor, 0 on invalid entries (no gradient)."""
  e = targets.entries
  return jax.lax.stop_gradient(jnp.where(e.valid, take_rows(targets.weights, e.anchor), 0.0))


def target_boxes(head: Head, targets: Targets, form: BoxForm = AXIS_ALIGNED) -> jax.Array:
  """``(b, A, D)`` target boxes in grid units of each anchor's level, ``form``'s stand-in on background
  anchors (double-``where``: their weight is 0 anyway)."""
  grid = targets.boxes / form.pixel_scale(head.strides)
  return jax.lax.stop_gradient(jnp.where(targets.fg_mask[..., None], grid, form.stand_in(head.anchors, head.strides)))


def class_term(head: Head, targets: Targets, class_weights, plain: tuple[str, ...] = ()) -> jax.Array:
  """Sum of BCE-with-logits over every anchor and class against ``one_hot(labels) * weights``.

  Per level, so no ``(b, A, nc)`` array is concatenated or materialised.
  """
  bce_sum = kernels.select("bce_sum", plain)
  cw = None if class_weights is None else jax.lax.stop_gradient(jnp.asarray(class_weights, jnp.float32))
  total, lo = 0.0, 0
  for logits in head.logits:
    hi = lo + logits.shape[1]
    total = total + bce_sum(logits, targets.labels[:, lo:hi], targets.weights[:, lo:hi], cw)
    lo = hi
  return total


def box_term(head: Head, targets: Targets, target: jax.Array, w: jax.Array, form: BoxForm = AXIS_ALIGNED) -> jax.Array:
  """Sum over the entry list of ``(1 - overlap(pred, target)) * weight``, grid units."""
  rows = targets.entries.anchor
  return jnp.sum(w * (1.0 - form.overlap(take_rows(head.boxes, rows), take_rows(target, rows))))


def dfl_term(head: Head, targets: Targets, target_ltrb: jax.Array, w: jax.Array, reg_max: int, plain: tuple[str, ...] = ()) -> jax.Array:
  """Sum over the entry list of ``weight * mean over 4 sides of DFL`` (two-bin cross-entropy).

  ``CE = logsumexp(bins) - <two-bin target, bins>``. The log-sum-exp part reads a per-anchor
  coefficient scattered from the entries, and :func:`jaxtal.kernels.two_bin_logit_sum` scatters
  the same coefficients for its dense gradient, so value and gradient agree for any entry list.
  """
  two_bin = kernels.select("two_bin_logit_sum", plain)
  rows = targets.entries.anchor
  row_coef = w / 4
  coef = jax.vmap(lambda r, c: jnp.zeros(head.lse.shape[1], c.dtype).at[r].add(c))(rows, row_coef)
  target = jnp.clip(target_ltrb, 0.0, reg_max - 1 - 0.01)
  total, lo = jnp.sum(coef[..., None] * head.lse), 0
  for dist in head.dist:
    hi = lo + dist.shape[1]
    here = (rows >= lo) & (rows < hi)
    local = jnp.clip(rows - lo, 0, hi - lo - 1)
    total = total - two_bin(dist, target[:, lo:hi], local, jnp.where(here, row_coef, 0.0))
    lo = hi
  return total


def l1_term(head: Head, targets: Targets, target_ltrb: jax.Array, w: jax.Array, image_hw) -> jax.Array:
  """``reg_max == 1`` (YOLO26): sum over the entries of ``weight * mean |ltrb - target|``, distances
  in units of the input size."""
  rows = targets.entries.anchor
  h, w_px = image_hw
  scale = take_rows(jnp.broadcast_to(head.strides, head.ltrb.shape[:-1] + (1,)), rows) / jnp.array([w_px, h, w_px, h], jnp.float32)
  diff = jnp.abs(take_rows(head.ltrb, rows) * scale - take_rows(target_ltrb, rows) * scale)
  return jnp.sum(w * jnp.mean(diff, axis=-1))


class BoxTargets(NamedTuple):
  """What every foreground term weighs and divides by, computed once per loss (see :func:`box_targets`).

  Attributes:
    n: the normaliser ``N`` (scalar).
    w: ``(b, E)`` entry weights.
    target: ``(b, A, D)`` target boxes in grid units (the form's stand-in on background anchors).
  """

  n: jax.Array
  w: jax.Array
  target: jax.Array


def box_targets(head: Head, targets: Targets, cfg: LossConfig, form: BoxForm = AXIS_ALIGNED) -> BoxTargets:
  """The normaliser, entry weights and grid-unit target boxes, for :func:`detection_parts` and a task's own
  foreground terms alike (OBB's angle term reads the same ones)."""
  return BoxTargets(normaliser(targets, cfg.axis_name), entry_weights(targets), target_boxes(head, targets, form))


def detection_parts(
    head: Head, targets: Targets, cfg: LossConfig, image_hw, class_weights, form: BoxForm = AXIS_ALIGNED,
    shared: BoxTargets | None = None,
) -> LossParts:
  """The gain-scaled class, box and DFL/L1 terms (not yet finished): what every task loss shares.

  ``head.boxes`` and ``targets.boxes`` are of ``form``'s kind (``(b, A, D)``); ``shared`` is
  :func:`box_targets` when the caller needs them too (computed here otherwise).
  """
  n, w, target = box_targets(head, targets, cfg, form) if shared is None else shared
  target_ltrb = form.to_ltrb(target, head.anchors)
  loss_cls = class_term(head, targets, class_weights, cfg.plain_kernels) / n
  loss_box = box_term(head, targets, target, w, form) / n
  if cfg.reg_max > 1:
    loss_dfl = dfl_term(head, targets, target_ltrb, w, cfg.reg_max, cfg.plain_kernels) / n
  else:
    loss_dfl = l1_term(head, targets, target_ltrb, w, image_hw) / n
  return LossParts(cfg.box * loss_box, cfg.cls * loss_cls, cfg.dfl * loss_dfl)


def finish(parts: Any, batch: int, axis_name: str | None) -> tuple[jax.Array, Any]:
  """``total = sum(parts) * batch_size`` (Ultralytics' convention), global under ``axis_name``.

  ``parts`` is the task's parts NamedTuple of gain-scaled scalars; returned as ``(total, parts)``.
  """
  batch_size = jnp.float32(batch)
  if axis_name is not None:
    batch_size = jax.lax.psum(batch_size, axis_name)
    parts = jax.tree.map(lambda x: global_sum(x, axis_name), parts)
  return sum(parts) * batch_size, parts
