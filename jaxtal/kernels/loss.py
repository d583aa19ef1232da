"""The detection loss's speed tricks, each beside its plain twin (the package's rules: :mod:`jaxtal.kernels`).

BCE over every class logit (``bce_sum``); the one sigmoid pass the BCE gradient and the assigner's scores share
(``sigmoid``, ``sqrt_sigmoid``, ``whole_map_scores``: the ``shared_sigmoid`` trick); DFL's expected bin and
log-sum-exp (``softmax_stats``); the head map's split into box bins and class logits (``split_channels``); DFL's
target term over the foreground entry list (``two_bin_logit_sum``, with ``two_bin_target``).
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
