"""Tests of examples/train_toy.py: the mAP / NMS helpers on hand-made boxes, the data, and a short run."""

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_toy.py"
_spec = importlib.util.spec_from_file_location("train_toy", _PATH)
toy = importlib.util.module_from_spec(_spec)
sys.modules["train_toy"] = toy
_spec.loader.exec_module(toy)

# Two images, three classes: image 0 has a class-0 and a class-1 box, image 1 has a class-2 box.
GT_BOXES = [np.array([[0, 0, 10, 10], [20, 20, 40, 30]], np.float32), np.array([[5, 5, 25, 25]], np.float32)]
GT_CLASSES = [np.array([0, 1]), np.array([2])]


def dets(boxes, scores, classes):
  return (np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), np.array(classes, np.int64))


def no_dets():
  return dets([], [], [])


def test_map_is_one_for_perfect_predictions():
  detections = [dets(GT_BOXES[0], [0.9, 0.8], GT_CLASSES[0]), dets(GT_BOXES[1], [0.7], GT_CLASSES[1])]
  assert toy.mean_average_precision(detections, GT_BOXES, GT_CLASSES, num_classes=3) == 1.0


def test_map_is_zero_without_predictions():
  assert toy.mean_average_precision([no_dets(), no_dets()], GT_BOXES, GT_CLASSES, num_classes=3) == 0.0


def test_map_is_zero_for_wrong_class_or_place():
  detections = [
      dets(GT_BOXES[0], [0.9, 0.8], [1, 0]),  # right boxes, swapped classes
      dets([[60, 60, 80, 80]], [0.7], [2]),  # right class, no overlap
  ]
  assert toy.mean_average_precision(detections, GT_BOXES, GT_CLASSES, num_classes=3) == 0.0


def test_map_counts_iou_threshold_and_duplicates():
  shifted = [0, 0, 10, 14]  # IoU with [0, 0, 10, 10] is 100 / 140 = 0.71
  far = [0, 0, 10, 25]  # IoU 100 / 250 = 0.4
  one_class = [np.array([[0, 0, 10, 10]], np.float32)]
  cls0 = [np.array([0])]
  assert toy.mean_average_precision([dets([shifted], [0.9], [0])], one_class, cls0, 1) == 1.0
  assert toy.mean_average_precision([dets([far], [0.9], [0])], one_class, cls0, 1) == 0.0
  assert toy.mean_average_precision([dets([far], [0.9], [0])], one_class, cls0, 1, iou_threshold=0.3) == 1.0
  # A duplicate of a matched box is a false positive; ranked below the match it costs nothing (all-point AP).
  assert toy.mean_average_precision([dets([[0, 0, 10, 10]] * 2, [0.9, 0.8], [0, 0])], one_class, cls0, 1) == 1.0
  # A false positive ranked above the only match: precision 1/2 at recall 1.
  fp_first = dets([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])
  assert toy.mean_average_precision([fp_first], one_class, cls0, 1) == 0.5


def test_map_averages_over_classes_with_ground_truth():
  # Class 0 and 2 found, class 1 missed: (1 + 0 + 1) / 3.
  detections = [dets(GT_BOXES[0][:1], [0.9], [0]), dets(GT_BOXES[1], [0.7], [2])]
  assert toy.mean_average_precision(detections, GT_BOXES, GT_CLASSES, num_classes=5) == pytest.approx(2 / 3)
  # Half the boxes of a class found: AP 0.5.
  two = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)]
  assert toy.mean_average_precision([dets([[20, 20, 30, 30]], [0.5], [0])], two, [np.array([0, 0])], 1) == 0.5


def test_average_precision_all_point_envelope():
  # PR points (r, p): (0.5, 1), (0.5, 0.5), (1, 2/3); envelope: 1 up to r = 0.5, then 2/3.
  ap = toy.average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
  assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
  # A dip later recovered is lifted by the envelope: p(r <= 0.75) = 1.
  ap = toy.average_precision(np.array([0.25, 0.25, 0.5, 0.75]), np.array([1.0, 0.5, 2 / 3, 1.0]))
  assert ap == pytest.approx(0.75)
  assert toy.average_precision(np.array([]), np.array([])) == 0.0


def test_iou_matrix():
  a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]], np.float32)
  b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
  want = np.array([[50 / 150, 1.0, 0.0], [0.0, 4 / 100, 0.0]])
  np.testing.assert_allclose(toy.iou_matrix(a, b), want, rtol=1e-6)


def test_nms_is_class_aware_and_greedy():
  boxes = np.array(
      [
          [0, 0, 10, 10],  # 0: best of class 0
          [1, 0, 11, 10],  # 1: overlaps 0 (IoU 0.82), same class -> dropped
          [1, 0, 11, 10],  # 2: same place, other class -> kept
          [30, 30, 40, 40],  # 3: class 0, far away -> kept
          [0, 0, 10, 16],  # 4: class 0, IoU 0.625 with 0 -> dropped at 0.5, kept at 0.7
      ],
      np.float32,
  )
  scores = np.array([0.9, 0.85, 0.5, 0.3, 0.6], np.float32)
  classes = np.array([0, 0, 1, 0, 0])
  np.testing.assert_array_equal(toy.nms(boxes, scores, classes, iou_threshold=0.5), [0, 2, 3])
  np.testing.assert_array_equal(toy.nms(boxes, scores, classes, iou_threshold=0.7), [0, 4, 2, 3])
  np.testing.assert_array_equal(toy.nms(boxes, scores, classes, iou_threshold=0.5, max_det=2), [0, 2])
  assert toy.nms(boxes[:0], scores[:0], classes[:0]).shape == (0,)


def test_dataset_boxes_match_the_drawn_shapes():
  rng = np.random.default_rng(3)
  images, rows, gt = toy.make_dataset(12, rng)
  assert images.shape == (12, toy.IMAGE_SIZE, toy.IMAGE_SIZE, 3) and images.dtype == np.float32
  assert rows.shape[1] == 6 and gt.mask.sum() == len(rows)
  assert set(np.unique(rows[:, 1]).astype(int)) <= {0, 1, 2}
  # Each class painted alone fills its box: pixel extent within 1 px of the box.
  for kind in range(3):
    image = np.zeros((64, 64, 3), np.float32)
    box = np.array([10.3, 20.7, 40.2, 45.1])
    toy.draw_shape(image, kind, box, np.ones(3, np.float32))
    ys, xs = np.nonzero(image[..., 0])
    extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    np.testing.assert_allclose(extent, box, atol=1.0, err_msg=toy.CLASS_NAMES[kind])


def test_decode_predictions_applies_strides_and_threshold():
  import jax.numpy as jnp

  nc, reg_max = 3, toy.REG_MAX
  shapes = [(8, 8), (4, 4), (2, 2)]
  feats = [np.full((1, h, w, 4 * reg_max + nc), -10.0, np.float32) for h, w in shapes]
  # Level 1 (stride 16), cell (row 2, col 1): class 2 confident; every side's distribution peaked at bin 1.
  feats[1][0, 2, 1, 4 * reg_max + 2] = 5.0
  feats[1][0, 2, 1, : 4 * reg_max] = np.tile(np.eye(reg_max)[1] * 50.0, 4)
  (boxes, scores, classes), = toy.decode_predictions([jnp.asarray(f) for f in feats], nc, conf=0.5)
  centre = np.array([1.5, 2.5]) * 16
  np.testing.assert_allclose(boxes, [[*(centre - 16), *(centre + 16)]], atol=1e-3)
  np.testing.assert_allclose(scores, [1 / (1 + math.exp(-5.0))], rtol=1e-5)
  np.testing.assert_array_equal(classes, [2])


def test_short_training_run(tmp_path):
  plot = tmp_path / "pred.png"
  result = toy.main(["--steps", "4", "--batch-size", "4", "--eval-images", "8", "--plot", str(plot)])
  losses = result["train_losses"]
  assert losses.shape == (4,) and np.isfinite(losses).all()
  assert np.isfinite(result["loss_untrained"]) and np.isfinite(result["loss_trained"])
  assert 0.0 <= result["map_untrained"] <= 1.0 and 0.0 <= result["map_trained"] <= 1.0
  assert result["compilations"] == 1  # fixed shapes: one compiled train step for every batch
  if importlib.util.find_spec("matplotlib") is not None:
    assert plot.stat().st_size > 0
