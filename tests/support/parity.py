"""Parity tolerances and comparisons of jaxtal's results with the reference's (Ultralytics 8.4.190),
shared by the parity tests and the fixture checker. Each test_parity_<x>.py states its rules in its
docstring; the helpers here implement the rules several of them share.
"""

from __future__ import annotations

import numpy as np
import pytest

# Assignment (test_parity_assign.py): target scores, and target boxes on the reference's positives.
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-6
BOX_RTOL, BOX_ATOL = 1e-6, 1e-4

# Losses (test_parity_detect.py and the tasks): total and parts, and per-level gradients.
LOSS_RTOL = 1e-4
GRAD_RATIO = 1e-3
SAME_RTOL = 1e-6  # two jaxtal spellings of one computation (module, layout)

# Target scores of the task losses (test_parity_obb.py, test_parity_segment.py): ProbIoU is rounded about
# ten times worse than CIoU in float32, and the align metric takes it to the power beta = 6, so scores
# get rtol 5e-5 (detection: 1e-5).
TASK_SCORE_RTOL, TASK_WEIGHT_ATOL = 5e-5, 1e-6


def params(names, fast):
  """``names`` as pytest parameters, those not in ``fast`` marked ``slow``."""
  return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def assert_assignment_matches(got: dict, ref: dict, where: str = "", score_rtol: float = SCORE_RTOL) -> None:
  """The comparison rules of test_parity_assign.py; ``got`` and ``ref`` map Assignment field names to arrays.
  ``score_rtol``: the target scores' rtol (the OBB assignment passes :data:`TASK_SCORE_RTOL`)."""
  for key, ndim in (("labels", 2), ("boxes", 3), ("scores", 3), ("fg_mask", 2), ("gt_index", 2)):
    assert got[key].shape == ref[key].shape, f"{where}{key}: shape {got[key].shape} != reference {ref[key].shape}"
    assert got[key].ndim == ndim, f"{where}{key}: rank {got[key].ndim}, expected {ndim}"
  np.testing.assert_allclose(got["scores"], ref["scores"], rtol=score_rtol, atol=SCORE_ATOL, err_msg=f"{where}scores")

  ref_pos = ref["scores"].sum(-1) > 0
  got_pos = got["scores"].sum(-1) > 0
  bad = ref_pos & ~got["fg_mask"]
  assert not bad.any(), f"{where}reference positives that are background in jaxtal at (image, anchor) {np.argwhere(bad)[:8].tolist()}"
  np.testing.assert_array_equal(got["gt_index"][ref_pos], ref["gt_index"][ref_pos], err_msg=f"{where}gt_index on positives")
  np.testing.assert_array_equal(got["labels"][ref_pos], ref["labels"][ref_pos], err_msg=f"{where}labels on positives")
  np.testing.assert_allclose(
      got["boxes"][ref_pos], ref["boxes"][ref_pos], rtol=BOX_RTOL, atol=BOX_ATOL, err_msg=f"{where}boxes on positives"
  )
  extra = got["fg_mask"] & got_pos & ~ref["fg_mask"]
  assert not extra.any(), f"{where}jaxtal positives that are background in the reference at {np.argwhere(extra)[:8].tolist()}"
  # Foreground disagreements are tie-order effects only: zero target score on both sides.
  differs = got["fg_mask"] != ref["fg_mask"]
  scored = ref_pos | got_pos
  assert not (differs & scored).any(), f"{where}fg differs on scored anchors {np.argwhere(differs & scored)[:8].tolist()}"
  # Background stays clean in jaxtal: no score, label 0, box 0, gt_index 0.
  bg = ~got["fg_mask"]
  assert not got["scores"][bg].any() and not got["labels"][bg].any() and not got["boxes"][bg].any()
  assert not got["gt_index"][bg].any()


def assert_loss_matches(total, parts, grads, ref: dict, where: str = "") -> None:
  """The loss rules of test_parity_detect.py: the total and each gain-scaled part (box, cls, dfl) within
  :data:`LOSS_RTOL`; for every level ``max|grad - ref grad| <= GRAD_RATIO * max|ref grad|``."""
  for key, value in (("total", total), ("box", parts.box), ("cls", parts.cls), ("dfl", parts.dfl)):
    np.testing.assert_allclose(value, ref[key], rtol=LOSS_RTOL, err_msg=f"{where}{key}")
  assert len(grads) == len(ref["grads"])
  for level, (g, rg) in enumerate(zip(grads, ref["grads"])):
    assert g.shape == rg.shape, f"{where}grad {level}: shape {g.shape} != reference {rg.shape}"
    assert np.isfinite(g).all(), f"{where}grad {level} is not finite"
    diff, scale = np.max(np.abs(g - rg)), np.max(np.abs(rg))
    assert diff <= GRAD_RATIO * scale, f"{where}grad {level}: max|diff| {diff:.3e} > {GRAD_RATIO} * max|ref| {scale:.3e}"


def assert_owners_match(out: dict, ref: dict, where: str = "") -> None:
  """The foreground equal, and its owner GT equal on every foreground anchor of the reference."""
  np.testing.assert_array_equal(out["fg_mask"], ref["fg_mask"], err_msg=f"{where}foreground")
  fg = ref["fg_mask"]
  np.testing.assert_array_equal(out["gt_index"][fg], ref["gt_index"][fg], err_msg=f"{where}owner GT on foreground")


# ----------------------------------------------------------------------------- error summaries (``--check``)


def grad_ratio(grads, ref_grads) -> float:
  """The worst level's ``max|grad - ref| / max|ref|``."""
  return max(float(np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-30)) for g, r in zip(grads, ref_grads))


def part_errors(out: dict, ref: dict) -> dict[str, float]:
  """``"<part> rel"``: the relative error of the total and each part of ``out["parts"]`` (absolute where the
  reference's is 0)."""
  errs = {}
  for key, value in (("total", out["total"]), *zip(out["parts"]._fields, out["parts"])):
    errs[f"{key} rel"] = abs(value - ref[key]) / abs(ref[key]) if ref[key] != 0 else abs(value)
  return errs


def obb_loss_errors(out: dict, ref: dict) -> dict[str, float]:
  """Relative errors of the total and parts, gradient ratios, and the worst target-score difference."""
  errs = part_errors(out, ref)
  errs["grad ratio"] = grad_ratio(out["grads"], ref["grads"])
  errs["angle grad ratio"] = grad_ratio(out["angle_grads"], ref["angle_grads"])
  errs["target score abs"] = float(np.max(np.abs(out["weights"] - ref["weights"]), initial=0.0))
  return errs


def pose_loss_errors(out: dict, ref: dict) -> dict[str, float]:
  """Relative errors of the total and parts (absolute where the reference's is 0), gradient ratios."""
  errs = part_errors(out, ref)
  errs["grad ratio"] = grad_ratio(out["grads"], ref["grads"])
  errs["kpt grad ratio"] = grad_ratio(out["kpt_grads"], ref["kpt_grads"])
  errs["foreground mismatches"] = float(np.sum(out["fg_mask"] != ref["fg_mask"]))
  return errs


def segment_loss_errors(out: dict, ref: dict) -> dict[str, float]:
  """Relative errors of the total and parts, gradient ratios, and the worst target-score difference."""
  errs = part_errors(out, ref)
  errs["grad ratio"] = grad_ratio(out["grads"], ref["grads"])
  errs["coef grad ratio"] = grad_ratio(out["coef_grads"], ref["coef_grads"])
  errs["proto grad ratio"] = grad_ratio([out["proto_grad"]], [ref["proto_grad"]])
  errs["target score abs"] = float(np.max(np.abs(out["weights"] - ref["weights"]), initial=0.0))
  return errs


def segment26_loss_errors(out: dict, ref: dict) -> dict[str, float]:
  """Relative errors of the total and parts (absolute where the reference's is 0) and the gradient ratios of every
  input (each branch's, end-to-end), and the worst target-score difference (not end-to-end)."""
  errs = part_errors(out, ref)
  for branch in ("o2m", "o2o") if "o2m" in out else (None,):
    o, r = (out, ref) if branch is None else (out[branch], ref[branch])
    tag = "" if branch is None else f"{branch} "
    errs[f"{tag}grad ratio"] = grad_ratio(o["grads"], r["grads"])
    errs[f"{tag}coef grad ratio"] = grad_ratio(o["coef_grads"], r["coef_grads"])
    errs[f"{tag}proto grad ratio"] = grad_ratio([o["proto_grad"]], [r["proto_grad"]])
    if "sem_grad" in r:
      errs[f"{tag}sem grad ratio"] = grad_ratio([o["sem_grad"]], [r["sem_grad"]])
  if "weights" in out:
    errs["target score abs"] = float(np.max(np.abs(out["weights"] - ref["weights"]), initial=0.0))
  return errs


def pose26_errors(out: dict, ref: dict) -> dict[str, float]:
  """Relative errors of the total and parts (absolute where the reference's is 0) and gradient ratios of every
  map and of the flow (end-to-end: both branches'), and the foreground mismatches of a loss case."""
  errs = part_errors(out, ref)
  for key in ("grads", "kpt_grads", "sigma_grads", "grads_o2o", "kpt_grads_o2o", "sigma_grads_o2o"):
    if key in ref:
      errs[f"{key} ratio"] = grad_ratio(out[key], ref[key])
  errs["flow grads ratio"] = flow_grad_ratio(out["flow_grads"], ref["flow_grads"])
  if "fg_mask" in ref:
    errs["foreground mismatches"] = float(np.sum(out["fg_mask"] != ref["fg_mask"]))
  return errs


def flow_grad_ratio(grads: dict, ref: dict) -> float:
  """The flow gradient's worst error ratio: per field ``max|grad - ref| / max|ref|`` over all fields; for a
  field stored projected (``<field>_proj``, ``<field>_norm``: ``pose26_cases.project_flow_grads``), ``max|D
  (grad - ref)| / |ref|_2`` over the stored directions ``D`` (about ``|grad - ref|_2 / |ref|_2``)."""
  from support import pose26_cases  # noqa: PLC0415

  scale = max(float(np.max(np.abs(v))) for k, v in ref.items() if not k.endswith(("_proj", "_norm")))
  worst = 0.0
  for k, v in ref.items():
    if k.endswith("_proj"):
      field = k[: -len("_proj")]
      proj = pose26_cases.flow_directions(field) @ np.asarray(grads[field], np.float64).reshape(-1)
      worst = max(worst, float(np.max(np.abs(proj - v))) / max(float(ref[field + "_norm"]), 1e-30))
    elif not k.endswith("_norm"):
      worst = max(worst, float(np.max(np.abs(np.asarray(grads[k]) - v))) / max(scale, 1e-30))
  return worst
