"""jaxtal.flow: the RealNVP flow of RLE against a float64 NumPy forward, Ultralytics 8.4.190's ``RealNVP``
(live: values and gradients, on the same weights), the torch state-dict loader, the initialisation and
the NNX module; and the COCO-17 RLE weights.

Weights for the comparisons are drawn larger than the initialisation (normal, std 0.3), so every
layer's nets matter and a wrong mask, order or sign shows; the residuals include large ones (+-100).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxtal
from jaxtal import flow
from support.oracles import np_flow_log_prob
from support.problems import random_flow_params

# log_prob vs the reference: float32 rounding. With the large random weights some residuals are
# ill-conditioned (a float32 ulp of x moves log_prob by ~3e-6 relative), and XLA's float32 tanh is a
# few ulp where torch's is correctly rounded: up to 1.5e-5 of the exact (float64) value seen for
# jaxtal, 1.1e-5 for the reference, so 3e-5 there; 1e-5 on the reference's own initialisation.
LOG_RTOL = {"random": 3e-5, "reference_init": 1e-5}
GRAD_RATIO = 1e-4  # max |grad - ref| <= GRAD_RATIO * max |ref|, per array


def residuals(seed: int = 1) -> np.ndarray:
  """``(40, 2)``: standard normal draws, wide ones, and the corners and axes at +-100."""
  rng = np.random.default_rng(seed)
  big = np.array([[100, 100], [-100, 100], [100, -100], [-100, -100], [100, 0], [0, -100], [0, 0], [1e-3, -1e-3]])
  return np.concatenate([rng.normal(size=(20, 2)), rng.normal(0, 10, (12, 2)), big]).astype(np.float32)


LOG_PROB = jax.jit(jaxtal.flow_log_prob)  # one wrapper, so tests of the same shapes share its compilation


@jax.jit
def log_prob_and_grads(params, x, w):
  """``(log_prob, d/dparams, d/dx)`` of ``sum(w * log_prob)``."""
  log_prob, vjp = jax.vjp(jaxtal.flow_log_prob, params, x)
  return (log_prob, *vjp(w))


def grad_close(got, want, name):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  err = np.abs(got - want).max()
  assert err <= GRAD_RATIO * np.abs(want).max(), f"{name}: max |grad - ref| = {err:.3g}, max |ref| = {np.abs(want).max():.3g}"
  return err / np.abs(want).max()


# ------------------------------------------------------------------------------------------------
# The function, without torch.


def test_log_prob_matches_numpy_float64():
  params, x = random_flow_params(), residuals()
  got = np.asarray(LOG_PROB(params, jnp.asarray(x)))
  want = np_flow_log_prob(params, x)
  assert got.shape == (len(x),) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=5e-5, atol=1e-5)  # float32 through six layers vs exact: ~1.5e-5 seen
  assert np.ptp(want) > 100  # the large residuals reach far into the tails: the test can fail


# A midpoint grid over [-8, 8]^2 for integrals over the residual plane.
STEP = 0.06
_AXIS = np.arange(-8.0, 8.0, STEP, dtype=np.float32) + STEP / 2
GRID = np.stack(np.meshgrid(_AXIS, _AXIS), -1).reshape(-1, 2)
NORMAL_ON_GRID = -0.5 * (GRID.astype(np.float64) ** 2).sum(-1) - math.log(2 * math.pi)


@pytest.mark.slow
def test_density_integrates_to_one():
  """A flow is a change of variables: exp(log_prob) integrates to 1 (checks the sign of log_det)."""
  for params in (jaxtal.init_flow_params(jax.random.key(0)), random_flow_params(3, std=0.1)):
    mass = float(jnp.exp(LOG_PROB(params, jnp.asarray(GRID))).sum()) * STEP * STEP
    assert abs(mass - 1) < 2e-3, mass


def test_every_matmul_runs_at_highest_precision():
  params, x = random_flow_params(), jnp.asarray(residuals())
  for fn in (jaxtal.flow_log_prob, jax.grad(lambda p, x: jaxtal.flow_log_prob(p, x).sum(), argnums=(0, 1))):
    text = str(jax.make_jaxpr(fn)(params, x))
    dots = text.count("dot_general[")
    assert dots >= 24 and text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == dots, dots


def test_vmap_and_leading_axes():
  params, other, x = random_flow_params(), random_flow_params(5), jnp.asarray(residuals())
  flat = LOG_PROB(params, x)
  np.testing.assert_allclose(LOG_PROB(params, x.reshape(4, 10, 2)), flat.reshape(4, 10), rtol=1e-6, atol=1e-6)
  # A batch of flows (e.g. one per keypoint) over a batch of residual sets: vmap over both.
  many = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other)
  both = jax.jit(jax.vmap(jaxtal.flow_log_prob))(many, jnp.stack([x, x[::-1]]))
  np.testing.assert_allclose(both[0], flat, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(both[1], LOG_PROB(other, x[::-1]), rtol=1e-6, atol=1e-6)


def test_lower_precision_input_computes_in_float32():
  params, x = random_flow_params(), residuals()
  got = LOG_PROB(params, jnp.asarray(x, jnp.bfloat16))
  assert got.dtype == jnp.float32
  want = LOG_PROB(params, jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32))
  np.testing.assert_array_equal(got, want)


def test_check_grads():
  """Reverse-mode gradients against finite differences (float32; small inputs keep log_prob O(1))."""
  params = random_flow_params(7, std=0.2)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 2)).astype(np.float32))
  check_grads(LOG_PROB, (params, x), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda p, x: (p._replace(s_w2=p.s_w2[:, :, :32]), x), ValueError, r"s_w2 must have shape \(6, 64, 64\), got \(6, 64, 32\)"),
        (lambda p, x: (p._replace(t_b3=p.t_b3[:5]), x), ValueError, r"t_b3 must have shape \(6, 2\), got \(5, 2\)"),
        (lambda p, x: (p._replace(t_w1=p.t_w1.astype(jnp.int32)), x), TypeError, "t_w1 must be a float array"),
        (lambda p, x: (tuple(p), x), TypeError, "must be a jaxtal.FlowParams"),
        (lambda p, x: (p, x[:, :1]), ValueError, r"x must be \(N, 2\).*got shape \(3, 1\)"),
        (lambda p, x: (p, x.astype(jnp.int32)), TypeError, "x must be a float array"),
    ],
)
def test_errors_at_trace_time(change, error, match):
  params, x = change(random_flow_params(), jnp.ones((3, 2)))
  with pytest.raises(error, match="flow_log_prob: (flow params )?" + match):
    jax.jit(jaxtal.flow_log_prob)(params, x)


def test_validate_flow_params_names_the_caller():
  with pytest.raises(ValueError, match=r"pose_loss: flow params s_b1 must have shape \(6, 64\), got \(6, 32\)"):
    flow.validate_flow_params(random_flow_params()._replace(s_b1=jnp.zeros((6, 32))), "pose_loss")
  flow.validate_flow_params(random_flow_params(), "pose_loss")


# ------------------------------------------------------------------------------------------------
# Initialisation.


def init_bound(name: str) -> float:
  """Xavier-uniform (gain 0.01) for a weight, torch's default ``1 / sqrt(fan_in)`` for a bias."""
  fan_in, fan_out = ((2, 64), (64, 64), (64, 2))[int(name[-1]) - 1]
  return 0.01 * math.sqrt(6 / (fan_in + fan_out)) if name[2] == "w" else 1 / math.sqrt(fan_in)


def test_init_statistics():
  params = jaxtal.init_flow_params(jax.random.key(0))
  for name, shape in flow.FIELD_SHAPES.items():
    value = np.asarray(getattr(params, name))
    bound = init_bound(name)
    assert value.shape == shape and value.dtype == np.float32, name
    assert np.abs(value).max() <= bound, name
    if value.size >= 384:  # uniform in +-bound: mean 0, std bound / sqrt(3) (10% is > 4 standard errors)
      assert np.abs(value).max() > 0.95 * bound, name
      assert abs(value.mean()) < 0.1 * bound, name
      np.testing.assert_allclose(value.std(), bound / math.sqrt(3), rtol=0.1, err_msg=name)
    for i in range(1, 6):  # every layer drawn on its own
      assert not np.array_equal(value[i], value[0]), name
  other = jaxtal.init_flow_params(jax.random.key(1))
  assert not np.array_equal(params.s_w2, other.s_w2)


def test_fresh_flow_is_close_to_the_standard_normal():
  """Weights of at most 0.003 make every net output almost its last bias (|b| <= 1/8): the flow starts as a
  near-identity affine map, |log_det| <= 6 tanh(1/8) < 0.75, and its density near N(0, I)'s: the mean of
  |log_prob - log N| under N(0, I) is below 0.4 (a unit shift of the mean would give 0.5 E|x_1| ~ 0.8 and
  more). Precisely, it is the flow of its biases alone (weights 0)."""
  x = residuals()
  pdf = np.exp(NORMAL_ON_GRID) * STEP * STEP
  for seed in range(3):
    params = jaxtal.init_flow_params(jax.random.key(seed))
    _, log_det = jax.jit(flow.flow_to_latent)(params, jnp.asarray(x))
    assert np.abs(np.asarray(log_det)).max() < 6 * math.tanh(1 / 8) + 1e-3
    gap = np.abs(np.asarray(LOG_PROB(params, jnp.asarray(GRID))) - NORMAL_ON_GRID)
    assert (pdf * gap).sum() < 0.4, (pdf * gap).sum()
    zero_weights = params._replace(**{n: jnp.zeros_like(getattr(params, n)) for n in params._fields if n[2] == "w"})
    np.testing.assert_allclose(LOG_PROB(params, jnp.asarray(x)), np_flow_log_prob(zero_weights, x), rtol=0.02, atol=0.05)


# ------------------------------------------------------------------------------------------------
# The torch state-dict loader.


def test_state_dict_round_trip_and_prefix():
  params = random_flow_params()
  sd = jaxtal.flow_params_to_torch(params)
  assert sd["s.0.0.weight"].shape == (64, 2) and sd["t.5.4.weight"].shape == (2, 64) and sd["s.3.4.bias"].shape == (2,)
  np.testing.assert_array_equal(sd["t.2.2.weight"], np.asarray(params.t_w2[2]).T)
  assert len(sd) == 6 * 2 * 6 + 3  # weights and biases, loc, cov, mask
  back = jaxtal.flow_params_from_torch(sd)
  for name in params._fields:
    np.testing.assert_array_equal(getattr(back, name), getattr(params, name), err_msg=name)
    assert getattr(back, name).dtype == jnp.float32
  # Nested in a whole model's state dict, with and without the prefix's final dot; other keys ignored.
  model = {"model.22.cv2.0.weight": np.zeros((3, 3)), "model.23.s.0.0.weight": np.zeros(1)}
  model |= jaxtal.flow_params_to_torch(params, "model.23.flow_model.")
  for prefix in ("model.23.flow_model.", "model.23.flow_model"):
    got = jaxtal.flow_params_from_torch(model, prefix=prefix)
    np.testing.assert_array_equal(got.s_w1, params.s_w1)
  # Lists and float64 arrays are accepted (np.asarray), the buffers are optional.
  loose = {k: v.astype(np.float64).tolist() for k, v in sd.items() if k not in ("loc", "cov", "mask")}
  np.testing.assert_array_equal(jaxtal.flow_params_from_torch(loose).t_b1, params.t_b1)


def test_state_dict_errors():
  sd = jaxtal.flow_params_to_torch(random_flow_params())
  missing = {k: v for k, v in sd.items() if k != "t.4.2.weight"}
  with pytest.raises(ValueError, match=r"missing key 't\.4\.2\.weight', expected shape \(64, 64\)"):
    jaxtal.flow_params_from_torch(missing)
  nested = {"model.23.flow_model." + k: v for k, v in sd.items()}
  with pytest.raises(ValueError, match=r"missing key 's\.0\.0\.weight'.*pass prefix='model\.23\.flow_model\.'"):
    jaxtal.flow_params_from_torch(nested)
  with pytest.raises(ValueError, match=r"missing key 'model\.22\.s\.0\.0\.weight' \(prefix 'model\.22\.'\)"):
    jaxtal.flow_params_from_torch(nested, prefix="model.22")
  narrow = dict(sd, **{"s.2.2.weight": np.zeros((32, 64), np.float32)})
  with pytest.raises(ValueError, match=r"'s\.2\.2\.weight' has shape \(32, 64\), expected \(64, 64\)"):
    jaxtal.flow_params_from_torch(narrow)
  deeper = dict(sd, **{"s.6.0.weight": np.zeros((64, 2), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key 's\.6\.0\.weight'.*6 coupling layers"):
    jaxtal.flow_params_from_torch(deeper)
  flipped = dict(sd, mask=sd["mask"][::-1])
  with pytest.raises(ValueError, match=r"'mask' must be the alternating coupling masks \[\[0, 1\], \[1, 0\]"):
    jaxtal.flow_params_from_torch(flipped)
  with pytest.raises(ValueError, match=r"'mask' must be .*\(shape \(4, 2\)\)"):
    jaxtal.flow_params_from_torch(dict(sd, mask=sd["mask"][:4]))


# ------------------------------------------------------------------------------------------------
# The NNX module.


def test_module_matches_the_function_under_nnx_jit_and_grad():
  model = jaxtal.RealNVP.from_torch(jaxtal.flow_params_to_torch(random_flow_params()))
  params, x = model.params(), jnp.asarray(residuals())
  assert isinstance(params, jaxtal.FlowParams)
  assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 12
  for name in jaxtal.FlowParams._fields:
    assert isinstance(getattr(model, name), nnx.Param)
    np.testing.assert_array_equal(getattr(params, name), getattr(random_flow_params(), name))
  w = jnp.linspace(-1.0, 1.0, x.shape[0])
  value, grads = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(w * m.log_prob(x))))(model)
  want, want_grads, _ = log_prob_and_grads(params, x, w)
  np.testing.assert_allclose(value, jnp.sum(w * want), rtol=1e-6)
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m.log_prob(x))(model, x), LOG_PROB(params, x))
  for name in jaxtal.FlowParams._fields:
    want_g = getattr(want_grads, name)
    np.testing.assert_allclose(grads[name][...], want_g, rtol=1e-6, atol=1e-6 * float(jnp.abs(want_g).max()), err_msg=name)


def test_module_init_and_constructor():
  model = jaxtal.RealNVP(nnx.Rngs(0))
  fresh = jaxtal.RealNVP(nnx.Rngs(params=0))
  np.testing.assert_array_equal(model.s_w2[...], fresh.s_w2[...])
  assert np.abs(np.asarray(model.t_w2[...])).max() <= 0.01 * math.sqrt(6 / 128)
  held = jaxtal.RealNVP(params=model.params())
  for a, b in zip(held.params(), model.params(), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(TypeError, match="exactly one of rngs"):
    jaxtal.RealNVP()
  with pytest.raises(ValueError, match=r"RealNVP: flow params s_w1 must have shape"):
    jaxtal.RealNVP(params=model.params()._replace(s_w1=jnp.zeros((6, 3, 64))))


# ------------------------------------------------------------------------------------------------
# Live: Ultralytics 8.4.190's RealNVP on the same weights.


@pytest.mark.live
@pytest.mark.parametrize("weights", ["random", "reference_init"])
def test_log_prob_and_gradients_match_the_reference(reference, weights):
  params = random_flow_params() if weights == "random" else jaxtal.flow_params_from_torch(reference.flow_state_dict(0))
  x = residuals()
  w = np.random.default_rng(4).uniform(-1, 1, len(x)).astype(np.float32)  # a cotangent with signs
  ref = reference.flow_log_prob(jaxtal.flow_params_to_torch(params), x, w)
  got, grad_params, grad_x = log_prob_and_grads(params, jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_allclose(got, ref["log_prob"], rtol=LOG_RTOL[weights], atol=1e-6)
  grad_close(grad_x, ref["grad_x"], "x")
  ref_grads = jaxtal.flow_params_from_torch(ref["grads"])  # the same key layout: transposed back
  for name in jaxtal.FlowParams._fields:
    grad_close(getattr(grad_params, name), getattr(ref_grads, name), name)


@pytest.mark.live
def test_reference_state_dict_loads_directly(reference):
  """The reference module's own state dict (torch tensors, with its buffers) loads, and initialises like ours."""
  ref_flow = reference.flow_log_prob(reference.flow_state_dict(1), np.zeros((1, 2), np.float32))["flow"]
  model = jaxtal.RealNVP.from_torch(ref_flow.state_dict())
  x = residuals()
  with reference.torch.no_grad():
    want = ref_flow.log_prob(reference.torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(LOG_PROB(model.params(), jnp.asarray(x)), want, rtol=LOG_RTOL["reference_init"], atol=1e-6)
  theirs, ours = jaxtal.flow_params_from_torch(ref_flow.state_dict()), jaxtal.init_flow_params(jax.random.key(0))
  for name in jaxtal.FlowParams._fields:  # the same bounds, the same spread
    a, b = np.asarray(getattr(theirs, name)), np.asarray(getattr(ours, name))
    assert np.abs(a).max() <= init_bound(name) and np.abs(b).max() <= init_bound(name), name
    if a.size >= 384:
      np.testing.assert_allclose(a.std(), b.std(), rtol=0.1, err_msg=name)


@pytest.mark.live
def test_rle_weights_coco17(reference):
  assert len(jaxtal.RLE_WEIGHTS_COCO17) == 17
  np.testing.assert_array_equal(np.asarray(jaxtal.RLE_WEIGHTS_COCO17, np.float32), np.asarray(reference.RLE_WEIGHT, np.float32))


def test_rle_weights_coco17_by_name():
  names = ["nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist",
           "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle"]
  weight = dict(zip(names, jaxtal.RLE_WEIGHTS_COCO17, strict=True))
  for name, w in weight.items():
    part = name.split("_")[-1]
    assert w == {"elbow": 1.2, "knee": 1.2, "wrist": 1.5, "ankle": 1.5}.get(part, 1.0), name
  assert len(jaxtal.RLE_WEIGHTS_COCO17) == len(jaxtal.pose.COCO_SIGMAS)
