"""Parity of :func:`jaxtal.detection_loss` with Ultralytics 8.4.190's ``v8DetectionLoss``.

Every case of ``cases.LOSS_CASES`` (NCHW head maps + YOLO label rows) is checked against
its golden fixture (``tests/fixtures/loss_<case>.npz``) and, marked ``live``, against the
reference run now through ``tests/support/reference.py``. jaxtal runs ``jax.value_and_grad`` of
``detection_loss(..., layout="NCHW")`` w.r.t. the list of head maps, jitted.

Comparison rules (``support.parity.assert_loss_matches``): the total and each gain-scaled part (box,
cls, dfl) within ``rtol=1e-4``; for every level, ``max|grad - ref grad| <= 1e-3 *
max|ref grad|``. The loss only sees zero-score anchors through their (zero) weight, so the
assigner's tie-order freedom (see ``test_parity_assign.py``) does not loosen these rules.

Also: the :class:`jaxtal.DetectionLoss` module equals the function, and NHWC maps (the
NCHW ones transposed) give the NCHW loss and gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jaxtal
from support import cases, fixtures
from support.parity import SAME_RTOL, assert_loss_matches
from support.runners import detection_config, detection_gt, run_detection_loss


# ----------------------------------------------------------------------------- golden


# nc80 and one2one compile their own steps (~5 s each): they run in the slow set.
_SLOW_GOLDEN = ("nc80", "one2one")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_GOLDEN else n for n in cases.LOSS_CASES])
def test_golden(name):
  case, ref, version = cases.load_fixture("loss", name)
  assert version == "8.4.190"
  assert_loss_matches(*run_detection_loss(case), ref, where=f"[{name}] ")


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
  config, class_weights = detection_config(case["config"])
  module = jaxtal.DetectionLoss(config, class_weights=class_weights)
  total, parts = nnx.jit(lambda m, feats, gt: m(feats, gt))(module, case["inputs"]["feats"], detection_gt(case))
  want_total, want_parts, _ = run_detection_loss(case)
  np.testing.assert_allclose(float(total), want_total, rtol=SAME_RTOL)
  np.testing.assert_allclose([float(p) for p in parts], list(want_parts), rtol=SAME_RTOL)


@pytest.mark.parametrize("name", ["seed", "reg_max1"])
def test_nhwc_matches_nchw(name):
  case, _, _ = cases.load_fixture("loss", name)
  total, parts, grads = run_detection_loss(case, layout="NHWC")
  want_total, want_parts, want_grads = run_detection_loss(case)
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
  assert_loss_matches(*run_detection_loss(case), ref, where=f"[{name} live] ")


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.parametrize("name", [j.name for j in fixtures.jobs(("loss",))])
def test_fixture_script_reproduces_the_file(name, reference, tmp_path):
  """``tests/make_fixtures.py --kind loss`` writes this committed file again (byte for byte here; see support.fixtures.assert_reproduces)."""
  fixtures.assert_reproduces(fixtures.job("loss", name), str(tmp_path))
