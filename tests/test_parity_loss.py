"""Parity of :func:`jaxtal.detection_loss` with Ultralytics 8.4.190's ``v8DetectionLoss``.

Every case of ``cases.LOSS_CASES`` (NCHW head maps + YOLO label rows) is checked against
its golden fixture (``tests/fixtures/loss_<case>.npz``) and, marked ``live``, against the
reference run now through ``tests/reference.py``. jaxtal runs ``jax.value_and_grad`` of
``detection_loss(..., layout="NCHW")`` w.r.t. the list of head maps, jitted.

Comparison rules (:func:`assert_loss_matches`): the total and each gain-scaled part (box,
cls, dfl) within ``rtol=1e-4``; for every level, ``max|grad - ref grad| <= 1e-3 *
max|ref grad|``. The loss only sees zero-score anchors through their (zero) weight, so the
assigner's tie-order freedom (see ``test_parity_assign.py``) does not loosen these rules.

Also: the :class:`jaxtal.DetectionLoss` module equals the function, and NHWC maps (the
NCHW ones transposed) give the NCHW loss and gradients.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import cases
import jaxtal

LOSS_RTOL = 1e-4
GRAD_RATIO = 1e-3
SAME_RTOL = 1e-6  # two jaxtal spellings of one computation (module, layout)


def _config(config: dict, layout: str = "NCHW") -> tuple[jaxtal.LossConfig, np.ndarray | None]:
  """A case's config as a (static, hashable) LossConfig and its class weights (an array, not configuration)."""
  kwargs, _ = cases.split_loss_config(config)
  cw = kwargs.pop("class_weights")
  return jaxtal.LossConfig(**kwargs, layout=layout), None if cw is None else np.asarray(cw, np.float32)


def _gt(case: dict) -> jaxtal.GroundTruth:
  _, m = cases.split_loss_config(case["config"])
  feats = case["inputs"]["feats"]
  size = feats[0].shape[2] * case["config"]["strides"][0], feats[0].shape[3] * case["config"]["strides"][0]
  return jaxtal.pack_labels(case["inputs"]["label_rows"], feats[0].shape[0], m, size)


@functools.partial(jax.jit, static_argnames="config")
def _value_and_grad(feats, gt, class_weights, *, config):
  def f(feats):
    return jaxtal.detection_loss(feats, gt, config, class_weights=class_weights)

  (total, parts), grads = jax.value_and_grad(f, has_aux=True)(feats)
  return total, parts, grads


def run_jaxtal(case: dict, layout: str = "NCHW"):
  """``(total, LossParts, grads)`` of jaxtal on a case, as NumPy; grads in the layout of the input."""
  feats = [np.asarray(f) for f in case["inputs"]["feats"]]
  if layout == "NHWC":
    feats = [f.transpose(0, 2, 3, 1) for f in feats]
  config, class_weights = _config(case["config"], layout)
  total, parts, grads = _value_and_grad(feats, _gt(case), class_weights, config=config)
  return float(total), jaxtal.LossParts(*(float(p) for p in parts)), [np.asarray(g) for g in grads]


def assert_loss_matches(total, parts, grads, ref: dict, where: str = "") -> None:
  """The comparison rules of the module docstring."""
  for key, value in (("total", total), ("box", parts.box), ("cls", parts.cls), ("dfl", parts.dfl)):
    np.testing.assert_allclose(value, ref[key], rtol=LOSS_RTOL, err_msg=f"{where}{key}")
  assert len(grads) == len(ref["grads"])
  for level, (g, rg) in enumerate(zip(grads, ref["grads"])):
    assert g.shape == rg.shape, f"{where}grad {level}: shape {g.shape} != reference {rg.shape}"
    assert np.isfinite(g).all(), f"{where}grad {level} is not finite"
    diff, scale = np.max(np.abs(g - rg)), np.max(np.abs(rg))
    assert diff <= GRAD_RATIO * scale, f"{where}grad {level}: max|diff| {diff:.3e} > {GRAD_RATIO} * max|ref| {scale:.3e}"


# ----------------------------------------------------------------------------- golden


# nc80 and one2one compile their own steps (~5 s each): they run in the slow set.
_SLOW_GOLDEN = ("nc80", "one2one")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_GOLDEN else n for n in cases.LOSS_CASES])
def test_golden(name):
  case, ref, version = cases.load_fixture("loss", name)
  assert version == "8.4.190"
  assert_loss_matches(*run_jaxtal(case), ref, where=f"[{name}] ")


@pytest.mark.parametrize("name", cases.LOSS_CASES)
def test_fixture_inputs_match_builders(name):
  """The stored head maps and rows are exactly what ``cases.py`` builds now (NumPy only)."""
  stored, _, _ = cases.load_fixture("loss", name)
  built = cases.loss_case(name)
  assert stored["config"] == built["config"]
  np.testing.assert_array_equal(stored["inputs"]["label_rows"], built["inputs"]["label_rows"])
  assert len(stored["inputs"]["feats"]) == len(built["inputs"]["feats"])
  for a, b in zip(stored["inputs"]["feats"], built["inputs"]["feats"]):
    np.testing.assert_array_equal(a, b)


def test_golden_cases_are_informative():
  """Every case with labels has a box loss (there are positives); the empty batch has none."""
  for name in cases.LOSS_CASES:
    case, ref, _ = cases.load_fixture("loss", name)
    if case["inputs"]["label_rows"].shape[0] == 0:
      assert ref["box"] == 0.0 and ref["dfl"] == 0.0 and ref["cls"] > 0.0, name
    else:
      assert ref["box"] > 0.0 and ref["dfl"] > 0.0 and ref["cls"] > 0.0, name
      assert max(np.abs(g[:, : 4 * case["config"]["reg_max"]]).max() for g in ref["grads"]) > 0.0, name


@pytest.mark.parametrize("name", ["seed", "class_weights"])
def test_module_matches_function(name):
  case, _, _ = cases.load_fixture("loss", name)
  config, class_weights = _config(case["config"])
  module = jaxtal.DetectionLoss(config, class_weights=class_weights)
  total, parts = nnx.jit(lambda m, feats, gt: m(feats, gt))(module, case["inputs"]["feats"], _gt(case))
  want_total, want_parts, _ = run_jaxtal(case)
  np.testing.assert_allclose(float(total), want_total, rtol=SAME_RTOL)
  np.testing.assert_allclose([float(p) for p in parts], list(want_parts), rtol=SAME_RTOL)


@pytest.mark.parametrize("name", ["seed", "reg_max1"])
def test_nhwc_matches_nchw(name):
  case, _, _ = cases.load_fixture("loss", name)
  total, parts, grads = run_jaxtal(case, layout="NHWC")
  want_total, want_parts, want_grads = run_jaxtal(case)
  np.testing.assert_allclose(total, want_total, rtol=SAME_RTOL)
  np.testing.assert_allclose(list(parts), list(want_parts), rtol=SAME_RTOL)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g.transpose(0, 3, 1, 2), w, rtol=1e-5, atol=1e-6 * np.abs(w).max())


# ----------------------------------------------------------------------------- live


@pytest.mark.live
@pytest.mark.parametrize("name", cases.LOSS_CASES)
def test_live(name, reference):
  case = cases.loss_case(name)
  kwargs, _ = cases.split_loss_config(case["config"])
  ref = reference.loss(case["inputs"]["feats"], case["inputs"]["label_rows"], **kwargs)
  assert_loss_matches(*run_jaxtal(case), ref, where=f"[{name} live] ")
