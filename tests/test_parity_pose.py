"""Parity of :func:`jaxtal.pose_loss` with Ultralytics 8.4.190's ``v8PoseLoss``.

Every case of ``pose_cases`` is checked against its golden fixture
(``tests/fixtures/pose_loss_<case>.npz``, no torch needed) and, marked ``live``, against the
reference run now through ``tests/support/pose_reference.py`` (skipped when it cannot be imported,
failed instead under ``JAXTAL_REQUIRE_REFERENCE=1``, the rule of ``conftest.py``). jaxtal runs
``jax.value_and_grad`` of ``pose_loss(..., layout="NCHW")`` w.r.t. the head maps and the
keypoint maps, jitted.

Comparison rules (:func:`assert_pose_loss_matches`): ``support.parity.assert_loss_matches``
for the total, box/cls/dfl and the head-map gradients, and, tighter (float32 rounding), the
total and all five parts within ``rtol=1e-5`` (``atol=1e-7`` for parts that are 0), both
gradients within ``max|grad - ref| <= 1e-4 max|ref|`` per level, the foreground of the
assignment inside the loss equal and its owner GT equal on every foreground anchor (the pose
terms count every foreground anchor, scored or not), target-score sums allclose.

Top-k ties (``pose_cases.TIE_CASES``): jaxtal breaks ties among zero-metric top-k candidates
towards the lower anchor index, one legal order of the reference's algorithm. Those cases match
the reference under ``reference.stable_ties()``, and the tests show that the native reference
differs there (so the rule can fail); every other case matches the native reference.
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxtal
from support import cases, fixtures, pose_cases
from support.parity import assert_loss_matches, assert_owners_match, params
from support.runners import run_pose_loss

POSE_RTOL, PART_ATOL = 1e-5, 1e-7
POSE_GRAD_RATIO = 1e-4
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-6


# Each configuration compiles the loss once (a few seconds on CI's CPUs): the default run keeps
# one case, golden and live (one compilation), ``-m slow`` runs the rest.
FAST_GOLDEN = ("ties",)
FAST_LIVE = ("ties",)


def assert_pose_loss_matches(out: dict, ref: dict, where: str = "") -> None:
  """The comparison rules of the module docstring."""
  assert_loss_matches(out["total"], out["parts"], out["grads"], ref, where)
  np.testing.assert_allclose(out["total"], ref["total"], rtol=POSE_RTOL, err_msg=f"{where}total")
  for key, value in zip(jaxtal.PoseLossParts._fields, out["parts"]):
    np.testing.assert_allclose(value, ref[key], rtol=POSE_RTOL, atol=PART_ATOL, err_msg=f"{where}{key}")
  assert_owners_match(out, ref, where)
  np.testing.assert_allclose(
      out["weights"], ref["weights"], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, err_msg=f"{where}target scores"
  )
  for name, key in (("head", "grads"), ("keypoint", "kpt_grads")):
    grads, ref_grads = out[key], ref[key]
    assert all(np.isfinite(g).all() and g.shape == r.shape for g, r in zip(grads, ref_grads)), f"{where}{name} grads"
    scale = max(float(np.abs(r).max()) for r in ref_grads)
    worst = max(float(np.abs(g - r).max()) for g, r in zip(grads, ref_grads))
    assert worst <= POSE_GRAD_RATIO * scale + 1e-12, (
        f"{where}{name} grads: max|diff| {worst:.3e} > {POSE_GRAD_RATIO} * max|ref| {scale:.3e}"
    )


# ----------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", params(pose_cases.POSE_LOSS_CASES, FAST_GOLDEN))
def test_golden_loss(name):
  case, ref, version = pose_cases.load_fixture(name)
  assert version == "8.4.190"
  assert_pose_loss_matches(run_pose_loss(case), ref, where=f"[pose {name}] ")


def test_fixture_inputs_match_builders():
  """The stored inputs are what ``pose_cases.py`` builds now (a stale fixture would test something else)."""
  for name in pose_cases.POSE_LOSS_CASES:
    cases.assert_case_equal(pose_cases.load_fixture(name)[0], pose_cases.loss_case(name), where=f"[pose {name}] ")


def test_golden_cases_are_informative():
  """The cases exercise what they claim: positives, invisible keypoints, keypoints outside their
  box, empty images, D = 2 (no kobj), custom sigmas, top-k ties."""
  for name in pose_cases.POSE_LOSS_CASES:
    case, ref, _ = pose_cases.load_fixture(name)
    rows, kp = case["inputs"]["label_rows"], case["inputs"]["keypoints"]
    if rows.shape[0] == 0:
      assert ref["box"] == ref["pose"] == ref["kobj"] == ref["dfl"] == 0.0 and ref["cls"] > 0, name
      assert not any(g.any() for g in ref["kpt_grads"]), name
      continue
    assert min(ref["box"], ref["pose"], ref["cls"], ref["dfl"]) > 0, name
    assert (ref["kobj"] > 0) == (case["config"]["kpt_shape"][1] == 3), name
    assert ref["fg_mask"].sum() > 0 and any(g.any() for g in ref["kpt_grads"]), name
    assert ((kp[..., :2] > 0) & (kp[..., :2] < 1)).all(), name  # inside the image: both sides see the same labels
  kp = pose_cases.load_fixture("invisible")[0]["inputs"]["keypoints"]
  assert (kp[..., 2] == 0).any() and (kp[..., 2] == 0).all(axis=1).any() and (kp[..., 2] == 2).any()
  case = pose_cases.load_fixture("outside_box")[0]["inputs"]
  x, y, rows = case["keypoints"][..., 0], case["keypoints"][..., 1], case["label_rows"][:, None]
  assert ((np.abs(x - rows[..., 2]) > rows[..., 4] / 2) | (np.abs(y - rows[..., 3]) > rows[..., 5] / 2)).any()
  assert pose_cases.load_fixture("k5_d2")[0]["inputs"]["keypoints"].shape[-1] == 2
  assert pose_cases.load_fixture("coco")[0]["config"]["kpt_shape"] == (17, 3)
  empty = pose_cases.load_fixture("empty_images")[0]["inputs"]["label_rows"]
  assert set(empty[:, 0].astype(int)) == {1}


# ----------------------------------------------------------------------------- live


@pytest.mark.live
@pytest.mark.parametrize("name", params([n for n in pose_cases.POSE_LOSS_CASES if n not in pose_cases.TIE_CASES], ()))
def test_live_loss(name, pose_reference):
  """Cases without top-k ties match the native reference."""
  case = pose_cases.loss_case(name)
  kwargs, _ = pose_cases.split_loss_config(case["config"])
  x = case["inputs"]
  ref = pose_reference.loss(x["feats"], x["kpts"], x["label_rows"], x["keypoints"], **kwargs)
  assert_pose_loss_matches(run_pose_loss(case), ref, where=f"[pose {name} live] ")


@pytest.mark.live
@pytest.mark.parametrize("name", params(pose_cases.TIE_CASES, FAST_LIVE))
def test_live_ties_match_the_stable_reference_not_the_native_one(name, pose_reference):
  """With tied zero-metric top-k candidates jaxtal is the reference with a stable top-k; the
  native reference takes other tied candidates, so its foreground and pose terms differ."""
  case = pose_cases.loss_case(name)
  kwargs, _ = pose_cases.split_loss_config(case["config"])
  x = case["inputs"]
  args = (x["feats"], x["kpts"], x["label_rows"], x["keypoints"])
  out = run_pose_loss(case)
  assert_pose_loss_matches(out, pose_reference.loss(*args, stable=True, **kwargs), where=f"[pose {name} stable] ")
  native = pose_reference.loss(*args, **kwargs)
  assert (native["fg_mask"] != out["fg_mask"]).any()
  assert abs(native["pose"] - out["parts"].pose) > 1e-3 * native["pose"]
  with pytest.raises(AssertionError):
    assert_pose_loss_matches(out, native)


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.parametrize("name", [j.name for j in fixtures.jobs(("pose",))])
def test_fixture_script_reproduces_the_file(name, pose_reference, tmp_path):
  """``tests/make_fixtures.py --kind pose`` writes this committed file again (byte for byte here; see support.fixtures.assert_reproduces)."""
  fixtures.assert_reproduces(fixtures.job("pose", name), str(tmp_path))
