"""Parity of :func:`jaxtal.end_to_end_loss` (and the YOLOv10 sum form) with Ultralytics 8.4.190.

Every case of ``cases.E2E_CASES`` (two branches' NCHW maps + YOLO label rows, an epoch of a
run) is checked against its golden fixture (``tests/fixtures/e2e_<case>.npz``) and, marked
``live``, against ``E2ELoss`` / ``E2EDetectLoss`` run now through ``tests/support/reference.py``: the
reference criterion is advanced one ``update()`` per finished epoch, as its trainer does, and
jaxtal gets ``weight=one2many_weight(epoch, epochs)``.

Rules as in ``test_parity_detect.py``: total and the reported parts within ``rtol=1e-4``; per
level and branch ``max|grad - ref| <= 1e-3 * max|ref|``.
"""

from __future__ import annotations

import numpy as np
import pytest

from support import cases, fixtures
from support.parity import GRAD_RATIO, LOSS_RTOL
from support.runners import run_end_to_end


def assert_matches(case: dict, ref: dict):
  total, parts, g_many, g_one = run_end_to_end(case)
  np.testing.assert_allclose(total, ref["total"], rtol=LOSS_RTOL, atol=1e-6, err_msg="total")
  for name in ("box", "cls", "dfl"):
    np.testing.assert_allclose(float(getattr(parts, name)), ref[name], rtol=LOSS_RTOL, atol=1e-6, err_msg=name)
  for branch, got, want in (("one2many", g_many, ref["grads"]), ("one2one", g_one, ref["grads_o2o"])):
    for level, (g, r) in enumerate(zip(got, want)):
      worst = np.max(np.abs(g - r))
      assert worst <= GRAD_RATIO * max(np.max(np.abs(r)), 1e-12), f"{branch} level {level}: {worst}"


# The default run checks one fixture (YOLOv10's form); the rest
# are marked slow (each compiles its own step), and every case runs live.
_DEFAULT_FIXTURES = ("v10",)  # the live middle_epoch and v10_reg_max1 run by default too
_FIXTURE_PARAMS = [n if n in _DEFAULT_FIXTURES else pytest.param(n, marks=pytest.mark.slow) for n in cases.E2E_CASES]


@pytest.mark.parametrize("name", _FIXTURE_PARAMS)
def test_golden_fixture(name):
  case, ref, version = cases.load_fixture("e2e", name)
  assert version == "8.4.190"
  assert_matches(case, ref)


@pytest.mark.parametrize("name", cases.E2E_CASES)
def test_fixture_inputs_match_builders(name):
  stored, _, _ = cases.load_fixture("e2e", name)
  built = cases.e2e_case(name)
  assert stored["config"] == {**built["config"], "strides": tuple(built["config"]["strides"])}
  for key in ("feats", "feats_o2o"):
    for a, b in zip(stored["inputs"][key], built["inputs"][key]):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(stored["inputs"]["label_rows"], built["inputs"]["label_rows"])


def test_cases_cover_the_schedule_and_the_edge_cases():
  configs = {n: cases.e2e_case(n)["config"] for n in cases.E2E_CASES}
  epochs = {c["epoch"] for c in configs.values() if not c["yolov10"]}
  assert {0, 19} <= epochs and len(epochs) >= 3  # first, middle, last
  assert {c["reg_max"] for c in configs.values()} == {1, 16}
  assert any(c["yolov10"] for c in configs.values())
  assert cases.e2e_case("empty_batch")["inputs"]["label_rows"].shape == (0, 6)


# Live, the default run checks two cases the default fixtures leave out (a middle epoch, YOLOv10 with
# reg_max 1); the other live cases are slow (CI runs them).
_DEFAULT_LIVE = ("middle_epoch", "v10_reg_max1")
_LIVE_PARAMS = [n if n in _DEFAULT_LIVE else pytest.param(n, marks=pytest.mark.slow) for n in cases.E2E_CASES]


@pytest.mark.live
@pytest.mark.parametrize("name", _LIVE_PARAMS)
def test_live(name, reference):
  case = cases.e2e_case(name)
  kwargs, _ = cases.split_loss_config(case["config"])
  ref = reference.e2e_loss(case["inputs"]["feats"], case["inputs"]["feats_o2o"], case["inputs"]["label_rows"], **kwargs)
  assert_matches(case, ref)


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.parametrize("name", [j.name for j in fixtures.jobs(("e2e",))])
def test_fixture_script_reproduces_the_file(name, reference, tmp_path):
  """``tests/make_fixtures.py --kind e2e`` writes this committed file again (byte for byte here; see support.fixtures.assert_reproduces)."""
  fixtures.assert_reproduces(fixtures.job("e2e", name), str(tmp_path))
