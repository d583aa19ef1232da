"""Parity of :func:`jaxtal.segment26_loss` with Ultralytics 8.4.190's ``SegmentLoss26`` (alone and under
``E2ELoss``), and of :func:`jaxtal.segment_loss` with a semantic head with its ``v8SegmentationLoss``.

Every case of ``segment26_cases.CASES`` (NCHW head maps, mask coefficients, prototypes, semantic
logits, YOLO label rows, the reference's masks and class map) is checked against its golden fixture
(``tests/fixtures/segment26_<case>.npz``) and, marked ``live``, against the reference run now through
``tests/support/segment26_reference.py``. jaxtal runs ``jax.value_and_grad`` (jitted, ``layout="NCHW"``)
w.r.t. the head maps, the coefficient maps, the prototypes and the semantic logits: of
``segment26_loss``, of ``segment_loss`` with ``Predictions.semantic`` (``v8_*``), or of
``end_to_end_loss(segment26_loss, ...)`` (``e2e*``: both branches' inputs).

The cases cover both mask forms (index map; per-slot bool and float), masks at the prototypes'
resolution, above and below it (non-square), predicted masks empty and full everywhere (coefficients
of one sign against positive prototypes), GTs with more candidates than their ``3 * topk`` short list,
empty images, an all-empty batch, ``reg_max = 1``, no semantic head, ``min_box_side`` 0 and the
default ``strides[1]``.

Comparison rules (``test_parity_segment``'s, shared through ``support.parity``): the total and each
gain-scaled part (box, seg, cls, dfl, sem) within ``rtol=1e-4``; for every gradient (each level's head
map and coefficient map, the prototypes, the semantic logits; each branch end-to-end) ``max|grad - ref|
<= 1e-3 * max|ref|``; the assignment inside the loss (not end-to-end): target-score sums allclose,
foreground and owner GT equal on every foreground anchor of the reference.

The seg term counts every foreground anchor, so it depends on the order of tied candidates, and here
also in the reference's short list (a ``Tensor.topk`` over a dense ``(b, M, A)`` metric). The golden
fixtures hold the reference run with stable ties in both (``segment26_reference.stable_ties``, jaxtal's
order); the live tests run both orders: the stable one must match every case, the native one every case
but ``ties`` (``segment26_cases.NATIVE_TIES_DIFFER``), where it must *not* match.
"""

from __future__ import annotations

import numpy as np
import pytest

from support import cases, fixtures, segment26_cases
from support.parity import LOSS_RTOL, assert_loss_matches, assert_owners_match, params
from support.parity import TASK_SCORE_RTOL as SCORE_RTOL
from support.parity import TASK_WEIGHT_ATOL as WEIGHT_ATOL
from support.runners import run_segment26_loss

# Each case compiles its loss once (about 7 s on CI's CPUs): the default run keeps one, ``ties`` (golden, live
# with stable ties, live native: one compilation); ``-m slow`` runs the rest.
FAST = ("ties",)
CASES = segment26_cases.CASES


def _assert_inputs_match(total, parts, out: dict, ref: dict, branch: dict, where: str) -> None:
  """Total and parts (``ref``), and every gradient of one branch (``out`` and ``branch`` hold ``grads``,
  ``coef_grads``, ``proto_grad`` and, with a semantic head, ``sem_grad``)."""
  pairs = [("", out["grads"], branch["grads"]), ("coefs: ", out["coef_grads"], branch["coef_grads"]),
           ("proto: ", [out["proto_grad"]], [branch["proto_grad"]])]
  if "sem_grad" in branch:
    pairs.append(("semantic: ", [out["sem_grad"]], [branch["sem_grad"]]))
  for key, grads, ref_grads in pairs:
    assert_loss_matches(total, parts, grads, dict(ref, grads=ref_grads), f"{where}{key}")


def assert_segment26_matches(out: dict, ref: dict, where: str = "") -> None:
  """The comparison rules of the module docstring."""
  for key in ("seg", "sem"):
    np.testing.assert_allclose(getattr(out["parts"], key), ref[key], rtol=LOSS_RTOL, atol=1e-7, err_msg=f"{where}{key}")
  if "o2m" in out:  # end-to-end: the one-to-one branch's parts, both branches' gradients
    for branch in ("o2m", "o2o"):
      _assert_inputs_match(out["total"], out["parts"], out[branch], ref, ref[branch], f"{where}{branch} ")
    return
  _assert_inputs_match(out["total"], out["parts"], out, ref, ref, where)
  np.testing.assert_allclose(
      out["weights"], ref["weights"], rtol=SCORE_RTOL, atol=WEIGHT_ATOL, err_msg=f"{where}target scores"
  )
  assert_owners_match(out, ref, where)


# ----------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", params(CASES, FAST))
def test_golden_loss(name):
  case, ref, version = segment26_cases.load_fixture(name)
  assert version == "8.4.190"
  assert_segment26_matches(run_segment26_loss(case), ref, where=f"[segment26 {name}] ")


def test_fixture_inputs_match_builders():
  """The stored inputs are what ``segment26_cases.py`` builds now (a stale fixture would test something else)."""
  for name in CASES:
    cases.assert_case_equal(segment26_cases.load_fixture(name)[0], segment26_cases.loss_case(name), f"{name}: ")


def _candidates_per_gt(case: dict) -> np.ndarray:
  """Each GT's number of candidate anchors (centre strictly inside the box widened to ``min_box_side``)."""
  cfg, rows = case["config"], case["inputs"]["label_rows"]
  anc, _ = cases.anchors_px(segment26_cases.IMAGE, cfg["strides"])
  side = cfg["strides"][1] if cfg["min_box_side"] is None else cfg["min_box_side"]
  box = cases.rows_xyxy(rows, segment26_cases.IMAGE)
  ctr, half = (box[:, :2] + box[:, 2:]) / 2, np.maximum(box[:, 2:] - box[:, :2], side) / 2
  return ((anc[None] > ctr[:, None] - half[:, None]) & (anc[None] < ctr[:, None] + half[:, None])).all(-1).sum(1)


def _mask_logits(case: dict, suffix: str = "") -> np.ndarray:
  """Every anchor's mask logits ``coefs . proto`` (float64) of a case's branch."""
  x = case["inputs"]
  coefs = np.concatenate([c.reshape(c.shape[0], c.shape[1], -1) for c in x["coefs" + suffix]], -1)
  return np.einsum("bna,bnhw->bahw", coefs.astype(np.float64), x["proto" + suffix].astype(np.float64))


def test_golden_cases_are_informative():
  """The cases exercise what they claim: positives and non-zero terms, padding, the short list binding, exact
  mask logits, empty and full predicted masks, each mask form and resolution, no semantic head, empty images
  and batch, the default ``min_box_side``."""
  seen_default = seen_zero = False
  for name in CASES:
    case, ref, _ = segment26_cases.load_fixture(name)
    x, cfg = case["inputs"], case["config"]
    seen_default |= cfg["min_box_side"] is None
    seen_zero |= cfg["min_box_side"] == 0.0
    counts = np.bincount(x["label_rows"][:, 0].astype(int), minlength=x["feats"][0].shape[0])
    assert cfg["max_boxes"] > counts.max(), f"{name}: no padding slot"
    logits = _mask_logits(case)
    assert np.array_equal(logits * 64, np.round(logits * 64)), f"{name}: mask logits not exact multiples of 1/64"
    if name == "empty_batch":
      assert not ref["fg_mask"].any() and ref["seg"] == ref["box"] == ref["dfl"] == ref["sem"] == 0.0 and ref["cls"] > 0
      continue
    assert min(ref["box"], ref["seg"], ref["cls"], ref["dfl"]) > 0.0, name
    assert (ref["sem"] > 0.0) == (name != "no_semantic"), name
    if name == "empty_masks":
      assert (logits < 0).all()
    elif name == "full_masks":
      assert (logits > 0).all()
    else:
      assert 0.2 < (logits > 0).mean() < 0.8, name
    if name == "empty_images":
      assert (counts == 0).sum() == 2 and not ref["fg_mask"][counts == 0].any()
  assert seen_default and seen_zero
  # The short list binds: GTs with more candidates than 3 * topk (the one-to-one branch's 3 * 7 as well).
  for name in ("per_instance", "full_masks", "ties"):
    assert (_candidates_per_gt(segment26_cases.load_fixture(name)[0]) > 30).any(), name
  assert (_candidates_per_gt(segment26_cases.load_fixture("e2e")[0]) > 21).any()
  shapes = {n: segment26_cases.load_fixture(n)[0]["inputs"]["masks"].shape[-2:] for n in ("upsampled", "downsampled")}
  assert shapes == {"upsampled": (32, 32), "downsampled": (12, 10)}
  forms = {n: segment26_cases.load_fixture(n)[0]["config"]["overlap_mask"] for n in ("overlap", "per_instance", "v8_per_instance", "e2e_per_instance")}
  assert forms == {"overlap": True, "per_instance": False, "v8_per_instance": False, "e2e_per_instance": False}
  assert "semantic" not in segment26_cases.load_fixture("no_semantic")[0]["inputs"]
  ties = segment26_cases.load_fixture("ties")[1]
  assert (ties["fg_mask"] & (ties["weights"] == 0)).sum() >= 3  # zero-score foreground anchors


# ----------------------------------------------------------------------------- live


@pytest.mark.live
@pytest.mark.parametrize("name", params(CASES, FAST))
def test_live_loss_stable_ties(name, segment26_reference):
  case = segment26_cases.loss_case(name)
  ref = segment26_cases.reference_loss(segment26_reference, case, stable=True)
  assert_segment26_matches(run_segment26_loss(case), ref, where=f"[segment26 {name} live, stable ties] ")


@pytest.mark.live
@pytest.mark.parametrize("name", params(CASES, FAST))
def test_live_loss_native_ties(name, segment26_reference):
  """The native reference matches every case but ``ties``, where its order of tied zero-metric anchors (in the
  short list and the top-k) picks other foreground anchors, so its seg term differs from jaxtal's."""
  case = segment26_cases.loss_case(name)
  ref = segment26_cases.reference_loss(segment26_reference, case, stable=False)
  out = run_segment26_loss(case)
  if name not in segment26_cases.NATIVE_TIES_DIFFER:
    assert_segment26_matches(out, ref, where=f"[segment26 {name} live, native ties] ")
    return
  assert not np.array_equal(out["fg_mask"], ref["fg_mask"])
  assert abs(out["parts"].seg - ref["seg"]) > 10 * LOSS_RTOL * abs(ref["seg"])
  with pytest.raises(AssertionError):
    assert_segment26_matches(out, ref)


@pytest.mark.live
def test_live_mask_iou_changes_the_assignment(segment26_reference):
  """Not vacuous: on the same inputs the reference's box-only assignment (``v8SegmentationLoss``) gives other
  target scores than its mask-aware one, which jaxtal matches (``test_live_loss_stable_ties``)."""
  case = segment26_cases.loss_case("ties")
  mask_aware = segment26_cases.reference_loss(segment26_reference, case, stable=True)
  box_only = segment26_cases.reference_loss(segment26_reference, dict(case, config=dict(case["config"], loss="v8")), stable=True)
  assert np.abs(mask_aware["weights"] - box_only["weights"]).max() > 1e-2


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.parametrize("name", [j.name for j in fixtures.jobs(("segment26",))])
def test_fixture_script_reproduces_the_file(name, segment26_reference, tmp_path):
  """``tests/make_fixtures.py --kind segment26`` writes this committed file again (see support.fixtures.assert_reproduces)."""
  fixtures.assert_reproduces(fixtures.job("segment26", name), str(tmp_path))
