"""Parity of the OBB pieces with Ultralytics 8.4.190: ``probiou``, ``RotatedTaskAlignedAssigner``, ``v8OBBLoss``.

Every case of ``obb_cases`` is checked against its golden fixture
(``tests/fixtures/obb_{assign,loss}_<case>.npz``, no torch needed) and, marked ``live``,
against the reference run now through ``tests/support/obb_reference.py`` (skipped when it cannot be
imported, failed instead under ``JAXTAL_REQUIRE_REFERENCE=1``, the rule of ``conftest.py``).

Comparison rules, the detection parity tests' (shared through ``support.parity``, not restated):

* assignment: ``support.parity.assert_assignment_matches`` (target scores allclose
  everywhere, owner GT, label and box equal on every scored anchor, foreground differing only
  on zero-score anchors), with the target scores' ``rtol`` 5e-5 instead of 1e-5 (see
  ``SCORE_RTOL``);
* loss: ``support.parity.assert_loss_matches`` for the total, the box/cls/dfl parts and the
  head-map gradients (``rtol=1e-4``; ``max|grad - ref| <= 1e-3 max|ref|`` per level), the same
  rules for the angle part and the angle-map gradients, and the assignment inside the loss
  (read from the reference's assigner through a forward hook): target-score sums allclose
  (``rtol=5e-5, atol=1e-6``) and the owner GT equal on every scored anchor;
* ProbIoU: on well-conditioned pairs values within ``2e-5`` and gradients within ``1e-3`` of
  the largest; on every pair the squared Hellinger distance ``(1 - ProbIoU)^2`` within ``1e-4``
  of both the reference and the reference evaluated in float64, the value finite in ``[0, 1]``
  and the gradient finite. Identical boxes, and a thin box against a near copy or itself turned
  by a half turn, are ill-conditioned (``obb_cases.ILL_CONDITIONED``: ``det S1 = a b - c^2``
  cancels, and ProbIoU's slope is ``1 / (2 (1 - ProbIoU))``): any float32 evaluation, the
  reference's included, is off by up to about ``5e-5`` in the squared Hellinger distance, up
  to ``5e-3`` in ProbIoU near 1, so only the squared distance is compared there.
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxtal
from support import fixtures, obb_cases
from support.parity import GRAD_RATIO, LOSS_RTOL, assert_assignment_matches, assert_loss_matches, params
from support.parity import TASK_SCORE_RTOL as SCORE_RTOL
from support.parity import TASK_WEIGHT_ATOL as WEIGHT_ATOL
from support.runners import obb_loss_gt, probiou_and_grads, run_obb_assign, run_obb_loss

PROBIOU_ATOL = 2e-5
HELLINGER2_ATOL = 1e-4


# Each case compiles the loss (or the assigner) once, about 5 s for the loss on CI's CPUs: the
# default run keeps a few representative cases, ``-m slow`` runs the rest.
FAST_ASSIGN = ("angles", "tiny_side_stride1")
FAST_LOSS = ("angles",)  # "tiny" runs in the slow set (each case compiles its loss, ~6 s)


def assert_obb_assignment_matches(got: dict, ref: dict, where: str = "") -> None:
  """``support.parity.assert_assignment_matches`` with the target-score rtol of this module."""
  assert_assignment_matches(got, ref, where, score_rtol=SCORE_RTOL)


def assert_obb_loss_matches(out: dict, ref: dict, where: str = "") -> None:
  """The loss comparison rules of the module docstring."""
  assert_loss_matches(out["total"], out["parts"], out["grads"], ref, where)
  np.testing.assert_allclose(out["parts"].angle, ref["angle"], rtol=LOSS_RTOL, err_msg=f"{where}angle")
  assert_loss_matches(out["total"], out["parts"], out["angle_grads"], dict(ref, grads=ref["angle_grads"]), f"{where}angle maps: ")
  np.testing.assert_allclose(out["weights"], ref["weights"], rtol=SCORE_RTOL, atol=WEIGHT_ATOL, err_msg=f"{where}target scores")
  scored = ref["weights"] > 0
  assert out["fg_mask"][scored].all(), f"{where}reference positives that are background in jaxtal"
  np.testing.assert_array_equal(out["gt_index"][scored], ref["gt_index"][scored], err_msg=f"{where}owner GT on scored anchors")


# ----------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", params(obb_cases.OBB_ASSIGN_CASES, FAST_ASSIGN))
def test_golden_assign(name):
  case, ref, version = obb_cases.load_fixture("assign", name)
  assert version == "8.4.190"
  assert_obb_assignment_matches(run_obb_assign(case), ref, where=f"[obb {name}] ")


@pytest.mark.parametrize("name", params(obb_cases.OBB_LOSS_CASES, FAST_LOSS))
def test_golden_loss(name):
  case, ref, version = obb_cases.load_fixture("loss", name)
  assert version == "8.4.190"
  assert_obb_loss_matches(run_obb_loss(case), ref, where=f"[obb {name}] ")


def _hellinger2(iou) -> np.ndarray:
  return (1.0 - np.asarray(iou, np.float64)) ** 2


def assert_probiou_matches(x: dict, ref: dict) -> None:
  """ProbIoU rules of the module docstring on a ``obb_cases.probiou_case`` and the reference's outputs."""
  good = ~np.isin(np.asarray(obb_cases.PROBIOU_KINDS)[x["kind"]], obb_cases.ILL_CONDITIONED)
  for suffix, floor in (("", 0.0), ("_floor", 0.01)):
    got = np.asarray(probiou_and_grads(x["box1"], x["box2"], floor=floor)[0])
    assert np.isfinite(got).all() and (got >= 0).all() and (got <= 1).all()
    np.testing.assert_allclose(got[good], ref["iou" + suffix][good], atol=PROBIOU_ATOL, rtol=0, err_msg=f"floor {floor}")
    for want, what in ((ref["iou" + suffix], "reference"), (ref["iou64" + suffix], "float64 reference")):
      worst = np.max(np.abs(_hellinger2(got) - _hellinger2(want)))
      assert worst <= HELLINGER2_ATOL, f"floor {floor}: squared Hellinger distance {worst:.2e} from the {what}"
  _, (g1, g2) = probiou_and_grads(x["box1"], x["box2"], floor=0.0)
  for g, r in ((g1, ref["d_box1"]), (g2, ref["d_box2"])):
    g = np.asarray(g)
    assert np.isfinite(g).all()
    assert np.max(np.abs(g[good] - r[good])) <= GRAD_RATIO * np.max(np.abs(r[good]))


def test_golden_probiou():
  case, ref, version = obb_cases.load_fixture("probiou", "pairs")
  assert version == "8.4.190"
  assert_probiou_matches(case["inputs"], ref)


def test_fixture_inputs_match_builders():
  """The stored inputs are what ``obb_cases.py`` builds now (a stale fixture would test something else)."""
  for kind, names, build in (
      ("assign", obb_cases.OBB_ASSIGN_CASES, obb_cases.assign_case),
      ("loss", obb_cases.OBB_LOSS_CASES, obb_cases.loss_case),
      ("probiou", ("pairs",), lambda _: obb_cases.probiou_case()),
  ):
    for name in names:
      stored, _, _ = obb_cases.load_fixture(kind, name)
      built = build(name)
      assert stored["config"] == built["config"], (kind, name)
      assert set(stored["inputs"]) == set(built["inputs"]), (kind, name)
      for key, value in built["inputs"].items():
        for a, b in zip(*(v if isinstance(v, list) else [v] for v in (stored["inputs"][key], value))):
          np.testing.assert_array_equal(a, b, err_msg=f"{kind} {name} {key}")


def test_golden_cases_are_informative():
  """The cases exercise what they claim (positives, padding, empty images, tiny rows dropped, edges)."""
  positives = {}
  for name in obb_cases.OBB_ASSIGN_CASES:
    case, ref, _ = obb_cases.load_fixture("assign", name)
    x = case["inputs"]
    assert x["gt_mask"].shape[1] > x["gt_mask"].sum(1).min(), f"{name}: no padding slot"
    positives[name] = int((ref["scores"].sum(-1) > 0).sum())
  assert positives["all_empty"] == 0
  assert all(v > 0 for k, v in positives.items() if k != "all_empty"), positives
  assert positives["tiny_side_stride1"] > positives["tiny_side0"]
  for kind in ("assign", "loss"):
    angles = obb_cases.load_fixture(kind, "angles")[0]["inputs"]["label_rows"][:, 6]
    for special in (0.0, np.pi / 4, -np.pi / 4, np.pi / 2):
      assert np.any(np.abs(angles - np.float32(special)) <= 1e-3), (kind, special)
  sides = obb_cases.load_fixture("assign", "squares_thin")[0]["inputs"]["label_rows"][:, 4:6]
  ratio = sides.max(1) / sides.min(1)
  assert (ratio == 1).any() and (ratio > 5).any()

  for name in obb_cases.OBB_LOSS_CASES:
    case, ref, _ = obb_cases.load_fixture("loss", name)
    if not (ref["weights"] > 0).any():
      assert ref["box"] == ref["dfl"] == ref["angle"] == 0.0 and ref["cls"] > 0.0, name
    else:
      assert min(ref["box"], ref["cls"], ref["dfl"], ref["angle"]) > 0.0, name
      assert max(np.abs(g).max() for g in ref["angle_grads"]) > 0.0, name
  # The tiny case has rows under 2 px (dropped by both sides) and one of exactly 2 px (kept).
  case, _, _ = obb_cases.load_fixture("loss", "tiny")
  rows = case["inputs"]["label_rows"]
  px = rows[:, 4:6] * np.float32(64)
  assert (px.min(1) < 2).any() and (px.min(1) == 2).any()
  assert int(np.asarray(obb_loss_gt(case).mask).sum()) == int((px.min(1) >= 2).sum())
  assert not (obb_cases.load_fixture("loss", "empty_batch")[0]["inputs"]["label_rows"].size)


# ----------------------------------------------------------------------------- live


@pytest.mark.live
@pytest.mark.parametrize("name", params(obb_cases.OBB_ASSIGN_CASES, FAST_ASSIGN))
def test_live_assign(name, obb_reference):
  case = obb_cases.assign_case(name)
  x = case["inputs"]
  ref = obb_reference.assign(
      x["pred_scores"], x["pred_boxes"], x["anchor_points"], x["gt_labels"], x["gt_boxes"], x["gt_mask"], **case["config"]
  )
  assert_obb_assignment_matches(run_obb_assign(case), ref, where=f"[obb {name} live] ")


@pytest.mark.live
@pytest.mark.parametrize("name", params(obb_cases.OBB_LOSS_CASES, FAST_LOSS))
def test_live_loss(name, obb_reference):
  case = obb_cases.loss_case(name)
  kwargs, _ = obb_cases.split_loss_config(case["config"])
  x = case["inputs"]
  ref = obb_reference.loss(x["feats"], x["angles"], x["label_rows"], **kwargs)
  assert_obb_loss_matches(run_obb_loss(case), ref, where=f"[obb {name} live] ")


@pytest.mark.live
def test_live_probiou(obb_reference):
  """More random pairs of every kind (near, identical, unrelated, thin, small, turned), both floors."""
  case = obb_cases.probiou_case(seed=7, n=6000)
  assert_probiou_matches(case["inputs"], obb_cases.reference_probiou(obb_reference, case))


@pytest.mark.live
def test_live_identical_boxes_probiou_is_about_0_9996(obb_reference):
  box = np.array([[10.0, 20.0, 5.0, 3.0, 0.3], [0.0, 0.0, 100.0, 1.0, -1.2]], np.float32)
  ref = obb_reference.probiou(box, box)
  np.testing.assert_allclose(ref, 0.99953, atol=2e-5)
  np.testing.assert_allclose(jaxtal.probiou(box, box), ref, atol=1e-7, rtol=0)


@pytest.mark.live
def test_live_half_turn_changes_only_the_dfl_part(obb_reference):
  """Ultralytics measures DFL distances along the target's own axes, so a GT angle moved by pi
  swaps l/r and t/b: the DFL part changes, box/cls/angle do not. jaxtal does the same."""
  case = obb_cases.loss_case("angles")
  kwargs, _ = obb_cases.split_loss_config(case["config"])
  x = case["inputs"]
  turned = dict(case, inputs=dict(x, label_rows=x["label_rows"] + np.array([0, 0, 0, 0, 0, 0, np.pi], np.float32)))
  ref = obb_reference.loss(x["feats"], x["angles"], turned["inputs"]["label_rows"], **kwargs)
  ref0 = obb_reference.loss(x["feats"], x["angles"], x["label_rows"], **kwargs)
  assert abs(ref["dfl"] - ref0["dfl"]) > 1e-3 * ref0["dfl"]
  for key in ("box", "cls", "angle"):
    np.testing.assert_allclose(ref[key], ref0[key], rtol=1e-5)
  assert_obb_loss_matches(run_obb_loss(turned), ref, where="[obb angles + pi live] ")


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.parametrize("name", [j.name for j in fixtures.jobs(("obb",))])
def test_fixture_script_reproduces_the_file(name, obb_reference, tmp_path):
  """``tests/make_fixtures.py --kind obb`` writes this committed file again (byte for byte here; see support.fixtures.assert_reproduces)."""
  fixtures.assert_reproduces(fixtures.job("obb", name), str(tmp_path))
