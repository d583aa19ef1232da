"""The dense per-anchor terms of the loss, with analytic gradients.

These run over every anchor and class (``b * A * nc`` logits, ``b * A * 4R`` bins), so they
dominate a training step's loss time. Each is a ``jax.custom_vjp`` whose backward pass is
the closed-form gradient (``sigmoid(x) - z`` for BCE; ``p * (g_E * (i - E) + g_lse)`` for the
DFL expectation and log-sum-exp), computed in one elementwise pass from the saved input
instead of replaying autodiff's chain of intermediates. Values equal
``optax.sigmoid_binary_cross_entropy``, ``optax.softmax_cross_entropy_with_integer_labels`` and
the softmax formulas to float32 rounding (``tests/test_ops.py``); gradients equal autodiff's.
Two helpers shape how XLA schedules those passes: :func:`split_channels` (the head map's
gradient as one concatenation) and :func:`sqrt_sigmoid` / :func:`sigmoid` (one pass for the
BCE gradient and the assigner's scores). :func:`two_bin_logit_sum` is DFL's target term,
read only at the listed foreground anchors, with a dense elementwise gradient; :func:`take_rows`
is the per-image row gather the loss reads that list with.

Why not call optax/jax.nn directly: on XLA:CPU, ``optax.sigmoid_binary_cross_entropy`` and
``jax.nn.softplus`` lower through ``logaddexp`` and a one-hot target broadcast inside a
reduction, which XLA does not vectorise; with autodiff the BCE forward and backward of a
``(16, 8400, 80)`` block took ~60 ms here against ~9 ms for this form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _twice_softplus(x: jax.Array) -> jax.Array:
  """``2 * softplus(x) = (x + |x|) + 2 * log1p(e^-|x|)``: finite for every finite x.

  Written without constants (``max(x, 0)`` would be): XLA:CPU hands the sum of this to a
  YNNPACK reduction, which takes every broadcast constant as a materialised full-size
  operand. Doubling and the caller's halving are exact, so the sum is bit-for-bit that of
  ``softplus``.
  """
  a = jnp.abs(x)
  l = jnp.log1p(jnp.exp(-a))
  return (x + a) + (l + l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_channels(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``(x[..., :k], x[..., k:])`` whose gradient is one concatenation of the two cotangents.

  Autodiff of two slices sums two zero-padded full-width cotangents; XLA:CPU then evaluates
  both producers for every channel of the fused gradient pass. Concatenating evaluates each
  channel's producer once (the head map's gradient pass got about 30% faster here).
  """
  return x[..., :k], x[..., k:]


def _split_fwd(x, k):
  return split_channels(x, k), None


def _split_bwd(k, _, g):
  return (jnp.concatenate(g, axis=-1),)


split_channels.defvjp(_split_fwd, _split_bwd)


def sqrt_sigmoid(x: jax.Array) -> jax.Array:
  """``sqrt(sigmoid(x)) = rsqrt(1 + exp(-x))``: one exp and one rsqrt per element.

  The loss needs both ``sigmoid(x)`` (BCE's gradient, as :func:`sigmoid`) and, for the
  assigner's default ``alpha = 0.5``, ``sigmoid(x) ** 0.5``; writing both from this one
  expression lets XLA compute it once per logit instead of a sigmoid pass and a sqrt pass.
  In ``[0, 1]`` for every non-NaN ``x`` (``exp`` overflowing to ``inf`` gives 0); relative
  error within a few float32 ulps of the exact value.
  """
  return jax.lax.rsqrt(1.0 + jnp.exp(-x))


def sigmoid(x: jax.Array) -> jax.Array:
  """``sigmoid(x)`` as ``sqrt_sigmoid(x) ** 2`` (shares its pass; relative error < 4e-7)."""
  r = sqrt_sigmoid(x)
  return r * r


def bce_one_hot_sum(
    logits: jax.Array, labels: jax.Array, weight: jax.Array, class_weights: jax.Array | None = None
) -> jax.Array:
  """``sum(BCE-with-logits(logits, one_hot(labels) * weight[..., None]) * class_weights)``.

  Args:
    logits: ``(..., nc)`` float32 class logits.
    labels: ``(...)`` int32 target class of each row (any value where ``weight`` is 0).
    weight: ``(...)`` float32 target probability of that class (0 on background).
    class_weights: optional ``(nc,)`` float32 per-class weights, ``None`` for all ones (a
      constant that XLA folds away). Treated as a constant: its cotangent is 0 (callers pass
      it through ``stop_gradient``).

  Returns:
    The scalar sum. Uses ``BCE(x, z) = softplus(x) - x * z``, so the one-hot target is
    never materialised; the gradient w.r.t. ``logits`` is ``(sigmoid(x) - z) * class_weights``.
  """
  if class_weights is None:
    class_weights = jnp.ones((logits.shape[-1],), jnp.float32)
  return _bce_sum(logits, labels, weight, class_weights)


def _picked(logits, labels, class_weights):
  # (logits * class_weights)[..., label]: gathered from a batched operand, so the gather keeps
  # the batch's sharding under jit (indexing the unbatched (nc,) weights would not).
  return jnp.take_along_axis(logits * class_weights, labels[..., None], axis=-1)[..., 0]


@jax.custom_vjp
def _bce_sum(logits, labels, weight, class_weights):
  return 0.5 * jnp.sum(_twice_softplus(logits) * class_weights) - jnp.sum(_picked(logits, labels, class_weights) * weight)


def _bce_fwd(logits, labels, weight, class_weights):
  return _bce_sum(logits, labels, weight, class_weights), (logits, labels, weight, class_weights)


def _bce_bwd(res, g):
  logits, labels, weight, class_weights = res
  nc = logits.shape[-1]
  z = (labels[..., None] == jnp.arange(nc, dtype=labels.dtype)) * weight[..., None]
  d_logits = g * (sigmoid(logits) - z) * class_weights
  d_weight = -g * _picked(logits, labels, class_weights)
  d_labels = jax.custom_derivatives.zero_from_primal(labels)
  return d_logits, d_labels, d_weight, jnp.zeros_like(class_weights)


_bce_sum.defvjp(_bce_fwd, _bce_bwd)


def side_bin_maxima(rows: jax.Array, reg_max: int) -> jax.Array | None:
  """``(b, A, 4)`` maximum of each side's ``R`` bin logits, read from whole head-map rows.

  ``rows`` are ``(b, A, 4R + nc)`` (bins first). When the channel count is a multiple of
  ``R`` the rows are viewed as groups of ``R`` channels (a reshape) and reduced in place;
  reducing the bin channels alone makes XLA:CPU copy that strided slice first. Returns
  ``None`` otherwise (callers then let :func:`softmax_expectation` take the maximum).
  """
  if reg_max < 2 or rows.shape[-1] % reg_max:
    return None
  return jnp.max(rows.reshape(*rows.shape[:-1], rows.shape[-1] // reg_max, reg_max), axis=-1)[..., :4]


def softmax_expectation(logits: jax.Array, top: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Expected bin ``sum_i softmax(logits)_i * i`` and ``logsumexp(logits)`` over the last axis.

  The expectation is DFL's decoded distance; the log-sum-exp is what DFL's cross-entropy needs
  besides two target logits (``CE = lse - sum_i target_i * logits_i``). Computing both in one
  pass, with one backward pass ``p * (g_E * (i - E) + g_lse)``, reads the bins once each way.

  Args:
    logits: ``(..., R)`` float32 bin logits.
    top: optional ``(...)`` row maximum of ``logits``, when the caller has it already (the
      loss takes it from :func:`side_bin_maxima`, which needs no copy of the strided bin
      channels). Only a numerical shift: results do not depend on it, and it gets
      no gradient.

  Returns:
    ``(expectation, lse)``, each ``(...)``. The expectation is an elementwise weighted sum
    (no matmul with a length-R vector).
  """
  if top is None:
    top = jnp.max(logits, axis=-1)
  return _softmax_stats(logits, jax.lax.stop_gradient(top))


def _softmax_parts(logits, top):
  e = jnp.exp(logits - top[..., None])
  total = jnp.sum(e, axis=-1)
  bins = jnp.arange(logits.shape[-1], dtype=logits.dtype)
  return jnp.sum(e * bins, axis=-1) / total, top + jnp.log(total), total


@jax.custom_vjp
def _softmax_stats(logits, top):
  return _softmax_parts(logits, top)[:2]


def _stats_fwd(logits, top):
  e, lse, total = _softmax_parts(logits, top)
  return (e, lse), (logits, top, e, total)


def _stats_bwd(res, g):
  logits, top, e, total = res
  g_e, g_lse = g
  p = jnp.exp(logits - top[..., None]) / total[..., None]  # the forward's exponentials again
  bins = jnp.arange(logits.shape[-1], dtype=logits.dtype)
  return p * (g_e[..., None] * (bins - e[..., None]) + g_lse[..., None]), jnp.zeros_like(top)


_softmax_stats.defvjp(_stats_fwd, _stats_bwd)


@jax.custom_vjp
def two_bin_logit_sum(
    logits: jax.Array, left: jax.Array, w_left: jax.Array, coef: jax.Array, rows: jax.Array, take: jax.Array
) -> jax.Array:
  """``sum_a coef[a] * sum_s (w_left * logits[a, s, left] + (1 - w_left) * logits[a, s, left + 1])``, sparse forward.

  DFL's target term (with ``lse`` from :func:`softmax_expectation`, the two-bin
  cross-entropy is ``lse - `` this), summed over the anchors where ``coef`` is non-zero.
  The forward pass reads only the listed rows (``b * E * S * R`` bins: the foreground
  anchors, not all ``A``); the backward pass is the dense closed form
  ``g * coef * two_bin_target(R, left, w_left)``, elementwise, so no target array and no
  scatter is made.

  Precondition (the loss guarantees it): every anchor with ``coef != 0`` is listed in
  ``rows`` exactly once with ``take`` True. ``left``, ``w_left`` and ``coef`` are treated as
  constants (cotangent 0; callers pass them through ``stop_gradient``).

  Args:
    logits: ``(b, A, S, R)`` float32 bin logits (``S`` sides).
    left: ``(b, A, S)`` int32 left bin in ``[0, R - 2]``.
    w_left: ``(b, A, S)`` float32 weight of the left bin.
    coef: ``(b, A)`` float32 weight of each anchor (0 where it does not count).
    rows: ``(b, E)`` int32 anchors listed, in ``[0, A)``.
    take: ``(b, E)`` bool, which listed rows count.

  Returns:
    The scalar sum.
  """
  x = take_rows(logits, rows)  # (b, E, S, R)
  picked = jnp.sum(x * two_bin_target(logits.shape[-1], take_rows(left, rows), take_rows(w_left, rows)), axis=-1)
  return jnp.sum(jnp.where(take, take_rows(coef, rows) * jnp.sum(picked, axis=-1), 0.0))


def _two_bin_sum_fwd(logits, left, w_left, coef, rows, take):
  # The logits ride along only for their bin count (they are an input, so nothing is copied).
  return two_bin_logit_sum(logits, left, w_left, coef, rows, take), (logits, left, w_left, coef, rows, take)


def _two_bin_sum_bwd(res, g):
  logits, left, w_left, coef, rows, take = res
  d_logits = (g * coef)[..., None, None] * two_bin_target(logits.shape[-1], left, w_left)
  zero = jax.custom_derivatives.zero_from_primal
  return d_logits, zero(left), jnp.zeros_like(w_left), jnp.zeros_like(coef), zero(rows), zero(take)


two_bin_logit_sum.defvjp(_two_bin_sum_fwd, _two_bin_sum_bwd)


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """``x[i, rows[i]]`` for every image ``i``: ``(b, A, ...)`` and ``(b, E)`` int -> ``(b, E, ...)``.

  A gather within each image (both operands batched), so it keeps the batch's sharding under a
  batch-sharded ``jit``. Rows must be in ``[0, A)``.
  """
  return jax.vmap(lambda v, i: jnp.take(v, i, axis=0))(x, rows)


def two_bin_target(num_bins: int, left: jax.Array, w_left: jax.Array) -> jax.Array:
  """``(..., R)`` DFL target: mass ``w_left`` on bin ``left`` and ``1 - w_left`` on ``left + 1``.

  Args:
    num_bins: ``R``.
    left: ``(...)`` int32 left bin in ``[0, R - 2]``.
    w_left: ``(...)`` float32 weight of the left bin in ``[0, 1]``.

  References:
    Li et al., 2020, "Generalized Focal Loss", https://arxiv.org/abs/2006.04388.
  """
  bins = jnp.arange(num_bins, dtype=left.dtype)
  w = w_left[..., None]
  return jnp.where(bins == left[..., None], w, 0.0) + jnp.where(bins == left[..., None] + 1, 1.0 - w, 0.0)
