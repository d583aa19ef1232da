"""jaxtal.ops kernels against optax / jax.nn and autodiff (values and gradients)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from jaxtal import ops


def _inputs(seed=0, shape=(3, 7), nc=5, scale=4.0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.standard_normal((*shape, nc)) * scale, jnp.float32)
  labels = jnp.asarray(rng.integers(0, nc, shape), jnp.int32)
  weight = jnp.asarray(rng.uniform(size=shape) * (rng.uniform(size=shape) > 0.5), jnp.float32)
  cw = jnp.asarray(rng.uniform(0.5, 2.0, nc), jnp.float32)
  return logits, labels, weight, cw


def _bce_reference(logits, labels, weight, cw):
  z = jax.nn.one_hot(labels, logits.shape[-1]) * weight[..., None]
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, z) * cw)


class BceTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.1, 4.0, 40.0)
  def test_value_and_gradients_match_optax(self, scale):
    logits, labels, weight, cw = _inputs(scale=scale)
    got = self.variant(jax.value_and_grad(ops.bce_one_hot_sum, argnums=(0, 2)))(logits, labels, weight, cw)
    want = jax.value_and_grad(_bce_reference, argnums=(0, 2))(logits, labels, weight, cw)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_without_class_weights_equals_unit_weights(self):
    logits, labels, weight, _ = _inputs(scale=4.0)
    ones = jnp.ones((logits.shape[-1],), jnp.float32)
    got = self.variant(jax.value_and_grad(ops.bce_one_hot_sum, argnums=(0, 2)))(logits, labels, weight)
    want = jax.value_and_grad(_bce_reference, argnums=(0, 2))(logits, labels, weight, ones)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)

  def test_extreme_logits_are_finite(self):
    logits, labels, weight, cw = _inputs()
    logits = logits.at[0, 0].set(jnp.array([1e4, -1e4, 0.0, 88.0, -88.0]))
    for weights in (cw, None):
      value, grad = jax.value_and_grad(ops.bce_one_hot_sum)(logits, labels, weight, weights)
      self.assertTrue(np.isfinite(value))
      self.assertTrue(np.isfinite(np.asarray(grad)).all())
      ref_weights = jnp.ones_like(cw) if weights is None else weights
      np.testing.assert_allclose(value, _bce_reference(logits, labels, weight, ref_weights), rtol=1e-5)


class SigmoidTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_sigmoid_and_its_square_root_match_jax_nn(self):
    x = jnp.concatenate([jnp.linspace(-80.0, 80.0, 20001), jnp.array([-1e4, -88.8, 88.8, 1e4, 0.0])])
    ref = np.asarray(jax.nn.sigmoid(x.astype(jnp.float64) if jax.config.jax_enable_x64 else x), np.float64)
    s = np.asarray(self.variant(ops.sigmoid)(x), np.float64)
    r = np.asarray(self.variant(ops.sqrt_sigmoid)(x), np.float64)
    np.testing.assert_allclose(s, ref, rtol=5e-7, atol=1e-30)
    np.testing.assert_allclose(r, np.sqrt(ref), rtol=5e-7, atol=1e-15)
    self.assertTrue(((s >= 0) & (s <= 1) & (r >= 0) & (r <= 1)).all())


class SplitChannelsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_and_gradient_equal_two_slices(self):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 9)), jnp.float32)
    w1, w2 = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 5, 4), (2, 5, 5)))

    def f(split):
      def loss(x):
        a, b = split(x)
        return jnp.sum(jnp.sin(a) * w1) + jnp.sum(b * b * w2)
      return loss

    ours = f(lambda x: ops.split_channels(x, 4))
    ref = f(lambda x: (x[..., :4], x[..., 4:]))
    chex.assert_trees_all_close(self.variant(ops.split_channels, static_argnums=1)(x, 4), (x[..., :4], x[..., 4:]))
    chex.assert_trees_all_close(self.variant(jax.value_and_grad(ours))(x), jax.value_and_grad(ref)(x), rtol=1e-6)

  def test_one_part_unused_gets_zero_gradient(self):
    x = jnp.ones((3, 6))
    grad = jax.grad(lambda x: jnp.sum(ops.split_channels(x, 2)[1]))(x)
    np.testing.assert_array_equal(grad, np.concatenate([np.zeros((3, 2)), np.ones((3, 4))], -1))


def _bins_and_cotangents(seed, shape, scale):
  """``(*shape, 16)`` bin logits and a random cotangent pair for ``(expectation, lse)``."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((*shape, 16)) * scale, jnp.float32)
  return x, tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))


class DflTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_expectation_and_lse_match_autodiff(self):
    x, cot = _bins_and_cotangents(1, (4, 6, 4), 3)

    def ref(x):
      return jnp.sum(jax.nn.softmax(x, -1) * jnp.arange(16.0), -1), jax.nn.logsumexp(x, -1)

    chex.assert_trees_all_close(self.variant(ops.softmax_expectation)(x), ref(x), rtol=1e-6, atol=1e-5)
    got = self.variant(lambda x: jax.vjp(ops.softmax_expectation, x)[1](cot)[0])(x)
    np.testing.assert_allclose(got, jax.vjp(ref, x)[1](cot)[0], rtol=1e-5, atol=1e-6)

  def test_side_bin_maxima_from_whole_rows(self):
    rng = np.random.default_rng(6)
    rows = jnp.asarray(rng.standard_normal((2, 5, 4 * 16 + 32)), jnp.float32)
    want = jnp.max(rows[..., :64].reshape(2, 5, 4, 16), axis=-1)
    np.testing.assert_array_equal(ops.side_bin_maxima(rows, 16), want)
    self.assertIsNone(ops.side_bin_maxima(rows[..., :-1], 16))  # 95 channels: not groups of 16
    self.assertIsNone(ops.side_bin_maxima(rows, 1))

  @chex.variants(with_jit=True, without_jit=True)
  def test_given_row_maximum_changes_nothing(self):
    x, cot = _bins_and_cotangents(5, (3, 5, 4), 20)

    def with_top(x):
      return ops.softmax_expectation(x, jnp.max(x, axis=-1))

    chex.assert_trees_all_close(self.variant(with_top)(x), ops.softmax_expectation(x), rtol=1e-6, atol=1e-6)
    got = self.variant(lambda x: jax.vjp(with_top, x)[1](cot)[0])(x)
    np.testing.assert_allclose(got, jax.vjp(ops.softmax_expectation, x)[1](cot)[0], rtol=1e-6, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dfl_cross_entropy_matches_optax(self):
    """lse - sum(target * x), as the loss writes it, is optax's two-label cross-entropy (value and grad)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 4, 16)) * 3, jnp.float32)
    target = jnp.asarray(rng.uniform(0, 14.99, (5, 4)), jnp.float32)
    left = jnp.floor(target).astype(jnp.int32)
    w_left = left + 1 - target

    def ours(x):
      return ops.softmax_expectation(x)[1] - jnp.sum(x * ops.two_bin_target(16, left, w_left), -1)

    def ref(x):
      ce = optax.softmax_cross_entropy_with_integer_labels
      return ce(x, left) * w_left + ce(x, left + 1) * (1 - w_left)

    cot = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    np.testing.assert_allclose(self.variant(ours)(x), ref(x), rtol=1e-5, atol=1e-5)
    got = self.variant(lambda x: jax.vjp(ours, x)[1](cot)[0])(x)
    np.testing.assert_allclose(got, jax.vjp(ref, x)[1](cot)[0], rtol=1e-5, atol=1e-6)


class TwoBinLogitSumTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_sparse_forward_equals_dense_formula_and_gradient(self):
    rng = np.random.default_rng(4)
    b, a, r = 2, 9, 16
    x = jnp.asarray(rng.standard_normal((b, a, 4, r)) * 3, jnp.float32)
    target = jnp.asarray(rng.uniform(0, r - 1.01, (b, a, 4)), jnp.float32)
    left = jnp.floor(target).astype(jnp.int32)
    w_left = left + 1 - target
    fg = rng.uniform(size=(b, a)) < 0.5
    coef = jnp.asarray(np.where(fg, rng.uniform(0.1, 1.0, (b, a)), 0.0), jnp.float32)
    # Each foreground anchor listed once with take=True, plus repeats and background rows with take=False.
    rows, take = [], []
    for i in range(b):
      fg_rows = np.flatnonzero(fg[i])
      extra = rng.integers(0, a, 7)
      order = rng.permutation(fg_rows.size + extra.size)
      rows.append(np.concatenate([fg_rows, extra])[order])
      take.append(np.concatenate([np.ones(fg_rows.size, bool), np.zeros(extra.size, bool)])[order])
    size = max(map(len, rows))
    rows = jnp.asarray([np.pad(v, (0, size - len(v))) for v in rows], jnp.int32)
    take = jnp.asarray([np.pad(v, (0, size - len(v))) for v in take])

    def dense(x):
      return jnp.sum(coef[..., None] * jnp.sum(x * ops.two_bin_target(r, left, w_left), axis=-1))

    got = self.variant(jax.value_and_grad(ops.two_bin_logit_sum))(x, left, w_left, coef, rows, take)
    want = jax.value_and_grad(dense)(x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
