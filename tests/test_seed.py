"""Pins the deterministic values the seed walkthrough printed, and checks its replay ``examples/toy_assign.py``.

The seed's head outputs were unseeded ``torch.randn``, so only the values that do not depend on them are pinned:
anchor points and strides, the GT boxes in pixels and image 0's in-box mask. Everything that does depend on them
(decoded boxes, each step of the assignment, the targets) is recomputed here from the example's head maps by an
independent NumPy version of the seed's steps, and (live, through the ``reference`` fixture of ``conftest.py``)
compared with Ultralytics 8.4.190.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal
from support.oracles import np_assign_one, np_box_iou, np_decode, np_flat_head, np_sigmoid

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "toy_assign.py"


def _load_example():
  spec = importlib.util.spec_from_file_location("toy_assign", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


toy = _load_example()

# The seed's `anc_points` listing (84 x 2, grid units): 8x8, then 4x4, then 2x2, row-major.
SEED_ANCHOR_POINTS = np.array([
    [0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [3.5, 0.5], [4.5, 0.5], [5.5, 0.5], [6.5, 0.5], [7.5, 0.5],
    [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [3.5, 1.5], [4.5, 1.5], [5.5, 1.5], [6.5, 1.5], [7.5, 1.5],
    [0.5, 2.5], [1.5, 2.5], [2.5, 2.5], [3.5, 2.5], [4.5, 2.5], [5.5, 2.5], [6.5, 2.5], [7.5, 2.5],
    [0.5, 3.5], [1.5, 3.5], [2.5, 3.5], [3.5, 3.5], [4.5, 3.5], [5.5, 3.5], [6.5, 3.5], [7.5, 3.5],
    [0.5, 4.5], [1.5, 4.5], [2.5, 4.5], [3.5, 4.5], [4.5, 4.5], [5.5, 4.5], [6.5, 4.5], [7.5, 4.5],
    [0.5, 5.5], [1.5, 5.5], [2.5, 5.5], [3.5, 5.5], [4.5, 5.5], [5.5, 5.5], [6.5, 5.5], [7.5, 5.5],
    [0.5, 6.5], [1.5, 6.5], [2.5, 6.5], [3.5, 6.5], [4.5, 6.5], [5.5, 6.5], [6.5, 6.5], [7.5, 6.5],
    [0.5, 7.5], [1.5, 7.5], [2.5, 7.5], [3.5, 7.5], [4.5, 7.5], [5.5, 7.5], [6.5, 7.5], [7.5, 7.5],
    [0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [3.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [3.5, 1.5],
    [0.5, 2.5], [1.5, 2.5], [2.5, 2.5], [3.5, 2.5], [0.5, 3.5], [1.5, 3.5], [2.5, 3.5], [3.5, 3.5],
    [0.5, 0.5], [1.5, 0.5], [0.5, 1.5], [1.5, 1.5],
], np.float32)

# The seed's `gt_bboxes` (b, M, 4), xyxy pixels as printed (5 significant digits); padding rows are zero.
SEED_GT_BOXES = np.array([
    [[178.56, 92.8, 604.8, 334.72], [217.6, -0.32, 490.24, 69.44], [0, 0, 0, 0]],
    [[53.44, 92.48, 531.52, 322.24], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[480.0, 208.96, 640.0, 410.56], [57.6, 98.88, 518.4, 361.92], [25.6, 2.56, 320.0, 79.36]],
    [[174.4, 257.6, 271.04, 409.28], [0, 0, 0, 0], [0, 0, 0, 0]],
], np.float32)
SEED_GT_LABELS = np.array([[1, 0, 0], [1, 0, 0], [2, 1, 0], [2, 0, 0]], np.int32)
SEED_GT_MASK = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], bool)

# The seed's `in_gts_mask` of image 0 (3 x 84), as the anchors set to 1 in each row.
SEED_IN_GTS_IMAGE0 = (
    [10, 11, 12, 13, 14, 15, 18, 19, 20, 21, 22, 23, 26, 27, 28, 29, 30, 31, 69, 70, 71, 81],
    [3, 4, 5],
    [],
)
NUM_ANCHORS = 84

def _rows_to_mask(rows) -> np.ndarray:
  mask = np.zeros((len(rows), NUM_ANCHORS), bool)
  for m, idx in enumerate(rows):
    mask[m, idx] = True
  return mask


def _seed_gt():
  return jaxtal.pack_labels(toy.SEED_LABELS, toy.BATCH, toy.MAX_BOXES, toy.IMAGE_SIZE)


# --- independent NumPy expectations (tests/support/oracles.py, float64) -----------------------------------

NP_ANCHORS_PX = SEED_ANCHOR_POINTS.astype(np.float64) * np.repeat([80.0, 160.0, 320.0], [64, 16, 4])[:, None]


def np_predictions(feats_nchw, reg_max=16):
  """The seed's pred_process + decode: NCHW maps -> sigmoid scores ``(b, A, nc)`` and pixel boxes ``(b, A, 4)``."""
  dist, logits = np_flat_head(feats_nchw, 3, reg_max, layout="NCHW")
  strides = NP_ANCHORS_PX[:, :1] / SEED_ANCHOR_POINTS[:, :1]
  return np_sigmoid(logits), np_decode(dist, SEED_ANCHOR_POINTS, reg_max) * strides


def np_in_box(boxes, anchors=NP_ANCHORS_PX, eps=1e-9):
  """The seed's ``__get_in_gts_mask``: ``(M, 4)`` boxes -> ``(M, A)``, anchor centre strictly inside."""
  boxes = np.asarray(boxes, np.float64)
  deltas = np.concatenate([anchors[None] - boxes[:, None, :2], boxes[:, None, 2:] - anchors[None]], -1)
  return deltas.min(-1) > eps


def np_steps(scores, pred_boxes, labels, boxes, mask):
  """The oracle's assignment of one image, every step, with the seed's anchors."""
  labels, boxes, mask = np.asarray(labels), np.asarray(boxes, np.float64), np.asarray(mask)
  return np_assign_one(scores, pred_boxes, NP_ANCHORS_PX, labels, boxes, mask)


def test_numpy_steps_on_a_hand_worked_case():
  """The oracle on the seed's anchors, numbers worked by hand: one GT, two in-box anchors, one prediction on the GT."""
  boxes = np.array([[0.0, 0.0, 160.0, 80.0]])  # covers anchors 0 (40, 40) and 1 (120, 40) of level 0
  pred = np.tile([[1000.0, 1000.0, 1001.0, 1001.0]], (NUM_ANCHORS, 1))  # far away: CIoU < 0, clamped to 0
  pred[1] = boxes[0]  # CIoU 1
  out = np_steps(np.full((NUM_ANCHORS, 2), 0.25), pred, [1], boxes, [True])
  np.testing.assert_array_equal(np.flatnonzero(out["in_box"][0]), [0, 1])
  np.testing.assert_allclose(out["overlaps"][0, :2], [0.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(out["metric"][0, :2], [0.0, 0.5], atol=1e-6)  # 0.25 ** 0.5 * 1 ** 6
  np.testing.assert_array_equal(np.flatnonzero(out["fg_mask"]), [0, 1])  # anchor 0 is a tied zero in the top 10
  np.testing.assert_allclose(out["scores"][:2], [[0, 0], [0, 1]], atol=1e-6)  # 0.5 * 1 / 0.5 on class 1
  np.testing.assert_array_equal(out["positives_per_gt"], [2])


# --- pinned seed values -------------------------------------------------------------------------


def test_anchor_points_and_strides_match_seed():
  anchors, strides = jaxtal.make_anchors(toy.FEATURE_SHAPES, toy.STRIDES)
  assert anchors.shape == (84, 2) and anchors.dtype == jnp.float32 and strides.shape == (84, 1)
  np.testing.assert_array_equal(np.asarray(anchors), SEED_ANCHOR_POINTS)
  expected = np.concatenate([np.full(64, 80.0), np.full(16, 160.0), np.full(4, 320.0)]).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(strides)[:, 0], expected)
  assert [h * s for (h, _), s in zip(toy.FEATURE_SHAPES, toy.STRIDES)] == [640, 640, 640]


def test_gt_boxes_match_seed():
  gt = _seed_gt()
  assert gt.boxes.shape == (4, 3, 4) and gt.boxes.dtype == np.float32
  np.testing.assert_allclose(gt.boxes, SEED_GT_BOXES, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(gt.labels, SEED_GT_LABELS)
  np.testing.assert_array_equal(gt.mask, SEED_GT_MASK)
  assert np.all(gt.boxes[~gt.mask] == 0)  # padding rows are exactly zero, as the seed's `torch.zeros` buffer


def test_numpy_in_box_matches_seed():
  np.testing.assert_array_equal(np_in_box(SEED_GT_BOXES[0]) & SEED_GT_MASK[0][:, None], _rows_to_mask(SEED_IN_GTS_IMAGE0))


def test_assign_steps_in_box_matches_seed(walkthrough):
  """``assign_steps``' candidate mask does not depend on the predictions: the seed's for image 0, NumPy's for all."""
  gt = _seed_gt()
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.uniform(0.1, 0.9, (4, NUM_ANCHORS, 3)), jnp.float32)
  boxes = jnp.asarray(np.concatenate([NP_ANCHORS_PX - 50, NP_ANCHORS_PX + 50], -1)[None].repeat(4, 0), jnp.float32)
  other = jax.jit(jaxtal.assign_steps)(scores, boxes, jnp.asarray(NP_ANCHORS_PX, jnp.float32), gt)
  for steps in (walkthrough[1]["steps"], other):
    np.testing.assert_array_equal(np.asarray(steps.in_box[0]), _rows_to_mask(SEED_IN_GTS_IMAGE0))
    for i in range(toy.BATCH):
      np.testing.assert_array_equal(np.asarray(steps.in_box[i]), np_in_box(SEED_GT_BOXES[i]) & SEED_GT_MASK[i][:, None])


@jax.jit
def _positives_with_all_anchors(pred_scores, pred_boxes, anchor_px, gt):
  # topk = A makes every anchor a top-k candidate, so the positives are exactly the in-box anchors.
  return jaxtal.task_aligned_assign(pred_scores, pred_boxes, anchor_px, gt, topk=NUM_ANCHORS).fg_mask


def test_fast_assigner_in_box_test_matches_seed():
  """The fast path's own in-box step (seen through topk = A, one GT at a time) equals the seed's / NumPy's mask."""
  gt = _seed_gt()
  anchor_px = jnp.asarray(NP_ANCHORS_PX, jnp.float32)
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.uniform(0.1, 0.9, (1, NUM_ANCHORS, 3)), jnp.float32)
  boxes = jnp.concatenate([anchor_px - 50.0, anchor_px + 50.0], axis=-1)[None]
  seed0 = _rows_to_mask(SEED_IN_GTS_IMAGE0)
  for i in range(toy.BATCH):
    for m in np.flatnonzero(gt.mask[i]):
      one = jax.tree.map(lambda x: x[i : i + 1, m : m + 1], gt)
      fg = np.asarray(_positives_with_all_anchors(scores, boxes, anchor_px, one))[0]
      np.testing.assert_array_equal(fg, np_in_box(SEED_GT_BOXES[i, m : m + 1])[0], err_msg=f"image {i}, GT {m}")
      if i == 0:
        np.testing.assert_array_equal(fg, seed0[m], err_msg=f"image 0, GT {m} vs the seed")


# --- the seed's top-k bug: positives must lie inside their GT -------------------------------------


def _assert_positives_in_box(target, gt):
  in_box = np.stack([np_in_box(b) for b in np.asarray(gt.boxes)])  # (b, M, A)
  fg, owner = np.asarray(target.fg_mask), np.asarray(target.gt_index)
  for i in range(fg.shape[0]):
    for a in np.flatnonzero(fg[i]):
      assert gt.mask[i, owner[i, a]], f"image {i} anchor {a} owned by padding row {owner[i, a]}"
      assert in_box[i, owner[i, a], a], f"image {i} anchor {a} is a positive outside GT {owner[i, a]}"


def test_in_box_check_catches_the_seeds_positives():
  """The check used below rejects the seed's printed result: its GT 1 owned anchors 0..9 of image 0."""
  gt = _seed_gt()
  fg = np.zeros((4, NUM_ANCHORS), bool)
  owner = np.zeros((4, NUM_ANCHORS), np.int32)
  fg[0, [10, 12, 13, 14, 20, 21, 22, 23, 27, 28]] = True  # the seed's pos_mask row of GT 0
  fg[0, :10], owner[0, :10] = True, 1
  with pytest.raises(AssertionError, match="image 0 anchor 0 is a positive outside GT 1"):
    _assert_positives_in_box(SimpleNamespace(fg_mask=fg, gt_index=owner), gt)
  fg[0, :10] = False
  fg[0, [3, 4, 5]] = True
  _assert_positives_in_box(SimpleNamespace(fg_mask=fg, gt_index=owner), gt)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_out_of_box_positive_on_seed_inputs(seed):
  scores, boxes = np_predictions(toy.head_outputs(seed))
  target = jax.jit(jaxtal.task_aligned_assign)(
      jnp.asarray(scores, jnp.float32), jnp.asarray(boxes, jnp.float32), jnp.asarray(NP_ANCHORS_PX, jnp.float32), _seed_gt()
  )
  assert np.asarray(target.fg_mask).any()
  _assert_positives_in_box(target, _seed_gt())


def test_all_zero_metrics_claim_no_anchor_outside_the_box():
  """The seed's failure case: every prediction is far from every GT, so all CIoUs clamp to 0.

  The seed's top-k (masking only padding) then gave its GT 1 the anchors 0..9, most outside the box. Every
  GT's top-10 are the tied anchors 0..9; only the in-box ones may become positives: anchors 3, 4, 5 of GT 1
  (GT 0's box starts at anchor 10), with target score 0.
  """
  gt = _seed_gt()
  far = np.broadcast_to([5000.0, 5000.0, 5010.0, 5010.0], (4, NUM_ANCHORS, 4))
  assert np.all(np_box_iou(SEED_GT_BOXES[:, :, None], far[:, None], "ciou") <= 0)  # the premise: every metric is zero
  target = jax.jit(jaxtal.task_aligned_assign)(
      jnp.full((4, NUM_ANCHORS, 3), 0.5), jnp.asarray(far, jnp.float32), jnp.asarray(NP_ANCHORS_PX, jnp.float32), gt
  )
  _assert_positives_in_box(target, gt)
  fg0 = np.flatnonzero(np.asarray(target.fg_mask[0]))
  np.testing.assert_array_equal(fg0, [3, 4, 5])
  np.testing.assert_array_equal(np.asarray(target.gt_index[0])[fg0], [1, 1, 1])
  np.testing.assert_array_equal(np.asarray(target.positives_per_gt[0]), [0, 3, 0])
  np.testing.assert_array_equal(np.asarray(target.scores), 0.0)


# --- the example ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def walkthrough():
  """The example's main() run once: its printout and its intermediate arrays."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = toy.main()
  return out.getvalue(), results


@pytest.fixture(scope="module")
def numpy_walkthrough():
  """The NumPy steps of every image, from the example's own head maps (independent of jaxtal)."""
  scores, boxes = np_predictions(toy.head_outputs(0))
  gt = _seed_gt()
  return scores, boxes, [
      np_steps(scores[i], boxes[i], gt.labels[i], gt.boxes[i], gt.mask[i]) for i in range(toy.BATCH)
  ]


def test_example_prints_every_stage(walkthrough):
  text, _ = walkthrough
  for section in [
      "== inputs: 3 NCHW head maps [(4, 67, 8, 8), (4, 67, 4, 4), (4, 67, 2, 2)]",
      "== pred_process -> flatten_head: pred_dist (4, 84, 64), pred_logits (4, 84, 3) ==",
      "== make_anchors: anchor_points (84, 2), strides (84, 1) ==",
      "strides per level [80.0, 160.0, 320.0]",
      "== decode -> decode_boxes: pred_boxes (4, 84, 4)",
      "== ann_process -> pack_labels",
      "[178.56  92.8  604.8  334.72]",
      "== TaskAlignedAssigner -> assign_steps, image 0 ==",
      "1. in_gts_mask (anchor centre inside the GT): GT 0: [10, 11, 12, 13, 14, 15, 18, 19, 20, 21, 22, 23, 26, 27,"
      " 28, 29, 30, 31, 69, 70, 71, 81] | GT 1: [3, 4, 5] | GT 2: []",
      "2. align_metric",
      "3. topk_mask",
      "4. pos_mask",
      "real GTs whose metrics are all zero (CIoU <= 0): [1]",
      "task_aligned_assign (fast path) agrees with assign_steps: True",
      "image 0 positives [3, 4, 5,",
      "== assignment per image",
      "image 3 (GT 0: class 2)",
  ]:
    assert section in text, f"missing {section!r} in the example's output"


def test_example_decodes_like_numpy(walkthrough, numpy_walkthrough):
  _, res = walkthrough
  scores, boxes, _ = numpy_walkthrough
  np.testing.assert_allclose(np.asarray(res["pred_scores"]), scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(res["pred_boxes_px"]), boxes, rtol=1e-5, atol=1e-2)


def test_example_steps_match_numpy(walkthrough, numpy_walkthrough):
  """Each of ``assign_steps``' masks and metrics, image by image, against the NumPy steps."""
  _, res = walkthrough
  steps = res["steps"]
  for i, want in enumerate(numpy_walkthrough[2]):
    for name, key in (("valid_gt", "valid"), ("in_box", "in_box"), ("topk_mask", "topk_mask"), ("pos_mask", "pos")):
      np.testing.assert_array_equal(np.asarray(getattr(steps, name)[i]), want[key], err_msg=f"image {i} {name}")
    np.testing.assert_allclose(np.asarray(steps.overlaps[i]), want["overlaps"], rtol=1e-4, atol=1e-6, err_msg=f"image {i}")
    # CIoU^6 amplifies float32 rounding six-fold; the metrics span 1e-16 .. 1e-7 here.
    np.testing.assert_allclose(np.asarray(steps.align_metric[i]), want["metric"], rtol=1e-3, atol=0, err_msg=f"image {i}")
  assert sum(int(w["metric"].astype(bool).sum()) for w in numpy_walkthrough[2]) > 20  # not vacuous


def test_example_targets_match_numpy(walkthrough, numpy_walkthrough):
  """The fast path's targets (and the dense path's, which the example checks against them) equal NumPy's."""
  _, res = walkthrough
  assert res["agree"]
  for target in (res["target"], res["steps"].assignment):
    for i, want in enumerate(numpy_walkthrough[2]):
      for name in ("fg_mask", "gt_index", "labels", "positives_per_gt"):
        np.testing.assert_array_equal(np.asarray(getattr(target, name)[i]), want[name], err_msg=f"image {i} {name}")
      np.testing.assert_allclose(np.asarray(target.boxes[i]), want["boxes"], rtol=1e-6, err_msg=f"image {i}")
      np.testing.assert_allclose(np.asarray(target.scores[i]), want["scores"], rtol=1e-3, atol=1e-7, err_msg=f"image {i}")


def test_example_grid_draws_the_assignment(walkthrough):
  text, res = walkthrough
  target = res["target"]
  for i in range(toy.BATCH):
    lines = toy.assignment_grid(target.fg_mask[i], target.gt_index[i])
    assert len(lines) == 8
    cells = [line.split("   ") for line in lines]
    drawn = (
        "".join(c[0].replace(" ", "") for c in cells)
        + "".join(c[1].replace(" ", "") for c in cells[:4])
        + "".join(c[2].replace(" ", "") for c in cells[:2])
    )
    fg, owner = np.asarray(target.fg_mask[i]), np.asarray(target.gt_index[i])
    expected = "".join(str(int(g)) if f else "." for f, g in zip(fg, owner))
    assert drawn == expected
    assert "\n".join("  " + line for line in lines) in text


@pytest.mark.live
def test_example_assignment_matches_ultralytics(walkthrough, reference):
  """Same targets as Ultralytics 8.4.190 on the example's inputs, up to ties among zero metrics.

  Random heads predict huge boxes, so many in-box anchors have CIoU <= 0 and metric 0. When a GT has fewer
  than ``topk`` non-zero metrics its top-k list ends in tied zeros: jaxtal takes the lowest anchor indices,
  ``torch.topk`` an unspecified order. Those extra positives get target score 0 (so the same loss); every
  anchor with a non-zero target must agree exactly.
  """
  _, res = walkthrough
  gt, target = res["gt"], res["target"]
  anchor_px = res["anchors"] * res["strides"]
  ref = reference.assign(
      np.array(res["pred_scores"]), np.array(res["pred_boxes_px"]), np.array(anchor_px), gt.labels, gt.boxes, gt.mask
  )
  np.testing.assert_allclose(np.asarray(target.scores), ref["scores"], rtol=1e-5, atol=1e-7)
  scored = ref["scores"].sum(-1) > 0
  assert scored.sum() > 20  # the comparison below is not vacuous
  np.testing.assert_array_equal(np.asarray(target.fg_mask)[scored], True)
  np.testing.assert_array_equal(np.asarray(target.gt_index)[scored], ref["gt_index"][scored])
  np.testing.assert_array_equal(np.asarray(target.labels)[scored], ref["labels"][scored])
  np.testing.assert_allclose(np.asarray(target.boxes)[scored], ref["boxes"][scored])
  assert not np.any((np.asarray(target.fg_mask) != ref["fg_mask"]) & scored)  # any difference is a zero-score positive


@pytest.mark.slow
def test_example_runs_as_a_script():
  proc = subprocess.run([sys.executable, str(EXAMPLE)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "agrees with assign_steps: True" in proc.stdout
  assert "image 3 (GT 0: class 2)" in proc.stdout  # got as far as the last image's grid
