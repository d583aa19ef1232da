"""The RealNVP flow of RLE: a learned 2-D density of keypoint residuals.

Residual Log-likelihood Estimation (RLE, YOLO26's pose loss) scores a keypoint residual ``e``
(the GT minus the predicted location, divided by a predicted scale) by ``log p(e)`` under a small
normalising flow trained with the network. The flow is a RealNVP: six affine coupling layers
over ``e in R^2``, each updating one coordinate from the other with alternating masks
``m_i = (0, 1)`` for even ``i`` and ``(1, 0)`` for odd ``i``. Layer ``i`` has a scale net
``s_i`` and a translation net ``t_i``, both ``2 -> 64 -> 64 -> 2`` MLPs with SiLU between the
layers (``s_i`` ends in ``tanh``). The data-to-latent map runs the layers last to first
(``i = 5, ..., 0``)::

    z' = m_i z;   s = s_i(z') (1 - m_i);   t = t_i(z') (1 - m_i)
    z  = (1 - m_i) (z - t) exp(-s) + z';     log_det -= sum(s)

and ``log p(e) = -|z|^2 / 2 - log(2 pi) + log_det`` (a standard normal prior in 2-D).

Parameters are plain arrays stacked over the six layers (:class:`FlowParams`), so a pure loss
takes them as an argument and ``jax.grad`` reaches them; :class:`RealNVP` holds the same arrays
as ``nnx.Param`` for Flax training loops. :func:`flow_params_from_torch` reads a PyTorch state
dict of Ultralytics' ``RealNVP`` (e.g. the ``flow_model`` of a YOLO26 pose checkpoint), and
:func:`flow_params_to_torch` writes one.

Every matmul runs at ``Precision.HIGHEST``: the nets are tiny, and on GPU/TPU the default
precision would round float32 inputs. Matches Ultralytics 8.4.190 (``RealNVP.log_prob``) to
float32 rounding, values and gradients.

References:
  Dinh et al., 2016, "Density estimation using Real NVP", https://arxiv.org/abs/1605.08803;
  Li et al., 2021, "Human Pose Regression with Residual Log-likelihood Estimation",
  https://arxiv.org/abs/2107.11291.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NUM_LAYERS = 6
HIDDEN = 64
DIM = 2

# Xavier-uniform gain of every Linear weight at initialisation: the flow starts near the identity.
INIT_GAIN = 0.01

_LOG_2PI = math.log(2 * math.pi)
_HIGHEST = jax.lax.Precision.HIGHEST


class FlowParams(NamedTuple):
  """Parameters of the RealNVP flow, stacked over its ``L = 6`` coupling layers (float32).

  Weights are ``(L, in, out)`` (``x @ w``, the transpose of a torch ``Linear.weight``). The
  ``s_*`` arrays are the scale nets (ending in tanh), the ``t_*`` arrays the translation nets.

  Attributes:
    s_w1: ``(L, 2, 64)`` first layer of the scale nets; s_b1: ``(L, 64)``.
    s_w2: ``(L, 64, 64)`` hidden layer; s_b2: ``(L, 64)``.
    s_w3: ``(L, 64, 2)`` output layer; s_b3: ``(L, 2)``.
    t_w1, t_b1, t_w2, t_b2, t_w3, t_b3: the translation nets, the same shapes.
  """

  s_w1: jax.Array
  s_b1: jax.Array
  s_w2: jax.Array
  s_b2: jax.Array
  s_w3: jax.Array
  s_b3: jax.Array
  t_w1: jax.Array
  t_b1: jax.Array
  t_w2: jax.Array
  t_b2: jax.Array
  t_w3: jax.Array
  t_b3: jax.Array


# (fan_in, fan_out) of the three Linear layers of every net, in order.
_LAYER_SIZES = ((DIM, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, DIM))


def _field_shapes() -> dict[str, tuple[int, ...]]:
  shapes = {}
  for net in ("s", "t"):
    for j, (fan_in, fan_out) in enumerate(_LAYER_SIZES, start=1):
      shapes[f"{net}_w{j}"] = (NUM_LAYERS, fan_in, fan_out)
      shapes[f"{net}_b{j}"] = (NUM_LAYERS, fan_out)
  return shapes


FIELD_SHAPES = _field_shapes()  # FlowParams field -> expected shape


def masks(dtype=jnp.float32) -> jax.Array:
  """``(L, 2)`` the coupling masks: ``(0, 1)`` on even layers, ``(1, 0)`` on odd ones (1 = kept)."""
  return jnp.asarray([[0.0, 1.0] if i % 2 == 0 else [1.0, 0.0] for i in range(NUM_LAYERS)], dtype)


def validate_flow_params(params, caller: str) -> None:
  """Raises at trace time unless ``params`` is a :class:`FlowParams` of float arrays of the flow's shapes.

  Reads only shapes and dtypes (never values), so it is free inside ``jit``.
  """
  if not isinstance(params, FlowParams):
    raise TypeError(f"{caller}: flow params must be a jaxtal.FlowParams, got {type(params).__name__}")
  for name, want in FIELD_SHAPES.items():
    value = getattr(params, name)
    shape = getattr(value, "shape", None)
    if shape is None or tuple(shape) != want:
      raise ValueError(f"{caller}: flow params {name} must have shape {want}, got {None if shape is None else tuple(shape)}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise TypeError(f"{caller}: flow params {name} must be a float array, got dtype {value.dtype}")


def _net(u: jax.Array, a: int, c: int, w1, b1, w2, b2, w3, b3) -> jax.Array:
  """One coupling net on its kept coordinate ``u (N,)`` -> its output ``(N,)`` on the updated one.

  The net's input ``m * z`` is zero but for coordinate ``a``, so its first Linear is ``u * w1[a] +
  b1`` (the other row multiplies an exact zero), and only output ``c`` is ever read. The hidden
  rows are feature-major, ``(64, N)``: every matmul of the forward and backward passes then has its
  long axis last (none contracts over ``N`` on its left operand, which XLA:CPU runs 3x slower).
  """
  h = jax.nn.silu(w1[a][:, None] * u[None, :] + b1[:, None])
  h = jax.nn.silu(jnp.dot(w2.T, h, precision=_HIGHEST) + b2[:, None])
  return jnp.dot(w3[:, c], h, precision=_HIGHEST) + b3[c]


def flow_to_latent(params: FlowParams, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The data-to-latent map: ``x (N, 2)`` -> ``(z (N, 2), log_det (N,))`` (any leading axes), ``log_det = log |det dz/dx|``.

  Each coupling reads one coordinate and updates the other (the masks are static), so the nets run
  on ``(64, N)`` hidden rows of their one input, never on the masked pair.
  """
  dtype = x.dtype
  lead = x.shape[:-1]
  x = x.reshape(-1, DIM)
  p = [jnp.asarray(a, dtype) for a in params]
  s_params, t_params = p[:6], p[6:]
  z = [x[:, 0], x[:, 1]]
  log_det = jnp.zeros(x.shape[:1], dtype)
  for i in reversed(range(NUM_LAYERS)):  # a static loop over the six layers
    a = 1 if i % 2 == 0 else 0  # the kept coordinate (mask (0, 1) on even layers); c is updated
    c = 1 - a
    s = jnp.tanh(_net(z[a], a, c, *(w[i] for w in s_params)))
    t = _net(z[a], a, c, *(w[i] for w in t_params))
    z[c] = (z[c] - t) * jnp.exp(-s)
    log_det = log_det - s
  return jnp.stack(z, axis=-1).reshape(lead + (DIM,)), log_det.reshape(lead)


def flow_log_prob(params: FlowParams, x: jax.Array) -> jax.Array:
  """Log-density of 2-D residuals under the RealNVP flow.

  Pure and jit/vmap/grad-safe; computed in float32 (or wider, if ``x`` or ``params`` is wider).

  Args:
    params: the flow's :class:`FlowParams` (see :func:`init_flow_params`, :func:`flow_params_from_torch`).
    x: ``(N, 2)`` residuals, any finite values (any leading axes: ``(..., 2)``).

  Returns:
    ``(N,)`` (``(...)``) ``log p(x) = log N(z(x); 0, I) + log |det dz/dx|``.
  """
  validate_flow_params(params, "flow_log_prob")
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) < 1 or shape[-1] != DIM:
    raise ValueError(f"flow_log_prob: x must be (N, 2) residuals (or (..., 2)), got shape {shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"flow_log_prob: x must be a float array, got dtype {x.dtype}")
  dtype = jnp.result_type(jnp.float32, x.dtype, *(a.dtype for a in params))
  z, log_det = flow_to_latent(params, jnp.asarray(x, dtype))
  return -0.5 * jnp.sum(z * z, axis=-1) - _LOG_2PI + log_det


def init_flow_params(key: jax.Array) -> FlowParams:
  """A freshly initialised flow, as Ultralytics initialises its ``RealNVP``.

  Every weight is Xavier-uniform with gain 0.01 (uniform in ``+-0.01 sqrt(6 / (fan_in + fan_out))``);
  every bias keeps PyTorch's default ``Linear`` init (uniform in ``+-1 / sqrt(fan_in)``). The
  nets then output almost their last bias, so the flow starts close to a fixed affine map.

  Args:
    key: a ``jax.random`` key.

  Returns:
    :class:`FlowParams` of float32 arrays.
  """
  keys = jax.random.split(key, len(FIELD_SHAPES))
  values = []
  for k, (name, shape) in zip(keys, FIELD_SHAPES.items()):
    layer = int(name[-1]) - 1
    fan_in, fan_out = _LAYER_SIZES[layer]
    if name[2] == "w":
      bound = INIT_GAIN * math.sqrt(6.0 / (fan_in + fan_out))
    else:
      bound = 1.0 / math.sqrt(fan_in)
    values.append(jax.random.uniform(k, shape, jnp.float32, -bound, bound))
  return FlowParams(*values)


def _torch_keys():
  """Yields ``(field, layer, torch key without prefix, torch shape)`` for every array of the flow."""
  for name, shape in FIELD_SHAPES.items():
    net, kind, j = name[0], name[2], int(name[-1])
    suffix = "weight" if kind == "w" else "bias"
    torch_shape = (shape[2], shape[1]) if kind == "w" else (shape[1],)
    for i in range(NUM_LAYERS):
      yield name, i, f"{net}.{i}.{2 * (j - 1)}.{suffix}", torch_shape


def _normal_prefix(prefix: str) -> str:
  return prefix + "." if prefix and not prefix.endswith(".") else prefix


def flow_params_from_torch(state_dict: Mapping[str, object], prefix: str = "") -> FlowParams:
  """:class:`FlowParams` from a PyTorch state dict of Ultralytics' ``RealNVP``.

  Reads ``{prefix}s.{i}.{0,2,4}.weight/bias`` and ``{prefix}t.{i}.{0,2,4}.weight/bias`` for
  ``i < 6`` and transposes the weights (torch's ``Linear.weight`` is ``(out, in)``). The buffers
  ``loc`` and ``cov`` are not read (the prior is the standard normal); a ``mask`` buffer, when
  present, must be the alternating one the flow assumes. Other keys (the rest of a model) are
  ignored, except flow layers beyond the sixth.

  Args:
    state_dict: key -> NumPy array or anything ``np.asarray`` takes (e.g. a CPU torch tensor).
    prefix: the flow's key prefix in a whole model's state dict, e.g. ``"model.23.flow_model."``
      (a missing final dot is added).

  Returns:
    :class:`FlowParams` of float32 arrays.

  Raises:
    ValueError: a missing key, an array of the wrong shape (a flow of another size), a layer
      beyond the sixth, or a ``mask`` that is not ``[[0, 1], [1, 0]] * 3``.
  """
  prefix = _normal_prefix(prefix)
  where = f" (prefix {prefix!r})" if prefix else ""
  stacks = {name: [None] * NUM_LAYERS for name in FIELD_SHAPES}
  for name, i, key, torch_shape in _torch_keys():
    full = prefix + key
    if full not in state_dict:
      hint = ""
      found = sorted(k[: -len(key)] for k in state_dict if isinstance(k, str) and k.endswith(key))
      if found:
        hint = f"; the key is there under prefix {found[0]!r}: pass prefix={found[0]!r}"
      raise ValueError(f"flow_params_from_torch: missing key {full!r}{where}, expected shape {torch_shape}{hint}")
    value = np.asarray(state_dict[full], np.float32)
    if value.shape != torch_shape:
      raise ValueError(
          f"flow_params_from_torch: {full!r} has shape {value.shape}, expected {torch_shape} (a RealNVP of"
          f" {NUM_LAYERS} coupling layers, {DIM} -> {HIDDEN} -> {HIDDEN} -> {DIM} nets)"
      )
    stacks[name][i] = value.T if value.ndim == 2 else value
  layer_key = re.compile(re.escape(prefix) + r"([st])\.(\d+)\.(\d+)\.(weight|bias)$")
  for k in state_dict:
    hit = layer_key.match(k) if isinstance(k, str) else None
    if hit and (int(hit.group(2)) >= NUM_LAYERS or hit.group(3) not in ("0", "2", "4")):
      raise ValueError(
          f"flow_params_from_torch: unexpected key {k!r}{where}: expected a RealNVP of {NUM_LAYERS} coupling"
          f" layers (s.0-s.{NUM_LAYERS - 1}, t.0-t.{NUM_LAYERS - 1}), each net Linear layers 0, 2, 4"
      )
  if prefix + "mask" in state_dict:
    mask = np.asarray(state_dict[prefix + "mask"], np.float32)
    want = np.asarray(masks())
    if mask.shape != want.shape or not np.array_equal(mask, want):
      raise ValueError(
          f"flow_params_from_torch: {prefix + 'mask'!r} must be the alternating coupling masks"
          f" {want.astype(int).tolist()} (shape {want.shape}), got {mask.tolist()} (shape {mask.shape})"
      )
  return FlowParams(**{name: jnp.asarray(np.stack(v)) for name, v in stacks.items()})


def flow_params_to_torch(params: FlowParams, prefix: str = "") -> dict[str, np.ndarray]:
  """The inverse of :func:`flow_params_from_torch`: a state dict of NumPy float32 arrays.

  Holds the weights (transposed to torch's ``(out, in)``), the biases and the buffers
  ``loc`` ``(2,)`` zeros, ``cov`` ``(2, 2)`` identity and ``mask`` ``(6, 2)``, so Ultralytics'
  ``RealNVP().load_state_dict({k: torch.from_numpy(v) for k, v in d.items()})`` takes it as is.
  """
  validate_flow_params(params, "flow_params_to_torch")
  prefix = _normal_prefix(prefix)
  out = {}
  for name, i, key, _ in _torch_keys():
    value = np.asarray(getattr(params, name)[i], np.float32)
    out[prefix + key] = np.ascontiguousarray(value.T if value.ndim == 2 else value)
  out[prefix + "loc"] = np.zeros(DIM, np.float32)
  out[prefix + "cov"] = np.eye(DIM, dtype=np.float32)
  out[prefix + "mask"] = np.asarray(masks())
  return out


class RealNVP(nnx.Module):
  """The RealNVP flow of RLE as a Flax NNX module: the :class:`FlowParams` arrays as ``nnx.Param``.

  ``log_prob`` delegates to :func:`flow_log_prob`, so module and function give identical results.

  Args:
    rngs: ``nnx.Rngs``; the ``params`` stream initialises the flow (:func:`init_flow_params`).
    params: instead of ``rngs``, the :class:`FlowParams` to hold (see also :meth:`from_torch`).

  Example::

    flow = jaxtal.RealNVP(nnx.Rngs(0))
    log_p = flow.log_prob(residuals)  # (N, 2) -> (N,)
  """

  def __init__(self, rngs: nnx.Rngs | None = None, *, params: FlowParams | None = None):
    if (rngs is None) == (params is None):
      raise TypeError("RealNVP: pass exactly one of rngs (a fresh flow) or params (a FlowParams)")
    if params is None:
      params = init_flow_params(rngs.params())
    validate_flow_params(params, "RealNVP")
    for name, value in zip(FlowParams._fields, params):
      setattr(self, name, nnx.Param(jnp.asarray(value, jnp.float32)))

  def params(self) -> FlowParams:
    """The held arrays as a :class:`FlowParams` (what :func:`flow_log_prob` takes)."""
    return FlowParams(*(getattr(self, name)[...] for name in FlowParams._fields))

  def log_prob(self, x: jax.Array) -> jax.Array:
    """``(N, 2)`` residuals -> ``(N,)`` log-densities (:func:`flow_log_prob`)."""
    return flow_log_prob(self.params(), x)

  @classmethod
  def from_torch(cls, state_dict: Mapping[str, object], prefix: str = "") -> RealNVP:
    """A module holding the flow of a PyTorch state dict (:func:`flow_params_from_torch`)."""
    return cls(params=flow_params_from_torch(state_dict, prefix))
