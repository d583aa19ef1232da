"""Parity of :func:`jaxtal.task_aligned_assign` with Ultralytics 8.4.190's ``TaskAlignedAssigner``.

Every case of ``cases.ASSIGN_CASES`` is checked twice: against its golden fixture
(``tests/fixtures/assign_<case>.npz``, no torch needed) and, marked ``live``, against the
reference run now through ``tests/reference.py``.

Comparison rules (:func:`assert_assignment_matches`):

* target scores ``(b, A, nc)`` are allclose everywhere in float32 (``rtol=1e-5``, ``atol=1e-6``);
* on every anchor whose reference target-score sum is ``> 0`` (a real positive): ``fg_mask``
  is True on both sides, ``gt_index`` and ``labels`` are equal and the target box is
  allclose (``rtol=1e-6``, ``atol=1e-4`` pixels);
* every jaxtal foreground anchor with a positive target score is foreground in the reference;
* foreground may differ only on anchors whose target score is 0 on both sides. Such anchors
  have a zero align metric (an in-box anchor whose CIoU is clamped to 0): when a GT has fewer
  than ``topk`` anchors of positive metric, its top-k list is filled with zero-metric
  anchors, and which ones is the order of equal values in top-k, unspecified for
  ``torch.topk`` while jaxtal's ``lax.top_k`` takes the lower anchor index. Those anchors
  carry no class target (score 0) and no box-loss weight, so they do not change the loss;
  their ``gt_index``/``labels``/``boxes`` are not compared (the reference also fills
  background anchors with GT 0's label and box, jaxtal with zeros).

``gt_chunk`` (blocks of GTs scanned with ``lax.scan``) must give exactly the dense result.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import cases
import jaxtal

SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-6
BOX_RTOL, BOX_ATOL = 1e-6, 1e-4


def _gt(inputs) -> jaxtal.GroundTruth:
  return jaxtal.GroundTruth(inputs["gt_labels"], inputs["gt_boxes"], inputs["gt_mask"])


def _assign_args(inputs):
  return inputs["pred_scores"], inputs["pred_boxes"], inputs["anchor_points"], _gt(inputs)


@functools.partial(jax.jit, static_argnames="config")
def _assign_jit(pred_scores, pred_boxes, anchor_points, gt, *, config):
  return jaxtal.task_aligned_assign(pred_scores, pred_boxes, anchor_points, gt, config)


def run_jaxtal(case: dict, gt_chunk: int | None = None) -> dict:
  """jaxtal's assignment of a case (jitted, the case's config as a static AssignerConfig) as NumPy arrays."""
  config = jaxtal.AssignerConfig(**case["config"], gt_chunk=gt_chunk)
  out = _assign_jit(*_assign_args(case["inputs"]), config=config)
  return {k: np.asarray(v) for k, v in out._asdict().items()}


def assert_assignment_matches(got: dict, ref: dict, where: str = "") -> None:
  """The comparison rules of the module docstring; ``got`` and ``ref`` map Assignment field names to arrays."""
  for key, ndim in (("labels", 2), ("boxes", 3), ("scores", 3), ("fg_mask", 2), ("gt_index", 2)):
    assert got[key].shape == ref[key].shape, f"{where}{key}: shape {got[key].shape} != reference {ref[key].shape}"
    assert got[key].ndim == ndim, f"{where}{key}: rank {got[key].ndim}, expected {ndim}"
  np.testing.assert_allclose(got["scores"], ref["scores"], rtol=SCORE_RTOL, atol=SCORE_ATOL, err_msg=f"{where}scores")

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


# ----------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", cases.ASSIGN_CASES)
def test_golden(name):
  case, ref, version = cases.load_fixture("assign", name)
  assert version == "8.4.190"
  assert_assignment_matches(run_jaxtal(case), ref, where=f"[{name}] ")


@pytest.mark.parametrize("name", cases.ASSIGN_CASES)
def test_fixture_inputs_match_builders(name):
  """The stored inputs are what ``cases.py`` builds now (a stale fixture would test something else)."""
  stored, _, _ = cases.load_fixture("assign", name)
  built = cases.assign_case(name)
  assert stored["config"] == built["config"]
  assert set(stored["inputs"]) == set(built["inputs"])
  for key, value in built["inputs"].items():
    # Head-decoded predictions move by float32 rounding across jax versions, and jaxtal's DFL
    # kernel divides once per side (sum(e * i) / sum(e)) where the fixtures normalised per bin:
    # a few ulps of a distance of up to 16 bins, times strides of up to 320 pixels.
    np.testing.assert_allclose(stored["inputs"][key], value, rtol=1e-5, atol=1e-4, err_msg=key)


def test_golden_cases_have_positives_and_padding():
  """The cases exercise what they claim: positives, padding slots, empty images."""
  positives = {}
  for name in cases.ASSIGN_CASES:
    case, ref, _ = cases.load_fixture("assign", name)
    x = case["inputs"]
    counts = x["gt_mask"].sum(1)
    assert x["gt_mask"].shape[1] > counts.min(), f"{name}: no padding slot"
    positives[name] = int((ref["scores"].sum(-1) > 0).sum())
  assert positives["all_empty"] == 0
  assert all(v > 0 for k, v in positives.items() if k != "all_empty"), positives
  x = cases.load_fixture("assign", "empty_images")[0]["inputs"]
  assert (x["gt_mask"].sum(1) == 0).any() and (x["gt_mask"].sum(1) > 0).any()
  x = cases.load_fixture("assign", "nc80_small")[0]["inputs"]
  assert x["pred_scores"].shape[-1] == 80
  assert len(set(x["gt_mask"].sum(1).tolist())) > 1 and x["gt_mask"].shape[1] > x["gt_mask"].sum(1).max()
  # The widened in-box test of min_box_side = strides[1] gives tiny boxes more positives.
  assert positives["tiny_boxes_side_stride1"] > positives["tiny_boxes_side0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["seed", "near_gt"])
def test_golden_eager(name):
  """The golden comparison without jit (op by op: ~10 s of compiles each on CPU, hence slow)."""
  case, ref, _ = cases.load_fixture("assign", name)
  got = jaxtal.task_aligned_assign(*_assign_args(case["inputs"]), **case["config"])
  assert_assignment_matches({k: np.asarray(v) for k, v in got._asdict().items()}, ref, where=f"[{name} eager] ")


def test_positives_per_gt_match_the_reference_positives():
  """positives_per_gt counts each GT's foreground anchors; on the golden cases it equals, per GT, the reference's
  anchors with a positive target score plus jaxtal's zero-score foreground anchors of that GT."""
  for name in cases.ASSIGN_CASES:
    case, ref, _ = cases.load_fixture("assign", name)
    got = run_jaxtal(case)
    m = case["inputs"]["gt_labels"].shape[1]
    pos = ref["scores"].sum(-1) > 0
    zero_fg = got["fg_mask"] & ~(got["scores"].sum(-1) > 0)
    for i in range(pos.shape[0]):
      want = np.bincount(ref["gt_index"][i][pos[i]], minlength=m) + np.bincount(got["gt_index"][i][zero_fg[i]], minlength=m)
      np.testing.assert_array_equal(got["positives_per_gt"][i], want, err_msg=f"{name}, image {i}")
    np.testing.assert_array_equal(got["positives_per_gt"][~case["inputs"]["gt_mask"]], 0)


@pytest.mark.parametrize(("name", "gt_chunk"), [("near_gt", 1), ("near_gt", 2), ("topk2", 3)])
def test_gt_chunk_matches_dense(name, gt_chunk):
  """Blocks of GTs give the dense assignment: the same anchors, GTs and boxes exactly.

  Scores agree to float32 rounding only: XLA compiles the CIoU inside the ``lax.scan``
  body differently from the dense one (about 1e-7 apart), so they use the parity tolerance.
  """
  case, ref, _ = cases.load_fixture("assign", name)
  m = case["inputs"]["gt_labels"].shape[1]
  dense = run_jaxtal(case, gt_chunk=m)
  chunked = run_jaxtal(case, gt_chunk=gt_chunk)
  for key in ("labels", "boxes", "fg_mask", "gt_index"):
    np.testing.assert_array_equal(chunked[key], dense[key], err_msg=f"{name} gt_chunk={gt_chunk}: {key}")
  np.testing.assert_allclose(chunked["scores"], dense["scores"], rtol=SCORE_RTOL, atol=SCORE_ATOL)
  assert_assignment_matches(chunked, ref, where=f"[{name} gt_chunk={gt_chunk}] ")


# ----------------------------------------------------------------------------- live


@pytest.mark.live
@pytest.mark.parametrize("name", cases.ASSIGN_CASES)
def test_live(name, reference):
  case = cases.assign_case(name)
  x = case["inputs"]
  ref = reference.assign(
      x["pred_scores"], x["pred_boxes"], x["anchor_points"], x["gt_labels"], x["gt_boxes"], x["gt_mask"], **case["config"]
  )
  assert_assignment_matches(run_jaxtal(case), ref, where=f"[{name} live] ")
