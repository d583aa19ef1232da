"""Speed tricks, each beside the plain form it is tested against and replaceable by it.

Every trick in jaxtal lives here. Each has a plain twin written with the well-kept library
(optax, ``jax.nn``, ``jax.lax``, autodiff) with the same numerics to float32 rounding
(``tests/test_kernels.py`` compares values and gradients, and runs
``jax.test_util.check_grads`` on every custom VJP). A trick stays only while
``benchmarks/bench.py``'s ablation rows ("plain <name>": the loss step with that one kernel
replaced by its plain twin) show it saves at least 5% of the loss step; the measured saving is
written beside each one, from ``benchmarks/README.md``. Removed after measuring: the bin maxima read
from whole head-map rows (0%). Task kernels (``TASK_KERNELS``: ``mask_bce_sum``, the mask
term) are measured on their task's loss step instead, and ``windows`` (the assigner's windowed
pass, :mod:`jaxtal.windows`) on the crowded-scene rows. XLA fuses the plain forms well on GPU
and TPU too; the tricks were measured on XLA:CPU, the only backend CI has.

The loss and the assigner pick each kernel with :func:`select` and the config's static
``plain_kernels`` field (:class:`jaxtal.AssignerConfig`): ``LossConfig(..., plain_kernels=("top_k",))``
traces that trick's plain twin instead, a new compilation and the same results to float32
rounding. The benchmark's ablation rows and the tests use it; nothing is swapped globally.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

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

KERNELS = ("bce_sum", "mask_bce_sum", "shared_sigmoid", "softmax_stats", "split_channels", "two_bin_logit_sum", "top_k", "windows")
# Kernels measured on another workload than the detection rows' (a task's loss, or the crowded scenes):
# the detection ablation rows leave them out and bench.py times them there.
TASK_KERNELS = {"mask_bce_sum": "segment_loss", "windows": "crowded"}
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
