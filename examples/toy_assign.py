"""Replays the seed walkthrough of YOLOv8's task-aligned assigner with jaxtal (CPU, seconds).

    python examples/toy_assign.py

Same setup as the seed: batch 4, 3 classes, head maps 8x8 / 4x4 / 2x2 of 67 = 4 * 16 + 3 channels for a
640x640 input (strides 80 / 160 / 320, 8 * 8 + 4 * 4 + 2 * 2 = 84 anchors) and the seed's seven labels.
The head outputs are seeded standard-normal noise in the seed's NCHW layout (``torch.randn(4, 67, 8, 8)``).
The seed's own random numbers cannot be reproduced, so the align metrics and positives differ from its
printout; the anchors, the GT boxes in pixels and the in-box mask are deterministic and match it
(``tests/test_seed.py`` pins them).

Stages, each named after the seed's function: ``pred_process`` -> ``jaxtal.flatten_head``,
``make_anchors`` -> ``jaxtal.make_anchors``, ``decode`` -> ``jaxtal.decode_boxes``, ``ann_process`` ->
``jaxtal.pack_labels``, ``TaskAlignedAssigner`` -> ``jaxtal.task_aligned_assign``. The assigner's inner
steps (in-box mask, align metric) are recomputed here from jaxtal's pieces so they can be printed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxtal
from jaxtal.head import xyxy_to_ltrb

BATCH = 4
NUM_CLASSES = 3
REG_MAX = 16
IMAGE_SIZE = (640, 640)  # (H, W)
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
  channels = 4 * REG_MAX + NUM_CLASSES
  return [rng.standard_normal((BATCH, channels, h, w)).astype(np.float32) for h, w in FEATURE_SHAPES]


@jax.jit  # each helper compiles once instead of op by op (eager JAX compiles every primitive)
def in_box_mask(anchor_px: jax.Array, gt_boxes: jax.Array, eps: float = 1e-9) -> jax.Array:
  """Seed's ``__get_in_gts_mask``: ``(A, 2)`` anchors, ``(M, 4)`` boxes -> ``(M, A)``, centre strictly inside."""
  deltas = xyxy_to_ltrb(gt_boxes[:, None, :], anchor_px[None, :, :])  # (M, A, 4): anchor - lt, rb - anchor
  return deltas.min(axis=-1) > eps


@jax.jit
def align_metric(scores, pred_boxes, anchor_px, gt_labels, gt_boxes, gt_mask, alpha=0.5, beta=6.0):
  """Seed's ``__refine_select`` for one image: ``s^alpha * CIoU^beta`` on in-box pairs, ``(M, A)``.

  ``scores (A, nc)`` probabilities, ``pred_boxes (A, 4)`` and ``anchor_px (A, 2)`` in pixels,
  ``gt_labels (M,)``, ``gt_boxes (M, 4)``, ``gt_mask (M,)``. Returns ``(metric, overlaps)``.
  """
  keep = in_box_mask(anchor_px, gt_boxes) & gt_mask[:, None]
  ciou = jaxtal.box_iou(gt_boxes[:, None, :], pred_boxes[None, :, :], "ciou")  # (M, A)
  overlaps = jnp.where(keep, jnp.maximum(ciou, 0.0), 0.0)
  class_scores = scores[:, gt_labels].T  # (M, A): each GT's class probability at every anchor
  return jnp.where(keep, class_scores**alpha * overlaps**beta, 0.0), overlaps


def assignment_grid(fg_mask, gt_index, feature_shapes=FEATURE_SHAPES) -> list[str]:
  """Text picture of one image's assignment: per level a grid of GT indices, '.' for background.

  ``fg_mask (A,)``, ``gt_index (A,)``; levels side by side, rows top to bottom.
  """
  cells = np.where(np.asarray(fg_mask), np.asarray(gt_index).astype(str), ".")
  grids, start = [], 0
  for h, w in feature_shapes:
    level = cells[start : start + h * w].reshape(h, w)
    grids.append([" ".join(row) for row in level])
    start += h * w
  widths = [len(g[0]) for g in grids]
  height = max(len(g) for g in grids)
  return [
      "   ".join((g[r] if r < len(g) else "").ljust(wd) for g, wd in zip(grids, widths)).rstrip()
      for r in range(height)
  ]


def main(seed: int = 0) -> dict:
  """Runs and prints every stage; returns the intermediate arrays (for tests)."""
  with np.printoptions(precision=4, suppress=True, linewidth=120):  # scoped: callers keep theirs
    return _main(seed)


def _main(seed: int) -> dict:
  feats = [jnp.asarray(f) for f in head_outputs(seed)]
  print("== inputs: head maps (NCHW, like the seed's torch.randn) ==")
  for i, f in enumerate(feats):
    print(f"  level {i}: {f.shape}  (b, 4 * reg_max + nc, H, W), stride {STRIDES[i]}")

  # pred_process: (b, 67, H, W) per level -> (b, 84, 67), split into box bins and class logits.
  pred_dist, pred_logits = jaxtal.flatten_head(feats, NUM_CLASSES, REG_MAX, layout="NCHW")
  print("\n== pred_process -> flatten_head ==")
  print(f"  pred_dist {pred_dist.shape} (b, A, 4R)   pred_logits {pred_logits.shape} (b, A, nc)")

  # make_anchors: one anchor per cell, its centre in grid units of its level, and that level's stride.
  anchors, anchor_strides = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
  anchor_px = anchors * anchor_strides
  print("\n== make_anchors ==")
  print(f"  anchor_points {anchors.shape}, strides {anchor_strides.shape}")
  print(f"  first anchors (grid units): {np.asarray(anchors[:3]).tolist()}  level starts at 0, 64, 80")
  print(f"  strides per level: {np.unique(np.asarray(anchor_strides)).tolist()}")

  # decode: softmax over 16 bins per side, expectation = ltrb distance, then xyxy around the anchor.
  pred_boxes = jaxtal.decode_boxes(pred_dist, anchors, REG_MAX)
  pred_boxes_px = pred_boxes * anchor_strides
  pred_scores = jax.nn.sigmoid(pred_logits)
  print("\n== decode -> decode_boxes ==")
  print(f"  pred_boxes {pred_boxes.shape} (b, A, 4) xyxy grid units; image 0, anchor 0 in pixels:")
  print(f"  {np.asarray(pred_boxes_px[0, 0])}")

  # ann_process: rows -> (b, M) padded arrays, xywh -> xyxy pixels; padding is read from `mask`.
  gt = jaxtal.pack_labels(SEED_LABELS, BATCH, MAX_BOXES, IMAGE_SIZE)
  print("\n== ann_process -> pack_labels ==")
  print(f"  labels {gt.labels.shape}  boxes {gt.boxes.shape}  mask {gt.mask.shape}")
  print("  gt boxes in pixels (b, M, 4), padding rows are zero:")
  print(np.asarray(gt.boxes))
  print(f"  gt labels:\n{gt.labels}\n  gt mask:\n{gt.mask.astype(int)}")

  # Inside the assigner, image 0: which anchor centres fall inside each GT, and the align metric.
  mask0 = in_box_mask(anchor_px, jnp.asarray(gt.boxes[0]))
  metric0, overlaps0 = align_metric(
      pred_scores[0], pred_boxes_px[0], anchor_px, jnp.asarray(gt.labels[0]), jnp.asarray(gt.boxes[0]),
      jnp.asarray(gt.mask[0]),
  )
  print("\n== image 0: in_gts_mask (M, A) ==")
  print(np.asarray(mask0).astype(int))
  print("\n== image 0: align_metric (M, A) = score^0.5 * CIoU^6 on in-box pairs; non-zero entries ==")
  for m in range(MAX_BOXES):
    nz = np.flatnonzero(np.asarray(metric0[m]))
    print(f"  GT {m}: " + (", ".join(f"{a}: {float(metric0[m, a]):.3e}" for a in nz) or "(none)"))
  zero = [m for m in range(MAX_BOXES) if gt.mask[0, m] and not np.any(np.asarray(metric0[m]))]
  if zero:
    # The seed's top-k gave such a GT anchors 0..9 whatever their position; here only in-box anchors count.
    print(f"  real GTs with all-zero metrics: {zero} (their CIoUs clamp to 0); they keep in-box anchors only")

  # TaskAlignedAssigner: top-k per GT, keep in-box, resolve conflicts, build targets.
  target = jax.jit(jaxtal.task_aligned_assign)(pred_scores, pred_boxes_px, anchor_px, gt)  # one compile, not op by op
  print("\n== TaskAlignedAssigner -> task_aligned_assign ==")
  for name, x in target._asdict().items():
    print(f"  {name:9s} {x.shape} {x.dtype}")
  fg0 = np.flatnonzero(np.asarray(target.fg_mask[0]))
  print(f"\n  image 0 positives (anchor indices): {fg0.tolist()}")
  print(f"  their GT: {np.asarray(target.gt_index[0])[fg0].tolist()}")
  print(f"  target labels: {np.asarray(target.labels[0])[fg0].tolist()}")
  print(f"  target boxes (pixels):\n{np.asarray(target.boxes[0])[fg0]}")
  print(f"  target scores (one-hot x normalised metric):\n{np.asarray(target.scores[0])[fg0]}")
  in_box_all = jax.vmap(in_box_mask, in_axes=(None, 0))(anchor_px, jnp.asarray(gt.boxes))  # (b, M, A)
  owner_in_box = jnp.take_along_axis(in_box_all, target.gt_index[:, None, :], axis=1)[:, 0]
  # Unlike the seed's own top-k (which let a GT with all-zero metrics claim anchors 0..9), positives are in-box.
  print(f"  every positive lies inside its GT: {bool(jnp.all(owner_in_box | ~target.fg_mask))}")

  print("\n== assignment per image (GT index per anchor, '.' background; levels 8x8 | 4x4 | 2x2) ==")
  for i in range(BATCH):
    legend = ", ".join(
        f"GT {m}: class {int(gt.labels[i, m])}" for m in range(MAX_BOXES) if gt.mask[i, m]
    )
    print(f"image {i} ({legend}), {int(target.fg_mask[i].sum())} positives")
    for line in assignment_grid(target.fg_mask[i], target.gt_index[i]):
      print("  " + line)
  return dict(
      feats=feats, pred_dist=pred_dist, pred_logits=pred_logits, anchors=anchors, anchor_strides=anchor_strides,
      pred_boxes_px=pred_boxes_px, pred_scores=pred_scores, gt=gt, in_box0=mask0, metric0=metric0,
      overlaps0=overlaps0, target=target,
  )


if __name__ == "__main__":
  main()
