"""Tests of examples/train_pose.py: the shapes and their keypoints by hand, the hidden keypoints, the packed
ground truth, the keypoint AP (pycocotools' OKS) on hand-made predictions, the keypoints following NMS, the
missing-matplotlib message, and a short training run that must learn.

pycocotools and OpenCV come with the ``examples`` extra (``pip install -e ".[examples]"``); the tests that need
them are skipped without it. Every expected number below is worked by hand in the comment beside it.
"""

import importlib.util
import math
import pathlib
import sys
import types

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_pose.py"
_spec = importlib.util.spec_from_file_location("train_pose", _PATH)
pose = importlib.util.module_from_spec(_spec)
sys.modules["train_pose"] = pose
_spec.loader.exec_module(pose)

needs_coco = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None,
                                reason="pycocotools: the examples extra")
needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV: the examples extra")

# An upright triangle: centroid (32, 30), height 24, base half-width 8. Apex 2/3 of the height above the centroid,
# the base 1/3 below it.
UPRIGHT = {"apex": (32, 14), "right": (40, 38), "left": (24, 38), "centroid": (32, 30), "notch": (32, 38 - 0.4 * 24)}


# --- shapes and keypoints ----------------------------------------------------------------------------------


def test_keypoints_of_an_upright_and_a_turned_shape():
  triangle = pose.keypoints_of(0, (32, 30), 24, 8, 0.0)
  np.testing.assert_allclose(triangle, [UPRIGHT[k] for k in ("apex", "right", "left", "centroid")], atol=1e-9)
  dart = pose.keypoints_of(1, (32, 30), 24, 8, 0.0)
  np.testing.assert_allclose(dart, [UPRIGHT[k] for k in ("apex", "right", "left", "notch")], atol=1e-9)
  # Turned a quarter clockwise on the screen (y down): the apex points to +x, the base lies at x = 32 - 8, and
  # the corner met first going clockwise from the apex (to +y, down) is the right one.
  turned = pose.keypoints_of(0, (32, 30), 24, 8, math.pi / 2)
  np.testing.assert_allclose(turned, [(48, 30), (24, 38), (24, 22), (32, 30)], atol=1e-9)


def test_keypoint_order_turns_one_way_at_every_angle():
  # apex -> right -> left is clockwise on the screen: the cross product (right - apex) x (left - apex) > 0 with
  # y pointing down, whatever the angle.
  for angle in np.linspace(0, 2 * math.pi, 13):
    apex, right, left, _ = pose.keypoints_of(0, (32, 32), 20, 6, angle)
    (ax, ay), (bx, by) = right - apex, left - apex
    assert ax * by - ay * bx > 0, angle


def test_shape_masks_by_hand():
  triangle = pose.shape_mask(0, pose.keypoints_of(0, (32, 30), 24, 8, 0.0))
  dart = pose.shape_mask(1, pose.keypoints_of(1, (32, 30), 24, 8, 0.0))
  # Areas of a larger pair: base 32 x height 48 / 2 = 768; the dart lacks the triangle notch-right-left, 32 x
  # (0.4 x 48) / 2 = 307.2. To 5 %: the pixels along the outline count whole or not at all.
  big = [pose.shape_mask(kind, pose.keypoints_of(kind, (32, 34), 48, 16, 0.0)).sum() for kind in (0, 1)]
  assert big == [pytest.approx(768, rel=0.05), pytest.approx(768 - 307.2, rel=0.05)]
  inside = [(32, 17), (37, 36), (27, 36), (32, 30)]  # near the apex and the base corners, the centroid
  for x, y in inside:
    assert triangle[y, x], (x, y)
  for x, y in [(32, 12), (41, 36), (22, 36), (32, 39)]:  # above the apex, beside the corners, below the base
    assert not triangle[y, x] and not dart[y, x], (x, y)
  assert dart[17, 32] and dart[34, 37] and dart[34, 26]  # near the apex and the base corners
  assert not dart[33, 32] and not dart[36, 32]  # the notch: between the notch point (y = 28.4) and the base
  assert dart[26, 32]  # above the notch point


def test_in_squares_by_hand():
  squares = np.array([[10.0, 10.0, 2.0], [30.0, 20.0, 3.0]])  # [8, 12]^2 and [27, 33] x [17, 23]
  points = np.array([[[10, 10], [12, 8], [12.1, 10]], [[27, 23], [33.5, 20], [0, 0]]])
  np.testing.assert_array_equal(pose.in_squares(points, squares), [[True, True, False], [True, False, False]])
  assert pose.in_squares(points, np.zeros((0, 3))).shape == (2, 3) and not pose.in_squares(points, []).any()


def test_render_erases_squares_and_hides_the_keypoints_under_them():
  background = np.full((64, 64, 3), 0.1)
  triangle = (0, pose.keypoints_of(0, (20, 30), 24, 8, 0.0))  # apex (20, 14), base corners (28, 38), (12, 38)
  dart = (1, pose.keypoints_of(1, (48, 30), 24, 8, 0.0))
  square = [20.5, 14.5, 3.0]  # over the triangle's apex: pixels with centres in [17.5, 23.5] x [11.5, 17.5]
  image, rows, kpts = pose.render(background, [triangle, dart], [(1.0, 0.5, 0.0), (0.0, 1.0, 1.0)], [square])
  assert image.shape == (64, 64, 3) and image.dtype == np.float32
  np.testing.assert_allclose(rows, [[0, 12, 14, 28, 38], [1, 40, 14, 56, 38]], atol=1e-9)  # class, corners' box
  np.testing.assert_allclose(kpts[0, :, :2], triangle[1]) and np.testing.assert_allclose(kpts[1, :, :2], dart[1])
  np.testing.assert_array_equal(kpts[..., 2], [[0, 2, 2, 2], [2, 2, 2, 2]])  # only the apex is under the square
  np.testing.assert_allclose(image[16, 20], [0.1, 0.1, 0.1])  # erased: below the apex, inside the square
  np.testing.assert_allclose(image[19, 20], [1.0, 0.5, 0.0])  # just below the square: the triangle
  np.testing.assert_allclose(image[24, 48], [0.0, 1.0, 1.0])  # the dart, above its notch point (y = 28.4)
  np.testing.assert_allclose(image[36, 48], [0.1, 0.1, 0.1])  # its notch
  # A keypoint under no square stays visible; no shapes: empty labels.
  _, rows, kpts = pose.render(background, [], [], [])
  assert rows.shape == (0, 5) and kpts.shape == (0, 4, 3)


def test_make_image_labels():
  rng = np.random.default_rng(5)
  hidden = total = 0
  for _ in range(60):
    image, rows, kpts = pose.make_image(rng)
    assert image.shape == (64, 64, 3) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    assert 1 <= len(rows) <= pose.MAX_BOXES and rows.shape[1] == 5 and kpts.shape == (len(rows), 4, 3)
    assert set(rows[:, 0].astype(int)) <= {0, 1} and set(kpts[..., 2].ravel()) <= {0.0, 2.0}
    np.testing.assert_allclose(rows[:, 1:3], kpts[:, :3, :2].min(1)) and np.testing.assert_allclose(
        rows[:, 3:], kpts[:, :3, :2].max(1))  # the box is the corners' box
    assert rows[:, 1:].min() >= 0 and rows[:, 1:].max() <= 64  # wholly inside the image
    heights = np.hypot(*(kpts[:, 0, :2] - (kpts[:, 1, :2] + kpts[:, 2, :2]) / 2).T)
    assert heights.min() >= pose.MIN_HEIGHT - 1e-9 and heights.max() <= pose.MAX_HEIGHT + 1e-9
    hidden, total = hidden + np.sum(kpts[..., 2] == 0), total + kpts[..., 2].size
  # A shape has one erased square with chance HIDE = 0.4, over 1 (sometimes 2) of its 4 keypoints: ~10 %.
  assert 0.04 < hidden / total < 0.2


def test_make_dataset_packs_the_images_labels():
  images, gt = pose.make_dataset(5, np.random.default_rng(3))
  assert images.shape == (5, 64, 64, 3) and images.dtype == np.float32
  assert gt.keypoints.shape == (5, pose.MAX_BOXES, 4, 3) and gt.boxes.shape == (5, pose.MAX_BOXES, 4)
  rng = np.random.default_rng(3)  # the same draws, one image at a time
  for i in range(5):
    image, rows, kpts = pose.make_image(rng)
    np.testing.assert_array_equal(images[i], image)
    real = gt.mask[i]
    assert real.sum() == len(rows)
    np.testing.assert_array_equal(gt.labels[i][real], rows[:, 0])
    np.testing.assert_allclose(gt.boxes[i][real], rows[:, 1:], atol=1e-4)  # pixels again
    np.testing.assert_allclose(gt.keypoints[i][real], kpts, atol=1e-4)  # pixels, visibility kept
    assert not gt.keypoints[i][~real].any()  # padding: zeros


# --- keypoint AP (pycocotools) -------------------------------------------------------------------------------

BOX = np.array([20.0, 20.0, 40.0, 40.0])  # area 400
KPTS = np.array([[30, 21, 2], [38, 38, 2], [22, 38, 2], [30, 32, 2]], np.float64)


def dets(keypoints, scores, classes, boxes=None):
  keypoints = np.asarray(keypoints, np.float64).reshape(-1, 4, 3)
  boxes = np.tile(BOX, (len(keypoints), 1)) if boxes is None else np.asarray(boxes, np.float64)
  return boxes, np.asarray(scores, np.float64), np.asarray(classes), keypoints


def ap(detections, keypoints=KPTS, classes=(0,), boxes=(BOX,), **kw):
  return pose.keypoint_ap(detections, [np.array(boxes)], [np.array(classes)], [np.asarray(keypoints)[None]], **kw)


def moved(kpts, dx, which=slice(None)):
  out = np.array(kpts, np.float64)
  out[which, 0] += dx
  return out


@needs_coco
def test_perfect_keypoints_give_ap_one_and_none_give_zero():
  assert ap([dets(KPTS, [0.9], [0])]) == pytest.approx((1.0, 1.0))
  assert ap([dets(np.zeros((0, 4, 3)), [], [])]) == (0.0, 0.0)
  assert ap([dets(KPTS, [0.9], [1])]) == (0.0, 0.0)  # the right keypoints, the wrong class


@needs_coco
def test_shifted_keypoints_by_hand():
  # sigma 0.1 everywhere: OKS per keypoint exp(-d^2 / (2 area (2 sigma)^2)) = exp(-d^2 / 32). Every keypoint
  # 4 px off: exp(-1/2) = 0.607, a match at the OKS thresholds 0.50, 0.55, 0.60: 3 of the 10 of AP@0.5:0.95.
  assert ap([dets(moved(KPTS, 4.0), [0.9], [0])], sigmas=(0.1,) * 4) == pytest.approx((0.3, 1.0))
  # The script's own sigmas (0.08 for the corners: exp(-16 / 20.48) = 0.458; 0.1 for the inner point: 0.607)
  # average to 0.495: no match at 0.5.
  assert ap([dets(moved(KPTS, 4.0), [0.9], [0])]) == (0.0, 0.0)
  # Narrower sigmas, the same shift: exp(-16 / 8) = 0.135 for sigma 0.05: no match at all.
  assert ap([dets(moved(KPTS, 4.0), [0.9], [0])], sigmas=(0.05,) * 4) == (0.0, 0.0)


@needs_coco
def test_hidden_keypoints_are_left_out():
  far = moved(KPTS, 30.0, which=0)  # the apex predicted 30 px away, the rest exact
  # Labelled: OKS (exp(-900 / 32) + 3) / 4 = 0.75: a match up to 0.75, 6 of 10 thresholds.
  assert ap([dets(far, [0.9], [0])], sigmas=(0.1,) * 4) == pytest.approx((0.6, 1.0))
  hidden = KPTS.copy()
  hidden[0, 2] = 0
  assert ap([dets(far, [0.9], [0])], keypoints=hidden, sigmas=(0.1,) * 4) == pytest.approx((1.0, 1.0))


@needs_coco
def test_a_shape_with_every_keypoint_hidden_is_ignored():
  # Two shapes of one class; the second has no visible keypoint: COCO ignores it, so the best-scored detection,
  # on it, is neither a hit nor a false positive, and the exact one on the first shape gives AP 1.
  other = np.array([42.0, 42.0, 60.0, 60.0])
  unseen = np.column_stack([np.full(4, 51.0), np.full(4, 51.0), np.zeros(4)])
  truth = [np.stack([BOX, other])], [np.array([0, 0])], [np.stack([KPTS, unseen])]
  detections = [dets([KPTS, unseen], [0.5, 0.9], [0, 0], boxes=[BOX, other])]
  assert pose.keypoint_ap(detections, *truth) == pytest.approx((1.0, 1.0))
  seen = unseen.copy()
  seen[:, 2] = 2  # now labelled, and the detection on it 30 px off (OKS ~0): a false positive ranked first
  detections = [dets([KPTS, moved(unseen, 30.0)], [0.5, 0.9], [0, 0], boxes=[BOX, other])]
  # Precision 0 then 1/2 at recall 1/2 (the second shape is never found): AP 1/2 at every threshold.
  result = pose.keypoint_ap(detections, truth[0], truth[1], [np.stack([KPTS, seen])])
  assert result == pytest.approx((51 / 101 / 2, 51 / 101 / 2), abs=0.01)


# --- detection plumbing -------------------------------------------------------------------------------------


@needs_cv2
def test_detect_keeps_each_kept_anchors_keypoints():
  # The script's detections: train_toy.detect's NMS, each kept box followed by its own anchor's keypoints.
  boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40]]], np.float32)
  scores = np.zeros((1, 3, 2), np.float32)
  scores[0, :, 0] = [0.8, 0.9, 0.0]  # anchor 0 overlaps anchor 1 (IoU 0.82): suppressed
  scores[0, 2, 1] = 0.5
  keypoints = np.arange(3 * 4 * 3, dtype=np.float32).reshape(1, 3, 4, 3)  # anchor a holds 12 a ... 12 a + 11
  ((b, s, c, k),) = pose.toy.detect(scores, boxes, keypoints, conf=0.001, iou=0.6)
  order = np.argsort(-s)
  np.testing.assert_array_equal(b[order], boxes[0, [1, 2]])
  np.testing.assert_array_equal(c[order], [0, 1])
  np.testing.assert_array_equal(k[order], keypoints[0, [1, 2]])
  ((b, s, c),) = pose.toy.detect(scores, boxes, conf=0.001, iou=0.6)  # without: boxes, scores, classes only
  assert len(b) == 2


def test_draw_keypoints_marks_visible_hidden_and_predicted():
  calls = []
  ax = types.SimpleNamespace(plot=lambda *a, **kw: calls.append((a, kw)))
  gt = np.array([[[10, 5, 2], [14, 15, 2], [6, 15, 0], [10, 12, 2]]], np.float64)
  detections = (np.zeros((2, 4)), np.array([0.9, 0.1]), np.array([0, 0]), np.concatenate([gt, gt])[:, :, :3])
  detections[3][0, :, 2] = [0.9, 0.9, 0.2, 0.9]  # the first detection: its left corner predicted hidden
  pose.draw_keypoints(ax, gt, detections, min_score=0.3)
  # Ground truth: 3 visible markers and one grey cross; the detection scoring 0.9: its corners' outline and 3
  # markers; the one scoring 0.1: nothing.
  assert [a[-1] for a, _ in calls[:4]] == ["^", ">", "x", "o"]
  assert [a[:2] for a, _ in calls[:4]] == [(10.0, 5.0), (14.0, 15.0), (6.0, 15.0), (10.0, 12.0)]  # no shift
  np.testing.assert_array_equal(calls[4][0][0], [10, 14, 6, 10])
  assert [a[-1] for a, _ in calls[5:]] == ["^", ">", "o"]


# --- missing packages and a short run -------------------------------------------------------------------


def test_plot_without_matplotlib_exits_before_training(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
  monkeypatch.setattr(pose.toy, "fit", lambda *a, **kw: pytest.fail("trained although --plot cannot work"))
  for name in ("pycocotools", "pycocotools.cocoeval", "cv2"):  # they may be missing too: stand-ins
    monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
  with pytest.raises(SystemExit) as exit_info:
    pose.main(["--plot", "out.png", "--steps", "1"])
  message = str(exit_info.value.code)
  assert message.startswith("train_pose.py: --plot needs matplotlib") and 'pip install -e ".[examples]"' in message


@needs_coco
@needs_cv2
@pytest.mark.slow
def test_short_training_run_learns_keypoints(capsys, tmp_path):
  argv = ["--steps", "200", "--batch-size", "16", "--eval-images", "60", "--log-every", "100"]
  if importlib.util.find_spec("matplotlib") is not None:
    argv += ["--plot", str(tmp_path / "pose.png")]
  result = pose.main(argv)
  out = capsys.readouterr().out
  assert result["losses"].shape == (200,) and np.isfinite(result["losses"]).all()
  assert result["compilations"] == 1  # gt is an argument and shapes are fixed: one compiled step
  # Chance is ~0 (a keypoint AP needs all four keypoints within a few pixels); after 200 steps it is well above.
  assert result["ap50"] > 0.2 and 0.0 <= result["ap"] <= result["ap50"] <= 1.0
  lines = [line for line in out.splitlines() if line.startswith("step ")]
  assert [line.split()[1] for line in lines] == ["100/200", "200/200"] and all("keypoints" in x for x in lines)
  assert "keypoint AP@0.5" in out and "time: training" in out
  if "--plot" in argv:
    assert (tmp_path / "pose.png").stat().st_size > 0
