"""What the assigner hands the loss: per-anchor targets and the foreground entry list.

The foreground entry list is the contract every foreground-only loss term reads (CIoU, DFL,
and later the OBB angle, pose keypoints and segmentation masks). It is written here, once:

* it has a fixed size ``E`` per image (``E = M * topk`` from the assigner), so terms that only
  foreground anchors contribute to are computed on ``E`` rows, not on all ``A`` anchors, with no
  dynamic shape;
* ``entries.valid[i, e]`` is True for exactly one entry of every foreground anchor of image
  ``i`` and for no other entry: ``{anchor[i, e] : valid[i, e]} == {a : fg_mask[i, a]}``, each
  anchor once;
* on a valid entry, ``gt[i, e] == gt_index[i, anchor[i, e]]``; invalid entries hold any
  in-range anchor and GT index (read them only through ``valid``).

:func:`foreground_entries` builds such a list from any foreground mask (for an assignment made
elsewhere), and :func:`entries_cover_foreground` tests the contract (used by the tests and by
:func:`jaxtal.checked_loss_from_targets`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ForegroundEntries(NamedTuple):
  """A fixed-size list holding every foreground anchor exactly once (see the module docstring).

  Attributes:
    anchor: ``(b, E)`` int32 anchor index of each entry, in ``[0, A)``.
    gt: ``(b, E)`` int32 GT slot that owns that anchor, in ``[0, M)``.
    valid: ``(b, E)`` bool, True exactly once per foreground anchor.
  """

  anchor: jax.Array
  gt: jax.Array
  valid: jax.Array


class Targets(NamedTuple):
  """Per-anchor training targets in the form the loss reads (class scores kept factored).

  The dense target scores are ``one_hot(labels, nc) * weights[..., None]``.

  Attributes:
    labels: ``(b, A)`` int32 class of the assigned GT; 0 on background.
    boxes: ``(b, A, D)`` float32 box of the assigned GT in pixels (``D = 4`` xyxy); 0 on background.
    weights: ``(b, A)`` float32 target score of that class (the normalised align metric); 0 on background.
    fg_mask: ``(b, A)`` bool, True on foreground anchors.
    gt_index: ``(b, A)`` int32 GT slot of each foreground anchor; 0 on background.
    positives_per_gt: ``(b, M)`` int32 foreground anchors each GT slot owns (0 on padding): a GT
      with 0 got no anchor at all (too small for any anchor centre, or outbid by its neighbours).
    entries: the :class:`ForegroundEntries` list.
  """

  labels: jax.Array
  boxes: jax.Array
  weights: jax.Array
  fg_mask: jax.Array
  gt_index: jax.Array
  positives_per_gt: jax.Array
  entries: ForegroundEntries


class Assignment(NamedTuple):
  """Per-anchor training targets with dense class scores, as the seed walkthrough prints them.

  Attributes:
    labels: ``(b, A)`` int32 class of the assigned GT; 0 on background.
    boxes: ``(b, A, D)`` float32 box of the assigned GT in pixels; 0 on background.
    scores: ``(b, A, nc)`` float32 soft targets (one-hot times the normalised metric); 0 on background.
    fg_mask: ``(b, A)`` bool, True on foreground (positive) anchors.
    gt_index: ``(b, A)`` int32 index into ``M`` of the assigned GT; 0 on background.
    positives_per_gt: ``(b, M)`` int32 foreground anchors each GT slot owns; 0 on padding.
  """

  labels: jax.Array
  boxes: jax.Array
  scores: jax.Array
  fg_mask: jax.Array
  gt_index: jax.Array
  positives_per_gt: jax.Array


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """``x[i, rows[i]]`` for every image ``i``: how a term reads its values at the entry list.

  Shapes: ``(b, A, ...)`` and ``(b, E)`` int in ``[0, A)`` -> ``(b, E, ...)``. A gather within each
  image (both operands batched), so it keeps the batch's sharding under a batch-sharded ``jit``.
  """
  return jax.vmap(lambda v, i: jnp.take(v, i, axis=0))(x, rows)


def to_assignment(targets: Targets, num_classes: int) -> Assignment:
  """The dense :class:`Assignment` of ``targets``: ``scores (b, A, nc)`` materialised."""
  scores = jax.nn.one_hot(targets.labels, num_classes, dtype=jnp.float32) * targets.weights[..., None]
  return Assignment(targets.labels, targets.boxes, scores, targets.fg_mask, targets.gt_index, targets.positives_per_gt)


def foreground_entries(fg_mask: jax.Array, gt_index: jax.Array, size: int) -> ForegroundEntries:
  """An entry list of ``size`` rows holding the foreground anchors of each image, in anchor order.

  For assignments made outside jaxtal. ``size`` is static; an image with more than ``size``
  foreground anchors keeps its first ``size`` (lowest anchor index) and the rest are not listed,
  which breaks the contract: pick ``size`` at least the largest foreground count (``M * topk``
  is an upper bound for a top-k assigner).

  Shapes: ``(b, A)`` bool, ``(b, A)`` int -> entries of ``(b, size)``.
  """
  size = int(size)

  def one(fg, gi):
    (anchor,) = jnp.nonzero(fg, size=size, fill_value=0)
    count = jnp.sum(fg)
    valid = jnp.arange(size) < count
    return ForegroundEntries(anchor.astype(jnp.int32), jnp.where(valid, gi[anchor], 0).astype(jnp.int32), valid)

  return jax.vmap(one)(jnp.asarray(fg_mask, bool), jnp.asarray(gt_index, jnp.int32))


def targets_from_assignment(assignment: Assignment, num_entries: int) -> Targets:
  """:class:`Targets` from a dense :class:`Assignment` (one made by any assigner), for :func:`loss_from_targets`.

  ``weights`` is the per-anchor sum of ``scores``; the entry list comes from
  :func:`foreground_entries` with ``num_entries`` rows per image.
  """
  weights = jnp.sum(assignment.scores, axis=-1)
  entries = foreground_entries(assignment.fg_mask, assignment.gt_index, num_entries)
  return Targets(
      assignment.labels, assignment.boxes, weights, assignment.fg_mask, assignment.gt_index,
      assignment.positives_per_gt, entries,
  )


def entries_cover_foreground(targets: Targets) -> jax.Array:
  """``(b,)`` bool: whether each image's entry list keeps the contract (every foreground anchor
  listed once as valid, no background anchor listed, valid entries naming the anchor's GT)."""

  def one(fg, gi, anchor, gt, valid):
    count = jnp.zeros(fg.shape, jnp.int32).at[anchor].add(valid.astype(jnp.int32))
    owners_agree = jnp.all(jnp.where(valid, gi[anchor] == gt, True))
    return jnp.all(count == fg.astype(jnp.int32)) & owners_agree

  e = targets.entries
  return jax.vmap(one)(targets.fg_mask, targets.gt_index, e.anchor, e.gt, e.valid)
