"""The assigner's speed tricks, each beside its plain twin (the package's rules: :mod:`jaxtal.kernels`).

The exact two-stage top-k of each GT's align metric over tiles of ``TILE`` anchors (``top_k``), and the decision
to run the assigner's pairwise passes over each GT's window of nearby anchors (``windows``, from ``WINDOW_GTS`` GT
slots; the windowed passes themselves are :mod:`jaxtal.windows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ------------------------------------------------------------------------------------------------
# Top-k of each GT's align metric over all A anchors.
# Why: XLA:CPU's top-k over all A anchors was the assigner's largest single cost. Exact two-stage
# form: per tile of TILE anchors keep the maximum; a row's k best values lie in its k best tiles.
# Bench rows "plain top_k": saves 10% of the loss step and 38% of the assignment (M = 50).

TILE = 16


def plain_top_k(metric_levels):
  """Top ``k`` over the concatenated per-level ``(C, A_l)`` metrics: ``(indices (C, k), values (C, k))``.

  Ties go to the lower anchor index (``jax.lax.top_k`` is stable). Called as
  ``plain_top_k(levels)(k)`` so both forms share a signature.
  """

  def run(k):
    values, idx = jax.lax.top_k(jnp.concatenate(metric_levels, axis=1), k)
    return idx.astype(jnp.int32), values

  return run


def top_k(metric_levels):
  """:func:`plain_top_k` in two stages over tiles of ``TILE`` anchors; the same indices and values.

  ``metric_levels`` are per-level ``(C, A_l)`` float32 metrics ``>= 0`` (tile padding scores -1,
  below every real value). Each row's ``k`` best tiles (by maximum) hold its ``k`` best anchors;
  the final top-k runs over those ``k * TILE`` candidates, taken in anchor order so ties still go
  to the lower anchor index.
  """

  def run(k):
    c = metric_levels[0].shape[0]
    padded, maxima, spans, first = [], [], [], 0  # spans: (first tile, tiles, first anchor, stop)
    lo = 0
    for m in metric_levels:
      hi = lo + m.shape[1]
      n = -(-(hi - lo) // TILE)
      m = jnp.pad(m, ((0, 0), (0, n * TILE - (hi - lo))), constant_values=-1.0)
      maxima.append(m.reshape(c, n, TILE).max(axis=2))
      padded.append(m)
      spans.append((first, n, lo, hi))
      first, lo = first + n, hi
    _, tiles = jax.lax.top_k(jnp.concatenate(maxima, axis=1), min(k, first))
    tiles = jnp.sort(tiles, axis=1)  # candidates in anchor order
    # Tile -> first anchor and level end by arithmetic, not a lookup table: indexing an unbatched
    # table with batch-sharded indices has no unambiguous sharding under a batch-sharded jit.
    start, stop = jnp.zeros_like(tiles), jnp.zeros_like(tiles)
    values = jnp.zeros((c, tiles.shape[1] * TILE), jnp.float32)
    offsets = jnp.arange(TILE, dtype=jnp.int32)
    for (t0, n, lo, hi), m in zip(spans, padded):
      here = (tiles >= t0) & (tiles < t0 + n)
      start = jnp.where(here, lo + (tiles - t0) * TILE, start)
      stop = jnp.where(here, hi, stop)
      local = (jnp.where(here, tiles - t0, 0)[..., None] * TILE + offsets).reshape(c, -1)
      values = jnp.where(jnp.repeat(here, TILE, axis=1), jnp.take_along_axis(m, local, axis=1), values)
    ids = start[..., None] + offsets
    ids = jnp.where(ids < stop[..., None], ids, 0).reshape(c, -1)  # padding (-1) is never among the top k
    top_values, pos = jax.lax.top_k(values, k)
    return jnp.take_along_axis(ids, pos, axis=1).astype(jnp.int32), top_values

  return run


# ------------------------------------------------------------------------------------------------
# The assigner's pairwise passes over each GT's window of nearby anchors (jaxtal.windows), not all A.
# Why: an anchor is a candidate only of a GT whose widened box holds its centre, so in crowded scenes
# (thousands of small boxes) nearly all M * A pairs are wasted work, and conflict resolution's search
# for each listed anchor's best GT is M * E pairs. With windows both are M * (window) pairs. The
# bookkeeping (sorting GTs into window sizes, scatters) costs more than it saves for few GTs.
# Bench rows "crowded ..., plain windows" (benchmarks/README.md).

WINDOW_GTS = 256  # GT slots from which windows pay: COCO-like boxes break even here, small crowded ones win from 64


def plain_windows(num_gts: int, num_anchors: int) -> bool:
  """Never windows: every GT is tested against every anchor."""
  del num_gts, num_anchors
  return False


def windows(num_gts: int, num_anchors: int) -> bool:
  """Windows from :data:`WINDOW_GTS` GT slots per image on."""
  del num_anchors
  return num_gts >= WINDOW_GTS
