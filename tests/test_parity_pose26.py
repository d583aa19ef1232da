"""Parity of YOLO26 pose with Ultralytics 8.4.190: ``PoseTaskAlignedAssigner``, ``PoseLoss26`` and ``E2ELoss(model,
PoseLoss26)``.

Every case of ``pose26_cases`` is checked against its golden fixture (``tests/fixtures/pose26_*.npz``, no torch
needed) and, marked ``live``, against the reference run now through ``tests/support/pose26_reference.py`` (skipped
when it cannot be imported, failed instead under ``JAXTAL_REQUIRE_REFERENCE=1``). jaxtal runs ``jax.value_and_grad``
of ``pose26_loss(..., layout="NCHW")`` (or ``end_to_end_loss(pose26_loss, ...)``) w.r.t. the head, keypoint and sigma
maps and the flow's parameters, jitted. Both sides load the same flow (``pose26_flow.npz``), drawn far from the
reference's near-identity init so that the RLE term and its gradients are informative.

Comparison rules (:func:`assert_pose26_matches`): ``support.parity.assert_loss_matches`` for the total, box/cls/dfl
and the head-map gradients; the total and all six parts within ``rtol=1e-5`` (``atol=1e-7``); the keypoint, sigma
and flow gradients within ``max|grad - ref| <= 1e-4 max|ref|`` (per list of levels; the flow's over its fields,
its two hidden ``(6, 64, 64)`` fields compared in the fixtures through fixed random projections,
``pose26_cases.project_flow_grads``); for a single loss the foreground of the assignment inside the loss equal, its
owner GT equal on the foreground (the pose, kobj and RLE terms count every foreground anchor) and the target-score
sums allclose. End to end: the total and the one-to-one parts, and the gradients of both branches' maps and of the
shared flow. The assignment alone (``pose_task_aligned_assign``): ``parity.assert_assignment_matches``.

No case has tied zero-metric top-k candidates (``pose26_cases.TIE_CASES`` is empty): every case matches the native
reference, and the OKS of candidate pairs stays far from float32's denormals, which XLA on CPU flushes to 0.
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxtal
from support import cases, fixtures, parity, pose26_cases
from support.parity import assert_assignment_matches, assert_loss_matches, assert_owners_match, params
from support.runners import run_pose26_assign, run_pose26_e2e, run_pose26_loss

RTOL, PART_ATOL = 1e-5, 1e-7
GRAD_RATIO = 1e-4
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-6

# One configuration compiles once (seconds); the default run keeps one loss case (golden and live share its
# compilation) and one assignment case; ``-m slow`` runs the rest (the non-finite sigma check among them).
FAST = ("gate",)
FAST_ASSIGN = ("gate",)


def _ref_args(case: dict):
  kwargs, _ = pose26_cases.split_config(case["config"])
  x = case["inputs"]
  return (x["feats"], x["kpts"], x["kpt_sigmas"], x["label_rows"], x["keypoints"], x["flow"]), kwargs


def _grad_ratio(grads, ref_grads, where: str, name: str) -> None:
  assert len(grads) == len(ref_grads) and all(np.isfinite(g).all() and g.shape == r.shape for g, r in zip(grads, ref_grads)), f"{where}{name}"
  scale = max(float(np.abs(r).max()) for r in ref_grads)
  worst = max(float(np.abs(g - r).max()) for g, r in zip(grads, ref_grads))
  assert worst <= GRAD_RATIO * scale + 1e-12, f"{where}{name}: max|diff| {worst:.3e} > {GRAD_RATIO} * max|ref| {scale:.3e}"


def assert_pose26_matches(out: dict, ref: dict, where: str = "") -> None:
  """The comparison rules of the module docstring (a single loss, or end to end when ``ref`` has ``grads_o2o``)."""
  assert_loss_matches(out["total"], out["parts"], out["grads"], ref, where)
  assert out["parts"]._fields == ("box", "pose", "kobj", "cls", "dfl", "rle")
  np.testing.assert_allclose(out["total"], ref["total"], rtol=RTOL, err_msg=f"{where}total")
  for key, value in zip(out["parts"]._fields, out["parts"]):
    np.testing.assert_allclose(value, ref[key], rtol=RTOL, atol=PART_ATOL, err_msg=f"{where}{key}")
  for key in ("kpt_grads", "sigma_grads", "grads_o2o", "kpt_grads_o2o", "sigma_grads_o2o"):
    if key in ref:
      _grad_ratio(out[key], ref[key], where, key)
  assert all(np.isfinite(v).all() for v in out["flow_grads"].values()), f"{where}flow grads"
  worst = parity.flow_grad_ratio(out["flow_grads"], ref["flow_grads"])
  assert worst <= GRAD_RATIO, f"{where}flow grads: error ratio {worst:.3e} > {GRAD_RATIO}"
  if "fg_mask" in ref:
    assert_owners_match(out, ref, where)
    np.testing.assert_allclose(out["weights"], ref["weights"], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, err_msg=f"{where}target scores")


# ----------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", params(pose26_cases.POSE26_CASES, FAST))
def test_golden_loss(name):
  case, ref, version = pose26_cases.load_fixture("pose26", name)
  assert version == "8.4.190"
  assert_pose26_matches(run_pose26_loss(case), ref, where=f"[pose26 {name}] ")


@pytest.mark.slow
@pytest.mark.parametrize("name", pose26_cases.E2E_CASES)
def test_golden_end_to_end(name):
  case, ref, _ = pose26_cases.load_fixture("pose26_e2e", name)
  assert_pose26_matches(run_pose26_e2e(case), ref, where=f"[pose26 e2e {name}] ")


@pytest.mark.parametrize("name", params(pose26_cases.ASSIGN_CASES, FAST_ASSIGN))
def test_golden_assign(name):
  case, ref, _ = pose26_cases.load_fixture("pose26_assign", name)
  assert_assignment_matches(run_pose26_assign(case), ref, where=f"[pose26 assign {name}] ")


def _assert_same_case(stored: dict, built: dict, where: str) -> None:
  flow_s, flow_b = stored["inputs"].pop("flow", None), built["inputs"].pop("flow", None)
  cases.assert_case_equal(stored, built, where=where)
  if flow_b is not None:
    for k in pose26_cases.FLOW_FIELDS:
      np.testing.assert_array_equal(flow_s[k], flow_b[k], err_msg=f"{where}flow {k}")


def test_fixture_inputs_match_builders():
  """The stored inputs are what ``pose26_cases.py`` builds now (a stale fixture would test something else)."""
  for name in pose26_cases.POSE26_CASES:
    _assert_same_case(pose26_cases.load_fixture("pose26", name)[0], pose26_cases.loss_case(name), f"[pose26 {name}] ")
  for name in pose26_cases.E2E_CASES:
    _assert_same_case(pose26_cases.load_fixture("pose26_e2e", name)[0], pose26_cases.e2e_case(name), f"[e2e {name}] ")
  for name in pose26_cases.ASSIGN_CASES:
    _assert_same_case(pose26_cases.load_fixture("pose26_assign", name)[0], pose26_cases.assign_case(name), f"[assign {name}] ")
  flow = pose26_cases.load_flow()
  for k, v in pose26_cases.flow_arrays().items():
    np.testing.assert_array_equal(flow[k], v, err_msg=f"flow {k}")


def _levels(case: dict) -> np.ndarray:
  """``(A,)`` the pyramid level of each anchor."""
  image = pose26_cases.image_size(case)
  return np.concatenate([np.full(h * w, i) for i, (h, w) in enumerate(cases.level_shapes(image, case["config"]["strides"]))])


def test_golden_cases_are_informative():
  """The cases exercise what they claim: positives in every labelled case, an RLE term (and a flow gradient) except
  where it is clamped, kobj only with D = 3, the level gate closing level 0 for a large GT and falling back for a
  thin one, GTs without visible keypoints owning anchors through the box CIoU, D = 2 ground truth, COCO-17 (its
  RLE weights), the default side floor, empty images and batches."""
  for name in pose26_cases.POSE26_CASES:
    case, ref, _ = pose26_cases.load_fixture("pose26", name)
    flow_moves = any(np.abs(v).max() > 0 for v in ref["flow_grads"].values())
    if case["inputs"]["label_rows"].shape[0] == 0:
      assert ref["box"] == ref["pose"] == ref["kobj"] == ref["dfl"] == ref["rle"] == 0.0 and ref["cls"] > 0, name
      assert not flow_moves and not any(g.any() for g in ref["kpt_grads"] + ref["sigma_grads"]), name
      continue
    assert ref["fg_mask"].sum() > 0 and min(ref["box"], ref["pose"], ref["cls"], ref["dfl"]) > 0, name
    assert (ref["kobj"] > 0) == (case["config"]["kpt_shape"][1] == 3), name
    if name == "rle_clamped":
      assert ref["rle"] == 0.0 and not flow_moves and not any(g.any() for g in ref["sigma_grads"]), name
    else:
      assert ref["rle"] > 0 and flow_moves and any(g.any() for g in ref["sigma_grads"]), name
  # The gate: image 0's 110 px GT (slot 0) owns no level-0 anchor; the thin 4 x 60 px GT (slot 1), whose only level
  # (0) has no anchor centre inside it, owns level-1 anchors (its ungated candidates).
  case, ref, _ = pose26_cases.load_fixture("pose26", "gate")
  level, fg, owner = _levels(case), ref["fg_mask"][0], ref["gt_index"][0]
  assert fg[owner == 0].any() and not (fg & (owner == 0) & (level == 0)).any()
  assert (fg & (owner == 1)).any() and set(level[fg & (owner == 1)]) == {1}
  # GTs whose keypoints are all invisible own anchors (their overlap is the box CIoU).
  case, ref, _ = pose26_cases.load_fixture("pose26", "invisible")
  gt = pose26_cases.gt_of(case)
  hidden = np.asarray(gt.mask) & (np.asarray(gt.keypoints)[..., 2] <= 0).all(-1)
  assert hidden.any() and any((ref["fg_mask"][i] & (ref["gt_index"][i] == j)).any() for i, j in np.argwhere(hidden))
  assert pose26_cases.load_fixture("pose26", "k4_d2")[0]["inputs"]["keypoints"].shape[-1] == 2
  assert pose26_cases.load_fixture("pose26", "coco")[0]["config"]["kpt_shape"] == (17, 3)
  assert pose26_cases.load_fixture("pose26", "side_default")[0]["config"]["min_box_side"] is None
  assert set(pose26_cases.load_fixture("pose26", "empty_images")[0]["inputs"]["label_rows"][:, 0].astype(int)) == {1}
  for name in pose26_cases.E2E_CASES:
    ref = pose26_cases.load_fixture("pose26_e2e", name)[1]
    assert ref["rle"] > 0 and any(g.any() for g in ref["sigma_grads"]) and any(g.any() for g in ref["sigma_grads_o2o"])


@pytest.mark.slow
def test_the_oks_geometry_decides_the_foreground():
  """The assignment matters (so the parity above can fail): with the detection assigner (box CIoU, no gate) or
  without the level gate, jaxtal's foreground differs from the reference's on the gate case."""
  case, ref, _ = pose26_cases.load_fixture("pose26_assign", "gate")
  x = case["inputs"]
  gt = jaxtal.GroundTruth(x["gt_labels"], x["gt_boxes"], x["gt_mask"])
  box = jaxtal.task_aligned_assign(x["pred_scores"], x["pred_boxes"], x["anchor_points"], gt, min_box_side=case["config"]["min_box_side"])
  assert (np.asarray(box.fg_mask) != ref["fg_mask"]).any()
  ungated = run_pose26_assign(dict(case, config=dict(case["config"], level_range=(0.0, float("inf")))))
  assert (ungated["fg_mask"] != ref["fg_mask"]).any()


# ----------------------------------------------------------------------------- live


@pytest.mark.live
@pytest.mark.parametrize("name", params(pose26_cases.POSE26_CASES, FAST))
def test_live_loss(name, pose26_reference):
  case = pose26_cases.loss_case(name)
  args, kwargs = _ref_args(case)
  assert_pose26_matches(run_pose26_loss(case), pose26_reference.loss(*args, **kwargs), where=f"[pose26 {name} live] ")


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.parametrize("name", pose26_cases.E2E_CASES)
def test_live_end_to_end(name, pose26_reference):
  case = pose26_cases.e2e_case(name)
  kwargs, _ = pose26_cases.split_config(case["config"])
  x = case["inputs"]
  ref = pose26_reference.e2e_loss(
      (x["feats"], x["kpts"], x["kpt_sigmas"]), (x["feats_o2o"], x["kpts_o2o"], x["kpt_sigmas_o2o"]), x["label_rows"],
      x["keypoints"], x["flow"], **kwargs,
  )
  assert_pose26_matches(run_pose26_e2e(case), ref, where=f"[pose26 e2e {name} live] ")


@pytest.mark.live
@pytest.mark.parametrize("name", params(pose26_cases.ASSIGN_CASES, FAST_ASSIGN))
def test_live_assign(name, pose26_reference):
  case = pose26_cases.assign_case(name)
  assert_assignment_matches(run_pose26_assign(case), fixtures.reference_pose26_assign(pose26_reference, case), where=f"[assign {name} live] ")


@pytest.mark.live
@pytest.mark.slow
def test_live_non_finite_sigma_logits_drop_their_rows(pose26_reference):
  """NaN sigma logits at foreground anchors: the reference drops those keypoints' RLE rows, and so does jaxtal, with a
  finite gradient (the reference's is NaN at the NaN inputs only); +-inf logits saturate (sigma 1, or the float32
  floor with its residual clipped to 100) and are kept by both."""
  case = pose26_cases.loss_case(FAST[0])
  args, kwargs = _ref_args(case)
  base = pose26_reference.loss(*args, **kwargs)
  sig = [s.copy() for s in case["inputs"]["kpt_sigmas"]]
  level0 = sig[0].reshape(*sig[0].shape[:2], -1)  # (b, 2K, A_0), a view
  fg = np.argwhere(base["fg_mask"][:, : level0.shape[-1]])
  for (i, a), value in zip(fg[::3], [np.nan, np.inf, -np.inf] * 4):
    level0[i, [0, 3, 5], a] = value
  case["inputs"]["kpt_sigmas"] = sig
  args, _ = _ref_args(case)
  ref = pose26_reference.loss(*args, **kwargs)
  out = run_pose26_loss(case)
  assert abs(ref["rle"] - base["rle"]) > 1e-3 * base["rle"]  # the spoiled logits mattered
  nan_inputs = [np.isnan(s) for s in sig]
  assert any(m.any() for m in nan_inputs) and any(np.isnan(g).any() for g in ref["sigma_grads"])
  assert all(np.isfinite(g).all() for g in out["sigma_grads"]) and all(not g[m].any() for g, m in zip(out["sigma_grads"], nan_inputs))
  ref["sigma_grads"] = [np.where(m, 0.0, g) for g, m in zip(ref["sigma_grads"], nan_inputs)]
  # The reference's NaN also reaches the x, y gradient of those keypoints (of those labelled: 0 * NaN through the
  # residual), and only there; jaxtal's is the pose term's alone, finite: compared everywhere else.
  k, d = case["config"]["kpt_shape"]
  for level, (g, m) in enumerate(zip(ref["kpt_grads"], nan_inputs)):
    b, _, h, w = m.shape
    nan_kpt = m.reshape(b, k, 2, h, w).any(2)  # (b, K, H, W): a keypoint with a NaN sigma logit
    want = np.zeros((b, k, d, h, w), bool)
    want[:, :, :2] = nan_kpt[:, :, None]
    assert not (np.isnan(g) & ~want.reshape(g.shape)).any(), f"level {level}"
    ref["kpt_grads"][level] = np.where(np.isnan(g), out["kpt_grads"][level], g)
  assert_pose26_matches(out, ref, where="[pose26 non-finite sigmas] ")


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.parametrize("name", [j.name for j in fixtures.jobs(("pose26",))])
def test_fixture_script_reproduces_the_file(name, pose26_reference, tmp_path):
  """``tests/make_fixtures.py --kind pose26`` writes this committed file again (see support.fixtures.assert_reproduces)."""
  fixtures.assert_reproduces(fixtures.job("pose26", name), str(tmp_path))
