"""Speed tricks, each beside the plain form it is tested against and replaceable by it.

Every trick in jaxtal lives here. Each has a plain twin written with the well-kept library
(optax, ``jax.nn``, ``jax.lax``, autodiff) with the same numerics to float32 rounding
(``tests/test_kernels.py`` compares values and gradients, and runs
``jax.test_util.check_grads`` on every custom VJP). A trick stays only while
``benchmarks/bench.py``'s ablation rows ("plain <name>": the loss step with that one kernel
replaced by its plain twin) show it saves at least 5% of the loss step; the measured saving is
written beside each one, from ``benchmarks/README.md``. Removed after measuring: the bin maxima read
from whole head-map rows (0%). Task kernels (``TASK_KERNELS``: ``mask_bce_sum`` and
``mask_windows``, the mask term; ``flow_rows`` and ``pair_mask_counts``, the YOLO26 pose and
segmentation steps) are measured on their task's loss step instead, and ``windows`` (the
assigner's windowed pass, :mod:`jaxtal.windows`) on the crowded-scene rows. XLA fuses the plain forms well on GPU
and TPU too; the tricks were measured on XLA:CPU, the only backend CI has.

The loss and the assigner pick each kernel with :func:`select` and the config's static
``plain_kernels`` field (:class:`jaxtal.AssignerConfig`): ``LossConfig(..., plain_kernels=("top_k",))``
traces that trick's plain twin instead, a new compilation and the same results to float32
rounding. The benchmark's ablation rows and the tests use it; nothing is swapped globally.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxtal import flow
from jaxtal.targets import take_rows

# ------------------------------------------------------------------------------------------------
# BCE over every class logit against one_hot(labels) * weight.
# Why: optax's BCE under autodiff lowers through logaddexp and a one-hot target broadcast that
# XLA:CPU does not vectorise; the closed-form gradient is one elementwise pass.
# Bench row "loss fwd+bwd, plain bce_sum": saves 30% of the loss step (2026-12-01, M = 50).


def plain_bce_sum(logits, labels, weight, class_weights=None):
  """``sum(optax.sigmoid_binary_cross_entropy(logits, one_hot(labels) * weight) * class_weights)``.

  Shapes: ``(..., nc)`` float32, ``(...)`` int, ``(...)`` float32, ``(nc,)`` or None -> scalar.
  """
  z = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype) * weight[..., None]
  bce = optax.sigmoid_binary_cross_entropy(logits, z)
  if class_weights is not None:
    bce = bce * class_weights
  return jnp.sum(bce)


def bce_sum(logits, labels, weight, class_weights=None, *, plain_sigmoid_pass: bool = False):
  """:func:`plain_bce_sum` with an analytic gradient ``(sigmoid(x) - z) * class_weights``.

  Uses ``BCE(x, z) = softplus(x) - x * z`` so the one-hot target is never materialised forward.
  ``labels``, ``weight`` and ``class_weights`` are constants to this kernel (the loss passes
  them under ``stop_gradient``); ``weight`` still gets its exact cotangent ``-x[label]``. The
  gradient's sigmoid is the shared pass (:func:`sigmoid`), or ``jax.nn.sigmoid`` with
  ``plain_sigmoid_pass`` (the ``shared_sigmoid`` ablation).
  """
  if class_weights is None:
    class_weights = jnp.ones((logits.shape[-1],), jnp.float32)
  return _bce_sum(bool(plain_sigmoid_pass), logits, labels, weight, class_weights)


def _softplus_doubled(x):
  # 2 * softplus(x) = (x + |x|) + 2 * log1p(exp(-|x|)), with no broadcast constant (XLA:CPU
  # materialises those as full-size operands of a reduction). Halving it later is exact.
  a = jnp.abs(x)
  l = jnp.log1p(jnp.exp(-a))
  return (x + a) + (l + l)


def _picked(logits, labels, class_weights):
  # (logits * class_weights)[..., label], gathered from a batched operand so it keeps the batch's
  # sharding under jit (indexing the unbatched (nc,) weights would not).
  return jnp.take_along_axis(logits * class_weights, labels[..., None], axis=-1)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bce_sum(plain_sig, logits, labels, weight, class_weights):
  del plain_sig
  return 0.5 * jnp.sum(_softplus_doubled(logits) * class_weights) - jnp.sum(_picked(logits, labels, class_weights) * weight)


def _bce_fwd(plain_sig, logits, labels, weight, class_weights):
  return _bce_sum(plain_sig, logits, labels, weight, class_weights), (logits, labels, weight, class_weights)


def _bce_bwd(plain_sig, res, g):
  logits, labels, weight, class_weights = res
  z = (labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)) * weight[..., None]
  sig = plain_sigmoid if plain_sig else sigmoid
  d_logits = g * (sig(logits) - z) * class_weights
  d_weight = -g * _picked(logits, labels, class_weights)
  return d_logits, jax.custom_derivatives.zero_from_primal(labels), d_weight, jnp.zeros_like(class_weights)


_bce_sum.defvjp(_bce_fwd, _bce_bwd)


# ------------------------------------------------------------------------------------------------
# One sigmoid pass over the class logits for the BCE gradient and the assigner's scores.
# Why: the assigner needs sigmoid(x) ** alpha, alpha = 0.5 by default, and the BCE gradient needs
# sigmoid(x). Written as r = rsqrt(1 + exp(-x)) and r * r, XLA computes r once per logit for both,
# so the assigner's whole-map transform costs nothing extra once there are at least nc / 2 GT
# slots (with fewer, transforming only the M * A values the pairs read is cheaper).
# Bench row "loss fwd+bwd, plain shared_sigmoid": saves 5% of the loss step in the paired
# Ultralytics/jaxtal measurement at M = 50 (2.42-2.45x with it, 2.30-2.35x without, 2026-12-01).


def plain_sigmoid(x):
  """``jax.nn.sigmoid(x)``."""
  return jax.nn.sigmoid(x)


def plain_sqrt_sigmoid(x):
  """``sqrt(jax.nn.sigmoid(x))``."""
  return jnp.sqrt(jax.nn.sigmoid(x))


def plain_whole_map_scores(num_gts: int, num_classes: int, from_logits: bool, alpha: float) -> bool:
  """Whether the assigner transforms the whole ``(A, nc)`` score map: when it holds fewer values
  than the ``M * A`` the (GT, anchor) pairs read."""
  del from_logits, alpha
  return num_gts >= num_classes


def sigmoid(x):
  """``sigmoid(x)`` as ``rsqrt(1 + exp(-x)) ** 2``, the pass :func:`sqrt_sigmoid` shares (rel. error < 4e-7)."""
  r = sqrt_sigmoid(x)
  return r * r


def sqrt_sigmoid(x):
  """``sqrt(sigmoid(x)) = rsqrt(1 + exp(-x))``: in ``[0, 1]`` for every non-NaN ``x``."""
  return jax.lax.rsqrt(1.0 + jnp.exp(-x))


def whole_map_scores(num_gts: int, num_classes: int, from_logits: bool, alpha: float) -> bool:
  """:func:`plain_whole_map_scores`, and from logits with ``alpha = 0.5`` already from ``nc / 2``
  slots, where the whole-map pass is shared with the BCE gradient."""
  shared = from_logits and alpha == 0.5 and 2 * num_gts >= num_classes
  return shared or num_gts >= num_classes


# ------------------------------------------------------------------------------------------------
# DFL: expected bin and log-sum-exp of each side's R bin logits.
# Why: one forward pass gives both (the decode needs the expectation, DFL's cross-entropy the
# log-sum-exp) and one backward pass p * (g_E * (i - E) + g_lse) replaces autodiff's chain.
# Bench row "loss fwd+bwd, plain softmax_stats": saves 33% of the loss step.


def plain_softmax_stats(logits):
  """``(sum_i softmax(logits)_i * i, logsumexp(logits))`` over the last axis, via ``jax.nn``.

  Shapes: ``(..., R)`` -> ``(...)``, ``(...)``. The expectation is an elementwise weighted sum
  (not a matmul with a length-R vector): the reference's rounding.
  """
  bins = jnp.arange(logits.shape[-1], dtype=logits.dtype)
  return jnp.sum(jax.nn.softmax(logits, axis=-1) * bins, axis=-1), jax.nn.logsumexp(logits, axis=-1)


def softmax_stats(logits):
  """:func:`plain_softmax_stats` in one pass each way (closed-form gradient)."""
  return _softmax_stats(logits, jax.lax.stop_gradient(jnp.max(logits, axis=-1)))


@jax.custom_vjp
def _softmax_stats(logits, top):
  return _softmax_parts(logits, top)[:2]


def _softmax_parts(logits, top):
  e = jnp.exp(logits - top[..., None])
  total = jnp.sum(e, axis=-1)
  bins = jnp.arange(logits.shape[-1], dtype=logits.dtype)
  # sum(e * i) / sum(e): one fused pass for both sums. Normalising first (the plain form's order)
  # needs a second pass over the bins and cost 9 ms of the 25 ms decode here; the two agree to a
  # few float32 ulps of the expectation.
  return jnp.sum(e * bins, axis=-1) / total, top + jnp.log(total), top, total


def _stats_fwd(logits, top):
  e, lse, top, total = _softmax_parts(logits, top)
  return (e, lse), (logits, top, e, total)


def _stats_bwd(res, g):
  logits, top, e, total = res
  g_e, g_lse = g
  p = jnp.exp(logits - top[..., None]) / total[..., None]  # the forward's exponentials again
  bins = jnp.arange(logits.shape[-1], dtype=logits.dtype)
  return p * (g_e[..., None] * (bins - e[..., None]) + g_lse[..., None]), jnp.zeros_like(top)


_softmax_stats.defvjp(_stats_fwd, _stats_bwd)


# ------------------------------------------------------------------------------------------------
# Head map split into (box bins, class logits).
# Why: autodiff of two slices sums two zero-padded full-width cotangents, and XLA:CPU evaluates
# both producers for every channel; a concatenation evaluates each channel's producer once.
# Bench row "loss fwd+bwd, plain split_channels": saves 22% of the loss step.


def plain_split_channels(x, k):
  """``(x[..., :k], x[..., k:])``."""
  return x[..., :k], x[..., k:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_channels(x, k):
  """:func:`plain_split_channels` whose gradient is one concatenation of the two cotangents."""
  return x[..., :k], x[..., k:]


def _split_fwd(x, k):
  return split_channels(x, k), None


def _split_bwd(k, _, g):
  return (jnp.concatenate(g, axis=-1),)


split_channels.defvjp(_split_fwd, _split_bwd)


# ------------------------------------------------------------------------------------------------
# DFL's target term over the foreground entry list.
# Why: the forward reads only the E listed rows; autodiff's gradient of that gather is a scatter
# of (b, E, 4, R) rows into a zero (b, A, 4, R) array, the kernel's is one dense elementwise pass.
# Bench row "loss fwd+bwd, plain two_bin_logit_sum": saves 4-6% of the loss step (two runs on
# 2026-12-01), on the 5% line; kept because without it the loss step falls under the 2.5x-Ultralytics
# floor this project holds (2.54x with it). Re-measure before relying on it.


def two_bin_target(num_bins: int, target: jax.Array) -> jax.Array:
  """``(..., R)`` DFL target of a distance ``target (...)`` in ``[0, R - 1)``: mass on the two
  bins around it, linear in the distance (Li et al., 2020, "Generalized Focal Loss")."""
  left = jnp.floor(target)
  w_left = left + 1 - target
  left = left.astype(jnp.int32)[..., None]
  bins = jnp.arange(num_bins, dtype=jnp.int32)
  return jnp.where(bins == left, w_left[..., None], 0.0) + jnp.where(bins == left + 1, 1.0 - w_left[..., None], 0.0)


def plain_two_bin_logit_sum(logits, target, rows, row_coef):
  """``sum_e row_coef[e] * sum_s <two_bin_target(target[rows[e], s]), logits[rows[e], s]>``, by autodiff.

  Shapes: ``logits (b, A, S, R)``, ``target (b, A, S)`` in ``[0, R - 1)``, ``rows (b, E)`` int,
  ``row_coef (b, E)`` -> scalar. ``target`` and ``row_coef`` are constants (their cotangents are
  not used by the loss).
  """
  x = take_rows(logits, rows)
  t = two_bin_target(logits.shape[-1], take_rows(target, rows))
  return jnp.sum(row_coef * jnp.sum(x * t, axis=(-2, -1)))


@jax.custom_vjp
def two_bin_logit_sum(logits, target, rows, row_coef):
  """:func:`plain_two_bin_logit_sum` with a dense elementwise gradient.

  The gradient is ``g * coef[a] * two_bin_target(target[a])`` with ``coef`` the entries'
  ``row_coef`` scatter-added onto their anchors, so value and gradient agree for any entry list
  (an anchor listed twice counts twice in both), not only for one that keeps the foreground
  entry contract.
  """
  return plain_two_bin_logit_sum(logits, target, rows, row_coef)


def _two_bin_fwd(logits, target, rows, row_coef):
  # The logits ride along only for their shape (they are an input: nothing is copied).
  return plain_two_bin_logit_sum(logits, target, rows, row_coef), (logits, target, rows, row_coef)


def _two_bin_bwd(res, g):
  logits, target, rows, row_coef = res
  coef = jax.vmap(lambda r, c: jnp.zeros(logits.shape[1], c.dtype).at[r].add(c))(rows, row_coef)
  d_logits = (g * coef)[..., None, None] * two_bin_target(logits.shape[-1], target)
  return d_logits, jnp.zeros_like(target), jax.custom_derivatives.zero_from_primal(rows), jnp.zeros_like(row_coef)


two_bin_logit_sum.defvjp(_two_bin_fwd, _two_bin_bwd)


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


# ------------------------------------------------------------------------------------------------
# The RLE term's flow over its counted rows only (YOLO26 pose).
# Why: the term has a row per entry-list slot and keypoint (b * E * K), of which only the valid
# entries' labelled keypoints count (about half at b = 16, M = 100); the plain form runs the flow's
# 24 (rows, 64) matmuls over all of them and autodiff keeps every hidden activation of every row.
# The kernel gathers the counted rows to the front and computes the value and its gradient over
# ceil(n / chunk) chunks of them, so the work follows the labelled keypoints and the memory
# one chunk. Bench row "YOLO26 pose loss fwd+bwd, plain flow_rows": saves 61% / 69% of the step at M = 20 / 100
# (2026-12-07, twelfth set).

# Rows per chunk. On XLA:CPU 2048 (1024-8192 within 10%; each chunk's activations stay in cache); an
# accelerator runs each op over many rows at once and pays per launch, so far fewer, larger chunks.
FLOW_CHUNK_CPU = 2048
FLOW_CHUNK_ACCELERATOR = 32768
FLOW_CHUNK: int | None = None  # an override of both (tests)


def flow_chunk() -> int:
  """Rows per chunk of :func:`flow_rows` on the default backend (read at trace time)."""
  if FLOW_CHUNK is not None:
    return FLOW_CHUNK
  return FLOW_CHUNK_CPU if jax.default_backend() == "cpu" else FLOW_CHUNK_ACCELERATOR


def plain_flow_rows(params, x, coef, keep) -> jax.Array:
  """``sum(where(keep, coef * flow_log_prob(params, x), 0))``, the flow run over every row (the others read 0).

  Shapes: ``params`` a :class:`~jaxtal.FlowParams`, ``x (R, 2)``, ``coef (R,)``, ``keep (R,)`` bool -> scalar.
  """
  log_p = flow.flow_log_prob(params, jnp.where(keep[:, None], x, 0.0))
  return jnp.sum(jnp.where(keep, coef * log_p, 0.0))


def _flow_chunks(params, x, coef, keep, grad: bool):
  """The kept rows in chunks: ``(value, (d params, d x (R, 2), log_p (R,)))``, the gradients None without ``grad``."""
  r = x.shape[0]
  chunk = max(1, min(flow_chunk(), r))
  size = -(-r // chunk) * chunk
  n = jnp.sum(keep, dtype=jnp.int32)
  idx = jnp.nonzero(keep, size=size, fill_value=r)[0]  # kept rows first, then r (past the end)
  live = jnp.arange(size) < n
  at = jnp.minimum(idx, r - 1)
  xs = jnp.where(live[:, None], x[at], 0.0)
  cs = jnp.where(live, coef[at], 0.0)

  def body(j, carry):
    value, d_params, d_x, log_p = carry
    xj, cj = (jax.lax.dynamic_slice_in_dim(a, j * chunk, chunk) for a in (xs, cs))
    if grad:
      out, vjp = jax.vjp(flow.flow_log_prob, params, xj)
      dp, dx = vjp(cj)
      d_params = jax.tree.map(jnp.add, d_params, dp)
      d_x = jax.lax.dynamic_update_slice_in_dim(d_x, dx, j * chunk, 0)
      log_p = jax.lax.dynamic_update_slice_in_dim(log_p, out, j * chunk, 0)
    else:
      out = flow.flow_log_prob(params, xj)
    return value + jnp.sum(cj * out), d_params, d_x, log_p

  zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(xs), jnp.zeros_like(cs)) if grad else (None, None, None)
  value, d_params, d_xs, log_ps = jax.lax.fori_loop(0, (n + chunk - 1) // chunk, body, (jnp.zeros((), cs.dtype),) + zeros)
  if not grad:
    return value, None
  d_x = jnp.zeros_like(x).at[idx].set(d_xs, mode="drop")  # rows past the kept ones carry index r: dropped
  log_p = jnp.zeros_like(coef).at[idx].set(log_ps, mode="drop")
  return value, (d_params, d_x, log_p)


@jax.custom_vjp
def flow_rows(params, x, coef, keep) -> jax.Array:
  """:func:`plain_flow_rows` over the kept rows only, value and gradient in one pass of chunks.

  The rows with ``keep`` go first (their order kept) and run in chunks of :func:`flow_chunk` rows, a
  loop of ``ceil(n / chunk)`` iterations for ``n`` kept rows (one compilation whatever ``n``):
  the flow's cost follows the kept rows, its memory one chunk. Differentiable once, w.r.t.
  ``params``, ``x`` and ``coef`` (``keep`` is a mask); rows without ``keep`` get zero gradients.
  """
  return _flow_chunks(params, x, coef, keep, grad=False)[0]


def _flow_rows_fwd(params, x, coef, keep):
  return _flow_chunks(params, x, coef, keep, grad=True)


def _flow_rows_bwd(residuals, g):
  d_params, d_x, log_p = residuals
  return jax.tree.map(lambda d: g * d, d_params), g * d_x, g * log_p, None


flow_rows.defvjp(_flow_rows_fwd, _flow_rows_bwd)


# ------------------------------------------------------------------------------------------------
# A sum over chunks of the entry list, each chunk under jax.checkpoint (memory bounded whatever E).
# Not a trick: the plain form of the mask term below. (Ordering counted entries first and skipping
# empty chunks was measured at b = 16, M = 50: -10% of the segmentation step, so it was removed.)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """``(b, E, ...)`` -> ``(n, b, chunk, ...)``, padded at the end with zeros (weight 0: not counted)."""
  b, size = x.shape[:2]
  n = -(-size // chunk)
  x = jnp.pad(x, [(0, 0), (0, n * chunk - size)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)


def plain_chunk_sum(term, shared, xs, weight, chunk: int) -> jax.Array:
  """``sum over chunks of term(*shared, *xs_chunk, weight_chunk)``, each chunk under ``jax.checkpoint``.

  ``term`` maps one chunk to a scalar and must give 0 for entries of weight 0 (the padding of the
  last chunk). ``shared``: arrays every chunk reads whole (prototypes, masks); ``xs``: ``(b, E,
  ...)`` per-entry arrays; ``weight (b, E)``: 0 on entries that do not count; ``chunk``: static
  entries per chunk. The backward pass recomputes a chunk's intermediates instead of keeping
  them, so memory is that of a few chunks whatever ``E``. One call, no scan, when ``chunk >= E``.
  """
  if chunk >= weight.shape[1]:
    return term(*shared, *xs, weight)
  body = jax.checkpoint(term)

  def step(total, chunk_xs):
    return total + body(*shared, *chunk_xs), None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), tuple(_chunks(x, chunk) for x in (*xs, weight)))
  return total


# ------------------------------------------------------------------------------------------------
# The mask term's BCE over chunks of entries (segment.py), value and gradient in one pass.
# Why: the plain form is a scan over chunks of entries whose body is under jax.checkpoint (memory
# must not grow with E), so autodiff computes each chunk's (b, chunk, mh, mw) mask logits twice
# and its transcendental twice. The loss is a scalar sum, so the gradients w.r.t. the
# coefficients and the prototypes can be formed in the forward scan from one exp pass
# (d BCE / d logit = sigmoid - target) and only scaled by the cotangent afterwards: one einsum
# and one exp per pixel fewer, and no recomputation. Counted entries are moved first, so chunks
# that count nothing in any image are skipped.
# Bench row "segment loss fwd+bwd, plain mask_bce_sum" (b = 16, M = 50, 160 x 160 x 32 prototypes;
# benchmarks/README.md).


def _mask_chunk(proto, masks, coef, gt, box, weight, index_map: bool):
  """One chunk's mask logits ``(b, C, mh, mw)``, targets and per-pixel weights (0 outside the box).

  Shapes: ``proto (b, nm, mh, mw)``; ``masks`` an index map ``(b, mh, mw)`` int (pixel value
  ``j + 1`` marks GT slot ``j``) or per-slot masks ``(b, M, mh, mw)``; ``coef (b, C, nm)``,
  ``gt (b, C)`` int, ``box (b, C, 4)`` xyxy in mask pixels, ``weight (b, C)``. A pixel of column
  ``x`` (row ``y``) is in the box when ``x1 <= x < x2`` (``y1 <= y < y2``), its index compared.
  A per-slot mask pixel that is not a value in ``[0, 1]`` (NaN, inf, or out of range) is read as 0 and
  weighted 0 (double ``where``): it adds nothing, and an entry that does not count never multiplies its
  mask's NaN by a zero weight.
  """
  logits = jnp.einsum("bcn,bnhw->bchw", coef, proto)
  mh, mw = logits.shape[-2:]
  cols, rows = jnp.arange(mw, dtype=jnp.float32), jnp.arange(mh, dtype=jnp.float32)
  in_cols = (cols >= box[..., 0:1]) & (cols < box[..., 2:3])  # (b, C, mw): the crop is separable
  in_rows = (rows >= box[..., 1:2]) & (rows < box[..., 3:4])  # (b, C, mh)
  counted = in_rows[..., :, None] & in_cols[..., None, :]
  if index_map:
    target = (masks[:, None] == (gt + 1)[..., None, None]).astype(jnp.float32)
  else:
    target = take_rows(masks, gt).astype(jnp.float32)
    ok = (target >= 0.0) & (target <= 1.0)  # False for NaN too
    target, counted = jnp.where(ok, target, 0.0), counted & ok
  pixel_weight = jnp.where(counted, weight[..., None, None], 0.0)
  return logits, target, pixel_weight


def _mask_chunk_value(proto, masks, coef, gt, box, weight, *, index_map: bool):
  logits, target, pixel_weight = _mask_chunk(proto, masks, coef, gt, box, weight, index_map)
  return jnp.sum(pixel_weight * (jax.nn.softplus(logits) - logits * target))


def plain_mask_bce_sum(coef, proto, masks, gt, box, weight, chunk: int, index_map: bool) -> jax.Array:
  """``sum over entries e of weight_e * sum over the pixels in box_e of BCE-with-logits(coef_e . proto,
  target_e)``, by autodiff over :func:`plain_chunk_sum` (chunks under ``jax.checkpoint``).

  Shapes: ``coef (b, E, nm)``, ``gt (b, E)`` int, ``box (b, E, 4)``, ``weight (b, E)`` (0: not
  counted), ``proto`` and ``masks`` as :func:`_mask_chunk`; ``chunk`` static -> scalar.
  """
  term = functools.partial(_mask_chunk_value, index_map=index_map)
  return plain_chunk_sum(term, (proto, masks), (coef, gt, box), weight, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def mask_bce_sum(coef, proto, masks, gt, box, weight, chunk: int, index_map: bool) -> jax.Array:
  """:func:`plain_mask_bce_sum` with its gradients (w.r.t. ``coef`` and ``proto``; the targets, boxes
  and weights are constants) formed in the forward scan; the same value and gradients."""
  return _mask_bce_fwd(coef, proto, masks, gt, box, weight, chunk, index_map)[0]


def _mask_bce_fwd(coef, proto, masks, gt, box, weight, chunk, index_map):
  size = weight.shape[1]
  chunk = min(chunk, size)
  # Counted entries first in each image, so that the trailing chunks count nothing in any image and
  # are skipped (lax.cond on one scalar); the coefficient gradients are put back in entry order.
  order = jnp.argsort(weight == 0, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
  coef_o, gt_o, box_o, weight_o = (take(x) for x in (coef, gt, box, weight))

  def step(carry, xs):
    return jax.lax.cond(jnp.any(xs[-1] != 0), chunk_step, lambda carry, xs: (carry, jnp.zeros(xs[0].shape, jnp.float32)), carry, xs)

  def chunk_step(carry, xs):
    total, d_proto = carry
    c, g, bx, w = xs
    logits, target, pixel_weight = _mask_chunk(proto, masks, c, g, bx, w, index_map)
    e = jnp.exp(-jnp.abs(logits))  # one exp for the softplus and the sigmoid
    softplus = jnp.maximum(logits, 0.0) + jnp.log1p(e)
    sigmoid = jnp.where(logits >= 0, 1.0, e) / (1.0 + e)
    total = total + jnp.sum(pixel_weight * (softplus - logits * target))
    d_logits = pixel_weight * (sigmoid - target)
    d_proto = d_proto + jnp.einsum("bchw,bcn->bnhw", d_logits, c)
    return (total, d_proto), jnp.einsum("bchw,bnhw->bcn", d_logits, proto)

  init = (jnp.zeros((), jnp.float32), jnp.zeros_like(proto))
  (total, d_proto), d_coef = jax.lax.scan(step, init, tuple(_chunks(x, chunk) for x in (coef_o, gt_o, box_o, weight_o)))
  d_coef = jnp.moveaxis(d_coef, 0, 1).reshape((coef.shape[0], -1, coef.shape[-1]))[:, :size]  # (n, b, C, nm) -> (b, E, nm)
  d_coef = jnp.take_along_axis(d_coef, jnp.argsort(order, axis=1)[..., None], axis=1)  # back to entry order
  return total, (d_coef, d_proto)


def _mask_bce_bwd(chunk, index_map, residuals, ct):
  d_coef, d_proto = residuals
  return ct * d_coef, ct * d_proto, None, None, None, None


mask_bce_sum.defvjp(_mask_bce_fwd, _mask_bce_bwd)


# ------------------------------------------------------------------------------------------------
# Box windows: fixed-size pixel windows that tile each box, and the mask term over them.
# Why: the full-plane form computes every entry's mh x mw logits and BCE and then zeroes the pixels
# outside its GT box; in the benchmark's workload the boxes cover 6% of the plane on average (1.5%
# median), so about 94% of that work is multiplied by zero. Here each box is tiled by windows of one
# static size starting at its first pixel; the entries of one GT share their windows (one prototype
# gather and one gradient scatter per window for up to ``group`` entries, so the per-window work is
# a small matmul, not a gather per entry), and a loop whose trip count is the number of windows in
# use (not a static worst case) visits them a chunk at a time, per image (so that a batch-sharded jit
# keeps every gather on its device; one list over the batch did 20-40% less work on one CPU).
# Bench row "segment loss fwd+bwd, plain mask_windows" (benchmarks/README.md).


class BoxWindows(NamedTuple):
  """Fixed-size windows tiling a list of boxes (:func:`box_windows`); shapes ``(N, ...)`` per box.

  Attributes:
    first: ``(N, 2)`` int32 first counted pixel ``(row, col)`` of each box, clipped into the plane.
    tiles: ``(N, 2)`` int32 windows along rows and columns (0 for a box that counts no pixel).
    end: ``(N,)`` int32 one past the index of each box's last window in the list (inclusive
      cumulative sum of ``tiles[:, 0] * tiles[:, 1]``): box ``n`` owns windows ``[end[n - 1], end[n])``.
    count: ``()`` int32 windows in the list (``end[-1]``).
  """

  first: jax.Array
  tiles: jax.Array
  end: jax.Array
  count: jax.Array


def box_windows(boxes: jax.Array, plane_hw, tile) -> BoxWindows:
  """The windows of size ``tile = (th, tw)`` that tile each box's pixels on an ``(h, w)`` plane.

  ``boxes (N, 4)`` xyxy in pixels; a pixel of column ``x`` (row ``y``) is in the box when ``x1 <= x
  < x2`` (``y1 <= y < y2``), its index compared; a box with a NaN side counts no pixel. Box ``n``'s
  pixels are tiled row-major by ``tiles[n]`` windows whose nominal corners are ``first[n] + (i * th,
  j * tw)``; :func:`window_at` gives each window's box, nominal corner and clamped corner. ``tile``
  must fit in the plane (``th <= h``, ``tw <= w``). The list's length ``count`` is a traced value:
  a caller loops over ``ceil(count / chunk)`` chunks (one compilation for any boxes).
  """
  h, w = plane_hw
  th, tw = tile
  if not (1 <= th <= h and 1 <= tw <= w):
    raise ValueError(f"box_windows: tile {tuple(tile)} must fit in the plane {tuple(plane_hw)}")
  size = jnp.array([w, h], jnp.float32)

  def edge(v, empty):  # first counted index >= v, clipped into [0, size]; NaN counts no pixel
    return jnp.where(jnp.isnan(v), empty, jnp.clip(jnp.ceil(v), 0.0, size)).astype(jnp.int32)

  lo, hi = edge(boxes[..., :2], size), edge(boxes[..., 2:], 0.0)  # (N, 2) as (x, y)
  n = jnp.maximum(hi - lo, 0)[..., ::-1]  # (rows, cols)
  tiles = (n + jnp.array([th - 1, tw - 1], jnp.int32)) // jnp.array([th, tw], jnp.int32)
  end = jnp.cumsum(tiles[:, 0] * tiles[:, 1], dtype=jnp.int32)
  count = end[-1] if end.shape[0] else jnp.zeros((), jnp.int32)
  return BoxWindows(lo[..., ::-1], tiles, end, count)


def window_items(windows: BoxWindows, capacity: int) -> jax.Array:
  """``(capacity,)`` int32: the box of each window index below ``capacity`` (the last box past ``count``).

  One scatter and a cumulative maximum, for a caller that visits many chunks of the list (each chunk
  then reads its boxes instead of searching ``end``). ``capacity``: static, at least ``count`` (``N``
  boxes of at most ``ceil(h / th) * ceil(w / tw)`` windows each).
  """
  n = windows.end.shape[0]
  starts = windows.end - windows.tiles[:, 0] * windows.tiles[:, 1]
  ids = jnp.arange(n, dtype=jnp.int32)
  first = jnp.full((capacity,), 0, jnp.int32).at[jnp.where(windows.end > starts, starts, capacity)].max(ids, mode="drop")
  return jnp.minimum(jax.lax.cummax(first), n - 1)


def window_at(windows: BoxWindows, index: jax.Array, plane_hw, tile, items: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(box (P,), nominal corner (P, 2), corner (P, 2))`` of the windows ``index (P,)`` of the list.

  The window counts the pixels of its box in ``[nominal, nominal + tile)`` (the box's windows
  partition its pixels); ``corner`` is the nominal corner clamped so the window lies in the plane
  (a window at the plane's bottom or right edge starts earlier and its first rows or columns belong
  to the box's previous window). Indices at or past ``count`` give some box and an in-plane corner:
  mask them out with ``index < count``. ``items``: the list's :func:`window_items`, read instead of a
  binary search of ``end``.
  """
  h, w = plane_hw
  th, tw = tile
  if items is None:
    box = jnp.minimum(jnp.searchsorted(windows.end, index, side="right"), windows.end.shape[0] - 1)
  else:  # window_items of the list
    box = items[jnp.minimum(index, items.shape[0] - 1)]
  tiles = windows.tiles[box]
  local = index - (windows.end[box] - tiles[:, 0] * tiles[:, 1])
  per_row = jnp.maximum(tiles[:, 1], 1)
  nominal = windows.first[box] + jnp.stack([local // per_row * th, local % per_row * tw], axis=-1)
  corner = jnp.clip(nominal, 0, jnp.array([h - th, w - tw], jnp.int32))
  return box, nominal, corner


def _window_index(lead: jax.Array | None, corner: jax.Array) -> jax.Array:
  # (P, k) leading indices (none, image, or image and slot) and (P, 2) corners -> (P, k + 2) start indices.
  if lead is None:
    return corner.astype(jnp.int32)
  lead = lead[:, None] if lead.ndim == 1 else lead
  return jnp.concatenate([lead.astype(jnp.int32), corner.astype(jnp.int32)], axis=1)


def gather_windows(planes: jax.Array, lead: jax.Array, corner: jax.Array, tile) -> jax.Array:
  """``planes[lead[p], y:y + th, x:x + tw]`` for each window ``p``: ``(b, [M,] h, w, ...)`` -> ``(P, th, tw, ...)``.

  ``lead (P,)`` image indices, ``(P, k)`` indices of the ``k`` leading axes (image and GT slot of
  per-slot masks ``(b, M, h, w)``), or None for one plane ``(h, w, ...)`` (vmap it over images: the
  gathers stay batched, so a batch-sharded ``jit`` keeps each image's windows on its device);
  ``corner (P, 2)`` int32 ``(y, x)`` keeps the window in the plane
  (:func:`window_at`'s corner; an index out of range is clamped). One gather, no copy per window.
  """
  index = _window_index(lead, corner)
  k = index.shape[1] - 2
  trailing = tuple(range(k + 2, planes.ndim))
  dims = jax.lax.GatherDimensionNumbers(
      offset_dims=tuple(range(1, 3 + len(trailing))), collapsed_slice_dims=tuple(range(k)),
      start_index_map=tuple(range(k + 2)),
  )  # fmt: skip
  sizes = (1,) * k + tuple(tile) + tuple(planes.shape[d] for d in trailing)
  return jax.lax.gather(planes, index, dims, sizes, mode=jax.lax.GatherScatterMode.CLIP)


def scatter_add_windows(planes: jax.Array, lead: jax.Array, corner: jax.Array, values: jax.Array) -> jax.Array:
  """``planes`` with each window ``values[p] (th, tw, ...)`` added at ``(lead[p], corner[p])``
  (overlapping windows add up): the transpose of :func:`gather_windows`, same arguments."""
  index = _window_index(lead, corner)
  k = index.shape[1] - 2
  # The leading axes stay in each update as unit axes (none inserted): with them inserted, XLA:CPU copied
  # every update into a layout that differs only in where the unit axis lies.
  values = values.reshape(values.shape[:1] + (1,) * k + values.shape[1:])
  dims = jax.lax.ScatterDimensionNumbers(
      update_window_dims=tuple(range(1, values.ndim)), inserted_window_dims=(), scatter_dims_to_operand_dims=tuple(range(k + 2)),
  )  # fmt: skip
  return jax.lax.scatter_add(planes, index, values, dims, mode=jax.lax.GatherScatterMode.CLIP)


def entry_groups(gt, box, weight, group: int):
  """Counted entries of one image grouped by GT slot, at most ``group`` to a group.

  Shapes: ``gt (E,)``, ``box (E, 4)``, ``weight (E,)`` -> ``(table (E, group) int32, union boxes (E, 4))``.
  Row ``g`` of ``table`` lists group ``g``'s entries (``E``: an empty slot); groups are numbered from
  0 and rows past the last group are empty, with an empty union box. Every counted entry (weight not
  0) is in exactly one group; all entries of a group have the same ``gt``; a GT with more than
  ``group`` entries gets several groups.
  """
  e = gt.shape[0]
  counted = weight != 0
  order = jnp.argsort(jnp.where(counted, gt, jnp.iinfo(jnp.int32).max), stable=True)  # uncounted last
  key, counted = gt[order], counted[order]
  pos = jnp.arange(e, dtype=jnp.int32)
  new_run = (pos == 0) | (key != jnp.roll(key, 1))  # no concatenation with a constant: it keeps key's sharding
  rank = pos - jax.lax.cummax(jnp.where(new_run, pos, 0))
  gid = jnp.cumsum(counted & (rank % group == 0), dtype=jnp.int32) - 1
  row = jnp.where(counted, gid, e)  # e: dropped
  table = jnp.full((e, group), e, jnp.int32).at[row, rank % group].set(order, mode="drop")
  b = box[order]
  b = jnp.where(jnp.isnan(b).any(-1, keepdims=True), jnp.array([jnp.inf, jnp.inf, -jnp.inf, -jnp.inf]), b)
  empty = jnp.broadcast_to(jnp.array([jnp.inf, jnp.inf, -jnp.inf, -jnp.inf], jnp.float32), (e, 4))
  union = jnp.concatenate([
      empty[:, :2].at[row].min(b[:, :2], mode="drop"), empty[:, 2:].at[row].max(b[:, 2:], mode="drop")], axis=1)
  return table, union


def _windows_chunk(proto, masks, coef, gt, box, weight, box_win, items, table, index, plane_hw, tile, index_map):
  """One image's chunk of windows: the value, and the gradients of the unit cotangent w.r.t. the chunk's
  coefficient rows ``(P, K, nm)`` and windows ``(P, th, tw * nm)``, with where they go.

  ``proto (h, w * nm)``: NHWC rows; ``masks (h, w)`` or ``(M, h, w)``; ``coef (E + 1, nm)``, ``gt``,
  ``box``, ``weight`` with one empty entry last; ``table (E, K)`` the groups' entry ids; ``box_win``
  the groups' :class:`BoxWindows` and ``items`` its windows' groups (:func:`window_items`); ``index
  (P,)`` window indices.
  """
  th, tw = tile
  nm = coef.shape[-1]
  live = index < box_win.count
  item, nominal, corner = window_at(box_win, index, plane_hw, tile, items)
  ids = jnp.where(live[:, None], table[item], coef.shape[0] - 1)  # (P, K)
  c, bx, w = coef[ids], box[ids], weight[ids]
  # A window of the (h, w * nm) rows is th runs of tw * nm contiguous values: gathered and scattered as
  # they lie, and a (th * tw, nm) matrix to the matmuls.
  row_corner = corner * jnp.array([1, nm], jnp.int32)
  # (Reshaped in two steps, a split and a merge: under explicitly sharded types JAX rejects one reshape doing both.)
  win = gather_windows(proto, None, row_corner, (th, tw * nm)).reshape(-1, th, tw, nm).reshape(-1, th * tw, nm)
  batched = lambda x, y, contract: jax.lax.dot_general(x, y, (contract, ((0,), (0,))))  # noqa: E731
  logits = batched(win, c, ((2,), (2,))).reshape(-1, th, tw, c.shape[1])  # (P, th, tw, K)
  rows = (corner[:, 0:1] + jnp.arange(th, dtype=jnp.int32))[..., None]  # (P, th, 1)
  cols = (corner[:, 1:2] + jnp.arange(tw, dtype=jnp.int32))[..., None]
  own_rows = (rows >= nominal[:, 0:1, None]) & (rows < nominal[:, 0:1, None] + th)  # this window's share
  own_cols = (cols >= nominal[:, 1:2, None]) & (cols < nominal[:, 1:2, None] + tw)
  rows, cols = rows.astype(jnp.float32), cols.astype(jnp.float32)
  in_rows = own_rows & (rows >= bx[:, None, :, 1]) & (rows < bx[:, None, :, 3])  # (P, th, K)
  in_cols = own_cols & (cols >= bx[:, None, :, 0]) & (cols < bx[:, None, :, 2])  # (P, tw, K)
  slot = gt[ids[:, 0]]  # every entry of a group has its GT slot
  if index_map:
    target = (gather_windows(masks, None, corner, tile) == (slot + 1)[:, None, None]).astype(jnp.float32)
    ok = 1.0
  else:
    target = gather_windows(masks, slot, corner, tile).astype(jnp.float32)
    ok = (target >= 0.0) & (target <= 1.0)  # False for NaN too
    target, ok = jnp.where(ok, target, 0.0), ok.astype(jnp.float32)[..., None]
  target = target[..., None]
  # where(counted, weight, 0) as a product of row, column and mask factors (the weights are finite).
  row_weight = jnp.where(in_rows, w[:, None, :], 0.0)  # (P, th, K)
  pixel_weight = row_weight[:, :, None, :] * in_cols[:, None, :, :].astype(jnp.float32) * ok
  e = jnp.exp(-jnp.abs(logits))  # one exp for the softplus and the sigmoid
  softplus = jnp.maximum(logits, 0.0) + jnp.log1p(e)
  sigmoid = jnp.where(logits >= 0, 1.0, e) / (1.0 + e)
  value = jnp.sum(pixel_weight * (softplus - logits * target))
  d_logits = (pixel_weight * (sigmoid - target)).reshape(-1, th * tw, c.shape[1])
  # (P, K, nm) from d_logits transposed and materialised (the barrier keeps XLA from folding the transpose
  # back into the matmul, which XLA:CPU then runs outside its fast matmul library, 1.6x slower).
  d_coef = batched(jax.lax.optimization_barrier(jnp.swapaxes(d_logits, 1, 2)), win, ((2,), (1,)))
  d_win = batched(d_logits, c, ((2,), (1,)))  # (P, th * tw, nm)
  return value, ids, d_coef, row_corner, d_win.reshape(-1, th, tw, nm).reshape(-1, th, tw * nm)


# What a window's slot-pixel (one entry slot, one window pixel) costs against a full-plane entry-pixel on
# XLA:CPU (benchmark workload, 16 x 16 windows: 12.5 ns against 4.7 ns of CPU time, the per-window gather,
# scatter and index work included). The windows are used while they cost less (every box the whole plane:
# the windows took 1.7x the full plane's time).
WINDOW_COST = 2.5


def plain_mask_windows(coef, proto, masks, gt, box, weight, chunk: int, index_map: bool, tile=None, group=None, fallback=True) -> jax.Array:
  """The full-plane form, :func:`mask_bce_sum` (the other arguments unused): the twin of :func:`mask_windows`."""
  del tile, group, fallback
  return mask_bce_sum(coef, proto, masks, gt, box, weight, chunk, index_map)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def mask_windows(coef, proto, masks, gt, box, weight, chunk: int, index_map: bool, tile, group: int, fallback: bool = True) -> jax.Array:
  """:func:`plain_mask_bce_sum` computed over box windows, with its gradients formed in the same pass.

  Arguments as :func:`mask_bce_sum`, plus static ``tile = (th, tw)`` (window size in mask pixels,
  clipped to the plane), ``group`` (entries sharing one window: the entries of one GT slot, at most
  ``group`` at a time) and ``fallback``. The counted entries of each image are grouped by GT slot;
  each group's windows tile the union of its entries' boxes (:func:`box_windows`), so no pixel
  outside a box's windows is computed; a pixel is counted by one window only, under the same box and
  mask rules as :func:`_mask_chunk`. ``chunk`` is the full-plane form's entries per chunk: a step
  here holds about as many bytes (``chunk * mh * mw / (th * tw * (nm + 3 * group))`` windows of
  each image). The windows are listed and visited per image, all images in step.
  With ``fallback``, the batch is computed by :func:`mask_bce_sum` instead when its windows would
  cost more (``WINDOW_COST`` per slot-pixel; chosen at run time with ``lax.cond``, both forms in one
  compilation). The same value and gradients as :func:`mask_bce_sum` to float32 rounding.
  """
  return _mask_windows_fwd(coef, proto, masks, gt, box, weight, chunk, index_map, tile, group, fallback)[0]


def _mask_windows_fwd(coef, proto, masks, gt, box, weight, chunk, index_map, tile, group, fallback):
  h, w = proto.shape[2:]
  tile = (min(int(tile[0]), h), min(int(tile[1]), w))
  table, union = jax.vmap(functools.partial(entry_groups, group=int(group)))(gt, box, weight)
  win = jax.vmap(functools.partial(box_windows, plane_hw=(h, w), tile=tile))(union)
  args = (coef, proto, masks, gt, box, weight, table, win, chunk, index_map, tile)
  if not fallback:
    return _windows_sum(*args)
  return jax.lax.cond(
      windows_cheaper(win.count, weight, (h, w), tile, group, chunk),
      lambda: _windows_sum(*args), lambda: _mask_bce_fwd(coef, proto, masks, gt, box, weight, chunk, index_map),
  )  # fmt: skip


def windows_cheaper(count: jax.Array, weight: jax.Array, plane_hw, tile, group: int, chunk: int) -> jax.Array:
  """Whether windows of ``tile`` (``group`` entry slots each), ``count (b,)`` in each image, cost less
  than the full-plane form.

  Both forms run every image in step: the windows ``b * max(count)`` windows, the full-plane form
  (:func:`mask_bce_sum`) ``ceil(max counted entries of an image / chunk)`` chunks of ``chunk`` entries
  per image of ``weight (b, E)``; a window slot-pixel costs ``WINDOW_COST`` full-plane entry-pixels.
  A scalar bool (traced).
  """
  b, e = weight.shape
  chunk = min(chunk, e)
  counted = jnp.max(jnp.sum(weight != 0, axis=1))
  full = ((counted + chunk - 1) // chunk * chunk).astype(jnp.float32) * (plane_hw[0] * plane_hw[1])
  return jnp.max(count).astype(jnp.float32) * (tile[0] * tile[1] * group * WINDOW_COST) <= full


def _windows_sum(coef, proto, masks, gt, box, weight, table, win, chunk, index_map, tile):
  """The value and unit-cotangent gradients of :func:`mask_windows` over its windows: a loop over chunks,
  each taking the next windows of every image (vmapped per image, so every gather and scatter is within
  one image: a batch-sharded ``jit`` keeps each image's work on its device)."""
  b, e, nm = coef.shape
  h, w = proto.shape[2:]
  group = table.shape[-1]
  pad = lambda x: jnp.pad(x, [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731  (an empty entry: id e)
  coef_p, gt_p, box_p, weight_p = pad(coef), pad(gt), pad(box), pad(weight)
  items = jax.vmap(functools.partial(window_items, capacity=e * (-(-h // tile[0])) * (-(-w // tile[1]))))(win)
  step = max(1, chunk * h * w // (tile[0] * tile[1] * (nm + 3 * group)))  # windows per image per step
  proto_t = jnp.transpose(proto, (0, 2, 3, 1)).reshape(b, h, w * nm)  # NHWC rows
  chunk_fn = functools.partial(_windows_chunk, plane_hw=(h, w), tile=tile, index_map=index_map)
  images = jax.vmap(chunk_fn, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 0, None))
  add_rows = jax.vmap(lambda acc, ids, rows: acc.at[ids].add(rows))
  add_windows = jax.vmap(lambda acc, corner, values: scatter_add_windows(acc, None, corner, values))

  def body(i, carry):
    total, d_coef, d_proto = carry
    index = i * step + jnp.arange(step, dtype=jnp.int32)
    value, ids, dc, corner, d_win = images(proto_t, masks, coef_p, gt_p, box_p, weight_p, win, items, table, index)
    return total + jnp.sum(value), add_rows(d_coef, ids, dc), add_windows(d_proto, corner, d_win)

  init = (jnp.zeros((), jnp.float32), jnp.zeros_like(coef_p), jnp.zeros_like(proto_t))  # zeros_like: the inputs' sharding
  total, d_coef, d_proto = jax.lax.fori_loop(0, (jnp.max(win.count) + step - 1) // step, body, init)
  return total, (d_coef[:, :-1], jnp.transpose(d_proto.reshape(b, h, w, nm), (0, 3, 1, 2)))


def _mask_windows_bwd(chunk, index_map, tile, group, fallback, residuals, ct):
  d_coef, d_proto = residuals
  return ct * d_coef, ct * d_proto, None, None, None, None


mask_windows.defvjp(_mask_windows_fwd, _mask_windows_bwd)


# ------------------------------------------------------------------------------------------------
# The mask-IoU assignment's pixel counts (YOLO26 segmentation, segment26.py), over tiles of the plane.
# Why: of each listed (GT, anchor) pair's predicted mask only the pixels inside its predicted box
# count, and the plain form decodes every pair over the whole plane. The kernel visits the plane's
# MASK_TILE x MASK_TILE tiles (a loop) and, in each, only the pairs whose box touches it
# (compacted; a loop of ceil(touching / MASK_TILE_CHUNK) chunks, one compilation for any boxes): the
# tile's prototypes are a static slice every pair shares (no gather per pair, which is what made
# windows gathered per pair's box slower than the whole plane), the pairs' coefficients a row gather.
# Both forms count the same per-pixel logits (each an nm-term dot product), so the counts are equal
# integers. Bench row "segment26 loss fwd+bwd, plain pair_mask_counts": saves 34% of the step (2026-12-07,
# twelfth set; 32 px tiles: 20 / 40 / 54 px were 1.7x / 1.3x / 1.3x slower).

MASK_TILE = 32  # pixels a side (16-54 measured: 32 best at 160 x 160 prototypes)
MASK_TILE_CHUNK = 256  # pairs per chunk of a tile


def _packed_counts(logits, gt, in_rows, in_cols) -> tuple[jax.Array, jax.Array]:
  """``(|pred & gt|, |pred|)`` int32 ``(K,)`` of logits ``(K, h, w)`` against ``gt (K, h, w)`` bool, with ``pred``
  the positive finite logits inside the box (``in_rows (K, h)`` times ``in_cols (K, w)``, bool).

  One integer pass: a pixel adds 1, plus ``base`` (a power of two above ``w``) where ``gt`` holds it,
  so each row's sum is ``pred + base * inter``; the rows' sums are then split and added up.
  """
  w = logits.shape[-1]
  shift = w.bit_length()  # base = 2^shift > w: a row's predicted count never reaches it
  weight = jnp.where(in_cols[:, None, :], jnp.where(gt, (1 << shift) + 1, 1), 0)
  row = jnp.sum(jnp.where((logits > 0) & (logits < jnp.inf), weight, 0), axis=-1)  # a non-finite logit is outside
  row = jnp.where(in_rows, row, 0)
  return jnp.sum(row >> shift, axis=-1), jnp.sum(row & ((1 << shift) - 1), axis=-1)


def _box_lines(box, rows, cols) -> tuple[jax.Array, jax.Array]:
  """``(in_rows (K, h), in_cols (K, w))``: pixel rows / columns (float indices) inside each box ``(K, 4)``
  (``x1 <= x < x2``; a NaN side holds none)."""
  x1, y1, x2, y2 = (box[:, i : i + 1] for i in range(4))
  return (rows >= y1) & (rows < y2), (cols >= x1) & (cols < x2)


def _decode(coef, proto) -> jax.Array:
  """``(K, h, w)`` mask logits of coefficients ``(K, nm)`` over prototypes ``(nm, h, w)``."""
  nm, h, w = proto.shape
  return jnp.dot(coef, proto.reshape(nm, -1), precision=jax.lax.Precision.HIGHEST).reshape(-1, h, w)


def _slot_masks(masks, owner) -> jax.Array:
  """``(K, h, w)`` bool: each pair's GT mask, from an index map ``(h, w)`` or per-slot masks ``(M, h, w)``."""
  return masks[None] == (owner + 1)[:, None, None] if masks.ndim == 2 else masks[owner]


def plain_pair_mask_counts(coef, box, owner, ok, proto, masks, chunk: int, early_exit: bool = True) -> tuple[jax.Array, jax.Array]:
  """One image's ``n`` (GT, anchor) pairs: ``(|pred & gt| (n,), |pred| (n,))`` int32 (0 where not ``ok``), with
  ``pred`` the pair's mask ``coef . proto > 0`` (a non-finite logit is outside) inside its box, ``gt`` its
  GT slot's mask; every pair decoded over the whole plane.

  Shapes: ``coef (n, nm)``; ``box (n, 4)`` xyxy in prototype pixels (a pixel of column ``x`` is in
  it when ``x1 <= x < x2``, rows alike); ``owner (n,)`` int32 GT slot; ``ok (n,)`` bool; ``proto (nm,
  h, w)``; ``masks`` an index map ``(h, w)`` int (pixel ``j + 1`` marks slot ``j``) or per-slot masks
  ``(M, h, w)`` bool. The ``ok`` pairs go first (a stable sort) and run ``chunk`` (static) at a time in a
  ``while_loop`` that stops after the last chunk holding one; without ``early_exit`` every chunk runs,
  in a ``lax.map`` (what ``checkify`` can transform).
  """
  n, nm = coef.shape
  _, h, w = proto.shape
  rows, cols = jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32)
  order = jnp.argsort(~ok, stable=True)
  pad = -(-n // chunk) * chunk - n
  sort = lambda x: jnp.pad(x[order], [(0, pad)] + [(0, 0)] * (x.ndim - 1))  # noqa: E731
  coef_s, box_s, owner_s = sort(coef), sort(jnp.where(ok[:, None], box, jnp.nan)), sort(owner)

  def counts(c, b, o):
    return _packed_counts(_decode(c, proto), _slot_masks(masks, o), *_box_lines(b, rows, cols))

  if early_exit:
    def body(carry):
      i, inter, pred = carry
      take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk)  # noqa: E731
      di, dp = counts(take(coef_s), take(box_s), take(owner_s))
      update = lambda out, v: jax.lax.dynamic_update_slice_in_dim(out, v, i * chunk, 0)  # noqa: E731
      return i + 1, update(inter, di), update(pred, dp)

    zeros = jnp.zeros((n + pad,), jnp.int32)
    count = jnp.sum(ok, dtype=jnp.int32)
    _, inter, pred = jax.lax.while_loop(lambda c: c[0] * chunk < count, body, (jnp.int32(0), zeros, zeros))
  else:
    chunks = lambda x: x.reshape((-1, chunk) + x.shape[1:])  # noqa: E731
    inter, pred = (x.reshape(-1) for x in jax.lax.map(lambda xs: counts(*xs), (chunks(coef_s), chunks(box_s), chunks(owner_s))))
  back = lambda x: jnp.zeros((n,), jnp.int32).at[order].set(x[:n])  # noqa: E731
  return back(inter), back(pred)


def pair_mask_counts(coef, box, owner, ok, proto, masks, chunk: int, early_exit: bool = True) -> tuple[jax.Array, jax.Array]:
  """:func:`plain_pair_mask_counts` over the plane's ``MASK_TILE`` tiles that each pair's box touches.

  Tiles (``min(MASK_TILE, side)`` pixels; the plane padded to whole tiles, the padding in no box) are a
  loop (one compilation for any number of tiles); in each, the ``ok`` pairs whose box touches it are listed (:func:`jnp.nonzero`, static
  size) and run ``MASK_TILE_CHUNK`` at a time in a loop of ``ceil(listed / chunk)`` iterations; each
  chunk's counts are added to its pairs. The same integers as the plain form. Without
  ``early_exit`` (``checkify``: no loop of traced length) this is the plain form; ``chunk`` is the
  plain form's.
  """
  if not early_exit:
    return plain_pair_mask_counts(coef, box, owner, ok, proto, masks, chunk, early_exit)
  n, _ = coef.shape
  _, h, w = proto.shape
  th, tw = min(MASK_TILE, h), min(MASK_TILE, w)
  gh, gw = -(-h // th), -(-w // tw)
  grow = ((0, gh * th - h), (0, gw * tw - w))
  proto = jnp.pad(proto, ((0, 0),) + grow)
  masks = jnp.pad(masks, grow if masks.ndim == 2 else ((0, 0),) + grow)
  x1, y1, x2, y2 = (box[:, i] for i in range(4))
  k = min(MASK_TILE_CHUNK, n)
  size = -(-n // k) * k
  totals = (jnp.zeros((n + 1,), jnp.int32), jnp.zeros((n + 1,), jnp.int32))  # slot n: the listing's filler

  def visit(t, totals):  # tile t: rows r0 + [0, th), columns c0 + [0, tw)
    r0, c0 = (t // gw) * th, (t % gw) * tw
    touch = ok & (y1 < r0 + th) & (y2 > r0) & (x1 < c0 + tw) & (x2 > c0)  # generous: the counts decide
    ids = jnp.nonzero(touch, size=size, fill_value=n)[0]
    line = lambda start, num, limit: jnp.where(start + jnp.arange(num) < limit, start + jnp.arange(num), jnp.inf).astype(jnp.float32)  # noqa: E731
    rows, cols = line(r0, th, h), line(c0, tw, w)  # pixels past the plane: in no box
    p_tile = jax.lax.dynamic_slice(proto, (0, r0, c0), (proto.shape[0], th, tw))
    m_tile = jax.lax.dynamic_slice(masks, (r0, c0) if masks.ndim == 2 else (0, r0, c0), masks.shape[:-2] + (th, tw))

    def body(j, totals):
      item = jax.lax.dynamic_slice_in_dim(ids, j * k, k)
      at = jnp.minimum(item, n - 1)
      di, dp = _packed_counts(_decode(coef[at], p_tile), _slot_masks(m_tile, owner[at]), *_box_lines(box[at], rows, cols))
      return totals[0].at[item].add(di), totals[1].at[item].add(dp)

    return jax.lax.fori_loop(0, (jnp.sum(touch, dtype=jnp.int32) + k - 1) // k, body, totals)

  totals = jax.lax.fori_loop(0, gh * gw, visit, totals)
  return totals[0][:n], totals[1][:n]


# ------------------------------------------------------------------------------------------------

KERNELS = ("bce_sum", "flow_rows", "mask_bce_sum", "mask_windows", "pair_mask_counts", "shared_sigmoid", "softmax_stats", "split_channels", "two_bin_logit_sum", "top_k", "windows")
# Kernels measured on another workload than the detection rows' (a task's loss, or the crowded scenes):
# the detection ablation rows leave them out and bench.py times them there.
TASK_KERNELS = {"flow_rows": "pose26_loss", "mask_bce_sum": "segment_loss", "mask_windows": "segment_loss", "pair_mask_counts": "segment26_loss", "windows": "crowded"}
# The trick each kernel function belongs to, where it is not its own name.
_TRICK_OF = {"sigmoid": "shared_sigmoid", "sqrt_sigmoid": "shared_sigmoid", "whole_map_scores": "shared_sigmoid"}


def check_names(names, caller: str = "plain_kernels") -> tuple[str, ...]:
  """``names`` as a sorted tuple of known trick names (:data:`KERNELS`); ValueError naming any other."""
  if isinstance(names, str):
    names = (names,)
  try:
    out = tuple(sorted(set(names)))
  except TypeError:
    raise ValueError(f"{caller} must be a tuple of kernel names from jaxtal.kernels.KERNELS, got {names!r}") from None
  unknown = [n for n in out if n not in KERNELS]
  if unknown:
    raise ValueError(f"{caller}: unknown kernel name(s) {unknown}; known: {KERNELS}")
  return out


def select(name: str, plain_kernels: tuple[str, ...] = ()):
  """The kernel function ``name``, or its plain twin when ``plain_kernels`` names its trick.

  ``plain_kernels`` is a config's static field, so the choice is made at trace time: one
  compilation per choice. ``bce_sum`` keeps its analytic gradient under a plain
  ``shared_sigmoid`` but computes that gradient's sigmoid plainly (the trick spans both).
  """
  if _TRICK_OF.get(name, name) in plain_kernels:
    return globals()[f"plain_{name}"]
  if name == "bce_sum":
    return functools.partial(bce_sum, plain_sigmoid_pass="shared_sigmoid" in plain_kernels)
  return globals()[name]
