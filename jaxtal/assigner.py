"""Task-aligned label assignment (TOOD), batched with ``vmap`` and fixed shapes.

The assignment for one image, in the steps of the seed walkthrough:

1. in-box mask: an anchor centre strictly inside a valid GT box (boxes with a side
   under ``min_box_side`` are widened to it about their centre, for this test only);
2. align metric ``s^alpha * u^beta`` on in-box pairs: ``s`` is the predicted
   probability of the GT's class, ``u`` the CIoU of GT and predicted box clamped at 0;
3. top-k: each GT keeps its ``topk`` anchors of highest metric, then only in-box ones;
4. conflict resolution: an anchor claimed by several GTs goes to the in-box GT with the
   highest overlap; ``topk2`` optionally re-filters each GT's positives by metric;
5. targets: the GT's class one-hot times ``metric * max overlap of the GT / max metric of
   the GT``, the GT's box, a foreground mask and the GT index.

Implementation notes. Steps 1-3 are the only ones that need every (GT, anchor) pair; they
run over blocks of ``gt_chunk`` GTs with ``lax.scan`` so memory is ``O(gt_chunk * A)``
whatever ``M`` is, and keep only each GT's top-k list (the ``(C, A)`` metric is the one
pairwise array materialised). Step 4 needs, for an anchor claimed twice, the in-box GT of
highest overlap among *all* GTs: it is computed only for the ``M * topk`` listed anchors,
again a block of GTs at a time. Steps 4-5 then work on per-anchor vectors,
``O(A + M * topk)``. Class scores are read as ``(nc, A_l)`` rows, one gather per GT, level by
level when the scores come in per-level blocks (the loss passes one per head level), so no
``(C, A)`` array is concatenated; with fewer GT slots than classes (than half the classes
from logits, where the loss's BCE gradient shares the whole-map pass), ``score ** alpha`` is
taken only at the values those gathers read, not over the whole ``(A, nc)`` map. Top-k is
exact and two-stage: per tile of 16 anchors the dense pass keeps only the maximum metric; a
GT's k best anchors lie in its k best tiles, and the final top-k runs over those ``16 * k``
candidates (XLA:CPU's top-k over all ``A`` was the largest single cost). Ties go to the lower
anchor index throughout. The loss's targets also carry that fixed-size ``M * topk`` entry list
with one entry marked per foreground anchor, so foreground-only terms are read without a
dynamic shape.
Chunked and dense (one block) runs give the same assignment, scores equal to float32 rounding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import ops
from jaxtal.boxes import aspect_angle, box_iou
from jaxtal.labels import GroundTruth, check_ground_truth

# Above this many (GT, anchor) pairs per image the GTs are processed in blocks.
_DENSE_PAIRS = 1 << 22
_AUTO_CHUNK = 32
# Anchors per tile of the two-stage top-k: the dense pass keeps one maximum per tile.
_TILE = 16


class Assignment(NamedTuple):
  """Per-anchor training targets.

  Attributes:
    labels: ``(b, A)`` int32 class of the assigned GT; 0 on background.
    boxes: ``(b, A, 4)`` float32 xyxy box of the assigned GT in pixels; 0 on background.
    scores: ``(b, A, nc)`` float32 soft targets (one-hot times the normalised metric);
      0 on background.
    fg_mask: ``(b, A)`` bool, True on foreground (positive) anchors.
    gt_index: ``(b, A)`` int32 index into ``M`` of the assigned GT; 0 on background.
  """

  labels: jax.Array
  boxes: jax.Array
  scores: jax.Array
  fg_mask: jax.Array
  gt_index: jax.Array


def valid_gt(gt_labels: jax.Array, gt_boxes: jax.Array, gt_mask: jax.Array, num_classes: int) -> jax.Array:
  """Which GT rows may own anchors: real rows with finite, positive-area boxes and a class in ``[0, nc)``.

  Shapes: ``(..., M)``, ``(..., M, 4)``, ``(..., M)`` -> ``(..., M)`` bool.
  """
  finite = jnp.isfinite(gt_boxes).all(axis=-1)
  positive = (gt_boxes[..., 2] > gt_boxes[..., 0]) & (gt_boxes[..., 3] > gt_boxes[..., 1])
  in_range = (gt_labels >= 0) & (gt_labels < num_classes)
  return gt_mask.astype(bool) & finite & positive & in_range


def _power(x: jax.Array, p: float) -> jax.Array:
  if float(p).is_integer() and 0 <= p <= 64:
    return jax.lax.integer_pow(x, int(p))
  if p == 0.5:
    return jnp.sqrt(x)
  return jnp.power(x, p)


def _score_power(s: jax.Array, from_logits: bool, alpha: float) -> jax.Array:
  """``score ** alpha`` of raw predictions (probabilities, or logits with ``from_logits``), float32.

  Non-finite or out-of-range predictions never become targets: they score 0.
  """
  s = s.astype(jnp.float32)
  if from_logits and alpha == 0.5:
    # The loss's BCE gradient computes ops.sigmoid from the same rsqrt: one pass serves both.
    s = ops.sqrt_sigmoid(s)
    return jnp.where(jnp.isnan(s), 0.0, s)  # in [0, 1] otherwise
  if from_logits:
    s = ops.sigmoid(s)
  return _power(jnp.where(jnp.isfinite(s), jnp.clip(s, 0.0, 1.0), 0.0), alpha)


def _class_score_rows(score_levels: tuple[jax.Array, ...], from_logits: bool, alpha: float, num_gts: int):
  """Per level ``(nc, A_l)`` class-score rows, and the map from a value read from them to ``score ** alpha``.

  ``score_levels`` are ``(A_l, nc)`` blocks of anchors (one per head level, or a single one);
  each GT reads the row of its class (the transpose is a view XLA folds into that gather).
  ``score ** alpha`` is computed over the whole map once when that pays: with ``M >= nc`` the
  pairs outnumber the scores, and from logits with ``alpha = 0.5`` and ``M >= nc / 2`` the
  loss's BCE gradient reuses the pass (with fewer slots the per-pair transform was faster in
  the loss even so). Otherwise only the values a pair reads are transformed, ``M * A`` instead
  of ``nc * A``; the floats are the same either way.
  """
  nc = score_levels[0].shape[-1]
  shared_with_bce = from_logits and alpha == 0.5 and 2 * num_gts >= nc
  if shared_with_bce or num_gts >= nc:
    return tuple(_score_power(s, from_logits, alpha).T for s in score_levels), lambda v: v
  return tuple(s.T for s in score_levels), functools.partial(_score_power, from_logits=from_logits, alpha=alpha)


def _level_spans(score_rows: tuple[jax.Array, ...]) -> list[tuple[int, int]]:
  """Static ``(start, stop)`` anchor range of each score block."""
  spans, start = [], 0
  for r in score_rows:
    spans.append((start, start + r.shape[1]))
    start += r.shape[1]
  return spans


def _score_at(score_rows: tuple[jax.Array, ...], power, labels: jax.Array, anchor_ids: jax.Array) -> jax.Array:
  """``score ** alpha`` of class ``labels`` at anchors ``anchor_ids`` (same shape), from the per-level rows."""
  safe = jnp.clip(labels, 0, score_rows[0].shape[0] - 1)
  out = jnp.zeros(anchor_ids.shape, score_rows[0].dtype)
  for r, (lo, hi) in zip(score_rows, _level_spans(score_rows)):
    inside = (anchor_ids >= lo) & (anchor_ids < hi)
    out = jnp.where(inside, r[safe, jnp.clip(anchor_ids - lo, 0, hi - lo - 1)], out)
  return power(out)


def _in_box_rect(boxes: jax.Array, valid: jax.Array, min_box_side: float) -> tuple[jax.Array, jax.Array]:
  """``(..., 2)`` left-top and right-bottom of the in-box test rectangle (sides floored at ``min_box_side``)."""
  ctr = (boxes[..., :2] + boxes[..., 2:]) / 2
  wh = boxes[..., 2:] - boxes[..., :2]
  if min_box_side > 0:
    wh = jnp.where(valid[..., None] & (wh < min_box_side), jnp.asarray(min_box_side, wh.dtype), wh)
  return ctr - wh / 2, ctr + wh / 2


def _pair_overlap(boxes, rect_lt, rect_rb, valid, gt_angle, pred_boxes, pred_angle, anchors, eps):
  """Broadcasting (GT, anchor) terms: whether the pair is a candidate and its clamped CIoU.

  Every place that needs a pair's overlap calls this, so the dense pass and the per-entry
  passes compute the same floats. Shapes broadcast: GT terms ``(..., 1)`` against anchor
  terms ``(1, ...)`` (or aligned).
  """
  ax, ay = anchors[..., 0], anchors[..., 1]
  cand = (
      (ax - rect_lt[..., 0] > eps)
      & (ay - rect_lt[..., 1] > eps)
      & (rect_rb[..., 0] - ax > eps)
      & (rect_rb[..., 1] - ay > eps)
      & valid
  )
  ciou = box_iou(boxes, pred_boxes, "ciou", angle1=gt_angle, angle2=pred_angle)
  return cand, jnp.where(cand & jnp.isfinite(ciou), jnp.maximum(ciou, 0.0), 0.0)


def _top_k_lists(score_rows, power, gts, preds, *, topk, beta, eps):
  """Steps 1-3 for a block of ``C`` GTs against all ``A`` anchors: ``(C, k)`` top-k anchors and metrics.

  ``gts`` = (labels, boxes, rect_lt, rect_rb, valid, angle) of the block; ``preds`` =
  (boxes, angle, anchors) of the image. An exact two-stage top-k: the anchors of each level
  are cut into tiles of ``_TILE``; the dense pass computes the ``(C, A_l)`` metric and each
  tile's maximum; each GT's ``k`` best tiles (by maximum) hold its ``k`` best anchors, so the
  final top-k runs over those ``k * _TILE`` candidates, their metrics read back from the
  dense pass (a gather, not a second in-box + CIoU evaluation). Candidates are taken in anchor
  order, so ties still go to the lower anchor index. Tile padding scores -1, below every
  real metric (>= 0), and there are always at least ``k`` real candidates (``k <= A``).
  """
  labels, boxes, lt, rb, valid, angle = gts
  pboxes, pangle, anchors = preds
  c = labels.shape[0]
  safe = jnp.clip(labels, 0, score_rows[0].shape[0] - 1)
  maxima, metrics, tile_levels, num_tiles = [], [], [], 0  # tile_levels: (first tile, tile count, first anchor, stop)
  for r, (lo, hi) in zip(score_rows, _level_spans(score_rows)):
    n = -(-(hi - lo) // _TILE)
    cand, overlaps = _pair_overlap(
        boxes[:, None], lt[:, None], rb[:, None], valid[:, None], angle[:, None],
        pboxes[None, lo:hi], pangle[None, lo:hi], anchors[None, lo:hi], eps,
    )
    metric = jnp.where(cand, power(jnp.take(r, safe, axis=0)) * _power(overlaps, beta), 0.0)
    metric = jnp.pad(metric, ((0, 0), (0, n * _TILE - (hi - lo))), constant_values=-1.0)
    maxima.append(metric.reshape(c, n, _TILE).max(axis=2))
    metrics.append(metric)
    tile_levels.append((num_tiles, n, lo, hi))
    num_tiles += n
  _, tiles = jax.lax.top_k(jnp.concatenate(maxima, axis=1), min(topk, num_tiles))
  tiles = jnp.sort(tiles, axis=1)  # candidates in anchor order
  # Tile -> first anchor and level end by arithmetic, not a lookup table: indexing an unbatched
  # table with batch-sharded indices has no unambiguous sharding under a batch-sharded jit.
  start, stop = jnp.zeros_like(tiles), jnp.zeros_like(tiles)
  metric = jnp.zeros((c, tiles.shape[1] * _TILE), jnp.float32)
  offsets = jnp.arange(_TILE, dtype=jnp.int32)
  for (first, n, lo, hi), level_metric in zip(tile_levels, metrics):
    here = (tiles >= first) & (tiles < first + n)
    start = jnp.where(here, lo + (tiles - first) * _TILE, start)
    stop = jnp.where(here, hi, stop)
    # The candidates' metrics are read back from the dense pass (its tile padding holds -1).
    local = (jnp.where(here, tiles - first, 0)[..., None] * _TILE + offsets).reshape(c, -1)
    metric = jnp.where(jnp.repeat(here, _TILE, axis=1), jnp.take_along_axis(level_metric, local, axis=1), metric)
  ids = start[..., None] + offsets
  ids = jnp.where(ids < stop[..., None], ids, 0).reshape(c, -1)  # padding (metric -1) is never among the top k
  top_metric, pos = jax.lax.top_k(metric, topk)  # ties go to the lower anchor index
  return jnp.take_along_axis(ids, pos, axis=1), top_metric


def _best_gt_of_entries(gts, entry_preds, *, eps):
  """Step 4 helper for a block of ``C`` GTs: for each entry's anchor ``(E,)``, the block's in-box GT of
  highest overlap (first on ties), that overlap (-1 if none) and the block-local index."""
  labels, boxes, lt, rb, valid, angle = gts
  pboxes, pangle, anchors = entry_preds
  cand, overlaps = _pair_overlap(
      boxes[:, None], lt[:, None], rb[:, None], valid[:, None], angle[:, None], pboxes[None], pangle[None], anchors[None], eps
  )  # (C, E): the reductions below run across GTs, vectorised along the entries
  masked = jnp.where(cand, overlaps, -1.0)
  best_ov = jnp.max(masked, axis=0)
  gt_ids = jnp.arange(masked.shape[0], dtype=jnp.int32)[:, None]
  best = jnp.min(jnp.where(masked == best_ov, gt_ids, masked.shape[0]), axis=0)  # the first GT on ties
  return best_ov, best


class Targets(NamedTuple):
  """Per-anchor targets with the class scores kept factored: ``scores = one_hot(labels) * norm``.

  ``entry_anchor`` lists the anchors of every GT's top-k (``E = M * topk``), and
  ``entry_first`` marks exactly one entry of each foreground anchor: a fixed-size list that
  holds every foreground anchor once, for terms that only foreground anchors contribute to.
  """

  labels: jax.Array  # (..., A) int32
  boxes: jax.Array  # (..., A, 4) float32 pixels
  norm: jax.Array  # (..., A) float32 normalised metric, 0 on background
  fg_mask: jax.Array  # (..., A) bool
  gt_index: jax.Array  # (..., A) int32
  entry_anchor: jax.Array  # (..., E) int32 anchor of each top-k entry
  entry_first: jax.Array  # (..., E) bool, True once per foreground anchor


def _assign_one(
    score_levels: tuple[jax.Array, ...],
    pred_boxes: jax.Array,
    anchors: jax.Array,
    gt_labels: jax.Array,
    gt_boxes: jax.Array,
    gt_mask: jax.Array,
    *,
    topk: int,
    topk2: int | None,
    alpha: float,
    beta: float,
    eps: float,
    min_box_side: float,
    gt_chunk: int,
    from_logits: bool,
) -> Targets:
  """Assignment of one image: score blocks ``(A_l, nc)``, ``(A, 4), (A, 2), (M,), (M, 4), (M,)``."""
  num_anchors = pred_boxes.shape[0]
  nc = score_levels[0].shape[-1]
  m = gt_labels.shape[0]
  valid = valid_gt(gt_labels, gt_boxes, gt_mask, nc)
  pred_boxes = jnp.where(jnp.isfinite(pred_boxes), pred_boxes, 0.0)
  safe_gt_boxes = jnp.where(valid[:, None], gt_boxes, 0.0)
  pred_angle = aspect_angle(pred_boxes)
  score_rows, power = _class_score_rows(score_levels, from_logits, alpha, m)
  rect_lt, rect_rb = _in_box_rect(safe_gt_boxes, valid, min_box_side)
  gts = (gt_labels, safe_gt_boxes, rect_lt, rect_rb, valid, aspect_angle(safe_gt_boxes))
  preds = (pred_boxes, pred_angle, anchors)
  gt_chunk = min(gt_chunk, m)
  n_blocks = -(-m // gt_chunk)

  def blocks(x):
    x = jnp.pad(x, [(0, n_blocks * gt_chunk - m)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_blocks, gt_chunk, *x.shape[1:])

  # Steps 1-3: each GT's top-k anchors by metric, a block of GTs at a time.
  if n_blocks == 1:
    top_idx, top_metric = _top_k_lists(score_rows, power, gts, preds, topk=topk, beta=beta, eps=eps)
  else:
    _, (top_idx, top_metric) = jax.lax.scan(
        lambda c, g: (c, _top_k_lists(score_rows, power, g, preds, topk=topk, beta=beta, eps=eps)), None, jax.tree.map(blocks, gts)
    )
    top_idx, top_metric = top_idx.reshape(-1, topk)[:m], top_metric.reshape(-1, topk)[:m]

  # Each list entry (GT m, anchor a): is it a positive (in-box, valid), and its overlap.
  entry_anchor = top_idx.reshape(-1)  # (E,) with E = M * topk
  owner = jnp.repeat(jnp.arange(m, dtype=jnp.int32), topk)
  # One gather of everything known per anchor; the anchors ride along with the (per-image)
  # predictions so the gather stays local to an image when the batch is sharded.
  entry_preds = (pred_boxes[entry_anchor], pred_angle[entry_anchor], anchors[entry_anchor])
  entry_pos, entry_ov = _pair_overlap(
      safe_gt_boxes[owner], rect_lt[owner], rect_rb[owner], valid[owner], gts[5][owner], *entry_preds, eps
  )
  entry_metric = top_metric.reshape(-1)

  # Step 4 needs, for contested anchors, the in-box GT of highest overlap among all M
  # (not only the claimants): computed for the E listed anchors only, not for all A.
  if n_blocks == 1:
    best_ov, best_gt = _best_gt_of_entries(gts, entry_preds, eps=eps)
  else:

    def step(carry, xs):
      start, g = xs
      b_ov, b_gt = _best_gt_of_entries(g, entry_preds, eps=eps)
      better = b_ov > carry[0]  # strict: an earlier GT keeps ties, as a global argmax would
      return (jnp.where(better, b_ov, carry[0]), jnp.where(better, b_gt + start, carry[1])), None

    starts = jnp.arange(n_blocks, dtype=jnp.int32) * gt_chunk
    init = (jnp.full(entry_anchor.shape, -1.0, jnp.float32), jnp.zeros(entry_anchor.shape, jnp.int32))
    (best_ov, best_gt), _ = jax.lax.scan(step, init, (starts, jax.tree.map(blocks, gts)))
  best_score = _score_at(score_rows, power, gt_labels[best_gt], entry_anchor)
  best_metric = jnp.where(best_ov >= 0, best_score * _power(jnp.maximum(best_ov, 0.0), beta), 0.0)

  # Per-anchor claim counts from the (M, topk) lists.
  count = jnp.zeros((num_anchors,), jnp.int32).at[entry_anchor].add(entry_pos.astype(jnp.int32))
  claimant = jnp.full((num_anchors,), -1, jnp.int32).at[entry_anchor].max(jnp.where(entry_pos, owner, -1))
  neg_inf = jnp.float32(-jnp.inf)
  claim_ov = jnp.full((num_anchors,), neg_inf).at[entry_anchor].max(jnp.where(entry_pos, entry_ov, neg_inf))
  claim_metric = jnp.full((num_anchors,), neg_inf).at[entry_anchor].max(jnp.where(entry_pos, entry_metric, neg_inf))
  # Every entry of one anchor carries the same best-GT values; scatter them to the anchor.
  best_ov = jnp.full((num_anchors,), -1.0).at[entry_anchor].max(best_ov)
  best_gt = jnp.zeros((num_anchors,), jnp.int32).at[entry_anchor].max(best_gt)
  best_metric = jnp.zeros((num_anchors,), jnp.float32).at[entry_anchor].max(best_metric)
  multi = count > 1
  fg = count > 0
  gt_index = jnp.where(multi, best_gt, jnp.maximum(claimant, 0))
  overlap = jnp.where(fg, jnp.where(multi, best_ov, claim_ov), 0.0)
  metric = jnp.where(fg, jnp.where(multi, best_metric, claim_metric), 0.0)

  if topk2 is not None and topk2 != topk:
    # Keep each GT's topk2 positives of highest metric (ties: lower anchor index).
    group = jnp.where(fg, gt_index, m)
    anchor_ids = jnp.arange(num_anchors, dtype=jnp.int32)
    # Sort by (GT, metric descending); lax.sort is stable, so ties keep the lower anchor index.
    sorted_group, _, sorted_ids = jax.lax.sort((group, -metric, anchor_ids), num_keys=2)
    group_start = jnp.searchsorted(sorted_group, jnp.arange(m + 1, dtype=sorted_group.dtype), side="left")
    position = jnp.arange(num_anchors, dtype=jnp.int32)
    rank = position - group_start[sorted_group]
    keep = jnp.zeros((num_anchors,), bool).at[sorted_ids].set(rank < topk2)
    fg = fg & keep
    metric = jnp.where(fg, metric, 0.0)
    overlap = jnp.where(fg, overlap, 0.0)
  gt_index = jnp.where(fg, gt_index, 0)

  # A foreground anchor is one some GT listed as a positive entry: mark the first such entry.
  entry_ids = jnp.arange(entry_anchor.shape[0], dtype=jnp.int32)
  first = jnp.full((num_anchors,), entry_anchor.shape[0], jnp.int32).at[entry_anchor].min(
      jnp.where(entry_pos, entry_ids, entry_anchor.shape[0])
  )
  entry_first = fg[entry_anchor] & (first[entry_anchor] == entry_ids)

  # Step 5: normalise each GT's metrics so its best anchor gets its best overlap. The per-GT
  # maxima run over the marked entries (every foreground anchor once), E values instead of A.
  owner_of_first = jnp.where(entry_first, gt_index[entry_anchor], m)  # m: dropped
  gt_max_metric = jnp.zeros((m,), jnp.float32).at[owner_of_first].max(metric[entry_anchor], mode="drop")
  gt_max_overlap = jnp.zeros((m,), jnp.float32).at[owner_of_first].max(overlap[entry_anchor], mode="drop")
  norm = jnp.where(fg, metric * gt_max_overlap[gt_index] / (gt_max_metric[gt_index] + eps), 0.0)

  labels = jnp.where(fg, gt_labels[gt_index], 0).astype(jnp.int32)
  boxes = jnp.where(fg[:, None], gt_boxes[gt_index], 0.0).astype(jnp.float32)
  return Targets(labels, boxes, norm, fg, gt_index.astype(jnp.int32), entry_anchor.astype(jnp.int32), entry_first)


def check_assign_inputs(pred_scores, pred_boxes, anchor_points, gt: GroundTruth, topk: int, topk2: int | None) -> None:
  """Trace-time validation of :func:`task_aligned_assign` arguments (raises ValueError / TypeError)."""
  for name, x, rank in (("pred_scores", pred_scores, 3), ("pred_boxes", pred_boxes, 3), ("anchor_points", anchor_points, 2)):
    if getattr(x, "ndim", None) != rank:
      raise ValueError(f"task_aligned_assign: {name} must have rank {rank}, got shape {getattr(x, 'shape', None)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"task_aligned_assign: {name} must be a float array, got dtype {x.dtype}")
  b, a, nc = pred_scores.shape
  if pred_boxes.shape != (b, a, 4):
    raise ValueError(
        f"task_aligned_assign: pred_boxes must be (b, A, 4) = ({b}, {a}, 4) to match pred_scores {pred_scores.shape},"
        f" got {pred_boxes.shape}"
    )
  if anchor_points.shape != (a, 2):
    raise ValueError(f"task_aligned_assign: anchor_points must be (A, 2) = ({a}, 2), got {anchor_points.shape}")
  check_ground_truth(gt, b, "task_aligned_assign")
  check_topk(topk, topk2, a, "task_aligned_assign")


def check_topk(topk, topk2, num_anchors: int, caller: str) -> None:
  """Trace-time check that ``topk`` (and ``topk2`` unless None) are whole numbers in ``[1, A]``."""

  def whole_in_range(x) -> bool:
    try:
      return not isinstance(x, bool) and int(x) == x and 1 <= x <= num_anchors
    except (TypeError, ValueError):
      return False

  if not whole_in_range(topk):
    raise ValueError(
        f"{caller}: topk must be a whole number in [1, A = {num_anchors}] (A = number of anchors), got {topk!r}"
    )
  if topk2 is not None and not whole_in_range(topk2):
    raise ValueError(f"{caller}: topk2 must be None or a whole number in [1, A = {num_anchors}], got {topk2!r}")


def task_aligned_assign(
    pred_scores: jax.Array,
    pred_boxes: jax.Array,
    anchor_points: jax.Array,
    gt: GroundTruth,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
    topk2: int | None = None,
    min_box_side: float = 0.0,
    gt_chunk: int | None = None,
) -> Assignment:
  """Assigns every anchor a target with the task-aligned assigner of TOOD.

  Written for one image and vmapped over the batch; jittable with the keyword
  arguments static; the whole computation is under ``stop_gradient``.

  Args:
    pred_scores: ``(b, A, nc)`` predicted class probabilities (sigmoid of the logits).
    pred_boxes: ``(b, A, 4)`` predicted xyxy boxes in input pixels.
    anchor_points: ``(A, 2)`` anchor centres in input pixels.
    gt: a :class:`~jaxtal.GroundTruth` with ``M`` slots per image. Rows that are padding,
      have a non-finite or zero/negative-area box, or a class outside ``[0, nc)`` never own anchors.
    topk: candidates kept per GT.
    alpha: exponent of the class score in the metric.
    beta: exponent of the CIoU in the metric.
    eps: margin of the strict in-box test and the normaliser's guard.
    topk2: if set (and different from ``topk``), each GT keeps at most ``topk2`` positives
      after conflict resolution, those of highest metric (YOLO26's one-to-one branch uses
      ``topk=7, topk2=1``).
    min_box_side: GT sides shorter than this (pixels) are widened to it about the box
      centre for the in-box test only; ``0`` disables (the original YOLOv8), the current
      Ultralytics release uses ``strides[1]``.
    gt_chunk: process GTs in blocks of this many (memory ``O(b * gt_chunk * max(A, M * topk))``:
      the pairwise pass and the conflict step's overlaps with the ``M * topk`` listed anchors);
      ``None`` picks dense for small ``M * A`` and blocks of 32 otherwise. The assignment
      does not depend on it; target scores agree to float32 rounding.

  Returns:
    An :class:`Assignment`: ``labels (b, A)``, ``boxes (b, A, 4)``, ``scores (b, A, nc)``,
    ``fg_mask (b, A)``, ``gt_index (b, A)``.

  References:
    Feng et al., 2021, "TOOD: Task-aligned One-stage Object Detection",
    https://arxiv.org/abs/2108.07755.
  """
  check_assign_inputs(pred_scores, pred_boxes, anchor_points, gt, topk, topk2)
  targets = assign_targets(
      (pred_scores,),
      pred_boxes,
      anchor_points,
      gt,
      from_logits=False,
      topk=topk,
      alpha=alpha,
      beta=beta,
      eps=eps,
      topk2=topk2,
      min_box_side=min_box_side,
      gt_chunk=gt_chunk,
  )
  nc = pred_scores.shape[-1]
  scores = jax.nn.one_hot(targets.labels, nc, dtype=jnp.float32) * targets.norm[..., None]
  return Assignment(targets.labels, targets.boxes, scores, targets.fg_mask, targets.gt_index)


def assign_targets(
    score_levels: tuple[jax.Array, ...],
    pred_boxes: jax.Array,
    anchor_points: jax.Array,
    gt: GroundTruth,
    *,
    from_logits: bool,
    topk: int,
    alpha: float,
    beta: float,
    eps: float,
    topk2: int | None,
    min_box_side: float,
    gt_chunk: int | None,
) -> Targets:
  """Batched assignment without the dense ``(b, A, nc)`` scores (used by the loss).

  ``score_levels`` are ``(b, A_l, nc)`` blocks whose anchors concatenate to ``A``: class
  probabilities, or logits with ``from_logits=True`` (no ``(b, A, nc)`` concatenation is
  made either way). Arguments are not validated here; see :func:`task_aligned_assign`.
  """
  if gt.labels.shape[1] == 0:
    # No GT slots at all: the same as one slot that is padding (every anchor is background).
    b = gt.labels.shape[0]
    gt = GroundTruth(jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1, 4), jnp.float32), jnp.zeros((b, 1), bool))
  m = gt.labels.shape[1]
  num_anchors = pred_boxes.shape[1]
  if gt_chunk is None:
    gt_chunk = m if m * num_anchors <= _DENSE_PAIRS else _AUTO_CHUNK
  elif int(gt_chunk) != gt_chunk or gt_chunk < 1:
    raise ValueError(f"gt_chunk must be None or a whole number >= 1, got {gt_chunk!r}")
  sg = jax.lax.stop_gradient
  one = functools.partial(
      _assign_one,
      topk=int(topk),
      topk2=None if topk2 is None else int(topk2),
      alpha=float(alpha),
      beta=float(beta),
      eps=float(eps),
      min_box_side=float(min_box_side),
      gt_chunk=int(min(gt_chunk, m)),
      from_logits=bool(from_logits),
  )
  pred_boxes = sg(jnp.asarray(pred_boxes, jnp.float32))
  # Anchors per image, laid out like the predictions: a gather from an unbatched operand with
  # batch-sharded indices has no unambiguous sharding under a batch-sharded jit.
  anchors = jnp.broadcast_to(sg(jnp.asarray(anchor_points, jnp.float32)), (pred_boxes.shape[0], *anchor_points.shape))
  sharding = getattr(jax.typeof(pred_boxes), "sharding", None)
  if sharding is not None and getattr(sharding, "mesh", None) is not None and not sharding.mesh.empty:
    anchors = jax.sharding.reshard(anchors, sharding)
  return jax.vmap(one)(
      tuple(sg(jnp.asarray(s)) for s in score_levels),
      pred_boxes,
      anchors,
      sg(jnp.asarray(gt.labels, jnp.int32)),
      sg(jnp.asarray(gt.boxes, jnp.float32)),
      sg(jnp.asarray(gt.mask, bool)),
  )
