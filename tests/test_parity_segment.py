"""Parity of :func:`jaxtal.segment_loss` with Ultralytics 8.4.190's ``v8SegmentationLoss``.

Every case of ``segment_cases.SEGMENT_CASES`` (NCHW head maps, mask coefficients and prototypes,
YOLO label rows and the reference's masks) is checked against its golden fixture
(``tests/fixtures/segment_<case>.npz``) and, marked ``live``, against the reference run now
through ``tests/support/segment_reference.py``. jaxtal runs ``jax.value_and_grad`` of
``segment_loss(..., layout="NCHW")`` w.r.t. the head maps, the coefficient maps and the
prototypes, jitted.

The cases cover the index-map masks (``overlap_mask=True``) and per-slot masks (False, bool
and float), masks at the prototypes' resolution, at a higher one and at a lower, non-square one
(the prototypes are resized), empty images, an all-empty batch, ``reg_max = 1`` and overlapping
instances (every case but the empty ones).

Comparison rules (the detection rules, ``support.parity.assert_loss_matches``, shared):
the total and each gain-scaled part (box, seg, cls, dfl) within ``rtol=1e-4``; for every
level's head map, every level's coefficient map and the prototypes, ``max|grad - ref| <= 1e-3 *
max|ref|``; the assignment inside the loss as in ``test_parity_obb`` (target-score sums
allclose, foreground and owner GT equal on every foreground anchor of the reference).

The mask term counts every foreground anchor, zero-score ones included, so it depends on the
order of tied zero-metric anchors in top-k (see ``jaxtal/segment.py``). The golden fixtures
hold the reference run with stable ties (``reference.stable_ties()``, jaxtal's order); the live
tests run both orders: the stable one must match every case, the native one every case but
``ties`` (``segment_cases.NATIVE_TIES_DIFFER``), where it must *not* match (so the stable-tie
comparison is not vacuous).
"""

from __future__ import annotations

import numpy as np
import pytest

from support import cases, fixtures, segment_cases
from support.parity import LOSS_RTOL, assert_loss_matches, assert_owners_match, params
from support.parity import TASK_SCORE_RTOL as SCORE_RTOL
from support.parity import TASK_WEIGHT_ATOL as WEIGHT_ATOL
from support.runners import run_segment_loss


# Each case compiles the loss once (about 5 s on CI's CPUs): the default run keeps one case, ``ties``
# (golden, live with stable ties, live with native ties: one compilation), ``-m slow`` runs the rest.
FAST = ("ties",)


def assert_segment_loss_matches(out: dict, ref: dict, where: str = "") -> None:
  """The comparison rules of the module docstring."""
  assert_loss_matches(out["total"], out["parts"], out["grads"], ref, where)
  np.testing.assert_allclose(out["parts"].seg, ref["seg"], rtol=LOSS_RTOL, err_msg=f"{where}seg")
  pairs = (("coefs", out["coef_grads"], ref["coef_grads"]), ("proto", [out["proto_grad"]], [ref["proto_grad"]]))
  for key, grads, ref_grads in pairs:
    assert_loss_matches(out["total"], out["parts"], grads, dict(ref, grads=ref_grads), f"{where}{key}: ")
  np.testing.assert_allclose(
      out["weights"], ref["weights"], rtol=SCORE_RTOL, atol=WEIGHT_ATOL, err_msg=f"{where}target scores"
  )
  assert_owners_match(out, ref, where)


# ----------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", params(segment_cases.SEGMENT_CASES, FAST))
def test_golden_loss(name):
  case, ref, version = segment_cases.load_fixture(name)
  assert version == "8.4.190"
  assert_segment_loss_matches(run_segment_loss(case), ref, where=f"[segment {name}] ")


@pytest.mark.parametrize("name", params(segment_cases.SEGMENT_CASES, FAST + ("downsampled",)))
def test_golden_loss_over_box_windows(name):
  """The mask term over 4 x 4 box windows (``mask_window=4``; the cases' planes are too small for the
  automatic windows) matches the reference too: index maps and per-slot masks, resized prototypes."""
  case, ref, _ = segment_cases.load_fixture(name)
  assert_segment_loss_matches(run_segment_loss(case, mask_window=4), ref, where=f"[segment {name}, windows] ")


def test_fixture_inputs_match_builders():
  """The stored inputs are what ``segment_cases.py`` builds now (a stale fixture would test something else)."""
  for name in segment_cases.SEGMENT_CASES:
    cases.assert_case_equal(segment_cases.load_fixture(name)[0], segment_cases.loss_case(name), f"{name}: ")


def test_golden_cases_are_informative():
  """The cases exercise what they claim: positives and a non-zero mask term, padding, empty images and
  batch, each mask resolution, overlapping instances, empty masks, zero-score foreground anchors."""
  proto_hw = (16, 16)
  for name in segment_cases.SEGMENT_CASES:
    case, ref, _ = segment_cases.load_fixture(name)
    x, cfg = case["inputs"], case["config"]
    counts = np.bincount(x["label_rows"][:, 0].astype(int), minlength=x["feats"][0].shape[0])
    assert cfg["max_boxes"] > counts.max(), f"{name}: no padding slot"
    if name == "empty_batch":
      assert not ref["fg_mask"].any() and ref["seg"] == ref["box"] == ref["dfl"] == 0.0 and ref["cls"] > 0.0
      continue
    assert min(ref["box"], ref["seg"], ref["cls"], ref["dfl"]) > 0.0, name
    assert np.abs(ref["proto_grad"]).max() > 0 and max(np.abs(g).max() for g in ref["coef_grads"]) > 0, name
    mask_hw = x["masks"].shape[-2:]
    assert (tuple(mask_hw) == proto_hw) == (name not in ("upsampled", "downsampled")), name
    if name == "empty_images":
      assert (counts == 0).sum() == 2 and not ref["fg_mask"][counts == 0].any()
  # Overlapping instances: boxes that intersect (the index map draws later ones over earlier ones),
  # per-instance masks that share pixels, and an instance with an empty mask.
  rows = segment_cases.load_fixture("overlap")[0]["inputs"]["label_rows"]
  rows = rows[rows[:, 0] == 0]
  lo, hi = rows[:, 2:4] - rows[:, 4:6] / 2, rows[:, 2:4] + rows[:, 4:6] / 2
  meet = (np.minimum(hi[:, None], hi[None]) > np.maximum(lo[:, None], lo[None])).all(-1)
  assert (meet & ~np.eye(len(rows), dtype=bool)).any()
  per = segment_cases.load_fixture("per_instance")[0]["inputs"]["masks"]
  assert (per[:3].sum(0) > 1).any() and not per.reshape(len(per), -1).any(1).all()
  assert segment_cases.load_fixture("downsampled")[0]["inputs"]["masks"].shape[-2:] == (12, 10)
  assert segment_cases.load_fixture("upsampled")[0]["inputs"]["masks"].shape[-2:] == (32, 32)
  ties = segment_cases.load_fixture("ties")[1]
  assert (ties["fg_mask"] & (ties["weights"] == 0)).sum() >= 5  # zero-score foreground anchors


# ----------------------------------------------------------------------------- live


@pytest.mark.live
@pytest.mark.parametrize("name", params(segment_cases.SEGMENT_CASES, FAST))
def test_live_loss_stable_ties(name, segment_reference):
  case = segment_cases.loss_case(name)
  ref = segment_cases.reference_loss(segment_reference, case, stable=True)
  assert_segment_loss_matches(run_segment_loss(case), ref, where=f"[segment {name} live, stable ties] ")


@pytest.mark.live
@pytest.mark.parametrize("name", params(segment_cases.SEGMENT_CASES, FAST))
def test_live_loss_native_ties(name, segment_reference):
  """The native reference matches every case but ``ties``, where its top-k order of tied zero-metric anchors
  picks other foreground anchors, so its mask term (only) differs from jaxtal's."""
  case = segment_cases.loss_case(name)
  ref = segment_cases.reference_loss(segment_reference, case, stable=False)
  out = run_segment_loss(case)
  if name not in segment_cases.NATIVE_TIES_DIFFER:
    assert_segment_loss_matches(out, ref, where=f"[segment {name} live, native ties] ")
    return
  for key in ("box", "cls", "dfl"):
    np.testing.assert_allclose(getattr(out["parts"], key), ref[key], rtol=LOSS_RTOL, err_msg=key)
  assert not np.array_equal(out["fg_mask"], ref["fg_mask"])
  assert abs(out["parts"].seg - ref["seg"]) > 10 * LOSS_RTOL * abs(ref["seg"])
  with pytest.raises(AssertionError):
    assert_segment_loss_matches(out, ref)


@pytest.mark.live
@pytest.mark.slow
def test_live_zero_area_box_makes_only_the_reference_nan(segment_reference):
  """A zero-width GT box in the top-left corner: the reference's in-box test widens it to ``min_box_side``, and
  its top-k of zero metrics (stable ties: the lowest anchors) keeps the anchors it then contains, so it owns
  anchors of zero score whose mask term divides by its zero area: NaN. In jaxtal it owns nothing (a
  deliberate difference); box, cls and dfl, where such anchors weigh 0, agree."""
  case = segment_cases.loss_case("overlap")
  rows = case["inputs"]["label_rows"].copy()
  rows[0, 2:6] = [0.1, 0.1, 0.0, 0.2]  # image 0, slot 0: 6.4 px from the left, no width
  case = dict(case, inputs=dict(case["inputs"], label_rows=rows))
  ref = segment_cases.reference_loss(segment_reference, case, stable=True)
  out = run_segment_loss(case)
  assert np.isnan(ref["seg"]) and np.isfinite(out["parts"].seg) and out["parts"].seg > 0
  assert ref["fg_mask"][0][ref["gt_index"][0] == 0].any() and not out["fg_mask"][0][out["gt_index"][0] == 0].any()
  for key in ("box", "cls", "dfl"):
    np.testing.assert_allclose(getattr(out["parts"], key), ref[key], rtol=LOSS_RTOL, err_msg=key)


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.parametrize("name", [j.name for j in fixtures.jobs(("segment",))])
def test_fixture_script_reproduces_the_file(name, segment_reference, tmp_path):
  """``tests/make_fixtures.py --kind segment`` writes this committed file again (byte for byte here; see support.fixtures.assert_reproduces)."""
  fixtures.assert_reproduces(fixtures.job("segment", name), str(tmp_path))
