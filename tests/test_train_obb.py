"""Tests of examples/train_obb.py: the polygon IoU, the VOC-style AP and the rotated NMS on hand-made boxes, the
drawn data against its labels, the angle head, the missing-matplotlib message, and a short training run.

OpenCV (drawing) comes with the ``examples`` extra (``pip install -e ".[examples]"``); the tests that need it
are skipped without it. Every expected number below is worked by hand in the comment beside it.
"""

import importlib.util
import math
import pathlib
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_obb.py"
_spec = importlib.util.spec_from_file_location("train_obb", _PATH)
obb = importlib.util.module_from_spec(_spec)
sys.modules["train_obb"] = obb
_spec.loader.exec_module(obb)

needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV: the examples extra")

SQ = np.array([20.0, 20.0, 10.0, 10.0, 0.0])  # a 10x10 square, area 100


def turned(box, angle):
  """``box`` with its angle replaced."""
  return np.array([*box[:4], angle])


def moved(box, along):
  """``box`` moved by ``along`` pixels along its own width axis (cos, sin)."""
  return np.array([box[0] + along * math.cos(box[4]), box[1] + along * math.sin(box[4]), *box[2:]])


def dets(boxes, scores, classes):
  return np.array(boxes, np.float64).reshape(-1, 5), np.array(scores, np.float64), np.array(classes, np.int64)


# --- polygon IoU -----------------------------------------------------------------------------------------


def test_iou_of_hand_made_rotated_boxes():
  iou = lambda a, b: float(obb.rotated_iou(a, b)[0, 0])  # noqa: E731
  a = turned(SQ, 0.4)
  assert iou(a, a) == pytest.approx(1.0, abs=1e-5)
  # A square turned by 90 degrees is the same square (w and h are equal): IoU 1.
  assert iou(a, turned(a, 0.4 + math.pi / 2)) == pytest.approx(1.0, abs=1e-5)
  # The same box turned by 180 degrees (any sides): IoU 1.
  thin = np.array([30.0, 30.0, 20.0, 4.0, 0.7])
  assert iou(thin, turned(thin, 0.7 + math.pi)) == pytest.approx(1.0, abs=1e-5)
  # Moved along its own axis by half a side: overlap 5 x 10 = 50, union 200 - 50 = 150; by 2: 80 / 120. (Edges that
  # coincide: where OpenCV 5.0's cv2.intersectConvexConvex gives 58.5 instead of 80.)
  assert iou(a, moved(a, 5.0)) == pytest.approx(1 / 3, abs=1e-5)
  assert iou(a, moved(a, 2.0)) == pytest.approx(2 / 3, abs=1e-5)
  # Axis-aligned vs turned by 45 degrees about the same centre: a regular octagon of inradius 5,
  # area 8 * 5^2 * tan(pi/8) = 200 (sqrt 2 - 1); IoU = (sqrt 2 - 1) / (2 - sqrt 2) = 1 / sqrt 2.
  assert iou(SQ, turned(SQ, math.pi / 4)) == pytest.approx(1 / math.sqrt(2), abs=1e-5)
  # A cross of two 20x4 bars: overlap 4 x 4 = 16, union 80 + 80 - 16 = 144.
  bar = np.array([30.0, 30.0, 20.0, 4.0, 0.0])
  assert iou(bar, turned(bar, math.pi / 2)) == pytest.approx(16 / 144, abs=1e-5)
  # Far apart, or one without area: 0.
  assert iou(SQ, moved(SQ, 30.0)) == 0.0
  assert iou(SQ, np.array([20.0, 20.0, 0.0, 10.0, 0.0])) == 0.0


def test_intersection_area_by_hand():
  # Unit square (counter-clockwise) and the square [0.5, 1.5] x [0.5, 1.5]: a quarter; a triangle inside: itself.
  unit = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
  assert obb.intersection_area(unit, unit + 0.5) == pytest.approx(0.25)
  assert obb.intersection_area(unit, np.array([[0.2, 0.2], [0.8, 0.2], [0.5, 0.8]])) == pytest.approx(0.18)
  assert obb.intersection_area(unit, unit + 2) == 0.0
  assert obb.intersection_area(unit, unit + [1, 0]) == 0.0  # a shared edge has no area


def test_iou_is_pairwise_and_symmetric():
  a = np.stack([SQ, moved(SQ, 5.0), turned(SQ, math.pi / 4)])
  b = np.stack([SQ, turned(SQ, 1.1)])
  iou = obb.rotated_iou(a, b)
  assert iou.shape == (3, 2)
  np.testing.assert_allclose(iou, obb.rotated_iou(b, a).T, atol=1e-6)
  np.testing.assert_allclose(iou[:2, 0], [1.0, 1 / 3], atol=1e-5)
  assert obb.rotated_iou(a, np.zeros((0, 5))).shape == (3, 0)


# --- AP ----------------------------------------------------------------------------------------------------

# Two images, three classes: image 0 has a class-0 and a class-1 box, image 1 a class-2 box.
GT_BOXES = [np.array([[15, 15, 12, 6, 0.3], [40, 40, 20, 8, 1.2]]), np.array([[30, 30, 10, 10, 0.0]])]
GT_CLASSES = [np.array([0, 1]), np.array([2])]


def ap(detections, boxes=GT_BOXES, classes=GT_CLASSES, **kw):
  return obb.average_precision(detections, boxes, classes, 3, **kw)


def test_ap_is_one_for_perfect_predictions_and_zero_without_any():
  perfect = [dets(GT_BOXES[0], [0.9, 0.8], [0, 1]), dets(GT_BOXES[1], [0.7], [2])]
  m, aps = ap(perfect)
  assert m == pytest.approx(1.0) and aps == pytest.approx([1.0, 1.0, 1.0])
  assert ap([dets([], [], []), dets([], [], [])]) == (0.0, [0.0, 0.0, 0.0])


def test_ap_is_zero_for_the_wrong_class_or_place():
  swapped = [dets(GT_BOXES[0], [0.9, 0.8], [1, 0]), dets(GT_BOXES[1], [0.7], [0])]  # right boxes, wrong classes
  assert ap(swapped) == (0.0, [0.0, 0.0, 0.0])
  elsewhere = [dets(GT_BOXES[1], [0.9], [2]), dets(GT_BOXES[0], [0.9, 0.8], [0, 1])]  # right classes, other image
  assert ap(elsewhere) == (0.0, [0.0, 0.0, 0.0])


def test_ap_of_a_square_predicted_turned_by_90_degrees():
  # The class-2 GT is a square: predicted at angle pi/2 it is the same box, IoU 1, a match.
  turned90 = [dets(GT_BOXES[0], [0.9, 0.8], [0, 1]), dets([[30, 30, 10, 10, math.pi / 2]], [0.7], [2])]
  assert ap(turned90)[0] == pytest.approx(1.0)


def test_ap_partial_recall_duplicates_and_threshold():
  one, two = turned(SQ, 0.2), np.array([45.0, 45.0, 10.0, 10.0, 0.9])
  gt_boxes, gt_classes = [np.stack([one, two])], [np.array([0, 0])]
  # One of two GTs found at precision 1: recall 0.5 at precision 1, AP 0.5.
  m, aps = obb.average_precision([dets([one], [0.9], [0])], gt_boxes, gt_classes, 1)
  assert m == pytest.approx(0.5) and aps == pytest.approx([0.5])
  # A duplicate of the first GT ranked between the two: TP, FP (GT already taken), TP. Precision 1, 1/2, 2/3 at
  # recall 1/2, 1/2, 1; the envelope is 1 up to recall 1/2 and 2/3 after: AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
  m, _ = obb.average_precision([dets([one, one, two], [0.9, 0.8, 0.7], [0, 0, 0])], gt_boxes, gt_classes, 1)
  assert m == pytest.approx(5 / 6)
  # The same boxes scored the other way: TP, TP, then the FP: AP 1 (the FP comes after full recall).
  m, _ = obb.average_precision([dets([one, one, two], [0.9, 0.1, 0.7], [0, 0, 0])], gt_boxes, gt_classes, 1)
  assert m == pytest.approx(1.0)
  # A detection moved by half a side (IoU 1/3): a miss at 0.5, a match at 0.3.
  half = [dets([moved(one, 5.0)], [0.9], [0])]
  assert obb.average_precision(half, [one[None]], [np.array([0])], 1)[0] == 0.0
  assert obb.average_precision(half, [one[None]], [np.array([0])], 1, iou=0.3)[0] == pytest.approx(1.0)


def test_ap_leaves_out_classes_without_ground_truth():
  # Class 2 has no GT: its AP is nan and the mean is over classes 0 and 1 (1.0 and 0.0).
  detections = [dets([GT_BOXES[0][0], GT_BOXES[0][0]], [0.9, 0.5], [0, 2])]
  m, aps = obb.average_precision(detections, GT_BOXES[:1], GT_CLASSES[:1], 3)
  assert m == pytest.approx(0.5) and aps[:2] == [1.0, 0.0] and math.isnan(aps[2])
  assert obb.average_precision(detections, [np.zeros((0, 5))], [np.zeros(0, int)], 3)[0] == 0.0


# --- NMS ---------------------------------------------------------------------------------------------------


def test_rotated_nms_is_greedy_and_class_aware():
  a = turned(SQ, 0.4)
  b = moved(a, 2.0)  # overlap 8 x 10 = 80, union 120: IoU 2/3 with a
  bar = np.array([45.0, 45.0, 20.0, 4.0, 0.0])
  boxes = np.stack([b, a, b, bar, turned(bar, math.pi / 2)])  # the crossed bars: IoU 16/144 = 1/9
  scores = np.array([0.8, 0.9, 0.5, 0.3, 0.2])
  classes = np.array([0, 0, 1, 0, 0])
  # a (0.9) drops b of its class (IoU 2/3 > 0.6); b of class 1 stays; the bars (1/9) both stay. Best first.
  np.testing.assert_array_equal(obb.rotated_nms(boxes, scores, classes, iou=0.6), [1, 2, 3, 4])
  np.testing.assert_array_equal(obb.rotated_nms(boxes, scores, classes, iou=0.7), [1, 0, 2, 3, 4])  # 2/3 < 0.7
  np.testing.assert_array_equal(obb.rotated_nms(boxes, scores, classes, iou=0.1), [1, 2, 3])  # 1/9 > 0.1
  # A dropped box suppresses nothing: c overlaps b (IoU 2/3) but not a (moved 4: IoU 6/14 = 0.43 < 0.6).
  c = moved(a, 4.0)
  np.testing.assert_array_equal(obb.rotated_nms(np.stack([a, b, c]), [0.9, 0.8, 0.7], [0, 0, 0], iou=0.6), [0, 2])
  assert obb.rotated_nms(np.zeros((0, 5)), np.zeros(0), np.zeros(0, int)).shape == (0,)


def test_detect_takes_each_anchors_best_class_above_the_threshold():
  a = turned(SQ, 0.4)
  boxes = np.stack([a, moved(a, 2.0), moved(a, 30.0)])[None]
  scores = np.zeros((1, 3, 2), np.float32)
  scores[0, 0] = [0.9, 0.2]
  scores[0, 1] = [0.8, 0.1]  # dropped by anchor 0 (IoU 2/3, same class)
  scores[0, 2] = [0.001, 0.005]  # below the threshold
  ((kept, s, c),) = obb.detect(scores, boxes, conf=0.01, iou=0.6)
  np.testing.assert_allclose(kept, boxes[0, :1])
  np.testing.assert_allclose(s, [0.9])
  np.testing.assert_array_equal(c, [0])
  ((kept, s, c),) = obb.detect(scores, boxes, conf=0.001)
  np.testing.assert_array_equal(c, [0, 1])  # anchor 2's best class is 1


# --- data --------------------------------------------------------------------------------------------------

BOX = np.array([32.0, 30.0, 40.0, 24.0, 0.5])


def pixel(image, box, u, v):
  """The pixel holding the point ``(u, v)`` of the box's own frame (units of w and h, from the centre)."""
  cx, cy, w, h, t = box
  x = cx + u * w * math.cos(t) - v * h * math.sin(t)
  y = cy + u * w * math.sin(t) + v * h * math.cos(t)
  return image[int(y), int(x)]


# Per kind: points (u, v) inside the shape and outside it, 1.5 px or more from its outline (BOX: 40 x 24 px).
INSIDE_OUTSIDE = {
    "rectangle": ([(0, 0), (0.4, 0.4), (-0.4, 0.4), (0.4, -0.4), (-0.4, -0.4)],
                  [(0.6, 0), (-0.6, 0), (0, 0.6), (0, -0.6)]),
    "ellipse": ([(0, 0), (0.4, 0), (-0.4, 0), (0, 0.4), (0, -0.4)],  # (0.45, 0.45): 4 (0.45^2 + 0.45^2) = 1.62 > 1
                [(0.45, 0.45), (-0.45, 0.45), (0.45, -0.45), (-0.45, -0.45)]),
    # apex at v = -1/2: at height v the half-width is (v + 1/2) w / 2, i.e. 0.45 w at v = 0.4.
    "triangle": ([(0, 0), (0, -0.35), (0.4, 0.4), (-0.4, 0.4)], [(0.4, -0.4), (-0.4, -0.4), (0.6, 0.4)]),
}
AREAS = {"rectangle": 40 * 24, "ellipse": math.pi * 20 * 12, "triangle": 40 * 24 / 2}


@needs_cv2
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_each_rotated_shape_fills_its_box(kind):
  name = obb.CLASS_NAMES[kind]
  image = np.zeros((64, 64, 3), np.float32)
  obb.draw_shape(image, kind, BOX, (1.0, 0.5, 0.25))
  inside, outside = INSIDE_OUTSIDE[name]
  for u, v in inside:
    np.testing.assert_array_equal(pixel(image, BOX, u, v), [1.0, 0.5, 0.25], err_msg=f"{name} {u, v}")
  for u, v in outside:
    np.testing.assert_array_equal(pixel(image, BOX, u, v), [0, 0, 0], err_msg=f"{name} {u, v}")
  # The painted area is the shape's area (w h, pi w h / 4, w h / 2) to within 2 % (pixels along the outline).
  assert np.count_nonzero(image[..., 0]) == pytest.approx(AREAS[name], rel=0.02)


@needs_cv2
def test_a_turned_triangle_points_the_other_way():
  image = np.zeros((64, 64, 3), np.float32)
  obb.draw_shape(image, 2, BOX, (1.0, 1.0, 1.0), turn=True)  # apex at v = +1/2
  for u, v in [(0, 0), (0, 0.35), (0.4, -0.4), (-0.4, -0.4)]:
    assert pixel(image, BOX, u, v)[0] == 1.0, (u, v)
  for u, v in [(0.4, 0.4), (-0.4, 0.4)]:
    assert pixel(image, BOX, u, v)[0] == 0.0, (u, v)


def test_regularize_keeps_the_box_and_puts_the_angle_in_a_quarter_turn():
  same = obb.regularize(np.array([5.0, 6.0, 10.0, 20.0, 0.3]))
  np.testing.assert_allclose(same, [5, 6, 10, 20, 0.3])
  swapped = obb.regularize(np.array([5.0, 6.0, 10.0, 20.0, 2.0]))  # 2.0 - pi/2 = 0.429, sides swapped
  np.testing.assert_allclose(swapped, [5, 6, 20, 10, 2.0 - math.pi / 2])
  np.testing.assert_allclose(obb.regularize(np.array([5.0, 6.0, 10.0, 20.0, math.pi + 0.3])), same)
  # The same four corners, in another order.
  before = obb.corners(np.array([5.0, 6.0, 10.0, 20.0, 2.0]))
  after = obb.corners(swapped)
  np.testing.assert_allclose(np.sort(before, axis=0), np.sort(after, axis=0), atol=1e-9)


def test_corners_by_hand():
  # A 4x2 box at (10, 20) turned by 90 degrees: the width axis points down (+y), the height axis left (-x).
  np.testing.assert_allclose(obb.corners(np.array([10.0, 20.0, 4.0, 2.0, math.pi / 2])),
                             [[11, 18], [11, 22], [9, 22], [9, 18]], atol=1e-9)


@needs_cv2
def test_make_image_labels_match_the_pixels():
  rng = np.random.default_rng(7)
  for _ in range(40):
    image, rows, colours = obb.make_image(rng)
    assert image.shape == (64, 64, 3) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    assert 1 <= len(rows) <= obb.MAX_BOXES and rows.shape[1] == 6 and colours.shape == (len(rows), 3)
    assert set(rows[:, 0].astype(int)) <= {0, 1, 2}
    assert (rows[:, 5] >= 0).all() and (rows[:, 5] < math.pi / 2).all()  # Ultralytics' angle range
    assert rows[:, 3:5].min() >= obb.MIN_SIDE and rows[:, 3:5].max() <= obb.MAX_SIDE
    assert obb.corners(rows[:, 1:]).min() >= -1e-6 and obb.corners(rows[:, 1:]).max() <= 64 + 1e-6  # inside
    for row, colour in zip(rows, colours):
      np.testing.assert_array_equal(image[int(row[2]), int(row[1])], colour)  # the centre pixel: the colour


@needs_cv2
def test_make_dataset_packs_the_images_labels():
  images, gt = obb.make_dataset(6, np.random.default_rng(3))
  assert images.shape == (6, 64, 64, 3) and images.dtype == np.float32
  assert gt.boxes.shape == (6, obb.MAX_BOXES, 5) and gt.labels.shape == gt.mask.shape == (6, obb.MAX_BOXES)
  rng = np.random.default_rng(3)  # the same draws one image at a time
  for i in range(6):
    image, rows, _ = obb.make_image(rng)
    np.testing.assert_array_equal(images[i], image)
    assert gt.mask[i].sum() == len(rows)
    np.testing.assert_allclose(gt.boxes[i][gt.mask[i]], rows[:, 1:], rtol=1e-5, atol=1e-4)  # pixels again
    np.testing.assert_array_equal(gt.labels[i][gt.mask[i]], rows[:, 0])
  again, gt2 = obb.make_dataset(6, np.random.default_rng(3))
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(gt.boxes, gt2.boxes)


# --- model ------------------------------------------------------------------------------------------------


@needs_cv2
@pytest.mark.slow
def test_detector_outputs_head_and_angle_maps():
  model = obb.OBBDetector(rngs=obb.nnx.Rngs(0))
  feats, angles = model(jnp.zeros((2, 64, 64, 3)))
  r, nc = obb.CONFIG.reg_max, obb.CONFIG.num_classes
  assert [f.shape for f in feats] == [(2, s, s, 4 * r + nc) for s in (8, 4, 2)]
  assert [a.shape for a in angles] == [(2, s, s, 1) for s in (8, 4, 2)]
  for a in angles:  # (sigmoid - 1/4) pi lies in [-pi/4, 3 pi/4)
    assert float(a.min()) >= -math.pi / 4 and float(a.max()) <= 3 * math.pi / 4
  total, parts = jaxtal.OBBLoss(obb.CONFIG)(feats, angles, obb.make_dataset(2, np.random.default_rng(0))[1])
  assert np.isfinite(float(total)) and float(parts.angle) >= 0
  scores, boxes = obb.predict(model, jnp.zeros((2, 64, 64, 3)))
  assert scores.shape == (2, 84, nc) and boxes.shape == (2, 84, 5)
  # The bias prior (flat bins) puts every box around its anchor: centre = anchor centre in pixels.
  anchors, strides = jaxtal.make_anchors([(8, 8), (4, 4), (2, 2)], obb.CONFIG.strides)
  np.testing.assert_allclose(boxes[..., :2], jnp.broadcast_to(anchors * strides, (2, 84, 2)), atol=2.0)


# --- missing packages and a short run -------------------------------------------------------------------


def test_plot_without_matplotlib_exits_before_training(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
  monkeypatch.setattr(obb.toy, "task_step", lambda *a: pytest.fail("trained although --plot cannot work"))
  monkeypatch.setitem(sys.modules, "cv2", sys.modules.get("cv2") or types.ModuleType("cv2"))  # a stand-in if missing
  with pytest.raises(SystemExit) as exit_info:
    obb.main(["--plot", "out.png", "--steps", "1"])
  message = str(exit_info.value.code)
  assert "--plot needs matplotlib" in message and 'pip install -e ".[examples]"' in message


@needs_cv2
@pytest.mark.slow
def test_short_training_run(capsys, tmp_path):
  argv = ["--steps", "4", "--batch-size", "4", "--eval-images", "8", "--log-every", "2"]
  if importlib.util.find_spec("matplotlib") is not None:
    argv += ["--plot", str(tmp_path / "pred.png")]
  result = obb.main(argv)
  out = capsys.readouterr().out
  assert result["losses"].shape == (4,) and np.isfinite(result["losses"]).all()
  assert 0.0 <= result["map50"] <= 1.0 and len(result["aps"]) == 3
  assert result["compilations"] == 1  # gt is an argument and shapes are fixed: one compiled step
  lines = [line for line in out.splitlines() if line.startswith("step ")]
  assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
  assert all("of which angle" in line for line in lines)
  assert "rotated mAP@0.5" in out and "polygon IoU" in out and "time: training" in out
  if "--plot" in argv:
    assert (tmp_path / "pred.png").stat().st_size > 0
