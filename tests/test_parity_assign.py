"""Parity of :func:`jaxtal.task_aligned_assign` with Ultralytics 8.4.190's ``TaskAlignedAssigner``.

Every case of ``cases.ASSIGN_CASES`` is checked twice: against its golden fixture
(``tests/fixtures/assign_<case>.npz``, no torch needed) and, marked ``live``, against the
reference run now through ``tests/support/reference.py``.

Comparison rules (``support.parity.assert_assignment_matches``):

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

import numpy as np
import pytest

import jaxtal
from support import cases, fixtures
from support.parity import SCORE_ATOL, SCORE_RTOL, assert_assignment_matches
from support.runners import assign_args, run_assign


# ----------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", cases.ASSIGN_CASES)
def test_golden(name):
  case, ref, version = cases.load_fixture("assign", name)
  assert version == "8.4.190"
  assert_assignment_matches(run_assign(case), ref, where=f"[{name}] ")


@pytest.mark.parametrize("name", cases.ASSIGN_CASES)
def test_fixture_inputs_match_builders(name):
  """The stored inputs are what ``cases.py`` builds now (a stale fixture would test something else)."""
  stored, _, _ = cases.load_fixture("assign", name)
  built = cases.assign_case(name)
  assert stored["config"] == built["config"]
  assert set(stored["inputs"]) == set(built["inputs"])
  for key, value in built["inputs"].items():
    # Head-decoded predictions (``cases.decode_head``: eager jax, pinned to the decode the fixtures
    # were made with, not jaxtal's kernel) can move by float32 rounding across jax versions: a few
    # ulps of a distance of up to 16 bins, times strides of up to 320 pixels.
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
  got = jaxtal.task_aligned_assign(*assign_args(case["inputs"]), **case["config"])
  assert_assignment_matches({k: np.asarray(v) for k, v in got._asdict().items()}, ref, where=f"[{name} eager] ")


def test_positives_per_gt_match_the_reference_positives():
  """positives_per_gt counts each GT's foreground anchors; on the golden cases it equals, per GT, the reference's
  anchors with a positive target score plus jaxtal's zero-score foreground anchors of that GT."""
  for name in cases.ASSIGN_CASES:
    case, ref, _ = cases.load_fixture("assign", name)
    got = run_assign(case)
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
  dense = run_assign(case, gt_chunk=m)
  chunked = run_assign(case, gt_chunk=gt_chunk)
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
  assert_assignment_matches(run_assign(case), ref, where=f"[{name} live] ")


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.parametrize("name", [j.name for j in fixtures.jobs(("assign",))])
def test_fixture_script_reproduces_the_file(name, reference, tmp_path):
  """``tests/make_fixtures.py --kind assign`` writes this committed file again (byte for byte here; see support.fixtures.assert_reproduces)."""
  fixtures.assert_reproduces(fixtures.job("assign", name), str(tmp_path))
