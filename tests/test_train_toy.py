"""Tests of examples/train_toy.py: the COCO-mAP wrapper, NMS and the NMS-free selection on hand-made boxes, the
data, the one-to-one head's detached input, the zero-positive count, the progress output, the missing-matplotlib
message, and short training runs (default and ``--end2end``).

pycocotools and OpenCV come with the ``examples`` extra (``pip install -e ".[examples]"``); the tests that need
them are skipped without it.
"""

import functools
import importlib.util
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_toy.py"
_spec = importlib.util.spec_from_file_location("train_toy", _PATH)
toy = importlib.util.module_from_spec(_spec)
sys.modules["train_toy"] = toy
_spec.loader.exec_module(toy)

needs_coco = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None, reason="pycocotools: the examples extra")
needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV: the examples extra")

# Two images, three classes: image 0 has a class-0 and a class-1 box, image 1 a class-2 box.
GT_BOXES = [np.array([[0, 0, 10, 10], [20, 20, 40, 30]], np.float32), np.array([[5, 5, 25, 25]], np.float32)]
GT_CLASSES = [np.array([0, 1]), np.array([2])]


def dets(boxes, scores, classes):
  return np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), np.array(classes, np.int64)


# --- mAP (pycocotools) --------------------------------------------------------------------------


@needs_coco
def test_map_is_one_for_perfect_predictions():
  detections = [dets(GT_BOXES[0], [0.9, 0.8], GT_CLASSES[0]), dets(GT_BOXES[1], [0.7], GT_CLASSES[1])]
  assert toy.coco_map(detections, GT_BOXES, GT_CLASSES) == pytest.approx((1.0, 1.0))


@needs_coco
def test_map_is_zero_without_predictions():
  assert toy.coco_map([dets([], [], []), dets([], [], [])], GT_BOXES, GT_CLASSES) == (0.0, 0.0)


@needs_coco
def test_map_is_zero_for_the_wrong_class_or_place():
  swapped = [dets(GT_BOXES[0], [0.9, 0.8], [1, 0]), dets(GT_BOXES[1], [0.7], [0])]  # right boxes, wrong classes
  assert toy.coco_map(swapped, GT_BOXES, GT_CLASSES) == (0.0, 0.0)
  elsewhere = [dets([[50, 50, 60, 60]], [0.9], [0]), dets([[40, 40, 60, 60]], [0.7], [2])]  # right class, no overlap
  assert toy.coco_map(elsewhere, GT_BOXES, GT_CLASSES) == (0.0, 0.0)


@needs_coco
def test_map_iou_thresholds_and_partial_recall():
  # IoU 100 / 140 = 0.714: a match at the thresholds 0.50 ... 0.70, 5 of the 10 of mAP@0.5:0.95.
  one = [np.array([[0, 0, 10, 10]], np.float32)]
  assert toy.coco_map([dets([[0, 0, 10, 14]], [0.9], [0])], one, [np.array([0])]) == pytest.approx((0.5, 1.0))
  # One of two boxes found at precision 1: recall 0.5, i.e. 51 of COCO's 101 recall points.
  two = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)]
  assert toy.coco_map([dets([[20, 20, 30, 30]], [0.5], [0])], two, [np.array([0, 0])]) == pytest.approx((51 / 101,) * 2)


# --- NMS (OpenCV) and decoding --------------------------------------------------------------------


@needs_cv2
def test_detect_keeps_the_best_class_and_suppresses_per_class():
  boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [30, 30, 40, 40], [50, 50, 60, 60]]], np.float32)
  scores = np.zeros((1, 5, 3), np.float32)
  scores[0, :, 0] = [0.9, 0.8, 0.0, 0.3, 0.0]  # anchor 1 overlaps anchor 0 (IoU 0.82): suppressed
  scores[0, 2, 1] = 0.5  # same place as anchor 1, other class: kept
  scores[0, 4, 2] = 0.0001  # below the confidence threshold
  ((kept, s, c),) = toy.detect(scores, boxes, conf=0.001, iou=0.6)
  order = np.argsort(-s)
  np.testing.assert_array_equal(kept[order], boxes[0, [0, 2, 3]])
  np.testing.assert_allclose(s[order], [0.9, 0.5, 0.3])
  np.testing.assert_array_equal(c[order], [0, 1, 0])


def test_top_detections_keeps_the_best_boxes_above_the_threshold_without_suppression():
  # Anchors 0 and 1 overlap (IoU 0.82) with the same class: NMS would drop 1, the one-to-one selection keeps both.
  boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40], [50, 50, 60, 60], [5, 5, 9, 9]]], np.float32)
  scores = np.zeros((1, 5, 3), np.float32)
  scores[0, :, 0] = [0.9, 0.8, 0.1, 0.0, 0.0]
  scores[0, 2, 2] = 0.3  # anchor 2's best class is 2, not 0
  scores[0, 3, 1] = 0.0005  # below the confidence threshold
  scores[0, 4, 1] = 0.6
  ((kept, s, c),) = toy.top_detections(scores, boxes, conf=0.001, max_det=100)
  np.testing.assert_array_equal(kept, boxes[0, [0, 1, 4, 2]])  # best first
  np.testing.assert_allclose(s, [0.9, 0.8, 0.6, 0.3])
  np.testing.assert_array_equal(c, [0, 0, 1, 2])
  # max_det keeps the best ones; a higher threshold drops the rest; an image with nothing above it gives nothing.
  ((kept, s, c),) = toy.top_detections(scores, boxes, conf=0.001, max_det=2)
  np.testing.assert_array_equal(kept, boxes[0, [0, 1]])
  ((kept, s, c),) = toy.top_detections(scores, boxes, conf=0.7)
  np.testing.assert_allclose(s, [0.9, 0.8])
  ((kept, s, c),) = toy.top_detections(np.zeros((1, 5, 3), np.float32), boxes)
  assert kept.shape == (0, 4) and s.shape == (0,) and c.shape == (0,)


def test_top_detections_per_image():
  boxes = np.tile(np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32), (2, 1, 1))  # two identical boxes
  scores = np.array([[[0.5, 0.1], [0.4, 0.2]], [[0.0, 0.0], [0.1, 0.7]]], np.float32)
  (k0, s0, c0), (k1, s1, c1) = toy.top_detections(scores, boxes)
  np.testing.assert_allclose(s0, [0.5, 0.4])  # the same box twice: both kept
  np.testing.assert_array_equal(c0, [0, 0])
  np.testing.assert_array_equal(k0, boxes[0])
  np.testing.assert_allclose(s1, [0.7])
  np.testing.assert_array_equal(c1, [1])


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_predict_decodes_pixel_boxes():
  model = toy.Detector(rngs=toy.nnx.Rngs(0))
  scores, boxes = toy.predict(model, jnp.zeros((2, 64, 64, 3)))
  assert scores.shape == (2, 84, 3) and boxes.shape == (2, 84, 4)
  assert float(scores.min()) >= 0 and float(scores.max()) <= 1
  # The bias prior (flat bins) puts every box around its anchor: centre = anchor centre in pixels.
  anchors, strides = jaxtal.make_anchors([(8, 8), (4, 4), (2, 2)], toy.CONFIG.strides)
  centres = (boxes[..., :2] + boxes[..., 2:]) / 2
  np.testing.assert_allclose(centres, jnp.broadcast_to(anchors * strides, (2, 84, 2)), atol=2.0)


# --- the one-to-one head (--end2end) ------------------------------------------------------------------


@pytest.mark.slow
def test_one2one_head_starts_as_a_copy_and_reads_detached_features():
  assert toy.Detector(rngs=toy.nnx.Rngs(0)).heads_o2o is None  # the default model has no second head
  model = toy.Detector(end2end=True, rngs=toy.nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  one2many, one2one = model.both(images)
  for a, b, c in zip(one2many, one2one, model(images)):
    np.testing.assert_array_equal(a, c)  # model(x) is the one-to-many head
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # the one-to-one head is a copy at initialisation
  # Separate parameters, and the one-to-one maps send no gradient into the shared layers.
  grads = toy.nnx.grad(lambda m: sum(jnp.sum(f**2) for f in m.both(images)[1]))(model)
  norm = lambda tree: sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(tree))  # noqa: E731
  assert norm(grads["heads_o2o"]) > 0  # (grads is an nnx.State: State.merge is a method, hence the indexing)
  assert norm(grads["down"]) == 0 and norm(grads["merge"]) == 0 and norm(grads["heads"]) == 0


def test_epochs_split_the_steps_evenly():
  epochs = [toy.epoch_of(step, 500, 10) for step in range(1, 501)]
  assert epochs[0] == 0 and epochs[-1] == 9
  assert np.bincount(epochs).tolist() == [50] * 10 and epochs == sorted(epochs)
  assert [toy.epoch_of(step, 7, 3) for step in range(1, 8)] == [0, 0, 0, 1, 1, 2, 2]


# --- data ------------------------------------------------------------------------------------------


def test_dataset_images_and_ground_truth():
  images, gt = toy.make_dataset(12, np.random.default_rng(3))
  assert images.shape == (12, 64, 64, 3) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0
  counts = gt.mask.sum(1)
  assert counts.min() >= 1 and counts.max() <= toy.MAX_BOXES
  assert set(np.unique(gt.labels[gt.mask])) <= {0, 1, 2}
  boxes = gt.boxes[gt.mask]
  sides = boxes[:, 2:] - boxes[:, :2]
  assert sides.min() >= 6 - 1e-3 and sides.max() <= 32 + 1e-3
  assert boxes.min() >= -1e-3 and boxes.max() <= 64 + 1e-3
  # Same seed, same data.
  again, gt2 = toy.make_dataset(12, np.random.default_rng(3))
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(gt.boxes, gt2.boxes)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_each_shape_fills_its_box(kind):
  image = np.zeros((64, 64, 3), np.float32)
  box = np.array([10.3, 20.7, 40.2, 45.1])
  toy.draw_shape(image, kind, box, np.ones(3, np.float32))
  ys, xs = np.nonzero(image[..., 0])
  np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box, atol=1.0, err_msg=toy.CLASS_NAMES[kind])


def test_random_boxes_hardly_overlap():
  boxes = toy.random_boxes(np.random.default_rng(0), 4)
  for i, a in enumerate(boxes):
    for b in boxes[:i]:
      assert (np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2])).min() < 2


# --- zero-positive fraction -------------------------------------------------------------------------


def test_zero_positive_counts_by_hand():
  positives = jnp.array([[3, 0, 0], [0, 5, 0]])
  mask = np.array([[True, True, False], [True, True, False]])  # padding slots hold 0 too and do not count
  zero, real = toy.zero_positive_counts(positives, mask)
  assert (int(zero), int(real)) == (2, 4)


def test_zero_positive_counts_from_detection_targets():
  """A 2.5 px box between the anchor centres (4, 12, ... at stride 8, 8, 24, ... at 16, 16, 48 at 32) owns no
  anchor; a 30 px box owns several."""
  gt = jaxtal.GroundTruth(
      jnp.array([[0, 1, 0]]), jnp.array([[[5.0, 5.0, 7.5, 7.5], [20.0, 20.0, 50.0, 50.0], [0, 0, 0, 0]]]),
      jnp.array([[True, True, False]]),
  )
  feats = [jnp.zeros((1, s, s, 4 * toy.CONFIG.reg_max + 3)) for s in (8, 4, 2)]
  _, targets = jax.jit(functools.partial(jaxtal.detection_targets, config=toy.CONFIG))(feats, gt)  # gt an argument
  assert int(targets.positives_per_gt[0, 0]) == 0 and int(targets.positives_per_gt[0, 1]) > 0
  zero, real = toy.zero_positive_counts(targets.positives_per_gt, gt.mask)
  assert (int(zero), int(real)) == (1, 2)


# --- progress output and missing packages ----------------------------------------------------------


def test_progress_is_one_plain_line_per_call_without_a_terminal(capsys):
  assert not sys.stdout.isatty()
  toy.report(10, 40, 3.25, 0.015, 1.5)
  toy.report(20, 40, 2.5, 0.0, 3.0)
  out = capsys.readouterr().out
  assert "\r" not in out and "[" not in out
  assert out.splitlines() == [
      "step   10/40  loss  3.250  real GTs with no positive  1.50%    1.5 s",
      "step   20/40  loss  2.500  real GTs with no positive  0.00%    3.0 s",
  ]


def test_progress_is_a_bar_redrawn_in_place_on_a_terminal(capsys, monkeypatch):
  monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
  toy.report(20, 40, 2.5, 0.0, 3.0)
  toy.report(40, 40, 2.0, 0.0, 6.0)
  out = capsys.readouterr().out
  assert out.startswith("\r[" + "#" * 12 + "." * 12 + "] step   20/40") and "\n" not in out[:-1]
  assert "\r[" + "#" * 24 + "] step   40/40" in out and out.endswith("\n")  # the last update ends the line


def test_plot_without_matplotlib_exits_before_training(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
  monkeypatch.setattr(toy, "train_step", lambda *a: pytest.fail("trained although --plot cannot work"))
  for name in ("pycocotools", "pycocotools.cocoeval", "cv2"):  # they may be missing too: stand-ins
    monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
  with pytest.raises(SystemExit) as exit_info:
    toy.main(["--plot", "out.png", "--steps", "1"])
  message = str(exit_info.value.code)
  assert "--plot needs matplotlib" in message and 'pip install -e ".[examples]"' in message


# --- a short run -------------------------------------------------------------------------------------


@needs_coco
@needs_cv2
@pytest.mark.slow
def test_short_training_run(capsys, tmp_path):
  argv = ["--steps", "4", "--batch-size", "4", "--eval-images", "8", "--log-every", "2"]
  if importlib.util.find_spec("matplotlib") is not None:
    argv += ["--plot", str(tmp_path / "pred.png")]
  result = toy.main(argv)
  out = capsys.readouterr().out
  assert result["losses"].shape == (4,) and np.isfinite(result["losses"]).all()
  assert 0.0 <= result["map"] <= result["map50"] <= 1.0
  assert result["compilations"] == 1  # fixed shapes: one compiled train step for every batch
  lines = [line for line in out.splitlines() if line.startswith("step ")]
  assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
  assert all("real GTs with no positive" in line for line in lines)
  assert "mAP@0.5:0.95" in out and "mAP@0.5 " in out and "time: training" in out
  if "--plot" in argv:
    assert (tmp_path / "pred.png").stat().st_size > 0


@needs_coco
@needs_cv2
@pytest.mark.slow
def test_short_end_to_end_run(capsys):
  argv = ["--end2end", "--steps", "6", "--batch-size", "4", "--eval-images", "8", "--log-every", "3", "--epochs", "3"]
  result = toy.main(argv)
  out = capsys.readouterr().out
  assert result["losses"].shape == (6,) and np.isfinite(result["losses"]).all()
  assert result["compilations"] == 1  # the one-to-many weight (0.8, 0.45, 0.1 here) is traced: one compilation
  for suffix in ("", "_o2o", "_o2o_nms"):  # one-to-many + NMS, one-to-one without NMS, one-to-one + NMS
    assert 0.0 <= result["map" + suffix] <= result["map50" + suffix] <= 1.0
  assert "weight 0.80 -> 0.10 over 3 epochs" in out
  lines = [line for line in out.splitlines() if line.startswith("step ")]
  assert [line.split()[1] for line in lines] == ["3/6", "6/6"]
  assert all("real GTs with no positive" in line for line in lines)
  for label in ("one-to-many + NMS", "one-to-one, no NMS", "one-to-one + NMS"):
    assert any(line.strip().startswith(label) for line in out.splitlines()), label
  assert "train_step_e2e compiled 1x" in out
