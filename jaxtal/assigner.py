"""Task-aligned label assignment (TOOD), written once for every geometry.

The assignment of one image, in the steps of the seed walkthrough (each a function below):

1. candidates (:func:`_select_topk`): anchors the geometry's candidate test accepts for a valid GT
   (axis-aligned boxes: the anchor centre strictly inside the box);
2. align metric (:func:`_select_topk`): ``s^alpha * u^beta`` on candidate pairs, ``s`` the
   predicted probability of the GT's class, ``u`` the geometry's overlap clamped at 0;
3. top-k (:func:`_select_topk`): each GT keeps its ``topk`` anchors of highest metric, then
   only the candidates among them: an ``(M, topk)`` claim list, ``E = M * topk`` entries;
4. conflict resolution (:func:`_best_candidate_gt`, :func:`_resolve_conflicts`): an anchor
   claimed by several GTs goes to the candidate GT (among all ``M``) of highest overlap;
   ``topk2`` optionally keeps each GT's best ``topk2`` positives (:func:`_keep_topk2`);
5. targets (:func:`_targets`): the GT's class, box, and score ``metric * (max overlap of the
   GT) / (max metric of the GT)``, plus the foreground entry list (:mod:`jaxtal.targets`).

The geometry (:class:`jaxtal.geometry.Geometry`) supplies the candidate test and the overlap;
nothing here knows what a box is.

Memory: steps 1-3 are the only ones over every (GT, anchor) pair. They run over blocks of
``gt_chunk`` GTs (``lax.scan``), so memory is ``O(gt_chunk * A)`` whatever ``M``; step 4 needs
each listed anchor's best candidate GT among all ``M`` and is computed for the ``E`` listed
anchors only, again a block of GTs at a time. Everything after is ``O(A + E)``. Chunked and
dense runs give the same assignment, scores equal to float32 rounding. Ties go to the lower
anchor index in top-k and to the lower GT index in conflict resolution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import _validate
from jaxtal import kernels
from jaxtal import windows
from jaxtal.config import AssignerConfig, make_config
from jaxtal.geometry import Geometry, GeometryExtra, axis_aligned, keypoint_oks, rotated
from jaxtal.labels import GroundTruth, valid_rows
from jaxtal.targets import Assignment, ForegroundEntries, Targets, to_assignment

# Memory, not speed: above this many (GT, anchor) pairs per image the GTs go in blocks of
# _AUTO_CHUNK (bench rows "assign memory, auto/dense": 79 MiB against 658 MiB at M = 1000).
_DENSE_PAIRS = 1 << 22
_AUTO_CHUNK = 32


class _Gts(NamedTuple):
  """One image's GT slots: every leaf ``(M, ...)`` (or a block ``(C, ...)`` of them)."""

  labels: jax.Array  # (M,) int32 class (clipped into [0, nc) for reading scores)
  valid: jax.Array  # (M,) bool, the one rule of jaxtal.labels.valid_rows
  data: Any  # the geometry's per-GT data
  gated: jax.Array | None = None  # (M,) bool: the geometry's gate applies (it leaves the GT a candidate)
  listed: jax.Array | None = None  # (M, L) int32: a shortlist geometry's refined pairs' anchors
  listed_overlap: jax.Array | None = None  # (M, L) float32: their refined overlaps


class _Scores(NamedTuple):
  """Class scores of one image as per-level rows and the map to ``score ** alpha``.

  ``rows`` are ``(nc, A_l)`` (``by_class``: the dense passes read a GT's class as one row) or the
  levels as given, ``(A_l, nc)`` (the windowed passes read scattered pairs: no transposed copy).
  """

  rows: tuple[jax.Array, ...]
  power: Callable[[jax.Array], jax.Array]
  by_class: bool = True

  def width(self, i: int) -> int:
    """Anchors of level ``i``."""
    return self.rows[i].shape[1 if self.by_class else 0]

  def at(self, i: int, labels: jax.Array, anchors: jax.Array) -> jax.Array:
    """Level ``i``'s raw value of class ``labels`` at its anchors ``anchors`` (broadcasting)."""
    return self.rows[i][labels, anchors] if self.by_class else self.rows[i][anchors, labels]

  def of_class(self, i: int, labels: jax.Array) -> jax.Array:
    """Level ``i``'s raw ``(C, A_l)`` rows of classes ``labels (C,)``."""
    return jnp.take(self.rows[i], labels, axis=0) if self.by_class else jnp.take(self.rows[i], labels, axis=1).T


class _Claims(NamedTuple):
  """The ``E = M * topk`` entries of the GTs' top-k lists: every leaf ``(E,)``."""

  anchor: jax.Array  # int32 anchor of the entry
  owner: jax.Array  # int32 GT whose top-k listed it
  positive: jax.Array  # bool: the anchor is a candidate of that (valid) GT
  overlap: jax.Array  # float32 the pair's clamped overlap
  metric: jax.Array  # float32 the pair's align metric


class _Best(NamedTuple):
  """For each entry's anchor, its best candidate GT among all ``M``: every leaf ``(E,)``."""

  overlap: jax.Array  # float32, -1 where the anchor is no GT's candidate
  gt: jax.Array  # int32, the first GT on ties
  metric: jax.Array  # float32 align metric of that pair


class _PerAnchor(NamedTuple):
  """The assignment of each anchor after conflict resolution: every leaf ``(A,)``."""

  fg: jax.Array  # bool
  gt: jax.Array  # int32 (0 on background)
  overlap: jax.Array  # float32 (0 on background)
  metric: jax.Array  # float32 (0 on background)


def _power(x: jax.Array, p: float) -> jax.Array:
  if float(p).is_integer() and 0 <= p <= 64:
    return jax.lax.integer_pow(x, int(p))
  if p == 0.5:
    return jnp.sqrt(x)
  return jnp.power(x, p)


def _score_power(s: jax.Array, from_logits: bool, alpha: float, plain: tuple[str, ...]) -> jax.Array:
  """``score ** alpha``, float32; non-finite or out-of-range scores never become targets (they score 0)."""
  s = s.astype(jnp.float32)
  if from_logits and alpha == 0.5:
    s = kernels.select("sqrt_sigmoid", plain)(s)  # the loss's BCE gradient reads the same pass (jaxtal.kernels)
    return jnp.where(jnp.isnan(s), 0.0, s)  # in [0, 1] otherwise
  if from_logits:
    s = jax.nn.sigmoid(s)
  return _power(jnp.where(jnp.isfinite(s), jnp.clip(s, 0.0, 1.0), 0.0), alpha)


def _read_scores(levels: tuple[jax.Array, ...], from_logits: bool, alpha: float, num_gts: int, plain: tuple[str, ...],
                 windowed: bool = False) -> _Scores:
  """Per-level ``(A_l, nc)`` scores -> ``(nc, A_l)`` rows, each GT reads the row of its class.

  ``score ** alpha`` is taken over the whole map (``nc * A`` values) or only at the values the
  (GT, anchor) pairs read (``M * A``), as :func:`jaxtal.kernels.whole_map_scores` decides; the
  floats are the same either way. ``windowed``: the pairs read a few anchors per GT, so only at
  those, from the levels as given.
  """
  if windowed:
    return _Scores(tuple(levels), lambda v: _score_power(v, from_logits, alpha, plain), by_class=False)
  if kernels.select("whole_map_scores", plain)(num_gts, levels[0].shape[-1], from_logits, alpha):
    return _Scores(tuple(_score_power(s, from_logits, alpha, plain).T for s in levels), lambda v: v)
  return _Scores(tuple(s.T for s in levels), lambda v: _score_power(v, from_logits, alpha, plain))


def _spans(scores: _Scores) -> list[tuple[int, int]]:
  """Static ``(start, stop)`` anchor range of each score level."""
  spans, start = [], 0
  for i in range(len(scores.rows)):
    spans.append((start, start + scores.width(i)))
    start += scores.width(i)
  return spans


def _raw_score_at(scores: _Scores, labels: jax.Array, anchors: jax.Array) -> jax.Array:
  """The score rows' value for class ``labels`` at anchor ``anchors`` (broadcasting), before ``power``."""
  out = jnp.zeros(jnp.broadcast_shapes(labels.shape, anchors.shape), scores.rows[0].dtype)
  for i, (lo, hi) in enumerate(_spans(scores)):
    inside = (anchors >= lo) & (anchors < hi)
    out = jnp.where(inside, scores.at(i, labels, jnp.clip(anchors - lo, 0, hi - lo - 1)), out)
  return out


def _score_at(scores: _Scores, labels: jax.Array, anchors: jax.Array) -> jax.Array:
  """``score ** alpha`` of class ``labels`` at anchor ``anchors`` (same shape)."""
  return scores.power(_raw_score_at(scores, labels, anchors))


def _tree_take(tree, idx):
  return jax.tree.map(lambda x: x[idx], tree)


def _candidates(geometry: Geometry, gts: _Gts, preds, eps: float) -> jax.Array:
  """Broadcasting pairs: the candidate test of valid GTs, with the geometry's gate where it applies."""
  cand = geometry.candidate(gts.data, preds, eps) & gts.valid
  if geometry.gate is not None and gts.gated is not None:
    cand = cand & (geometry.gate(gts.data, preds) | ~gts.gated)
  return cand


def _candidate_overlap(geometry: Geometry, gts: _Gts, preds, eps: float, anchor=None) -> tuple[jax.Array, jax.Array]:
  """Broadcasting pairs: candidate mask and overlap clamped to ``[0, ...)`` (0 off candidates).

  Every place that needs a pair's overlap calls this, so the dense pass and the per-entry
  passes compute the same floats. With a shortlist geometry's refined list in ``gts``, the
  pairs' ``anchor`` indices (broadcasting like the pairs) look up the listed pairs' overlaps.
  """
  cand = _candidates(geometry, gts, preds, eps)
  overlap = geometry.overlap(gts.data, preds)
  if gts.listed is not None and anchor is not None:
    hit = gts.listed == anchor[..., None]  # (..., L): a pair is listed at most once
    overlap = jnp.where(jnp.any(hit, axis=-1), jnp.sum(jnp.where(hit, gts.listed_overlap, 0.0), axis=-1), overlap)
  return cand, jnp.where(cand & jnp.isfinite(overlap), jnp.maximum(overlap, 0.0), 0.0)


def _select_topk(scores: _Scores, gts: _Gts, preds, geometry: Geometry, cfg: AssignerConfig, k: int | None = None, rank: bool = False):
  """Steps 1-3 for a block of ``C`` GTs against all ``A`` anchors -> ``(C, k)`` anchors and metrics.

  ``rank``: a shortlist geometry's ranking pass (candidates score ``metric + eps``, so a
  zero-metric candidate still outranks every non-candidate). With the shortlist refined
  (``gts.listed``), the listed pairs' metrics replace the others' in the row before the top-k.
  """
  metric_levels = []
  for r, (lo, hi) in zip(scores.rows, _spans(scores)):
    level = jax.tree.map(lambda x: x[None, lo:hi], preds)  # (1, A_l, ...)
    cand, overlap = _candidate_overlap(geometry, jax.tree.map(lambda x: x[:, None], gts), level, cfg.eps)
    s = scores.power(jnp.take(r, gts.labels, axis=0))  # (C, A_l)
    metric = s * _power(overlap, cfg.beta)
    metric_levels.append(jnp.where(cand, metric + cfg.eps if rank else metric, 0.0))
  if gts.listed is not None:
    # Refined pairs: row-aligned (C, L) against their own anchors, scattered into the whole row.
    listed = _tree_take(preds, gts.listed)  # leaves (C, L, ...)
    cand, overlap = _candidate_overlap(geometry, jax.tree.map(lambda x: x[:, None], gts), listed, cfg.eps, gts.listed)
    s = _score_at(scores, gts.labels[:, None], gts.listed)
    row = jnp.concatenate(metric_levels, axis=1)
    rows = jnp.arange(row.shape[0], dtype=jnp.int32)[:, None]
    metric_levels = [row.at[rows, gts.listed].set(jnp.where(cand, s * _power(overlap, cfg.beta), 0.0))]
  return kernels.select("top_k", cfg.plain_kernels)(metric_levels)(cfg.topk if k is None else k)


def _blocks(tree, size: int):
  """Pads the leading ``M`` axis of every leaf to whole blocks: ``(M, ...)`` -> ``(n, size, ...)``."""
  m = jax.tree.leaves(tree)[0].shape[0]
  n = -(-m // size)

  def split(x):
    x = jnp.pad(x, [(0, n * size - m)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n, size, *x.shape[1:])

  return jax.tree.map(split, tree), n


def _claims(top_anchor, top_metric, gts: _Gts, preds, geometry: Geometry, eps: float) -> _Claims:
  """The ``(M, k)`` top-k lists as ``E = M * k`` entries, each with its pair's candidate flag and overlap."""
  m, k = top_anchor.shape
  anchor = top_anchor.reshape(-1)  # (E,)
  owner = jnp.repeat(jnp.arange(m, dtype=jnp.int32), k)
  positive, overlap = _candidate_overlap(geometry, _tree_take(gts, owner), _tree_take(preds, anchor), eps, anchor)
  return _Claims(anchor, owner, positive, overlap, top_metric.reshape(-1))


def _gate_applies(gts: _Gts, preds, geometry: Geometry, cfg: AssignerConfig, gt_chunk: int) -> jax.Array:
  """``(M,)`` whether a gated geometry's gate leaves each GT some candidate (else it keeps its ungated ones)."""

  def block(g: _Gts):
    gated = geometry.candidate(g.data, preds, cfg.eps) & g.valid & geometry.gate(g.data, preds)
    return jnp.any(gated, axis=1)

  pairs = lambda g: jax.tree.map(lambda x: x[:, None], g)  # noqa: E731
  preds = jax.tree.map(lambda x: x[None], preds)
  m = gts.labels.shape[0]
  if gt_chunk >= m:
    return block(pairs(gts))
  blocks, _ = _blocks(gts, gt_chunk)
  _, out = jax.lax.scan(lambda c, g: (c, block(pairs(g))), None, blocks)
  return out.reshape(-1)[:m]


def _best_candidate_gt(gts: _Gts, entry_preds, entry_anchor, geometry: Geometry, cfg: AssignerConfig, gt_chunk: int):
  """Step 4 helper: for each entry's anchor, the candidate GT of highest overlap among all ``M``.

  Returns ``(overlap (E,), gt (E,))``: -1 and 0 where the anchor is no GT's candidate.
  """

  def block(g: _Gts):  # (C,) GTs against (E,) entries: reductions run across GTs
    cand, overlap = _candidate_overlap(
        geometry, jax.tree.map(lambda x: x[:, None], g), jax.tree.map(lambda x: x[None], entry_preds), cfg.eps, entry_anchor[None]
    )
    masked = jnp.where(cand, overlap, -1.0)
    best = jnp.max(masked, axis=0)
    ids = jnp.arange(masked.shape[0], dtype=jnp.int32)[:, None]
    return best, jnp.min(jnp.where(masked == best, ids, masked.shape[0]), axis=0)  # the first GT on ties

  m = gts.labels.shape[0]
  if gt_chunk >= m:
    best_ov, best_gt = block(gts)
  else:
    blocks, n = _blocks(gts, gt_chunk)

    def step(carry, xs):
      start, g = xs
      ov, gt = block(g)
      better = ov > carry[0]  # strict: an earlier GT keeps ties, as one global argmax would
      return (jnp.where(better, ov, carry[0]), jnp.where(better, gt + start, carry[1])), None

    num = jax.tree.leaves(entry_preds)[0].shape[0]
    init = (jnp.full((num,), -1.0, jnp.float32), jnp.zeros((num,), jnp.int32))
    (best_ov, best_gt), _ = jax.lax.scan(step, init, (jnp.arange(n, dtype=jnp.int32) * gt_chunk, blocks))
  return best_ov, best_gt


def _resolve_conflicts(claims: _Claims, best: _Best, num_anchors: int) -> _PerAnchor:
  """Step 4: entries -> anchors. An anchor with one positive claim goes to its claimant; one with
  several goes to its best candidate GT among all ``M`` (which may not have listed it)."""
  at = claims.anchor
  count = jnp.zeros((num_anchors,), jnp.int32).at[at].add(claims.positive.astype(jnp.int32))
  claimant = jnp.full((num_anchors,), -1, jnp.int32).at[at].max(jnp.where(claims.positive, claims.owner, -1))
  neg_inf = jnp.float32(-jnp.inf)
  claim_overlap = jnp.full((num_anchors,), neg_inf).at[at].max(jnp.where(claims.positive, claims.overlap, neg_inf))
  claim_metric = jnp.full((num_anchors,), neg_inf).at[at].max(jnp.where(claims.positive, claims.metric, neg_inf))
  # Every entry of one anchor carries the same best-GT values: scattering them with max is a copy.
  best_overlap = jnp.full((num_anchors,), -1.0).at[at].max(best.overlap)
  best_gt = jnp.zeros((num_anchors,), jnp.int32).at[at].max(best.gt)
  best_metric = jnp.zeros((num_anchors,), jnp.float32).at[at].max(best.metric)
  fg, multi = count > 0, count > 1
  return _PerAnchor(
      fg=fg,
      gt=jnp.where(fg, jnp.where(multi, best_gt, claimant), 0),
      overlap=jnp.where(fg, jnp.where(multi, best_overlap, claim_overlap), 0.0),
      metric=jnp.where(fg, jnp.where(multi, best_metric, claim_metric), 0.0),
  )


def _keep_topk2(a: _PerAnchor, entries: ForegroundEntries, num_gts: int, topk2: int) -> tuple[_PerAnchor, ForegroundEntries]:
  """Optional step 4b: each GT keeps its ``topk2`` positives of highest metric (ties: lower anchor).

  Sorted over the ``E`` entries, not the ``A`` anchors: the valid entries hold every foreground
  anchor once with its GT, so ranking them ranks each GT's positives (``E = M * topk`` values per
  image instead of ``A``; YOLO26's one-to-one branch runs this every step).
  """
  e = entries.anchor.shape[0]
  group = jnp.where(entries.valid, entries.gt, num_gts)  # invalid entries sort last
  ids = jnp.arange(e, dtype=jnp.int32)
  # Sort by (GT, metric descending, anchor): ties within a GT go to the lower anchor index.
  sorted_group, _, _, order = jax.lax.sort((group, -a.metric[entries.anchor], entries.anchor, ids), num_keys=3)
  group_start = jnp.searchsorted(sorted_group, jnp.arange(num_gts + 1, dtype=sorted_group.dtype), side="left")
  rank = ids - group_start[sorted_group]
  keep = jnp.zeros((e,), bool).at[order].set(rank < topk2) & entries.valid
  fg = jnp.zeros(a.fg.shape, jnp.int32).at[entries.anchor].max(keep.astype(jnp.int32)) > 0
  kept = _PerAnchor(fg, jnp.where(fg, a.gt, 0), jnp.where(fg, a.overlap, 0.0), jnp.where(fg, a.metric, 0.0))
  return kept, entries._replace(valid=keep)


def _entry_list(claims: _Claims, a: _PerAnchor) -> ForegroundEntries:
  """Marks one entry per foreground anchor (its first positive claim): the entry-list contract."""
  e = claims.anchor.shape[0]
  ids = jnp.arange(e, dtype=jnp.int32)
  first = jnp.full(a.fg.shape, e, jnp.int32).at[claims.anchor].min(jnp.where(claims.positive, ids, e))
  valid = a.fg[claims.anchor] & (first[claims.anchor] == ids)
  return ForegroundEntries(claims.anchor, a.gt[claims.anchor], valid)


def _targets(a: _PerAnchor, entries: ForegroundEntries, gt_labels, gt_boxes, eps: float) -> Targets:
  """Step 5: each GT's metrics normalised so its best anchor scores its best overlap.

  The per-GT maxima run over the valid entries (every foreground anchor once): ``E`` values.
  """
  m = gt_labels.shape[0]
  owner = jnp.where(entries.valid, entries.gt, m)  # m: dropped
  max_metric = jnp.zeros((m,), jnp.float32).at[owner].max(a.metric[entries.anchor], mode="drop")
  max_overlap = jnp.zeros((m,), jnp.float32).at[owner].max(a.overlap[entries.anchor], mode="drop")
  weights = jnp.where(a.fg, a.metric * max_overlap[a.gt] / (max_metric[a.gt] + eps), 0.0)
  positives = jnp.zeros((m,), jnp.int32).at[owner].add(1, mode="drop")
  labels = jnp.where(a.fg, gt_labels[a.gt], 0).astype(jnp.int32)
  boxes = jnp.where(a.fg[:, None], gt_boxes[a.gt], 0.0).astype(jnp.float32)
  return Targets(labels, boxes, weights, a.fg, a.gt.astype(jnp.int32), positives, entries)


def _topk_blocks(scores: _Scores, gts: _Gts, preds, geometry: Geometry, cfg: AssignerConfig, gt_chunk: int, k: int, rank: bool = False):
  """:func:`_select_topk` for all ``M`` GTs, a block of ``gt_chunk`` at a time: ``(M, k)`` anchors and metrics."""
  m = gts.labels.shape[0]
  if gt_chunk >= m:
    return _select_topk(scores, gts, preds, geometry, cfg, k, rank)
  blocks, _ = _blocks(gts, gt_chunk)
  _, (top_anchor, top_metric) = jax.lax.scan(lambda c, g: (c, _select_topk(scores, g, preds, geometry, cfg, k, rank)), None, blocks)
  return top_anchor.reshape(-1, k)[:m], top_metric.reshape(-1, k)[:m]


def _refine(scores: _Scores, gts: _Gts, preds, geometry: Geometry, cfg: AssignerConfig, gt_chunk: int, image_extra) -> _Gts:
  """A shortlist geometry's first pass: each GT's ``L`` best pairs by the unrefined metric, refined once."""
  num_anchors = jax.tree.leaves(preds)[0].shape[0]
  size = min(geometry.shortlist * cfg.topk, num_anchors)
  listed, _ = _topk_blocks(scores, gts, preds, geometry, cfg, gt_chunk, size, rank=True)  # (M, L)
  return _refined(gts, listed, preds, geometry, cfg, image_extra)


def _refined(gts: _Gts, listed: jax.Array, preds, geometry: Geometry, cfg: AssignerConfig, image_extra) -> _Gts:
  """``gts`` with the shortlist ``listed (M, L)`` refined by the geometry (one call per image)."""
  listed_preds = _tree_take(preds, listed)
  cand = _candidates(geometry, jax.tree.map(lambda x: x[:, None], gts), listed_preds, cfg.eps)
  data, overlap = geometry.refine(gts.data, listed_preds, listed, cand, image_extra)
  overlap = jnp.where(cand & jnp.isfinite(overlap), overlap, 0.0).astype(jnp.float32)
  return gts._replace(data=data, listed=listed, listed_overlap=overlap)


# ------------------------------------------------------------------------------------------------
# The windowed passes (jaxtal.windows): each GT against the anchors of its window only, in blocks of
# GTs sorted by window size; a block whose GTs fit no window runs dense. The same pair floats as the
# dense passes above (every pair goes through _candidate_overlap), so the same targets.


class _Windows(NamedTuple):
  """One image's windowed plan (:func:`jaxtal.windows.plan`)."""

  layout: windows.Layout  # static window shapes
  sizes: tuple[int, ...]  # static GTs per block of each bucket
  bounds: jax.Array  # (M, 4) the geometry's bounds of each GT's candidates
  plan: windows.Plan  # the image's GTs by bucket, and the loop over blocks (cum: not batched)


def _filled(like: jax.Array, shape: tuple[int, ...], value, dtype) -> jax.Array:
  """``value`` in ``shape``, computed from ``like`` (an image's array under the batch ``vmap``) so that it is
  batched and laid out like the batch: a ``while_loop`` carry created as a constant has no sharding, and
  under a batch-sharded ``jit`` (explicit mesh axes) the loop's batching rule cannot place it."""
  zero = jnp.zeros((), dtype) * (jnp.ravel(like)[0] == 0).astype(dtype)  # 0 whatever ``like`` holds (no NaN)
  return jnp.full(shape, value, dtype) + zero


def _block_loop(win: _Windows, gts: _Gts, branch_fn, finish, outs, carry=None):
  """One loop over the blocks of every bucket (:func:`jaxtal.windows.block_ids`).

  ``branch_fn(bucket, g, ids, bounds) -> (per_gt, shared)`` with static ``bucket`` and the block's
  ``C_k`` GTs ``g`` (padding rows invalid), indices ``ids (C_k,)`` (``M`` on padding) and bounds
  ``(C_k, 4)``; then ``finish(g, ids, (per_gt, shared), carry) -> (carry, out)`` with ``per_gt``'s
  leaves padded to ``max(sizes)`` rows,
  outside the switch so that its code is compiled once, not once per bucket. Each leaf of ``out``
  is written into ``outs``'s ``(M, ...)`` rows at the block's GTs. Returns ``(carry, outs)``.
  """
  m = gts.labels.shape[0]
  rows = max(win.sizes)

  def branch(bucket, g, ids, bounds):
    size = win.sizes[bucket]
    per_gt, shared = branch_fn(bucket, jax.tree.map(lambda x: x[:size], g), ids[:size], bounds[:size])
    return jax.tree.map(lambda x: jnp.pad(x, [(0, rows - size)] + [(0, 0)] * (x.ndim - 1)), per_gt), shared

  branches = [functools.partial(branch, k) for k in range(win.layout.dense + 1)]

  def body(t, state):
    carry, outs = state
    bucket, ids = windows.block_ids(win.plan, t, win.sizes, m)
    safe = jnp.minimum(ids, m - 1)
    g = _tree_take(gts, safe)
    g = g._replace(valid=g.valid & (ids < m))  # padding: no candidates
    raw = jax.lax.switch(bucket, branches, g, ids, win.bounds[safe])
    carry, out = finish(g, ids, raw, carry)
    return carry, jax.tree.map(lambda o, x: o.at[ids].set(x, mode="drop"), outs, out)

  return jax.lax.fori_loop(0, win.plan.cum[-1], body, (carry, outs))


def _windowed_gate(win: _Windows, gts: _Gts, preds, geometry: Geometry, cfg: AssignerConfig) -> jax.Array:
  """:func:`_gate_applies` over the windows: ``(M,)`` whether the gate leaves each GT some candidate."""

  def gated(g: _Gts, p):  # g.valid: (C,), or (C, W) with a window's unused slots masked
    data = jax.tree.map(lambda x: x[:, None], g.data)
    valid = g.valid if g.valid.ndim == 2 else g.valid[:, None]
    return jnp.any(geometry.candidate(data, p, cfg.eps) & valid & geometry.gate(data, p), axis=1)

  def branch(bucket, g, ids, bounds):
    if bucket == win.layout.dense:
      return gated(g, jax.tree.map(lambda x: x[None], preds)), None
    anchor, used = windows.window_anchors(windows.cells(bounds, win.layout), win.layout, win.layout.caps[bucket])
    return gated(g._replace(valid=g.valid[:, None] & used), _tree_take(preds, anchor)), None

  m = gts.labels.shape[0]
  return _block_loop(win, gts, branch, lambda g, ids, raw, carry: (carry, raw[0]), _filled(gts.labels, (m,), False, bool))[1]


def _window_scores(scores: _Scores, labels: jax.Array, anchor: jax.Array) -> jax.Array:
  """``score ** alpha`` of class ``labels (C,)`` at window anchors ``(C, W)``."""
  if len(scores.rows) == 1:
    return scores.power(scores.at(0, labels[:, None], anchor))
  return _score_at(scores, labels[:, None], anchor)


def _windowed_top_k(win: _Windows, scores: _Scores, gts: _Gts, preds, geometry: Geometry, cfg: AssignerConfig, k: int,
                    rank: bool = False, best: bool = False):
  """Steps 1-3 over the windows: :func:`_topk_blocks` and :func:`_claims` in one pass.

  Returns ``(claims, best)``: the ``(M, k)`` top-k lists as :class:`_Claims` (every leaf ``(M *
  k,)``), and with ``best`` each anchor's best candidate GT among all ``M``, ``((A,) overlap, (A,)
  gt)`` (-1 and 0 where it is no GT's candidate: :func:`_best_candidate_gt` per anchor), else None.
  The top-k lists are those of :func:`_topk_blocks`, ties included; the claims' candidate flags
  and overlaps are the pairs' own, read from the window.
  """
  m = gts.labels.shape[0]
  num_anchors = jax.tree.leaves(preds)[0].shape[0]
  lay = win.layout
  sentinel = jnp.iinfo(jnp.int32).max
  nobody = (_filled(gts.labels, (num_anchors,), -1.0, jnp.float32), _filled(gts.labels, (num_anchors,), sentinel, jnp.int32))

  def pairs(g: _Gts, p, slots):
    """Candidates and clamped overlaps of ``g`` against ``p`` (leaves ``(C, W, ...)`` or ``(1, A, ...)``);
    a refined shortlist's pairs (``slots``: their columns, ``W`` when outside) take their refined overlaps."""
    cand, overlap = _candidate_overlap(geometry, jax.tree.map(lambda x: x[:, None], g), p, cfg.eps)
    if g.listed is not None:
      listed = _tree_take(preds, g.listed)
      _, refined = _candidate_overlap(geometry, jax.tree.map(lambda x: x[:, None], g), listed, cfg.eps, g.listed)
      rows = jnp.arange(g.listed.shape[0], dtype=jnp.int32)[:, None]
      overlap = overlap.at[rows, slots].set(refined, mode="drop")
    return cand, overlap

  def metric_of(cand, overlap, s):
    metric = s * _power(overlap, cfg.beta)
    return jnp.where(cand, metric + cfg.eps if rank else metric, 0.0)

  def at(x, pos):  # x (C, W) read at columns pos (C, k)
    return jnp.take_along_axis(x, pos, axis=1)

  def dense(g: _Gts, ids, carry):
    everywhere = jax.tree.map(lambda x: x[None], preds)
    cand, overlap = pairs(g, everywhere, g.listed)
    s = jnp.concatenate([scores.power(scores.of_class(i, g.labels)) for i in range(len(scores.rows))], axis=1)
    top_anchor, top_metric = kernels.select("top_k", cfg.plain_kernels)([metric_of(cand, overlap, s)])(k)
    if best:
      masked = jnp.where(cand, overlap, -1.0)
      high = jnp.max(masked, axis=0)
      owner = jnp.min(jnp.where((masked >= 0) & (masked == high), ids[:, None], sentinel), axis=0)
      carry = windows.merge_best(carry, (high, owner))
    return carry, (top_metric, top_anchor, at(cand, top_anchor), at(overlap, top_anchor))

  def branch(bucket, g, ids, bounds):
    """The block's top ``k`` window pairs ``(values, anchors, candidate, overlap)``, each ``(C, k)``, and
    with ``best`` the block's best GT of every anchor."""
    if bucket == lay.dense:
      block_best, top = dense(g, ids, nobody)
      return top, block_best if best else None
    cap = lay.caps[bucket]
    anchor, used = windows.window_anchors(windows.cells(bounds, lay), lay, cap)  # (C, W)
    slots = None if g.listed is None else windows.window_slots(g.listed, windows.cells(bounds, lay), lay, cap)
    cand, overlap = pairs(g, _tree_take(preds, anchor), slots)
    cand = cand & used  # unused slots (anchor 0) are no pair
    metric = metric_of(cand, overlap, _window_scores(scores, g.labels, anchor))
    if cap < k:  # a window smaller than k: pad (-1 never counts as a top value)
      pad = ((0, 0), (0, k - cap))
      metric, anchor, cand, overlap = (jnp.pad(x, pad, constant_values=v) for x, v in ((metric, -1.0), (anchor, 0), (cand, False), (overlap, 0.0)))
    values, pos = jax.lax.top_k(metric, k)  # stable: ties to the lower window slot, the lower anchor
    top = (values, at(anchor, pos), at(cand, pos), at(overlap, pos))
    return top, windows.best_in_block(anchor, jnp.where(cand, overlap, -1.0), ids, num_anchors) if best else None

  def finish(g, ids, raw, carry):
    (values, anchor, cand, overlap), block_best = raw
    top_anchor, top_metric, kept = windows.complete_top_k(values, anchor)
    # A filled slot is a pair of the GT with a low-index anchor, scoring 0: read it directly.
    cand_f, overlap_f = _candidate_overlap(geometry, jax.tree.map(lambda x: x[:, None], g), _tree_take(preds, top_anchor), cfg.eps, top_anchor)
    out = (top_anchor, top_metric, jnp.where(kept, cand, cand_f), jnp.where(kept, overlap, overlap_f))
    return (windows.merge_best(carry, block_best) if best else carry), out

  outs = tuple(_filled(gts.labels, (m, k), 0, t) for t in (jnp.int32, jnp.float32, bool, jnp.float32))
  carry, (top_anchor, top_metric, positive, overlap) = _block_loop(win, gts, branch, finish, outs, nobody if best else None)
  owner = jnp.repeat(jnp.arange(m, dtype=jnp.int32), k)
  claims = _Claims(top_anchor.reshape(-1), owner, positive.reshape(-1), overlap.reshape(-1), top_metric.reshape(-1))
  if not best:
    return claims, None
  high, who = carry
  return claims, (high, jnp.where(high >= 0, who, 0))


def _prepare_image(score_levels, pred_boxes, anchors, gt_labels, gt_boxes, gt_mask, extra, *, cfg, geometry, image_hw):
  """One image's GT slots and anchors as the geometry sees them: ``(_Gts, p)``."""
  nc = score_levels[0].shape[-1]
  box_ok = geometry.box_ok(gt_boxes)
  if image_hw is not None:
    box_ok = box_ok & geometry.on_image(gt_boxes, image_hw)
  valid = valid_rows(gt_labels, gt_boxes, gt_mask, nc, box_ok)
  safe_boxes = jnp.where(valid[:, None], gt_boxes, 0.0)  # invalid rows never reach the geometry
  safe_preds = jnp.where(jnp.isfinite(pred_boxes), pred_boxes, 0.0)
  # Anchors ride along with the (per-image) predictions, so gathers stay local to an image
  # when the batch is sharded.
  if extra is None:
    data, preds = geometry.gt_data(safe_boxes, valid, cfg.side_floor), geometry.pred_data(safe_preds, anchors)
  else:
    data, preds = geometry.gt_data(safe_boxes, valid, cfg.side_floor, extra.gt), geometry.pred_data(safe_preds, anchors, extra.pred)
  return _Gts(jnp.clip(gt_labels, 0, nc - 1), valid, data), preds


def _assign_image(score_levels, gts: _Gts, preds, gt_labels, gt_boxes, image_extra, *, cfg, geometry, from_logits, gt_chunk, windowed=None):
  """Steps 1-5 for one image: score levels ``(A_l, nc)``, its GT slots and anchors
  (:func:`_prepare_image`), ``(M,)`` labels, ``(M, D)`` boxes, and ``GeometryExtra.image`` (or None).

  ``windowed``: ``(layout, order (M'), bucket (n,))`` to run the pairwise passes over each GT's
  window of anchors (:mod:`jaxtal.windows`), or None for the dense passes.
  """
  m, num_anchors = gt_labels.shape[0], jax.tree.leaves(preds)[0].shape[0]
  scores = _read_scores(score_levels, from_logits, cfg.alpha, m, cfg.plain_kernels, windowed=windowed is not None)
  if windowed is None:
    if geometry.gate is not None:
      gts = gts._replace(gated=_gate_applies(gts, preds, geometry, cfg, gt_chunk))
    if geometry.shortlist:
      gts = _refine(scores, gts, preds, geometry, cfg, gt_chunk, image_extra)
    # Steps 1-3, a block of GTs at a time: (M, topk) anchors and metrics.
    top_anchor, top_metric = _topk_blocks(scores, gts, preds, geometry, cfg, gt_chunk, cfg.topk)
    claims = _claims(top_anchor, top_metric, gts, preds, geometry, cfg.eps)
    # Step 4's helper: each listed anchor's best candidate GT among all M.
    best_overlap, best_gt = _best_candidate_gt(gts, _tree_take(preds, claims.anchor), claims.anchor, geometry, cfg, gt_chunk)
  else:
    win = _Windows(*windowed)
    if geometry.gate is not None:
      gts = gts._replace(gated=_windowed_gate(win, gts, preds, geometry, cfg))
    if geometry.shortlist:
      size = min(geometry.shortlist * cfg.topk, num_anchors)
      listed, _ = _windowed_top_k(win, scores, gts, preds, geometry, cfg, size, rank=True)
      gts = _refined(gts, listed.anchor.reshape(m, size), preds, geometry, cfg, image_extra)
    # Steps 1-3 and step 4's helper in one pass over the windows: the best candidate GT of every anchor.
    claims, (best_overlap, best_gt) = _windowed_top_k(win, scores, gts, preds, geometry, cfg, cfg.topk, best=True)
    best_overlap, best_gt = best_overlap[claims.anchor], best_gt[claims.anchor]

  # Step 4.
  best_score = _score_at(scores, gts.labels[best_gt], claims.anchor)
  best_metric = jnp.where(best_overlap >= 0, best_score * _power(jnp.maximum(best_overlap, 0.0), cfg.beta), 0.0)
  per_anchor = _resolve_conflicts(claims, _Best(best_overlap, best_gt, best_metric), num_anchors)
  entries = _entry_list(claims, per_anchor)
  if cfg.topk2 is not None and cfg.topk2 != cfg.topk:
    per_anchor, entries = _keep_topk2(per_anchor, entries, m, cfg.topk2)

  # Step 5.
  return _targets(per_anchor, entries, gt_labels, gt_boxes, cfg.eps)


def assign_targets(
    score_levels: tuple[jax.Array, ...],
    pred_boxes: jax.Array,
    anchor_points: jax.Array,
    gt: GroundTruth,
    config: AssignerConfig,
    *,
    geometry: Geometry,
    from_logits: bool,
    image_hw: tuple[float, float] | None = None,
    extra: GeometryExtra | None = None,
    grid: tuple[tuple[int, int, float], ...] | None = None,
) -> Targets:
  """Batched assignment in the form the loss reads (:class:`~jaxtal.Targets`), for any geometry.

  Args:
    score_levels: ``(b, A_l, nc)`` blocks whose anchors concatenate to ``A`` (the loss passes
      one per head level, so no ``(b, A, nc)`` array is made): probabilities, or logits with
      ``from_logits=True``.
    pred_boxes: ``(b, A, D)`` predicted boxes in pixels.
    anchor_points: ``(A, 2)`` anchor centres in pixels.
    gt: :class:`~jaxtal.GroundTruth` with ``(b, M, D)`` boxes in pixels.
    config: the assigner's settings.
    geometry: the :class:`~jaxtal.geometry.Geometry` of the boxes.
    from_logits: whether ``score_levels`` are logits.
    image_hw: the input ``(H, W)`` in pixels when known (the loss): GT rows with no overlap
      with the image are then masked too.
    extra: the geometry's data beyond boxes (:class:`~jaxtal.geometry.GeometryExtra`, leaves
      ``(b, ...)``, taken under ``stop_gradient``), or None for box geometries.
    grid: when ``anchor_points`` are the cell centres of per-level grids (``make_anchors(shapes,
      strides)`` times the strides), one ``(H_l, W_l, stride_l)`` per level in anchor order: the
      pairwise passes may then visit only the anchors near each GT (:mod:`jaxtal.windows`,
      ``config.windows``); the targets are the same. None: every anchor is visited. The loss
      passes its head's grid.

  Returns:
    :class:`~jaxtal.Targets` with ``E = M * topk`` entries, under ``stop_gradient``. Arguments
    are validated by the public callers, not here.
  """
  grid = _validate.grid(grid, pred_boxes.shape[1], "assign_targets")
  if gt.labels.shape[1] == 0:
    # No GT slots at all: the same as one slot that is padding (every anchor is background).
    b = gt.labels.shape[0]
    gt = GroundTruth(jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1, geometry.box_dim), jnp.float32), jnp.zeros((b, 1), bool))
    if extra is not None and extra.gt is not None:  # per-GT extras get the padding slot too
      extra = extra._replace(gt=jax.tree.map(lambda x: jnp.zeros((x.shape[0], 1, *x.shape[2:]), x.dtype), extra.gt))
  m = gt.labels.shape[1]
  num_anchors = pred_boxes.shape[1]
  gt_chunk = config.gt_chunk
  if gt_chunk is None:
    gt_chunk = m if m * num_anchors <= _DENSE_PAIRS else _AUTO_CHUNK
  gt_chunk = min(int(gt_chunk), m)
  sg = jax.lax.stop_gradient
  pred_boxes = sg(jnp.asarray(pred_boxes, jnp.float32))
  # Anchors per image, laid out like the predictions: a gather from an unbatched operand with
  # batch-sharded indices has no unambiguous sharding under a batch-sharded jit.
  anchors = jnp.broadcast_to(sg(jnp.asarray(anchor_points, jnp.float32)), (pred_boxes.shape[0], *anchor_points.shape))
  sharding = getattr(jax.typeof(pred_boxes), "sharding", None)
  if sharding is not None and getattr(sharding, "mesh", None) is not None and not sharding.mesh.empty:
    anchors = jax.sharding.reshard(anchors, sharding)
  levels = tuple(sg(jnp.asarray(s)) for s in score_levels)
  labels = sg(jnp.asarray(gt.labels, jnp.int32))
  gt_boxes = sg(jnp.asarray(gt.boxes, jnp.float32))
  extra = None if extra is None else jax.tree.map(sg, extra)
  image = None if extra is None else extra.image
  prepare = functools.partial(_prepare_image, cfg=config, geometry=geometry, image_hw=image_hw)
  gts, preds = jax.vmap(prepare)(levels, pred_boxes, anchors, labels, gt_boxes, sg(jnp.asarray(gt.mask).astype(bool)), extra)
  assign = functools.partial(_assign_image, cfg=config, geometry=geometry, from_logits=from_logits, gt_chunk=gt_chunk)
  if not _use_windows(config, geometry, grid, m, num_anchors):
    return jax.vmap(assign)(levels, gts, preds, labels, gt_boxes, image)
  lay = windows.layout(grid)
  sizes = windows.block_sizes(lay, m, gt_chunk)
  bounds = jax.vmap(geometry.bounds)(gts.data)  # (b, M, 4)
  plan = windows.plan(jnp.where(gts.valid, windows.needs(bounds, lay), 0), sizes)
  cum = plan.cum  # the same loop for every image: not batched

  def windowed(levels, gts, preds, labels, gt_boxes, image, bounds, order, start, count):
    return assign(levels, gts, preds, labels, gt_boxes, image, windowed=(lay, sizes, bounds, windows.Plan(order, start, count, cum)))

  return jax.vmap(windowed)(levels, gts, preds, labels, gt_boxes, image, bounds, plan.order, plan.start, plan.count)


def _use_windows(cfg: AssignerConfig, geometry: Geometry, grid, num_gts: int, num_anchors: int) -> bool:
  """Whether the pairwise passes run over windows: possible with a known grid and a geometry that
  bounds its candidates; ``cfg.windows`` forces the choice, else :func:`jaxtal.kernels.windows` decides."""
  if grid is None or geometry.bounds is None:
    return False
  if cfg.windows is not None:
    return cfg.windows
  return kernels.select("windows", cfg.plain_kernels)(num_gts, num_anchors)


def task_aligned_assign(
    pred_scores: jax.Array,
    pred_boxes: jax.Array,
    anchor_points: jax.Array,
    gt: GroundTruth,
    config: AssignerConfig | None = None,
    *,
    grid: tuple[tuple[int, int, float], ...] | None = None,
    **overrides,
) -> Assignment:
  """Assigns every anchor a target with the task-aligned assigner of TOOD (axis-aligned boxes).

  Written for one image and vmapped over the batch; the whole computation is under
  ``stop_gradient``. Configuration is static: pass a hashable
  :class:`~jaxtal.AssignerConfig` (``jax.jit(..., static_argnames="config")``) or keyword
  overrides (``topk=..., alpha=..., beta=..., eps=..., topk2=..., min_box_side=..., overlap=...,
  gt_chunk=...``; see :class:`~jaxtal.AssignerConfig` for each).

  Args:
    pred_scores: ``(b, A, nc)`` predicted class probabilities (sigmoid of the logits).
    pred_boxes: ``(b, A, 4)`` predicted xyxy boxes in input pixels.
    anchor_points: ``(A, 2)`` anchor centres in input pixels.
    gt: a :class:`~jaxtal.GroundTruth` with ``M`` slots per image. Rows that are padding, have a
      non-finite, out-of-bound (``|x| > COORD_LIMIT``) or zero/negative-area box, or a class
      outside ``[0, nc)`` never own anchors.
    config: an :class:`~jaxtal.AssignerConfig` (a :class:`~jaxtal.LossConfig` works too).
    grid: when ``anchor_points`` are ``make_anchors(shapes, strides)`` times the strides, one
      ``(H_l, W_l, stride_l)`` per level: the assignment may then visit only the anchors near each
      GT (crowded scenes; see :func:`~jaxtal.assign_targets`). The result is the same.

  Returns:
    An :class:`~jaxtal.Assignment`: ``labels (b, A)``, ``boxes (b, A, 4)``, ``scores (b, A, nc)``,
    ``fg_mask (b, A)``, ``gt_index (b, A)``, ``positives_per_gt (b, M)``.

  References:
    Feng et al., 2021, "TOOD: Task-aligned One-stage Object Detection",
    https://arxiv.org/abs/2108.07755.
  """
  cfg = make_config(AssignerConfig, config, overrides, "task_aligned_assign")
  return _dense_assignment(pred_scores, pred_boxes, anchor_points, gt, cfg, axis_aligned(cfg.overlap), "task_aligned_assign", grid=grid)


def _dense_assignment(pred_scores, pred_boxes, anchor_points, gt, cfg: AssignerConfig, geometry: Geometry, caller: str, extra=None, grid=None) -> Assignment:
  """The public assigners' shared half: validate probabilities, boxes and ``gt`` of ``geometry``'s kind,
  assign, and return the dense :class:`~jaxtal.Assignment`."""
  _, a, nc = _validate.assigner_inputs(pred_scores, pred_boxes, anchor_points, gt, geometry.box_dim, caller)
  _validate.topk_in_range(cfg.topk, cfg.topk2, a, caller)
  grid = _validate.grid(grid, a, caller)
  targets = assign_targets((pred_scores,), pred_boxes, anchor_points, gt, cfg, geometry=geometry, from_logits=False, extra=extra, grid=grid)
  return to_assignment(targets, nc)


def rotated_only(overlap: str, caller: str) -> None:
  """Rotated boxes always use ProbIoU: a config asking for another ``overlap`` is an error."""
  if overlap != "ciou":
    raise ValueError(
        f"{caller}: rotated boxes always use ProbIoU as the overlap; leave overlap at its default, got {overlap!r}"
    )


def rotated_task_aligned_assign(
    pred_scores: jax.Array,
    pred_boxes: jax.Array,
    anchor_points: jax.Array,
    gt: GroundTruth,
    config: AssignerConfig | None = None,
    *,
    grid: tuple[tuple[int, int, float], ...] | None = None,
    **overrides,
) -> Assignment:
  """The task-aligned assigner for rotated ``xywhr`` boxes (Ultralytics' ``RotatedTaskAlignedAssigner``).

  :func:`~jaxtal.assign_targets` with :func:`jaxtal.geometry.rotated`: an anchor is a candidate of
  a GT when its centre's projections on the box's two edges fall within them (edges included;
  sides below ``min_box_side`` widened to it first, Ultralytics uses ``strides[1]``), and the
  overlap is ProbIoU (no variance floor) clamped at 0. Configuration as for
  :func:`~jaxtal.task_aligned_assign` (``overlap`` must stay at its default).

  Args:
    pred_scores: ``(b, A, nc)`` predicted class probabilities.
    pred_boxes: ``(b, A, 5)`` predicted xywhr boxes, centre and sides in input pixels.
    anchor_points: ``(A, 2)`` anchor centres in input pixels.
    gt: a :class:`~jaxtal.GroundTruth` with ``(b, M, 5)`` xywhr boxes in pixels (e.g. from
      :func:`~jaxtal.pack_rotated_labels`). Rows that are padding, non-finite, beyond
      ``COORD_LIMIT``, with a non-positive side or a class outside ``[0, nc)`` never own anchors.
    config: an :class:`~jaxtal.AssignerConfig`.
    grid: the anchors' grid, as for :func:`~jaxtal.task_aligned_assign`.

  Returns:
    An :class:`~jaxtal.Assignment` with ``boxes (b, A, 5)``.
  """
  caller = "rotated_task_aligned_assign"
  cfg = make_config(AssignerConfig, config, overrides, caller)
  rotated_only(cfg.overlap, caller)
  return _dense_assignment(pred_scores, pred_boxes, anchor_points, gt, cfg, rotated(), caller, grid=grid)


def pose_task_aligned_assign(
    pred_scores: jax.Array,
    pred_boxes: jax.Array,
    pred_keypoints: jax.Array,
    anchor_points: jax.Array,
    anchor_strides: jax.Array,
    gt: GroundTruth,
    config: AssignerConfig | None = None,
    *,
    sigmas,
    level_range: tuple[float, float] = (2.0, 12.0),
    grid: tuple[tuple[int, int, float], ...] | None = None,
    **overrides,
) -> Assignment:
  """The task-aligned assigner of YOLO26 pose (Ultralytics' ``PoseTaskAlignedAssigner``): overlap OKS, level gate.

  :func:`~jaxtal.assign_targets` with :func:`jaxtal.geometry.keypoint_oks`: an anchor is a candidate
  of a GT when its centre is strictly inside the box (sides below ``min_box_side`` widened) and its
  level fits the GT's size (``lo * stride <= sqrt(box area) <= hi * stride``, the finest level open
  below, the coarsest above; a GT the gate empties keeps its ungated candidates); the overlap is
  the OKS of the predicted keypoints against the GT's visible ones (visibility > 0), with the box
  area times 0.53 as the object area, or the box CIoU for a GT with no visible keypoint.
  Configuration as for :func:`~jaxtal.task_aligned_assign` (``overlap`` must stay at its default).

  Args:
    pred_scores: ``(b, A, nc)`` predicted class probabilities.
    pred_boxes: ``(b, A, 4)`` predicted xyxy boxes in input pixels.
    pred_keypoints: ``(b, A, K, 2)`` predicted keypoints in input pixels.
    anchor_points: ``(A, 2)`` anchor centres in input pixels.
    anchor_strides: ``(A,)`` (or ``(A, 1)``) stride of each anchor's level.
    gt: a :class:`~jaxtal.GroundTruth` with ``keypoints (b, M, K, 2 or 3)`` in pixels (``D = 2``:
      all visible); rows that never own anchors as for :func:`~jaxtal.task_aligned_assign`.
    config: an :class:`~jaxtal.AssignerConfig`.
    sigmas: the ``K`` per-keypoint OKS sigmas (e.g. ``jaxtal.pose.COCO_SIGMAS``).
    level_range: the gate's ``(lo, hi)`` in strides; ``(0, inf)`` turns it off.
    grid: the anchors' grid, as for :func:`~jaxtal.task_aligned_assign`.

  Returns:
    An :class:`~jaxtal.Assignment`.
  """
  caller = "pose_task_aligned_assign"
  cfg = make_config(AssignerConfig, config, overrides, caller)
  if cfg.overlap != "ciou":
    raise ValueError(f"{caller}: the pose assigner's overlap is OKS (the box CIoU without keypoints); leave overlap at its default, got {cfg.overlap!r}")
  geometry = keypoint_oks(sigmas, level_range=level_range, eps=cfg.eps)
  b, a, _ = _validate.assigner_inputs(pred_scores, pred_boxes, anchor_points, gt, 4, caller)
  k = len(tuple(sigmas))
  _validate.gt_keypoints(gt, k, caller)
  _validate.float_array(caller, "pred_keypoints", pred_keypoints, 4)
  if pred_keypoints.shape != (b, a, k, 2):
    raise ValueError(f"{caller}: pred_keypoints must be (b, A, K, 2) = ({b}, {a}, {k}, 2) (K = len(sigmas)), got {pred_keypoints.shape}")
  strides = jnp.asarray(anchor_strides, jnp.float32)
  if strides.shape not in ((a,), (a, 1)):
    raise ValueError(f"{caller}: anchor_strides must be (A,) or (A, 1) with A = {a}, got {strides.shape}")
  extra = GeometryExtra(
      gt=jnp.asarray(gt.keypoints, jnp.float32),
      pred=(jnp.asarray(pred_keypoints, jnp.float32), jnp.broadcast_to(strides.reshape(1, a), (b, a))),
  )
  return _dense_assignment(pred_scores, pred_boxes, anchor_points, gt, cfg, geometry, caller, extra, grid)
