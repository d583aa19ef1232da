"""jaxtal.kernels (and jaxtal._parallel): every speed trick against its plain twin and NumPy.

For each kernel: value and gradient equal the plain twin's (``the ``variant`` fixture: compiled and eager),
and every custom VJP passes ``jax.test_util.check_grads`` (reverse mode against finite differences,
run in float64 so the numerical derivative is precise). ``top_k`` is compared index for index with
``plain_top_k`` and a NumPy stable sort on tie-heavy metrics. Finally the whole loss traced with
every plain twin (``plain_kernels``) equals the loss with the tricks, in value and gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from jax.test_util import check_grads

import jaxtal
from jaxtal import kernels
from jaxtal._parallel import global_sum
from support.oracles import np_bce_with_logits, np_flow_log_prob, np_logsumexp, np_softmax, np_two_bin_target
from support import segment26_cases
from support.problems import R, crowded_loss_problem, random_flow_params

GRAD_TOL = dict(atol=1e-6, rtol=1e-6, eps=1e-6)  # check_grads in float64


def _bce_inputs(seed=0, shape=(3, 7), nc=5, scale=4.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.standard_normal((*shape, nc)) * scale, dtype)
  labels = jnp.asarray(rng.integers(0, nc, shape), jnp.int32)
  weight = jnp.asarray(rng.uniform(size=shape) * (rng.uniform(size=shape) > 0.5), dtype)
  cw = jnp.asarray(rng.uniform(0.5, 2.0, nc), dtype)
  return logits, labels, weight, cw


# --------------------------------------------------------------------------------------------------
# bce_sum


class TestBceSum:

  @pytest.mark.parametrize("scale", [
      0.1,
      4.0,
      40.0,
  ])
  def test_value_and_gradients_equal_the_plain_twin(self, variant, scale):
    logits, labels, weight, cw = _bce_inputs(scale=scale)
    for weights in (cw, None):
      got = variant(jax.value_and_grad(kernels.bce_sum, argnums=(0, 2)))(logits, labels, weight, weights)
      want = jax.value_and_grad(kernels.plain_bce_sum, argnums=(0, 2))(logits, labels, weight, weights)
      chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)

  def test_plain_twin_matches_numpy(self):
    logits, labels, weight, cw = _bce_inputs(seed=1)
    z = np.eye(5)[np.asarray(labels)] * np.asarray(weight)[..., None]
    want = (np_bce_with_logits(np.asarray(logits, np.float64), z) * np.asarray(cw, np.float64)).sum()
    np.testing.assert_allclose(kernels.plain_bce_sum(logits, labels, weight, cw), want, rtol=1e-5)
    np.testing.assert_allclose(kernels.bce_sum(logits, labels, weight, cw), want, rtol=1e-5)

  @pytest.mark.parametrize("class_weights", [
      None,
      "weights",
  ])
  def test_check_grads(self, class_weights):
    with jax.enable_x64(True):
      logits, labels, weight, cw = _bce_inputs(seed=2, dtype=jnp.float64)
      cw = cw if class_weights else None
      # labels are integers and class_weights a constant of the kernel: differentiate logits and weight.
      check_grads(lambda x, w: kernels.bce_sum(x, labels, w, cw), (logits, weight), order=1, modes=("rev",), **GRAD_TOL)

  def test_extreme_logits_are_finite(self):
    logits, labels, weight, cw = _bce_inputs()
    logits = logits.at[0, 0].set(jnp.array([1e4, -1e4, 0.0, 88.0, -88.0]))
    for weights in (cw, None):
      value, grad = jax.value_and_grad(kernels.bce_sum)(logits, labels, weight, weights)
      assert np.isfinite(value)
      assert np.isfinite(np.asarray(grad)).all()
      np.testing.assert_allclose(value, kernels.plain_bce_sum(logits, labels, weight, weights), rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# softmax_stats


def _bins_and_cotangents(seed, shape, scale, r=16, dtype=jnp.float32):
  """``(*shape, r)`` bin logits and a random cotangent pair for ``(expectation, lse)``."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((*shape, r)) * scale, dtype)
  return x, tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))


class TestSoftmaxStats:

  def test_value_and_vjp_equal_the_plain_twin(self, variant):
    x, cot = _bins_and_cotangents(1, (4, 6, 4), 3)
    kernel = kernels.softmax_stats

    chex.assert_trees_all_close(variant(kernel)(x), kernels.plain_softmax_stats(x), rtol=1e-6, atol=1e-5)
    got = variant(lambda x: jax.vjp(kernel, x)[1](cot)[0])(x)
    np.testing.assert_allclose(got, jax.vjp(kernels.plain_softmax_stats, x)[1](cot)[0], rtol=1e-5, atol=1e-6)

  def test_plain_twin_matches_numpy(self):
    x, _ = _bins_and_cotangents(2, (5, 4), 5)
    e, lse = kernels.plain_softmax_stats(x)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(e, (np_softmax(x64) * np.arange(16)).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, np_logsumexp(x64), rtol=1e-6)

  def test_check_grads(self):
    with jax.enable_x64(True):
      x, _ = _bins_and_cotangents(3, (3, 4), 2, r=8, dtype=jnp.float64)
      check_grads(kernels.softmax_stats, (x,), order=1, modes=("rev",), **GRAD_TOL)

  def test_large_logits_stay_finite(self):
    # The row maximum shift: logits of 1e4 give finite values and gradients.
    x, cot = _bins_and_cotangents(5, (3, 5, 4), 1)
    x = x.at[0, 0, 0, 3].set(1e4)
    e, lse = kernels.softmax_stats(x)
    g = jax.vjp(kernels.softmax_stats, x)[1](cot)[0]
    assert np.isfinite(np.asarray(e)).all() and np.isfinite(np.asarray(lse)).all() and np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(e[0, 0, 0], 3.0, atol=1e-6)

  def test_dfl_cross_entropy_matches_optax(self):
    """lse - <two-bin target, x>, as the loss writes it, is optax's two-label cross-entropy (value and grad)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 4, 16)) * 3, jnp.float32)
    target = jnp.asarray(rng.uniform(0, 14.99, (5, 4)), jnp.float32)
    left = jnp.floor(target).astype(jnp.int32)
    w_left = left + 1 - target

    def ours(x):
      return kernels.softmax_stats(x)[1] - jnp.sum(x * kernels.two_bin_target(16, target), -1)

    def ref(x):
      ce = optax.softmax_cross_entropy_with_integer_labels
      return ce(x, left) * w_left + ce(x, left + 1) * (1 - w_left)

    cot = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    run = jax.jit(lambda x, cot: [(f(x), jax.vjp(f, x)[1](cot)[0]) for f in (ours, ref)])
    (value, vjp), (want_value, want_vjp) = run(x, cot)
    np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vjp, want_vjp, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# split_channels


class TestSplitChannels:

  def test_values_and_gradient_equal_the_plain_twin(self, variant):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 9)), jnp.float32)
    w1, w2 = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 5, 4), (2, 5, 5)))

    def f(split):
      def loss(x):
        a, b = split(x, 4)
        return jnp.sum(jnp.sin(a) * w1) + jnp.sum(b * b * w2)
      return loss

    chex.assert_trees_all_close(variant(kernels.split_channels, static_argnums=1)(x, 4), (x[..., :4], x[..., 4:]))
    chex.assert_trees_all_close(
        variant(jax.value_and_grad(f(kernels.split_channels)))(x),
        jax.value_and_grad(f(kernels.plain_split_channels))(x), rtol=1e-6,
    )

  def test_check_grads(self):
    with jax.enable_x64(True):
      x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 7)), jnp.float64)
      check_grads(lambda x: kernels.split_channels(x, 3), (x,), order=1, modes=("rev",), **GRAD_TOL)
      check_grads(lambda x: kernels.split_channels(x, 7)[0], (x,), order=1, modes=("rev",), **GRAD_TOL)  # empty part

  def test_one_part_unused_gets_zero_gradient(self):
    x = jnp.ones((3, 6))
    grad = jax.grad(lambda x: jnp.sum(kernels.split_channels(x, 2)[1]))(x)
    np.testing.assert_array_equal(grad, np.concatenate([np.zeros((3, 2)), np.ones((3, 4))], -1))


# --------------------------------------------------------------------------------------------------
# two_bin_target and two_bin_logit_sum


def _two_bin_problem(seed=4, b=2, a=9, r=16, extra=7, dtype=jnp.float32):
  """Logits (b, a, 4, r), targets away from whole bins, and an entry list with repeats and background rows."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, a, 4, r)) * 3, dtype)
  whole = rng.integers(0, r - 1, (b, a, 4))
  target = jnp.asarray(whole + rng.uniform(0.1, 0.9, (b, a, 4)), dtype)  # never on a bin: no kink
  rows, coef = [], []
  for _ in range(b):
    fg = np.flatnonzero(rng.uniform(size=a) < 0.5)
    listed = np.concatenate([fg, rng.integers(0, a, extra)])  # repeats: an anchor may be listed twice
    order = rng.permutation(listed.size)
    rows.append(listed[order])
    coef.append(rng.uniform(0.1, 1.0, listed.size)[order] * (rng.uniform(size=listed.size) < 0.8))
  size = max(map(len, rows))
  rows = jnp.asarray([np.pad(v, (0, size - len(v))) for v in rows], jnp.int32)
  coef = jnp.asarray([np.pad(v, (0, size - len(v))) for v in coef], dtype)
  return x, target, rows, coef


class TestTwoBin:

  def test_two_bin_target_matches_numpy(self):
    t = jnp.array([0.0, 0.25, 3.5, 14.99, 7.0], jnp.float32)
    got = kernels.two_bin_target(16, t)
    np.testing.assert_allclose(got, np_two_bin_target(16, t), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1, :3], [0.75, 0.25, 0.0], rtol=1e-6)  # hand-worked
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose((got * np.arange(16)).sum(-1), t, rtol=1e-6)  # its expectation is the target

  def test_value_and_gradient_equal_the_plain_twin_with_repeated_rows(self, variant):
    x, target, rows, coef = _two_bin_problem()
    assert any(np.unique(r).size < r.size for r in np.asarray(rows))  # an anchor listed twice
    got = variant(jax.value_and_grad(kernels.two_bin_logit_sum))(x, target, rows, coef)
    want = jax.value_and_grad(kernels.plain_two_bin_logit_sum)(x, target, rows, coef)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  def test_value_matches_numpy(self):
    x, target, rows, coef = _two_bin_problem(seed=5)
    xs, ts, rs, cs = (np.asarray(v, np.float64) for v in (x, target, rows, coef))
    want = 0.0
    for i in range(rs.shape[0]):
      for e, a in enumerate(rs[i].astype(int)):
        want += cs[i, e] * (np_two_bin_target(16, ts[i, a]) * xs[i, a]).sum()
    np.testing.assert_allclose(kernels.two_bin_logit_sum(x, target, rows, coef), want, rtol=1e-5)

  def test_check_grads(self):
    with jax.enable_x64(True):
      x, target, rows, coef = _two_bin_problem(seed=6, a=6, r=8, dtype=jnp.float64)
      check_grads(lambda x: kernels.two_bin_logit_sum(x, target, rows, coef), (x,), order=1, modes=("rev",), **GRAD_TOL)


# --------------------------------------------------------------------------------------------------
# top_k


def _tied_levels(seed, sizes, rows=6, values=(0.0, 0.25, 0.5, 1.0)):
  """Per-level (rows, A_l) metrics >= 0 drawn from a few values: ties everywhere, many zeros."""
  rng = np.random.default_rng(seed)
  p = np.array([0.5] + [0.5 / (len(values) - 1)] * (len(values) - 1))
  full = rng.choice(np.asarray(values, np.float32), size=(rows, sum(sizes)), p=p)
  full[0] = 0.0  # a row of ties only
  full[1, :] = values[-1]  # a row of equal maxima
  return [jnp.asarray(x) for x in np.split(full, np.cumsum(sizes)[:-1], axis=1)], full


def np_top_k(full, k):
  """Stable descending sort: ties to the lower anchor index."""
  idx = np.argsort(-full, axis=1, kind="stable")[:, :k]
  return idx, np.take_along_axis(full, idx, axis=1)


class TestTopK:

  @pytest.mark.parametrize("sizes,k", [
      ((37, 20, 5), 1),
      ((37, 20, 5), 10),
      ((37, 20, 5), 13),  # more than the 3 + 2 + 1 = 6 tiles... of a row's best
      ((37, 20, 5), 62),  # every anchor
      ((1, 17, 33), 7),
      ((50,), 5),
      ((3, 3), 4),  # fewer tiles than k
  ])
  def test_equals_plain_top_k_and_numpy_on_ties(self, sizes, k):
    for seed in range(3):
      levels, full = _tied_levels(seed, sizes)
      got = jax.jit(lambda *lv: kernels.top_k(list(lv))(k))(*levels)
      want = kernels.plain_top_k(levels)(k)
      np.testing.assert_array_equal(got[0], want[0])
      np.testing.assert_array_equal(got[1], want[1])
      idx, val = np_top_k(full, k)
      np.testing.assert_array_equal(got[0], idx)
      np.testing.assert_array_equal(got[1], val)
      chex.assert_type(got[0], jnp.int32)

  def test_compiled_and_eager(self, variant):
    levels, full = _tied_levels(5, (37, 20, 5))
    got = variant(lambda *lv: kernels.top_k(list(lv))(10))(*levels)
    idx, val = np_top_k(full, 10)
    np.testing.assert_array_equal(got[0], idx)
    np.testing.assert_array_equal(got[1], val)

  def test_continuous_values(self):
    rng = np.random.default_rng(9)
    full = rng.uniform(size=(4, 300)).astype(np.float32) ** 8  # many tiny values, few large
    levels = [jnp.asarray(x) for x in np.split(full, [200, 290], axis=1)]
    for k in (1, 10, 40):
      got = jax.jit(lambda *lv, k=k: kernels.top_k(list(lv))(k))(*levels)
      idx, val = np_top_k(full, k)
      np.testing.assert_array_equal(got[0], idx)
      np.testing.assert_array_equal(got[1], val)


# --------------------------------------------------------------------------------------------------
# plain_kernels: every trick can be replaced by its twin through the config, and the loss does not change


# --------------------------------------------------------------------------------------------------
# flow_rows (the RLE term's flow over its kept rows)


def _flow_rows_inputs(seed=0, rows=50, dtype=np.float32):
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), random_flow_params(seed, std=0.15))
  x = rng.normal(0.0, 3.0, (rows, 2)).astype(dtype)
  keep = rng.uniform(size=rows) < 0.6
  x[~keep] = np.where(rng.uniform(size=((~keep).sum(), 2)) < 0.5, np.nan, np.inf)  # rows not kept hold anything
  coef = rng.uniform(-2.0, 2.0, rows).astype(dtype)
  return params, jnp.asarray(x), jnp.asarray(coef), jnp.asarray(keep)


class TestFlowRows:

  @pytest.mark.parametrize("chunk", [7, pytest.param(8192, marks=pytest.mark.slow)])  # many chunks, a partial last one; one chunk
  def test_value_and_gradients_equal_the_flow_over_the_kept_rows(self, chunk, monkeypatch):
    monkeypatch.setattr(kernels.yolo26, "FLOW_CHUNK", chunk)
    params, x, coef, keep = _flow_rows_inputs()
    k = np.asarray(keep)
    want = float(np.sum(np.asarray(coef, np.float64)[k] * np_flow_log_prob(params, np.asarray(x)[k])))
    grad = jax.jit(jax.value_and_grad(kernels.flow_rows, argnums=(0, 1, 2)))
    value, (d_params, d_x, d_coef) = grad(params, x, coef, keep)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    p_value, (p_params, p_x, p_coef) = jax.value_and_grad(kernels.plain_flow_rows, argnums=(0, 1, 2))(params, x, coef, keep)
    np.testing.assert_allclose(value, p_value, rtol=2e-5)  # float32 sums in another order
    for got, ref in zip(d_params, p_params):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))  # sums with cancellation
    np.testing.assert_allclose(d_x, p_x, rtol=1e-4, atol=1e-5 * float(np.abs(p_x).max()))
    np.testing.assert_allclose(d_coef, p_coef, rtol=1e-4, atol=1e-5 * float(np.abs(p_coef).max()))
    assert np.all(np.asarray(d_x)[~k] == 0) and np.all(np.asarray(d_coef)[~k] == 0)
    np.testing.assert_allclose(np.asarray(d_coef)[k], np_flow_log_prob(params, np.asarray(x)[k]), rtol=1e-4)
    np.testing.assert_allclose(jax.jit(kernels.flow_rows)(params, x, coef, keep), value, rtol=2e-5)  # value alone

  def test_no_kept_row_gives_zero_and_zero_gradients(self):
    params, x, coef, keep = _flow_rows_inputs(seed=1)
    value, grads = jax.value_and_grad(kernels.flow_rows, argnums=(0, 1, 2))(params, x, coef, jnp.zeros_like(keep))
    assert float(value) == 0.0
    for g in jax.tree.leaves(grads):
      assert np.all(np.asarray(g) == 0)

  @pytest.mark.slow
  def test_vmap_equals_one_problem_at_a_time(self, monkeypatch):
    monkeypatch.setattr(kernels.yolo26, "FLOW_CHUNK", 16)
    problems = [_flow_rows_inputs(seed=s) for s in (2, 3)]
    params = problems[0][0]
    x, coef, keep = (jnp.stack([p[i] for p in problems]) for i in (1, 2, 3))
    keep = keep.at[1].set(False).at[1, :3].set(True)  # another kept count (trip count) per problem
    grad = jax.value_and_grad(kernels.flow_rows, argnums=(0, 1))
    values, (d_params, d_x) = jax.jit(jax.vmap(grad, in_axes=(None, 0, 0, 0)))(params, x, coef, keep)
    for i in range(2):
      v, (dp, dx) = grad(params, x[i], coef[i], keep[i])
      np.testing.assert_allclose(values[i], v, rtol=1e-6)
      np.testing.assert_allclose(d_x[i], dx, rtol=1e-6, atol=1e-7)
      for got, ref in zip(d_params, dp):  # sums over rows in another order
        np.testing.assert_allclose(got[i], ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))

  @pytest.mark.slow
  def test_check_grads(self, monkeypatch):
    monkeypatch.setattr(kernels.yolo26, "FLOW_CHUNK", 5)
    with jax.enable_x64(True):
      params, x, coef, keep = _flow_rows_inputs(seed=4, rows=12, dtype=np.float64)
      x = jnp.where(keep[:, None], x, 0.0)  # finite differences perturb every row
      check_grads(lambda p, x, c: kernels.flow_rows(p, x, c, keep), (params, x, coef), order=1, modes=("rev",), **GRAD_TOL)


# --------------------------------------------------------------------------------------------------
# pair_mask_counts (the mask-IoU assignment's pixel counts over tiles)


class TestPairMaskCounts:

  @pytest.mark.parametrize("index_map", [True, False])
  @pytest.mark.parametrize(("tile", "tile_chunk"), [(7, 5), (5, 64), (32, 3), (1, 100)])  # 1: 480 tiles, one pixel each
  def test_tiles_count_what_the_plane_counts(self, index_map, tile, tile_chunk, monkeypatch):
    """Equal integers for any tile (partial tiles on both sides, one pixel, the whole plane) and chunking, on boxes
    past every border, NaN and infinite sides, empty and full masks, non-finite values; the counts are not trivial."""
    monkeypatch.setattr(kernels.yolo26, "MASK_TILE", tile)
    monkeypatch.setattr(kernels.yolo26, "MASK_TILE_CHUNK", tile_chunk)
    coef, box, cand, image = segment26_cases.counting_problem(2, index_map)
    m, size, nm = coef.shape
    args = (jnp.asarray(coef.reshape(-1, nm)), jnp.asarray(box.reshape(-1, 4)), jnp.repeat(jnp.arange(m, dtype=jnp.int32), size),
            jnp.asarray(cand.reshape(-1)), jnp.asarray(image.proto), jnp.asarray(image.masks))
    # Fresh lambdas: jit's trace cache is keyed on the function, and MASK_TILE is read at trace time.
    got = jax.jit(lambda *a: kernels.pair_mask_counts(*a, 8))(*args)
    want = jax.jit(lambda *a: kernels.plain_pair_mask_counts(*a, 8))(*args)
    chex.assert_trees_all_equal(got, want)
    inter, pred = (np.asarray(x) for x in got)
    assert (inter > 0).sum() >= 10 and (pred > inter).sum() >= 10 and not inter[~cand.reshape(-1)].any()

  def test_vmap_over_images_with_other_pair_counts(self, monkeypatch):
    monkeypatch.setattr(kernels.yolo26, "MASK_TILE", 6)
    monkeypatch.setattr(kernels.yolo26, "MASK_TILE_CHUNK", 4)
    problems = [segment26_cases.counting_problem(s, True) for s in (3, 4)]
    stack = lambda f: jnp.stack([jnp.asarray(f(*p)) for p in problems])  # noqa: E731
    m, size, nm = problems[0][0].shape
    coef, box = stack(lambda c, b, k, i: c.reshape(-1, nm)), stack(lambda c, b, k, i: b.reshape(-1, 4))
    ok = stack(lambda c, b, k, i: k.reshape(-1)).at[1, 10:].set(False)  # another trip count per image
    proto, masks = stack(lambda c, b, k, i: i.proto), stack(lambda c, b, k, i: i.masks)
    owner = jnp.repeat(jnp.arange(m, dtype=jnp.int32), size)
    run = lambda fn: jax.jit(jax.vmap(lambda c, b, k, p, s: fn(c, b, owner, k, p, s, 8)))(coef, box, ok, proto, masks)  # noqa: E731  (a fresh trace)
    chex.assert_trees_all_equal(run(kernels.pair_mask_counts), run(kernels.plain_pair_mask_counts))


class TestPlainSwitch:

  def test_select_picks_the_twin_named_by_the_config(self):
    for name in ("softmax_stats", "split_channels", "two_bin_logit_sum", "top_k", "mask_bce_sum", "mask_windows", "flow_rows", "pair_mask_counts"):
      assert kernels.select(name) is getattr(kernels, name)
      assert kernels.select(name, (name,)) is getattr(kernels, f"plain_{name}")
    for name in ("sigmoid", "sqrt_sigmoid", "whole_map_scores"):  # one trick spans three functions
      assert kernels.select(name, ("shared_sigmoid",)) is getattr(kernels, f"plain_{name}")
      assert kernels.select(name, ("top_k",)) is getattr(kernels, name)
    assert kernels.select("bce_sum", ("bce_sum",)) is kernels.plain_bce_sum
    cfg = jaxtal.LossConfig(num_classes=3, strides=(8,), plain_kernels=["top_k", "bce_sum", "top_k"])
    assert cfg.plain_kernels == ("bce_sum", "top_k")  # normalised: hashable, one compilation
    with pytest.raises(ValueError, match=r"unknown kernel name\(s\) \['sqrt_sigmoid'\]"):
      jaxtal.AssignerConfig(plain_kernels=("sqrt_sigmoid",))

  def test_shared_sigmoid_pair_equals_jax_nn(self):
    x = jnp.asarray(np.random.default_rng(4).standard_normal(1000) * 8, jnp.float32)
    x = jnp.concatenate([x, jnp.asarray([-1e4, -100.0, 0.0, 100.0, 1e4, jnp.inf, -jnp.inf])])
    np.testing.assert_allclose(kernels.sigmoid(x), jax.nn.sigmoid(x), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(kernels.sqrt_sigmoid(x), jnp.sqrt(jax.nn.sigmoid(x)), rtol=1e-6, atol=1e-30)
    # The policy: the whole map from nc / 2 slots when the pass is shared (logits, alpha 0.5), else from nc.
    assert kernels.whole_map_scores(40, 80, True, 0.5) and not kernels.whole_map_scores(39, 80, True, 0.5)
    assert not kernels.whole_map_scores(40, 80, False, 0.5) and kernels.whole_map_scores(80, 80, False, 1.0)
    assert kernels.plain_whole_map_scores(80, 80, True, 0.5) and not kernels.plain_whole_map_scores(40, 80, True, 0.5)

  @pytest.mark.slow
  def test_loss_with_every_plain_twin_equals_the_loss(self):
    """Value and gradient of the whole loss (and its targets) with all tricks swapped for their twins."""
    feats, gt = crowded_loss_problem(seed=1)
    cfg = jaxtal.LossConfig(num_classes=3, strides=(8, 16), reg_max=R, topk=3)

    def run(cfg):
      return jax.jit(jax.value_and_grad(lambda f: jaxtal.detection_loss(f, gt, cfg), has_aux=True))(feats)

    tricks = run(cfg)
    plain = run(dataclasses.replace(cfg, plain_kernels=kernels.KERNELS))
    (total, parts), grads = tricks
    assert float(parts.box) > 0 and float(parts.dfl) > 0
    chex.assert_trees_all_close(plain[0], tricks[0], rtol=2e-5, atol=1e-6)
    for g, p in zip(grads, plain[1]):
      np.testing.assert_allclose(g, p, rtol=1e-4, atol=1e-6 * float(np.abs(p).max()))


# --------------------------------------------------------------------------------------------------
# _parallel.global_sum (support.global_sum)


class TestGlobalSum:

  def test_check_grads_under_shard_map_and_pmap_with_one_device(self):
    mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec("d")

    def mapped(x):
      body = lambda v: global_sum(jnp.sin(v), "d") * v  # noqa: E731
      return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))(x)

    with jax.enable_x64(True):
      x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5)), jnp.float64)
      check_grads(mapped, (x,), order=1, modes=("rev",), **GRAD_TOL)
      pm = jax.pmap(lambda v: global_sum(jnp.sin(v), "d") * v, axis_name="d")
      check_grads(pm, (x,), order=1, modes=("rev",), **GRAD_TOL)

  def test_value_is_the_sum_and_the_gradient_is_the_own_share(self):
    """Under vmap with an axis name (4 'devices'): every device sees the global sum, and differentiating
    its own copy gives the cotangent for its own input only (not 4 times it, as psum's transpose would)."""
    x = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    summed = jax.vmap(lambda v: global_sum(v, "i"), axis_name="i")(x)
    np.testing.assert_array_equal(summed, [10.0] * 4)
    own = jax.vmap(jax.grad(lambda v: 3.0 * global_sum(v * v, "i")), axis_name="i")(x)
    np.testing.assert_allclose(own, 6.0 * np.asarray(x))  # d(3 * v^2)/dv, this device's share
    psum = jax.vmap(jax.grad(lambda v: 3.0 * jax.lax.psum(v * v, "i")), axis_name="i")(x)
    assert not np.allclose(psum, own)  # control: the plain psum gradient is different here



# --------------------------------------------------------------------------------------------------
# mask_bce_sum


class TestMaskBceSum:
  """The mask term's fused sum (gradients formed in the forward scan) equals its plain twin (autodiff over
  checkpointed chunks) and a NumPy oracle, for both mask forms and any chunk size."""

  @staticmethod
  def _problem(seed=0, b=2, e=7, nm=3, mh=5, mw=6, m=3, index_map=True):
    rng = np.random.default_rng(seed)
    coef = jnp.asarray(rng.normal(size=(b, e, nm)) * 2, jnp.float32)
    proto = jnp.asarray(rng.normal(size=(b, nm, mh, mw)), jnp.float32)
    gt = jnp.asarray(rng.integers(0, m, (b, e)), jnp.int32)
    lo = rng.uniform(-1, 3, (b, e, 2))
    box = jnp.asarray(np.concatenate([lo, lo + rng.uniform(0, 4, (b, e, 2))], -1), jnp.float32)
    weight = jnp.asarray(rng.uniform(0.5, 2, (b, e)) * (rng.uniform(size=(b, e)) < 0.7), jnp.float32)
    if index_map:
      masks = jnp.asarray(rng.integers(0, m + 1, (b, mh, mw)), jnp.int32)
    else:
      masks = jnp.asarray(rng.uniform(size=(b, m, mh, mw)) < 0.5)
    return coef, proto, masks, gt, box, weight

  @staticmethod
  def _numpy(coef, proto, masks, gt, box, weight, index_map):
    coef, proto, masks, gt, box, weight = (np.asarray(x, np.float64) for x in (coef, proto, masks, gt, box, weight))
    total = 0.0
    b, e, _ = coef.shape
    for i in range(b):
      for j in range(e):
        x = np.einsum("n,nhw->hw", coef[i, j], proto[i])
        y = (masks[i] == gt[i, j] + 1) if index_map else masks[i, int(gt[i, j])]
        cols, rows = np.arange(x.shape[1]), np.arange(x.shape[0])
        inside = ((rows >= box[i, j, 1]) & (rows < box[i, j, 3]))[:, None] & ((cols >= box[i, j, 0]) & (cols < box[i, j, 2]))
        ok = (y >= 0) & (y <= 1)  # the masking rule: a pixel not a value in [0, 1] is read as 0 with weight 0
        y, inside = np.where(ok, y, 0.0), inside & ok
        total += weight[i, j] * np.sum(inside * (np.logaddexp(0, x) - x * y))
    return total

  @pytest.mark.parametrize("chunk,index_map", [
      (1, True),
      (3, True),
      (7, True),
      (2, False),
      (9, False),
  ])
  def test_value_and_gradients_equal_the_plain_twin_and_numpy(self, chunk, index_map):
    coef, proto, masks, gt, box, weight = self._problem(index_map=index_map)

    def run(fn):
      f = lambda c, p: fn(c, p, masks, gt, box, weight, chunk, index_map)  # noqa: E731
      return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(coef, proto)

    got, want = run(kernels.mask_bce_sum), run(kernels.plain_mask_bce_sum)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(got[0]), self._numpy(coef, proto, masks, gt, box, weight, index_map), rtol=1e-5)

  def test_check_grads(self):
    coef, proto, masks, gt, box, weight = self._problem(seed=3)
    f = lambda c, p: kernels.mask_bce_sum(c, p, masks, gt, box, weight, 3, True)  # noqa: E731
    check_grads(f, (coef, proto), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)




# --------------------------------------------------------------------------------------------------
# mask_windows and the box windows


def _window_problem(seed=0, b=2, e=12, nm=3, mh=11, mw=13, m=3, index_map=True):
  """A mask problem whose boxes cover every window case: inside, touching or crossing each border, larger
  than the plane, empty, NaN, uncounted (weight 0), and GT slots owning more entries than a group holds."""
  rng = np.random.default_rng(seed)
  coef = jnp.asarray(rng.normal(size=(b, e, nm)) * 2, jnp.float32)
  proto = jnp.asarray(rng.normal(size=(b, nm, mh, mw)), jnp.float32)
  gt = rng.integers(0, m, (b, e))
  gt[0, :7] = 1  # slot 1 of image 0 owns 7 entries
  lo = rng.uniform(-2, [mw - 1, mh - 1], (b, e, 2))
  box = np.concatenate([lo, lo + rng.uniform(0.3, 6, (b, e, 2))], -1)
  box[0, 0] = [-3.0, -1.5, mw + 2.0, mh + 0.5]  # larger than the plane
  box[0, 1] = [mw - 2.5, mh - 1.2, mw + 3.0, mh + 3.0]  # bottom-right corner
  box[0, 2] = [0.0, 0.0, 2.0, 1.0]  # top-left corner, edges on pixel indices
  box[0, 3] = [4.0, 5.0, 4.0, 9.0]  # no width: counts nothing
  box[1, 0] = [np.nan, 1.0, 5.0, 4.0]  # NaN: counts nothing
  box[1, 1] = [2.5, -4.0, 7.2, 0.0]  # above the plane: counts nothing
  box[1, 2] = [mw - 4.0, 2.0, mw, mh]  # right and bottom edges exactly on the plane's
  weight = rng.uniform(0.5, 2, (b, e)) * (rng.uniform(size=(b, e)) < 0.8)
  weight[0, :4] = 1.5
  weight[1, :3] = 0.7
  if index_map:
    masks = jnp.asarray(rng.integers(0, m + 1, (b, mh, mw)), jnp.int32)
  else:
    masks = (rng.uniform(size=(b, m, mh, mw)) < 0.5).astype(np.float32)
    masks[0, 1, 0, :4] = [np.nan, np.inf, 2.0, -1.0]  # not values in [0, 1]: read as 0, weight 0
    masks[1, 0, 3, 3] = np.nan
    masks = jnp.asarray(masks)
  as_f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return coef, proto, masks, jnp.asarray(gt, jnp.int32), as_f32(box), as_f32(weight)


class TestMaskWindows:
  """The mask term over box windows equals the full-plane forms (its plain twin ``mask_bce_sum``, and
  ``plain_mask_bce_sum``'s autodiff) and a NumPy oracle, for both mask forms, window sizes from one
  pixel to the whole plane and group sizes below and above the entries a GT owns."""

  @pytest.mark.parametrize("index_map,tile,group", [
      (True, (4, 4), 2),
      pytest.param(True, (3, 5), 3, marks=pytest.mark.slow),
      (True, (11, 13), 1),  # one window is the whole plane
      pytest.param(True, (1, 1), 10, marks=pytest.mark.slow),
      (False, (4, 4), 4),
      (False, (2, 7), 16),  # a group larger than any GT's entries
  ])
  def test_value_and_gradients_equal_the_full_plane_and_numpy(self, index_map, tile, group):
    coef, proto, masks, gt, box, weight = _window_problem(index_map=index_map)

    @jax.jit
    def run(c, p):  # the windows, the twin (the fused full-plane kernel) and the full-plane autodiff form
      forms = (
          functools.partial(kernels.mask_windows, tile=tile, group=group, fallback=False),
          functools.partial(kernels.plain_mask_windows, tile=tile, group=group),
          kernels.plain_mask_bce_sum,
      )  # fmt: skip
      return [jax.value_and_grad(lambda c, p, fn=fn: fn(c, p, masks, gt, box, weight, 5, index_map), argnums=(0, 1))(c, p) for fn in forms]

    got, *wants = run(coef, proto)
    for want in wants:
      chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got[1][1])).max() > 0 and np.isfinite(float(got[0]))
    want = TestMaskBceSum._numpy(coef, proto, masks, gt, box, weight, index_map)
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)

  @pytest.mark.slow
  def test_compiled_and_eager(self, variant):
    coef, proto, masks, gt, box, weight = _window_problem(seed=1, index_map=False)
    f = lambda c, p: kernels.mask_windows(c, p, masks, gt, box, weight, 5, False, (4, 3), 3, False)  # noqa: E731
    got = variant(jax.value_and_grad(f, argnums=(0, 1)))(coef, proto)
    want = jax.value_and_grad(lambda c, p: kernels.plain_mask_bce_sum(c, p, masks, gt, box, weight, 5, False), argnums=(0, 1))(coef, proto)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  def test_nothing_counted_gives_zeros(self):
    coef, proto, masks, gt, box, weight = _window_problem(seed=2)
    f = lambda c, p: kernels.mask_windows(c, p, masks, gt, box, 0.0 * weight, 5, True, (4, 4), 3, False)  # noqa: E731
    value, (d_coef, d_proto) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(coef, proto)
    assert float(value) == 0.0 and not np.asarray(d_coef).any() and not np.asarray(d_proto).any()

  def test_falls_back_to_the_full_plane_where_the_windows_cost_more(self):
    """Small boxes: windows; boxes filling the plane: the full-plane form (chosen at run time, one
    compilation); the value and gradients are the same either way."""
    coef, proto, masks, gt, box, weight = _window_problem(seed=6, mh=40, mw=40)
    whole = jnp.broadcast_to(jnp.asarray([-1.0, -1.0, 41.0, 41.0]), box.shape)
    small = box * 0.25

    @jax.jit
    def run(box):
      table, union = jax.vmap(functools.partial(kernels.entry_groups, group=3))(gt, box, weight)
      win = jax.vmap(lambda u: kernels.box_windows(u, (40, 40), (4, 4)))(union)
      f = lambda c, p, fn: fn(c, p, masks, gt, box, weight, 5, True, (4, 4), 3)  # noqa: E731
      grads = [jax.value_and_grad(f, argnums=(0, 1))(coef, proto, fn) for fn in (kernels.mask_windows, kernels.plain_mask_windows)]
      return kernels.windows_cheaper(win.count, weight, (40, 40), (4, 4), 3, 5), grads

    for boxes, cheaper in ((small, True), (whole, False)):
      got_cheaper, (got, want) = run(boxes)
      assert bool(got_cheaper) == cheaper
      chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  @pytest.mark.slow
  def test_under_vmap(self):
    """Batched (the loop's trip count differs per member): each member's own value and gradients."""
    problems = [_window_problem(seed=s) for s in (3, 4)]
    stacked = [jnp.stack(x) for x in zip(*problems)]
    f = lambda c, p, mk, g, bx, w: kernels.mask_windows(c, p, mk, g, bx, w, 5, True, (4, 4), 3, False)  # noqa: E731
    got = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1))))(*stacked)
    for i, problem in enumerate(problems):
      want = jax.value_and_grad(f, argnums=(0, 1))(*problem)
      chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], got), want, rtol=1e-5, atol=1e-5)

  @pytest.mark.slow
  def test_check_grads(self):
    coef, proto, masks, gt, box, weight = _window_problem(seed=5, index_map=False)
    f = lambda c, p: kernels.mask_windows(c, p, masks, gt, box, weight, 5, False, (4, 5), 3, False)  # noqa: E731
    check_grads(f, (coef, proto), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


class TestBoxWindows:

  def test_each_box_pixel_is_owned_by_exactly_one_of_its_windows(self):
    rng = np.random.default_rng(0)
    h, w, tile = 11, 13, (4, 3)
    lo = rng.uniform(-3, 14, (40, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(-1, 12, (40, 2))], 1).astype(np.float32)
    boxes[0] = [np.nan, 0, 4, 4]
    boxes[1] = [-np.inf, -np.inf, np.inf, np.inf]
    win = jax.jit(kernels.box_windows, static_argnums=(1, 2))(jnp.asarray(boxes), (h, w), tile)
    count = int(win.count)
    assert count == int(np.sum(np.prod(np.asarray(win.tiles), 1)))
    box, nominal, corner = (np.asarray(x) for x in kernels.window_at(win, jnp.arange(count + 3), (h, w), tile))
    assert ((corner >= 0) & (corner <= [h - tile[0], w - tile[1]])).all()
    ys, xs = np.arange(h)[:, None], np.arange(w)[None]
    owned = np.zeros((len(boxes), h, w), int)
    for n, (y0, x0), (cy, cx) in zip(box[:count], nominal[:count], corner[:count]):
      in_window = (ys >= cy) & (ys < cy + tile[0]) & (xs >= cx) & (xs < cx + tile[1])
      owned[n] += in_window & (ys >= y0) & (ys < y0 + tile[0]) & (xs >= x0) & (xs < x0 + tile[1])
    for n, (x1, y1, x2, y2) in enumerate(boxes):
      inside = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)  # False for NaN
      assert (owned[n][inside] == 1).all(), n
      assert inside.any() == (np.prod(np.asarray(win.tiles)[n]) > 0), n
    assert (owned[1] == 1).all()  # the infinite box: the whole plane, each pixel once

  def test_entry_groups(self):
    """Every counted entry in exactly one group, of one GT slot, at most ``group`` to a group; the union
    boxes bound their entries'; groups are numbered from 0 and the rest are empty."""
    _, _, _, gt, box, weight = _window_problem(seed=7, e=20)
    for i in range(2):
      table, union = (np.asarray(x) for x in jax.jit(kernels.entry_groups, static_argnums=3)(gt[i], box[i], weight[i], 3))
      g, bx, counted = np.asarray(gt[i]), np.asarray(box[i]), np.asarray(weight[i]) != 0
      listed = table[table < 20]
      np.testing.assert_array_equal(np.sort(listed), np.flatnonzero(counted))
      used = (table < 20).any(1)
      assert used.sum() == sum(-(-np.sum(counted & (g == s)) // 3) for s in np.unique(g)) and not used[used.sum():].any()
      for row, u in zip(table[used], union[used]):
        ids = row[row < 20]
        assert len(set(g[ids])) == 1
        finite = bx[ids][~np.isnan(bx[ids]).any(1)]
        if len(finite):
          np.testing.assert_array_equal(u, np.concatenate([finite[:, :2].min(0), finite[:, 2:].max(0)]))
      assert (union[~used][:, :2] == np.inf).all() and (union[~used][:, 2:] == -np.inf).all()

  def test_scatter_is_the_transpose_of_gather(self):
    rng = np.random.default_rng(1)
    planes = jnp.asarray(rng.normal(size=(2, 7, 9, 3)), jnp.float32)
    image = jnp.asarray([0, 1, 1, 0], jnp.int32)
    corner = jnp.asarray([[0, 0], [4, 6], [4, 6], [2, 3]], jnp.int32)  # overlapping windows add up
    got = kernels.gather_windows(planes, image, corner, (3, 3))
    for p in range(4):
      (y, x), i = np.asarray(corner[p]), int(image[p])
      np.testing.assert_array_equal(got[p], planes[i, y : y + 3, x : x + 3])
    ct = jnp.asarray(rng.normal(size=got.shape), jnp.float32)
    _, vjp = jax.vjp(lambda q: kernels.gather_windows(q, image, corner, (3, 3)), planes)
    np.testing.assert_allclose(kernels.scatter_add_windows(jnp.zeros_like(planes), image, corner, ct), vjp(ct)[0], rtol=1e-6)
    slots = jnp.asarray(rng.normal(size=(2, 4, 7, 9)), jnp.float32)  # per-slot planes: (image, slot) leading
    lead = jnp.asarray([[1, 3], [0, 2]], jnp.int32)
    got = kernels.gather_windows(slots, lead, corner[:2], (2, 3))
    np.testing.assert_array_equal(got[1], slots[0, 2, 4:6, 6:9])
