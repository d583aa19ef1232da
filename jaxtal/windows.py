"""Windows of anchors: each GT's candidates lie in a small rectangle of cells on every level.

The task-aligned assigner's pairwise pass (candidate test, overlap, metric, top-k, and the best
candidate GT of each anchor) is dense over ``M x A`` pairs, although an anchor can only be a
candidate of a GT whose (widened) box holds its centre. When the anchors are the cell centres of
per-level grids (:func:`jaxtal.make_anchors`: ``(i + 0.5) * stride``), the anchors of level ``l``
that a box ``[x1, x2] x [y1, y2]`` can hold form a rectangle of cells. This module is the
geometry-free half of the windowed pass (:mod:`jaxtal.assigner` runs the other half through the
geometry):

* :func:`cells`: each GT's window, per level the rectangle of cells whose anchors its bounds may
  hold, computed generously from the geometry's bounds (anchors up to ``MARGIN`` of a cell beyond
  them are kept, so float rounding never drops a candidate: the geometry's own test decides),
  flattened in anchor order; :func:`layout`, :func:`needs`: window capacities ("buckets", 32 to
  512 anchors, doubling) and the smallest holding each window; one past the last is the dense
  fallback (every anchor);
* :func:`plan`, :func:`block_ids`: each image's GTs sorted by bucket, in blocks of a size per
  bucket; one loop runs every bucket's blocks, as many as the image with most needs, so the loop
  and each iteration's bucket are not batched and ``lax.switch`` runs one branch;
* :func:`window_anchors`, :func:`window_slots`: a block's windows as anchor indices (ascending, so
  ties in a top-k over a window still go to the lower anchor index) and the inverse lookup;
* :func:`complete_top_k`: a top-k over the window made the top-k over all ``A`` anchors;
* :func:`best_in_block`, :func:`merge_best`: each anchor's best candidate GT (highest overlap,
  the lower GT index on ties), scattered from the windows, a block at a time.

The windowed pass gives the same targets as the dense one, to the bit: the same floats are
computed for every pair that can matter, and every pair outside the windows is a non-candidate.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Anchors within this fraction of a cell beyond a GT's bounds stay in its window (float rounding
# of the bounds and of the geometry's own test is far smaller).
MARGIN = 1.0 / 16.0
# Window capacities (anchors per GT), doubling; a GT whose window holds more runs dense.
_CAPS = (32, 64, 128, 256, 512)


class Layout(NamedTuple):
  """Static shapes of the windowed pass (hashable).

  Attributes:
    grid: ``((H_l, W_l, stride_l), ...)``, one per level, levels in anchor order.
    caps: window capacities in anchors, ascending, one per bucket; bucket ``len(caps)`` is dense.
  """

  grid: tuple[tuple[int, int, float], ...]
  caps: tuple[int, ...]

  @property
  def dense(self) -> int:
    """The dense bucket's index (``len(caps)``)."""
    return len(self.caps)

  def offsets(self) -> tuple[int, ...]:
    """First anchor index of each level."""
    out, start = [], 0
    for h, w, _ in self.grid:
      out.append(start)
      start += h * w
    return tuple(out)


def layout(grid) -> Layout:
  """The buckets of ``grid`` (``((H_l, W_l, stride_l), ...)``): window capacities of 32 to 512 anchors,
  those of at most a sixteenth of the grid's anchors (the smallest while it is at most a quarter).

  A window's pair costs several times a dense pair (its predictions are gathered, the dense pass
  reads them in order and vectorises), so a GT whose window would hold more runs dense.
  """
  grid = tuple((int(h), int(w), float(s)) for h, w, s in grid)
  total = sum(h * w for h, w, _ in grid)
  return Layout(grid, tuple(c for c in _CAPS if 16 * c <= total or (c == _CAPS[0] and 4 * c <= total)))


class Cells(NamedTuple):
  """Each GT's window: per level a rectangle of cells, flattened in anchor order.

  Attributes:
    first: per level ``(..., 2)`` int32 first cell ``(row, col)``.
    count: per level ``(..., 2)`` int32 rows and columns (0 on a level the box misses).
    start: per level ``(...,)`` int32 position of the level's first cell in the window.
    size: ``(...,)`` int32 cells in the window; above every capacity for non-finite bounds.
  """

  first: tuple[jax.Array, ...]
  count: tuple[jax.Array, ...]
  start: tuple[jax.Array, ...]
  size: jax.Array


def cells(bounds: jax.Array, lay: Layout) -> Cells:
  """The cells whose anchors may be candidates of GTs with ``bounds (..., 4)`` (``x1, y1, x2, y2``
  pixels, :attr:`~jaxtal.Geometry.bounds`): per level, the anchors whose centres lie within
  ``MARGIN`` of a cell of the bounds, clipped to the grid (the geometry's own test decides)."""
  finite = jnp.all(jnp.isfinite(bounds), axis=-1)
  lo, hi = bounds[..., 1::-1], bounds[..., :1:-1]  # (y, x) of the two corners
  firsts, counts, starts = [], [], []
  size = jnp.zeros(bounds.shape[:-1], jnp.int32)
  for h, w, s in lay.grid:
    dims = jnp.array([h, w], jnp.float32)
    # Anchor i sits at (i + 0.5) * s: strictly inside (lo - m, hi + m) for first <= i <= last.
    first = jnp.floor((lo - MARGIN * s) / s - 0.5) + 1.0
    last = jnp.ceil((hi + MARGIN * s) / s - 0.5) - 1.0
    first = jnp.clip(jnp.where(finite[..., None], first, 0.0), 0.0, dims)  # clipped as floats: no int overflow
    last = jnp.clip(jnp.where(finite[..., None], last, dims - 1.0), -1.0, dims - 1.0)
    count = jnp.maximum(last - first + 1.0, 0.0).astype(jnp.int32)
    count = jnp.where(jnp.all(count > 0, axis=-1, keepdims=True), count, 0)
    firsts.append(first.astype(jnp.int32))
    counts.append(count)
    starts.append(size)
    size = size + count[..., 0] * count[..., 1]
  total = sum(h * w for h, w, _ in lay.grid)
  return Cells(tuple(firsts), tuple(counts), tuple(starts), jnp.where(finite, size, total + 1))


def needs(bounds: jax.Array, lay: Layout) -> jax.Array:
  """``(...,)`` int32: the smallest bucket whose capacity holds each GT's window (``lay.dense`` if none)."""
  size = cells(bounds, lay).size
  need = jnp.full(size.shape, lay.dense, jnp.int32)
  for k in reversed(range(lay.dense)):
    need = jnp.where(size <= lay.caps[k], k, need)
  return need


# Pairs per image in one block of a window bucket: many GTs per block for small windows, few for large.
_BLOCK_PAIRS = 8192
_MAX_BLOCK = 256
# GTs per block of the dense bucket (every anchor): few GTs overflow the windows, so small blocks.
_DENSE_BLOCK = 16


def block_sizes(lay: Layout, num_gts: int, gt_chunk: int) -> tuple[int, ...]:
  """GTs per block of each bucket: about ``_BLOCK_PAIRS`` pairs per image for a window bucket,
  ``_DENSE_BLOCK`` or the config's ``gt_chunk`` if smaller for the dense one; at most ``num_gts``."""
  sizes = [max(16, min(_MAX_BLOCK, _BLOCK_PAIRS // cap)) for cap in lay.caps] + [min(gt_chunk, _DENSE_BLOCK)]
  return tuple(max(1, min(c, num_gts)) for c in sizes)


class Plan(NamedTuple):
  """The windowed pass's blocks for one image (leaves batched), and the loop over them (not batched).

  Iteration ``t`` of the loop runs bucket ``k`` (``cum[k - 1] <= t < cum[k]``) on its block ``j = t -
  cum[k - 1]``: each image's GTs ``order[start[k] + j * C_k + i]`` for ``i < C_k`` and ``j * C_k + i <
  count[k]``. ``cum`` is the running sum over buckets of the largest block count of any image, so
  the loop and each iteration's bucket are the same for every image: a vmapped loop over images
  neither runs every branch of its switch nor selects between iterations.
  """

  order: jax.Array  # (M,) int32 GT indices sorted by bucket (stable)
  start: jax.Array  # (K + 1,) int32 first position of each bucket in order
  count: jax.Array  # (K + 1,) int32 GTs in each bucket
  cum: jax.Array  # (K + 1,) int32, not batched


def plan(need: jax.Array, sizes: tuple[int, ...]) -> Plan:
  """Blocks for a batch: ``need (b, M)`` buckets, ``sizes`` GTs per block of each bucket."""
  k = len(sizes)
  order = jnp.argsort(need, axis=1, stable=True).astype(jnp.int32)
  count = jnp.sum(need[..., None] == jnp.arange(k, dtype=need.dtype), axis=1, dtype=jnp.int32)  # (b, K + 1)
  start = jnp.cumsum(count, axis=1, dtype=jnp.int32) - count
  blocks = -(-count // jnp.array(sizes, jnp.int32))
  return Plan(order, start, count, jnp.cumsum(jnp.max(blocks, axis=0), dtype=jnp.int32))


def block_ids(p: Plan, t: jax.Array, sizes: tuple[int, ...], num_gts: int) -> tuple[jax.Array, jax.Array]:
  """Iteration ``t``'s bucket (not batched) and one image's GT indices ``(max(sizes),)`` (``M`` past the block)."""
  bucket = jnp.sum(t >= p.cum, dtype=jnp.int32)
  block = t - jnp.where(bucket > 0, p.cum[jnp.maximum(bucket - 1, 0)], 0)
  size = jnp.array(sizes, jnp.int32)[bucket]
  i = jnp.arange(max(sizes), dtype=jnp.int32)
  pos = block * size + i
  ok = (i < size) & (pos < p.count[bucket])
  ids = jnp.where(ok, p.order[jnp.clip(p.start[bucket] + pos, 0, num_gts - 1)], num_gts)
  return bucket, ids


def window_anchors(c: Cells, lay: Layout, cap: int) -> tuple[jax.Array, jax.Array]:
  """``(anchor (C, cap) int32, used (C, cap) bool)``: each GT's window as anchor indices, ascending
  (levels, then rows, then columns), in its first ``size`` slots; unused slots hold anchor 0."""
  # Per GT and level: the window's first slot, the anchor of its first cell, its columns.
  base = [off + f[..., 0] * w + f[..., 1] for f, off, (_, w, _) in zip(c.first, lay.offsets(), lay.grid)]
  cols = [jnp.maximum(n[..., 1], 1) for n in c.count]
  start, size = c.start, c.size
  t = jnp.arange(cap, dtype=jnp.int32)
  at_start, at_base, at_cols, at_w = start[0][..., None], base[0][..., None], cols[0][..., None], jnp.int32(lay.grid[0][1])
  for level in range(1, len(lay.grid)):  # each slot takes the parameters of the last level starting at or before it
    here = t >= start[level][..., None]
    at_start = jnp.where(here, start[level][..., None], at_start)
    at_base = jnp.where(here, base[level][..., None], at_base)
    at_cols = jnp.where(here, cols[level][..., None], at_cols)
    at_w = jnp.where(here, jnp.int32(lay.grid[level][1]), at_w)
  local = t - at_start
  # row = local // cols in floats (vectorised), then corrected by one where rounding fell short or over.
  row = jnp.floor((local.astype(jnp.float32) + 0.5) / at_cols.astype(jnp.float32)).astype(jnp.int32)
  col = local - row * at_cols
  row, col = jnp.where(col < 0, row - 1, row), jnp.where(col < 0, col + at_cols, col)
  row, col = jnp.where(col >= at_cols, row + 1, row), jnp.where(col >= at_cols, col - at_cols, col)
  used = t < size[..., None]
  return jnp.where(used, at_base + row * at_w + col, 0), used


def window_slots(anchor: jax.Array, c: Cells, lay: Layout, cap: int) -> jax.Array:
  """``(C, L)`` int32 slot of anchors ``(C, L)`` in their GT's window, ``cap`` where outside it."""
  slot = jnp.full(anchor.shape, cap, jnp.int32)
  for first, count, start, off, (h, w, _) in zip(c.first, c.count, c.start, lay.offsets(), lay.grid):
    local = anchor - off
    row, col = local // w - first[..., :1], local % w - first[..., 1:]
    inside = (local >= 0) & (local < h * w) & (row >= 0) & (row < count[..., :1]) & (col >= 0) & (col < count[..., 1:])
    slot = jnp.where(inside, start[..., None] + row * count[..., 1:] + col, slot)
  return slot


def complete_top_k(values: jax.Array, anchor: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A top-k over each GT's window -> its top-k over all ``A`` anchors (every other anchor scores 0).

  ``values (C, k)`` descending, ``anchor (C, k)``: a stable top-k over a window in ascending
  anchor order, so positive values are already in the order of the top-k over all anchors (ties to
  the lower index). A row with ``P < k`` positive values continues, as a stable top-k over every
  anchor would, with the ``k - P`` lowest-index anchors scoring 0: those not among its positive
  ones, all below ``k``. Returns ``(anchor, values, kept)``: ``kept (C, k)`` marks the slots of
  the window's top-k (the others were filled and score 0).
  """
  k = values.shape[1]
  positive = values > 0
  count = jnp.sum(positive, axis=1, keepdims=True)  # positives form the prefix
  low = jnp.arange(k, dtype=anchor.dtype)
  taken = jnp.any((anchor[:, None, :] == low[:, None]) & positive[:, None, :], axis=-1)  # (C, k): index low[i] is positive
  rank = jnp.cumsum(~taken, axis=1) - 1  # rank of each free low index among the free ones
  want = jnp.arange(k)[None, :] - count  # (C, k): slot j >= P takes the free index of rank j - P
  hit = (~taken[:, None, :]) & (rank[:, None, :] == want[:, :, None])  # (C, slot, low index)
  filler = jnp.sum(jnp.where(hit, low, 0), axis=-1).astype(anchor.dtype)
  kept = jnp.arange(k)[None, :] < count
  return jnp.where(kept, anchor, filler), jnp.where(kept, values, 0.0), kept


def best_in_block(anchor: jax.Array, overlap: jax.Array, gt: jax.Array, num_anchors: int) -> tuple[jax.Array, jax.Array]:
  """Each anchor's best GT among a block's windows: ``(A,)`` highest overlap (-1: none) and its GT
  (the lowest index among equals; ``sentinel`` where none).

  ``anchor (C, W)`` window anchors, ``overlap (C, W)`` the pair's clamped overlap where the anchor
  is a candidate and -1 elsewhere, ``gt (C,)`` int32 GT indices (``sentinel = max + 1`` is never
  returned for a candidate pair).
  """
  best = jnp.full((num_anchors,), -1.0, overlap.dtype).at[anchor].max(overlap)
  sentinel = jnp.iinfo(jnp.int32).max
  tied = (overlap >= 0) & (overlap == best[anchor])
  owner = jnp.full((num_anchors,), sentinel, jnp.int32).at[anchor].min(jnp.where(tied, gt[:, None], sentinel))
  return best, owner


def merge_best(running: tuple[jax.Array, jax.Array], block: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Running ``(best overlap, gt)`` per anchor merged with a block's: the higher overlap, the lower GT on ties."""
  (ov, gt), (bov, bgt) = running, block
  better = (bov > ov) | ((bov == ov) & (bgt < gt))
  return jnp.where(better, bov, ov), jnp.where(better, bgt, gt)
