"""Replays the seed walkthrough of YOLOv8's task-aligned assigner with jaxtal's public API (CPU, seconds).

    python examples/toy_assign.py

The seed's setup: batch 4, 3 classes, head maps 8x8 / 4x4 / 2x2 of 67 = 4 * 16 + 3 channels in NCHW for a
640x640 input (strides 80 / 160 / 320, 8 * 8 + 4 * 4 + 2 * 2 = 84 anchors), and the seed's seven labels.
The head maps are seeded standard-normal noise (the seed's ``torch.randn`` cannot be reproduced), so the
align metrics and positives differ from its printout; the anchors, the GT boxes in pixels and the in-box
mask do not depend on them and match it (``tests/test_seed.py`` pins them).

Seed step -> jaxtal: ``pred_process`` -> ``flatten_head``, ``make_anchors`` -> ``make_anchors``, ``decode`` ->
``decode_boxes``, ``ann_process`` -> ``pack_labels``, the ``TaskAlignedAssigner``'s inner steps ->
``assign_steps`` (dense, for reading) and the assigner itself -> ``task_aligned_assign`` (the fast path the
loss runs). ``jaxtal.detection_targets`` does all of this in one call inside the loss.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

import jaxtal

BATCH, NUM_CLASSES, REG_MAX = 4, 3, 16
IMAGE_SIZE = 640
FEATURE_SHAPES = ((8, 8), (4, 4), (2, 2))
STRIDES = (80, 160, 320)  # 640 / 8, 640 / 4, 640 / 2
MAX_BOXES = 3  # M: image 2 has the most labels
# The seed's labels: rows [batch_idx, cls, cx, cy, w, h], box normalised to [0, 1] (people, from a real task).
SEED_LABELS = np.array(
    [
        [0, 1.0, 0.612, 0.334, 0.666, 0.378],
        [0, 0.0, 0.553, 0.054, 0.426, 0.109],
        [1, 1.0, 0.457, 0.324, 0.747, 0.359],
        [2, 2.0, 0.875, 0.484, 0.25, 0.315],
        [2, 1.0, 0.45, 0.36, 0.72, 0.411],
        [2, 0.0, 0.27, 0.064, 0.46, 0.12],
        [3, 2.0, 0.348, 0.521, 0.151, 0.237],
    ],
    np.float32,
)


def head_outputs(seed: int = 0) -> list[np.ndarray]:
  """Seeded stand-in for the network: one NCHW ``(4, 67, H, W)`` float32 map per level."""
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((BATCH, 4 * REG_MAX + NUM_CLASSES, h, w)).astype(np.float32) for h, w in FEATURE_SHAPES]


def assignment_grid(fg_mask, gt_index) -> list[str]:
  """One image's assignment as text: per level a grid of GT indices ('.' background), levels side by side."""
  cells = np.where(np.asarray(fg_mask), np.asarray(gt_index).astype(str), ".")
  grids, start = [], 0
  for h, w in FEATURE_SHAPES:
    grids.append([" ".join(row) for row in cells[start : start + h * w].reshape(h, w)])
    start += h * w
  rows = max(len(g) for g in grids)
  return ["   ".join((g[r] if r < len(g) else "").ljust(len(g[0])) for g in grids).rstrip() for r in range(rows)]


def show(name: str, mask) -> None:
  """Prints the anchors set in each GT row of an ``(M, A)`` mask."""
  print(f"  {name}: " + " | ".join(f"GT {m}: {np.flatnonzero(row).tolist()}" for m, row in enumerate(np.asarray(mask))))


def main(seed: int = 0) -> dict:
  """Runs and prints every step; returns the intermediate arrays (for tests)."""
  with np.printoptions(precision=3, suppress=True, linewidth=120):  # scoped: callers keep theirs
    feats = head_outputs(seed)
    print(f"== inputs: {len(feats)} NCHW head maps {[f.shape for f in feats]}, strides {STRIDES} ==")

    # pred_process: per level (b, 67, H, W) -> (b, 84, 67) rows, split into box bins and class logits.
    pred_dist, pred_logits = jaxtal.flatten_head(feats, NUM_CLASSES, REG_MAX, layout="NCHW")
    print(f"\n== pred_process -> flatten_head: pred_dist {pred_dist.shape}, pred_logits {pred_logits.shape} ==")

    # make_anchors: one anchor per cell (centre, grid units of its level) and that level's stride.
    anchors, strides = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
    anchor_px = anchors * strides
    print(f"\n== make_anchors: anchor_points {anchors.shape}, strides {strides.shape} ==")
    print(f"  first anchors {np.asarray(anchors[:3]).tolist()}; strides per level {np.unique(strides).tolist()}")

    # decode: softmax over 16 bins per side, expectation = ltrb distance, xyxy around the anchor; then pixels.
    pred_boxes_px = jaxtal.decode_boxes(pred_dist, anchors, REG_MAX) * strides
    pred_scores = jax.nn.sigmoid(pred_logits)
    print(f"\n== decode -> decode_boxes: pred_boxes {pred_boxes_px.shape}; image 0, anchor 0: {pred_boxes_px[0, 0]} px ==")

    # ann_process: label rows -> (b, M) padded arrays, xywh -> xyxy pixels; padding is read from `mask`.
    gt = jaxtal.pack_labels(SEED_LABELS, BATCH, MAX_BOXES, IMAGE_SIZE)
    print(f"\n== ann_process -> pack_labels: labels {gt.labels.shape}, boxes {gt.boxes.shape}, mask {gt.mask.shape} ==")
    print(f"  gt boxes (xyxy pixels, padding rows zero):\n{gt.boxes}")
    print(f"  gt labels {gt.labels.tolist()}, mask {gt.mask.astype(int).tolist()}")

    # TaskAlignedAssigner, step by step (dense (b, M, A) arrays), shown for image 0.
    # min_box_side=0: the seed's (original YOLOv8) in-box test; Ultralytics 8.4.190 widens sides under strides[1].
    steps = jax.jit(functools.partial(jaxtal.assign_steps, min_box_side=0.0))(pred_scores, pred_boxes_px, anchor_px, gt)
    print("\n== TaskAlignedAssigner -> assign_steps, image 0 ==")
    show("1. in_gts_mask (anchor centre inside the GT)", steps.in_box[0])
    metric = np.asarray(steps.align_metric[0])
    print("  2. align_metric = score^0.5 * CIoU^6 on in-box pairs, non-zero entries:")
    for m in range(MAX_BOXES):
      print(f"     GT {m}: " + (", ".join(f"{a}: {metric[m, a]:.2e}" for a in np.flatnonzero(metric[m])) or "(none)"))
    show("3. topk_mask (top 10 by metric, in-box only)", steps.topk_mask[0])
    show("4. pos_mask (an anchor claimed twice goes to its GT of highest CIoU)", steps.pos_mask[0])
    zero = [m for m in range(MAX_BOXES) if gt.mask[0, m] and not metric[m].any()]
    if zero:  # the seed's top-k let such a GT claim anchors 0..9 wherever they lie; here only in-box ones count
      print(f"  real GTs whose metrics are all zero (CIoU <= 0): {zero}; they keep their in-box anchors, target score 0")

    # The fast path (what the loss runs) gives the same assignment.
    target = jax.jit(functools.partial(jaxtal.task_aligned_assign, min_box_side=0.0))(pred_scores, pred_boxes_px, anchor_px, gt)
    dense = steps.assignment
    exact = ("labels", "fg_mask", "gt_index", "positives_per_gt")
    same = all(np.array_equal(getattr(target, k), getattr(dense, k)) for k in exact)
    same &= np.allclose(target.boxes, dense.boxes) and np.allclose(target.scores, dense.scores, rtol=1e-5, atol=1e-7)
    print(f"\n== 5. targets -> task_aligned_assign (fast path) agrees with assign_steps: {same} ==")
    fg0 = np.flatnonzero(target.fg_mask[0])
    print(f"  image 0 positives {fg0.tolist()}, their GT {np.asarray(target.gt_index[0])[fg0].tolist()}")
    print(f"  target scores (one-hot x normalised metric):\n{np.asarray(target.scores[0])[fg0]}")
    print(f"  positives per GT slot {target.positives_per_gt.tolist()}")

    print("\n== assignment per image (GT index per anchor, '.' background; levels 8x8 | 4x4 | 2x2) ==")
    for i in range(BATCH):
      legend = ", ".join(f"GT {m}: class {gt.labels[i, m]}" for m in range(MAX_BOXES) if gt.mask[i, m])
      print(f"image {i} ({legend}), {int(target.fg_mask[i].sum())} positives")
      for line in assignment_grid(target.fg_mask[i], target.gt_index[i]):
        print("  " + line)
  return dict(
      feats=feats, anchors=anchors, strides=strides, pred_scores=pred_scores, pred_boxes_px=pred_boxes_px, gt=gt,
      steps=steps, target=target, agree=same,
  )


if __name__ == "__main__":
  main()
