"""Pins the deterministic values the seed walkthrough printed, and runs its replay ``examples/toy_assign.py``.

The seed's head outputs were unseeded ``torch.randn``, so only the values that do not depend on them are pinned:
anchor points and strides, the GT boxes in pixels and image 0's in-box mask. The assignment of the example's own
seeded outputs is checked against an independent NumPy version of steps 3-5 and (live, through the ``reference``
fixture of ``conftest.py``) against Ultralytics 8.4.190.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal

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


@pytest.fixture(scope="module")
def walkthrough():
  """The example's main() run once (its printout and its intermediate arrays)."""
  import contextlib
  import io

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = toy.main()
  return out.getvalue(), results


def _pixels():
  anchors, strides = jaxtal.make_anchors(toy.FEATURE_SHAPES, toy.STRIDES)
  return anchors * strides


# --- pinned seed values -------------------------------------------------------------------------


def test_anchor_points_match_seed():
  anchors, strides = jaxtal.make_anchors(toy.FEATURE_SHAPES, toy.STRIDES)
  assert anchors.shape == (84, 2) and anchors.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(anchors), SEED_ANCHOR_POINTS)


def test_strides_match_seed():
  _, strides = jaxtal.make_anchors(toy.FEATURE_SHAPES, toy.STRIDES)
  expected = np.concatenate([np.full(64, 80.0), np.full(16, 160.0), np.full(4, 320.0)]).astype(np.float32)
  assert strides.shape == (84, 1)
  np.testing.assert_array_equal(np.asarray(strides)[:, 0], expected)
  # 640 / 8, 640 / 4, 640 / 2: every level maps back to the 640 input.
  assert [h * s for (h, _), s in zip(toy.FEATURE_SHAPES, toy.STRIDES)] == [640, 640, 640]


def test_gt_boxes_match_seed():
  gt = jaxtal.pack_labels(toy.SEED_LABELS, toy.BATCH, toy.MAX_BOXES, toy.IMAGE_SIZE)
  assert gt.boxes.shape == (4, 3, 4) and gt.boxes.dtype == np.float32
  np.testing.assert_allclose(gt.boxes, SEED_GT_BOXES, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(gt.labels, SEED_GT_LABELS)
  np.testing.assert_array_equal(gt.mask, SEED_GT_MASK)
  # Padding rows are exactly zero, as the seed's `torch.zeros` buffer.
  assert np.all(gt.boxes[~gt.mask] == 0)


def test_in_box_mask_image0_matches_seed():
  gt = jaxtal.pack_labels(toy.SEED_LABELS, toy.BATCH, toy.MAX_BOXES, toy.IMAGE_SIZE)
  got = np.asarray(toy.in_box_mask(_pixels(), jnp.asarray(gt.boxes[0])))
  assert got.shape == (3, 84)
  np.testing.assert_array_equal(got, _rows_to_mask(SEED_IN_GTS_IMAGE0))


@jax.jit
def _positives_with_all_anchors(pred_scores, pred_boxes, anchor_px, gt):
  # topk = A makes every anchor a top-k candidate, so the positives are exactly the in-box anchors.
  return jaxtal.task_aligned_assign(pred_scores, pred_boxes, anchor_px, gt, topk=NUM_ANCHORS).fg_mask


def test_assigner_in_box_test_matches_seed_and_example():
  """The library's own in-box step (seen through topk = A, one GT at a time) equals the seed's mask."""
  gt = jaxtal.pack_labels(toy.SEED_LABELS, toy.BATCH, toy.MAX_BOXES, toy.IMAGE_SIZE)
  anchor_px = _pixels()
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.uniform(0.1, 0.9, (1, NUM_ANCHORS, 3)), jnp.float32)
  boxes = jnp.concatenate([anchor_px - 50.0, anchor_px + 50.0], axis=-1)[None]
  seed0 = _rows_to_mask(SEED_IN_GTS_IMAGE0)
  for i in range(toy.BATCH):
    example = np.asarray(toy.in_box_mask(anchor_px, jnp.asarray(gt.boxes[i])))
    for m in range(toy.MAX_BOXES):
      if not gt.mask[i, m]:
        continue
      one = jaxtal.GroundTruth(gt.labels[i : i + 1, m : m + 1], gt.boxes[i : i + 1, m : m + 1], gt.mask[i : i + 1, m : m + 1])
      fg = np.asarray(_positives_with_all_anchors(scores, boxes, anchor_px, one))[0]
      np.testing.assert_array_equal(fg, example[m], err_msg=f"image {i}, GT {m}")
      if i == 0:
        np.testing.assert_array_equal(fg, seed0[m], err_msg=f"image 0, GT {m} vs the seed")


# --- the seed's top-k bug: positives must lie inside their GT -------------------------------------


def _assert_positives_in_box(target, gt, anchor_px):
  in_box = np.stack([np.asarray(toy.in_box_mask(anchor_px, jnp.asarray(b))) for b in gt.boxes])  # (b, M, A)
  fg, owner = np.asarray(target.fg_mask), np.asarray(target.gt_index)
  for i in range(fg.shape[0]):
    for a in np.flatnonzero(fg[i]):
      assert gt.mask[i, owner[i, a]], f"image {i} anchor {a} owned by padding row {owner[i, a]}"
      assert in_box[i, owner[i, a], a], f"image {i} anchor {a} is a positive outside GT {owner[i, a]}"


def test_in_box_check_catches_the_seeds_positives():
  """The check used below rejects the seed's printed result: its GT 1 owned anchors 0..9 of image 0."""
  gt = jaxtal.pack_labels(toy.SEED_LABELS, toy.BATCH, toy.MAX_BOXES, toy.IMAGE_SIZE)
  fg = np.zeros((4, NUM_ANCHORS), bool)
  owner = np.zeros((4, NUM_ANCHORS), np.int32)
  seed_gt0 = [10, 12, 13, 14, 20, 21, 22, 23, 27, 28]  # the seed's pos_mask rows
  fg[0, seed_gt0] = True
  fg[0, :10], owner[0, :10] = True, 1
  seed_target = jaxtal.Assignment(None, None, None, fg, owner)
  with pytest.raises(AssertionError, match="image 0 anchor 0 is a positive outside GT 1"):
    _assert_positives_in_box(seed_target, gt, _pixels())
  fg[0, :10] = False
  fg[0, [3, 4, 5]] = True
  _assert_positives_in_box(seed_target._replace(fg_mask=fg), gt, _pixels())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_out_of_box_positive_on_seed_inputs(seed):
  gt = jaxtal.pack_labels(toy.SEED_LABELS, toy.BATCH, toy.MAX_BOXES, toy.IMAGE_SIZE)
  pred_dist, logits = jaxtal.flatten_head([jnp.asarray(f) for f in toy.head_outputs(seed)], 3, 16, layout="NCHW")
  anchors, strides = jaxtal.make_anchors(toy.FEATURE_SHAPES, toy.STRIDES)
  boxes = jaxtal.decode_boxes(pred_dist, anchors) * strides
  target = jax.jit(jaxtal.task_aligned_assign)(jax.nn.sigmoid(logits), boxes, anchors * strides, gt)
  assert np.asarray(target.fg_mask).any()
  _assert_positives_in_box(target, gt, anchors * strides)


def test_all_zero_metrics_claim_no_anchor_outside_the_box():
  """The seed's failure case: every prediction is far from every GT, so all CIoUs clamp to 0.

  The seed's top-k (masking only padding) then gave its GT 1 the anchors 0..9, most outside the box. Every
  GT's top-10 are the tied anchors 0..9; only the in-box ones may become positives: anchors 3, 4, 5 of GT 1
  (GT 0's box starts at anchor 10), with target score 0.
  """
  gt = jaxtal.pack_labels(toy.SEED_LABELS, toy.BATCH, toy.MAX_BOXES, toy.IMAGE_SIZE)
  anchor_px = _pixels()
  far = jnp.broadcast_to(jnp.array([5000.0, 5000.0, 5010.0, 5010.0]), (4, NUM_ANCHORS, 4))
  scores = jnp.full((4, NUM_ANCHORS, 3), 0.5)
  ciou = jaxtal.box_iou(jnp.asarray(gt.boxes)[:, :, None], far[:, None], "ciou")
  assert np.all(np.asarray(ciou) <= 0)  # the premise: every metric is zero
  target = jax.jit(jaxtal.task_aligned_assign)(scores, far, anchor_px, gt)
  _assert_positives_in_box(target, gt, anchor_px)
  fg0 = np.flatnonzero(np.asarray(target.fg_mask[0]))
  np.testing.assert_array_equal(fg0, [3, 4, 5])
  np.testing.assert_array_equal(np.asarray(target.gt_index[0])[fg0], [1, 1, 1])
  np.testing.assert_array_equal(np.asarray(target.scores), 0.0)


# --- the example ---------------------------------------------------------------------------------


def _expected_targets(metric, overlaps, in_box, labels, boxes, valid, nc, topk=10, eps=1e-9):
  """NumPy steps 3-5 for one image from the example's ``(M, A)`` metric, overlaps and in-box mask."""
  m, a = metric.shape
  cand = in_box & valid[:, None]
  pos = np.zeros((m, a), bool)
  for g in range(m):
    top = np.argsort(-metric[g], kind="stable")[:topk]  # ties: lower anchor index first
    pos[g, top] = cand[g, top]
  multi = pos.sum(0) > 1
  best = np.argmax(np.where(cand, overlaps, -1.0), axis=0)
  pos[:, multi] = np.arange(m)[:, None] == best[None, multi]
  fg = pos.any(0)
  gt_index = np.where(fg, pos.argmax(0), 0)
  norm = np.zeros(a, np.float64)
  for g in range(m):
    mine = pos[g]
    if mine.any():
      norm[mine] = metric[g, mine] * overlaps[g, mine].max() / (metric[g, mine].max() + eps)
  scores = np.eye(nc)[labels[gt_index]] * norm[:, None]
  return fg, gt_index, np.where(fg[:, None], boxes[gt_index], 0.0), scores


def test_example_prints_every_stage(walkthrough):
  text, _ = walkthrough
  for section in [
      "== inputs: head maps (NCHW",
      "== pred_process -> flatten_head ==",
      "pred_dist (4, 84, 64)",
      "pred_logits (4, 84, 3)",
      "== make_anchors ==",
      "anchor_points (84, 2), strides (84, 1)",
      "strides per level: [80.0, 160.0, 320.0]",
      "== decode -> decode_boxes ==",
      "pred_boxes (4, 84, 4)",
      "== ann_process -> pack_labels ==",
      "[178.56  92.8  604.8  334.72]",
      "== image 0: in_gts_mask (M, A) ==",
      "== image 0: align_metric (M, A)",
      "== TaskAlignedAssigner -> task_aligned_assign ==",
      "scores    (4, 84, 3) float32",
      "image 0 positives (anchor indices):",
      "target boxes (pixels):",
      "target scores",
      "every positive lies inside its GT: True",
      "== assignment per image",
      "image 3 (GT 0: class 2)",
  ]:
    assert section in text, f"missing {section!r} in the example's output"


def test_example_grid_draws_the_assignment(walkthrough):
  text, res = walkthrough
  target = res["target"]
  for i in range(toy.BATCH):
    lines = toy.assignment_grid(target.fg_mask[i], target.gt_index[i])
    assert len(lines) == 8
    cells = [line.split("   ") for line in lines]
    level0 = "".join(c[0].replace(" ", "") for c in cells)
    level1 = "".join(c[1].replace(" ", "") for c in cells[:4])
    level2 = "".join(c[2].replace(" ", "") for c in cells[:2])
    drawn = level0 + level1 + level2
    assert len(drawn) == NUM_ANCHORS
    expected = "".join(str(int(g)) if f else "." for f, g in zip(np.asarray(target.fg_mask[i]), np.asarray(target.gt_index[i])))
    assert drawn == expected
    assert "\n".join("  " + line for line in lines) in text


def test_example_assignment_matches_numpy_steps(walkthrough):
  """The example's in-box mask and align metric, taken through NumPy top-k / conflicts / normalising, give the library's targets."""
  _, res = walkthrough
  gt, target = res["gt"], res["target"]
  anchor_px = res["anchors"] * res["anchor_strides"]
  np.testing.assert_array_equal(np.asarray(res["in_box0"]), _rows_to_mask(SEED_IN_GTS_IMAGE0))
  for i in range(toy.BATCH):
    metric, overlaps = toy.align_metric(
        res["pred_scores"][i], res["pred_boxes_px"][i], anchor_px, jnp.asarray(gt.labels[i]), jnp.asarray(gt.boxes[i]),
        jnp.asarray(gt.mask[i]),
    )
    in_box = np.asarray(toy.in_box_mask(anchor_px, jnp.asarray(gt.boxes[i])))
    fg, gt_index, boxes, scores = _expected_targets(
        np.asarray(metric, np.float64), np.asarray(overlaps, np.float64), in_box, gt.labels[i], gt.boxes[i], gt.mask[i], 3
    )
    np.testing.assert_array_equal(np.asarray(target.fg_mask[i]), fg, err_msg=f"image {i}")
    np.testing.assert_array_equal(np.asarray(target.gt_index[i]), gt_index, err_msg=f"image {i}")
    np.testing.assert_allclose(np.asarray(target.boxes[i]), boxes, err_msg=f"image {i}")
    np.testing.assert_allclose(np.asarray(target.scores[i]), scores, rtol=1e-4, atol=1e-7, err_msg=f"image {i}")
  np.testing.assert_allclose(np.asarray(res["metric0"]), np.asarray(toy.align_metric(
      res["pred_scores"][0], res["pred_boxes_px"][0], anchor_px, jnp.asarray(gt.labels[0]), jnp.asarray(gt.boxes[0]),
      jnp.asarray(gt.mask[0]))[0]))


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
  anchor_px = res["anchors"] * res["anchor_strides"]
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
  # Where the two differ it is only over zero-score positives.
  differ = np.asarray(target.fg_mask) != ref["fg_mask"]
  assert not np.any(differ & scored)


def test_example_runs_as_a_script():
  proc = subprocess.run([sys.executable, str(EXAMPLE)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "== TaskAlignedAssigner -> task_aligned_assign ==" in proc.stdout
  assert "image 3 (GT 0: class 2)" in proc.stdout  # got as far as the last image's grid
