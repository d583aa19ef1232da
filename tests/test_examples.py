"""Tests of the examples: ``examples/toykit.py``, the module the training examples share (the COCO-mAP wrapper, the
class-aware NMS with per-anchor extras, the toy shapes, the training loop), and the scripts ``train_toy.py``,
``train_obb.py``, ``train_pose.py`` and ``train_segment.py``, each in its own section:

* ``train_toy.py``: the NMS-free selection, the one-to-one head's detached input, the zero-positive count, the
  progress output, the missing-matplotlib message, and short training runs (default and ``--end2end``);
* ``train_obb.py``: the polygon IoU, the VOC-style AP and the rotated NMS on hand-made boxes, the drawn data
  against its labels, the angle head, the missing-matplotlib message, and a short training run;
* ``train_pose.py``: the shapes and their keypoints by hand, the hidden keypoints, the packed ground truth, the
  keypoint AP (pycocotools' OKS) on hand-made predictions, the keypoints following NMS, the ``--yolo26`` model's
  branches, the missing-matplotlib message, and short training runs that must learn (default and ``--yolo26``);
* ``train_segment.py``: the instance masks against the drawn pixels, their boxes and their ``pack_masks`` slots;
  mask mAP (pycocotools' ``segm``) on perfect, shrunk and misplaced masks; the masks made of coefficients and
  prototypes; the coefficients following NMS; the model's outputs; the missing-matplotlib message; and a short
  training run that must segment clearly better than chance.

The examples import ``toykit`` as a module of their own folder (Python puts a script's folder on ``sys.path``);
this file puts ``examples/`` on ``sys.path`` once to import the module and the scripts the same way.

pycocotools and OpenCV come with the ``examples`` extra (``pip install -e ".[examples]"``); the tests that need
them are skipped without it. The expected numbers are worked by hand in the comments beside them.
"""

import dataclasses
import functools
import importlib.util
import math
import pathlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtal

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
  sys.path.insert(0, str(EXAMPLES))

import toykit  # noqa: E402
import train_obb as obb  # noqa: E402
import train_pose as pose  # noqa: E402
import train_segment as seg  # noqa: E402
import train_toy  # noqa: E402

needs_coco = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None,
                                reason="pycocotools: the examples extra")
needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV: the examples extra")


# ======================================================================================================================
# toykit.py: the shared pieces
# ======================================================================================================================


# Two images, three classes: image 0 has a class-0 and a class-1 box, image 1 a class-2 box.
TOY_GT_BOXES = [np.array([[0, 0, 10, 10], [20, 20, 40, 30]], np.float32), np.array([[5, 5, 25, 25]], np.float32)]
TOY_GT_CLASSES = [np.array([0, 1]), np.array([2])]


def toy_dets(boxes, scores, classes):
  return np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), np.array(classes, np.int64)


# --- mAP (pycocotools) --------------------------------------------------------------------------


@needs_coco
def test_map_is_one_for_perfect_predictions():
  detections = [toy_dets(TOY_GT_BOXES[0], [0.9, 0.8], TOY_GT_CLASSES[0]),
                toy_dets(TOY_GT_BOXES[1], [0.7], TOY_GT_CLASSES[1])]
  assert toykit.coco_map(detections, TOY_GT_BOXES, TOY_GT_CLASSES) == pytest.approx((1.0, 1.0))


@needs_coco
def test_map_is_zero_without_predictions():
  assert toykit.coco_map([toy_dets([], [], []), toy_dets([], [], [])], TOY_GT_BOXES, TOY_GT_CLASSES) == (0.0, 0.0)


@needs_coco
def test_map_is_zero_for_the_wrong_class_or_place():
  # Right boxes, wrong classes.
  swapped = [toy_dets(TOY_GT_BOXES[0], [0.9, 0.8], [1, 0]), toy_dets(TOY_GT_BOXES[1], [0.7], [0])]
  assert toykit.coco_map(swapped, TOY_GT_BOXES, TOY_GT_CLASSES) == (0.0, 0.0)
  # Right class, no overlap.
  elsewhere = [toy_dets([[50, 50, 60, 60]], [0.9], [0]), toy_dets([[40, 40, 60, 60]], [0.7], [2])]
  assert toykit.coco_map(elsewhere, TOY_GT_BOXES, TOY_GT_CLASSES) == (0.0, 0.0)


@needs_coco
def test_map_iou_thresholds_and_partial_recall():
  # IoU 100 / 140 = 0.714: a match at the thresholds 0.50 ... 0.70, 5 of the 10 of mAP@0.5:0.95.
  one = [np.array([[0, 0, 10, 10]], np.float32)]
  assert toykit.coco_map([toy_dets([[0, 0, 10, 14]], [0.9], [0])], one, [np.array([0])]) == pytest.approx((0.5, 1.0))
  # One of two boxes found at precision 1: recall 0.5, i.e. 51 of COCO's 101 recall points.
  two = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)]
  found = toykit.coco_map([toy_dets([[20, 20, 30, 30]], [0.5], [0])], two, [np.array([0, 0])])
  assert found == pytest.approx((51 / 101,) * 2)


# --- NMS (OpenCV) -----------------------------------------------------------------------------------------------------


@needs_cv2
def test_detect_keeps_the_best_class_and_suppresses_per_class():
  boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [30, 30, 40, 40], [50, 50, 60, 60]]], np.float32)
  scores = np.zeros((1, 5, 3), np.float32)
  scores[0, :, 0] = [0.9, 0.8, 0.0, 0.3, 0.0]  # anchor 1 overlaps anchor 0 (IoU 0.82): suppressed
  scores[0, 2, 1] = 0.5  # same place as anchor 1, other class: kept
  scores[0, 4, 2] = 0.0001  # below the confidence threshold
  ((kept, s, c),) = toykit.detect(scores, boxes, conf=0.001, iou=0.6)
  order = np.argsort(-s)
  np.testing.assert_array_equal(kept[order], boxes[0, [0, 2, 3]])
  np.testing.assert_allclose(s[order], [0.9, 0.5, 0.3])
  np.testing.assert_array_equal(c[order], [0, 1, 0])


# --- data ------------------------------------------------------------------------------------------


def test_dataset_images_and_ground_truth():
  images, gt = toykit.make_dataset(12, np.random.default_rng(3))
  assert images.shape == (12, 64, 64, 3) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0
  counts = gt.mask.sum(1)
  assert counts.min() >= 1 and counts.max() <= toykit.MAX_BOXES
  assert set(np.unique(gt.labels[gt.mask])) <= {0, 1, 2}
  boxes = gt.boxes[gt.mask]
  sides = boxes[:, 2:] - boxes[:, :2]
  assert sides.min() >= 6 - 1e-3 and sides.max() <= 32 + 1e-3
  assert boxes.min() >= -1e-3 and boxes.max() <= 64 + 1e-3
  # Same seed, same data.
  again, gt2 = toykit.make_dataset(12, np.random.default_rng(3))
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(gt.boxes, gt2.boxes)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_each_shape_fills_its_box(kind):
  image = np.zeros((64, 64, 3), np.float32)
  box = np.array([10.3, 20.7, 40.2, 45.1])
  toykit.draw_shape(image, kind, box, np.ones(3, np.float32))
  ys, xs = np.nonzero(image[..., 0])
  np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box, atol=1.0,
                             err_msg=toykit.CLASS_NAMES[kind])


def test_random_boxes_hardly_overlap():
  boxes = toykit.random_boxes(np.random.default_rng(0), 4)
  for i, a in enumerate(boxes):
    for b in boxes[:i]:
      assert (np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2])).min() < 2


# --- the training loop ------------------------------------------------------------------------------------------------


def test_fit_trains_on_fresh_batches_and_reports_a_term(capsys):
  args = toykit.example_parser("test", 6, "plot").parse_args(["--batch-size", "3", "--log-every", "3", "--seed", "4"])
  assert (args.steps, args.batch_size, args.eval_images, args.plot) == (6, 3, 200, None)
  seen = []

  def make_batch(n, rng):
    seen.append(rng.integers(1000))
    return np.zeros((n, 2, 2, 3)), seen[-1]

  def step(images, gt):  # loss = the batch's draw; the "seg" part = a tenth of it
    assert images.shape == (3, 2, 2, 3)
    return jnp.float32(gt), types.SimpleNamespace(seg=jnp.float32(gt / 10))

  losses = toykit.fit(step, make_batch, args, start=0.0, term="seg", label="mask")
  expected = np.random.default_rng(4).integers(1000, size=6)  # one draw per step, from an rng seeded by --seed
  np.testing.assert_array_equal(seen, expected)
  np.testing.assert_allclose(losses, expected)
  compiling, *lines = capsys.readouterr().out.splitlines()
  assert re.fullmatch(r"compiling the training step \.\.\. done in \d+\.\d s", compiling), compiling  # step 1 compiles
  assert [line.split()[:4] for line in lines] == [["step", "3/6", "loss", f"{expected[:3].mean():.3f}"],
                                                  ["step", "6/6", "loss", f"{expected[3:].mean():.3f}"]]
  assert f"of which mask {expected[3:].mean() / 10:5.3f}" in lines[1]


def test_first_call_says_the_step_is_compiling_and_how_long_it_took(capsys):
  """The examples were silent for 17-38 s while the first step compiled: the line says so before it starts."""
  seen = []

  def step(x, y):
    seen.append(capsys.readouterr().out)  # what was printed before the step ran
    return jnp.float32(x + y)

  assert float(toykit.first_call(step, 2.0, 3.0, name="the pose step")) == 5.0
  assert seen == ["compiling the pose step ..."]
  assert re.fullmatch(r" done in \d+\.\d s\n", capsys.readouterr().out)


def test_box_labels_stay_in_the_picture():
  calls = []
  ax = types.SimpleNamespace(text=lambda *a, **kw: calls.append((a, kw)))
  toykit.box_label(ax, np.array([10.0, 20.0, 30.0, 40.0]), "rect 0.90", "red")  # room above the box: above it
  toykit.box_label(ax, np.array([10.0, 2.0, 30.0, 40.0]), "rect 0.90", "red")  # at the top edge: just inside
  assert [(a[:3], kw["va"], kw["clip_on"]) for a, kw in calls] == [((10.0, 19.0, "rect 0.90"), "bottom", False),
                                                                    ((10.0, 3.0, "rect 0.90"), "top", False)]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_the_plot_has_a_legend_and_keeps_labels_beyond_the_panels(tmp_path, monkeypatch, capsys):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  saved = {}
  monkeypatch.setattr(plt.Figure, "savefig", lambda fig, path, **kw: saved.update(fig=fig, path=path, **kw))
  images = np.zeros((2, 64, 64, 3), np.float32)
  gt = types.SimpleNamespace(boxes=np.array([[[0, 0, 20, 20]], [[5, 5, 30, 30]]], np.float32), mask=np.ones((2, 1), bool))
  detections = [(np.array([[0.0, 0.0, 20.0, 20.0]]), np.array([0.9]), np.array([1]))] * 2
  toykit.save_plot(plt, str(tmp_path / "p.png"), images, gt, detections, count=2)
  assert saved["bbox_inches"] == "tight"  # every artist inside the file: labels beyond a panel are not cut off
  (legend,) = saved["fig"].legends
  assert [t.get_text() for t in legend.get_texts()] == ["ground truth", "detection (score >= 0.3): class, score"]
  (text,) = saved["fig"].axes[0].texts
  assert text.get_text() == "elli 0.90" and not text.get_clip_on()
  plt.close(saved["fig"])


# ======================================================================================================================
# train_toy.py
# ======================================================================================================================


# --- NMS-free selection and decoding ----------------------------------------------------------------------------------


def test_top_detections_keeps_the_best_boxes_above_the_threshold_without_suppression():
  # Anchors 0 and 1 overlap (IoU 0.82) with the same class: NMS would drop 1, the one-to-one selection keeps both.
  boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40], [50, 50, 60, 60], [5, 5, 9, 9]]], np.float32)
  scores = np.zeros((1, 5, 3), np.float32)
  scores[0, :, 0] = [0.9, 0.8, 0.1, 0.0, 0.0]
  scores[0, 2, 2] = 0.3  # anchor 2's best class is 2, not 0
  scores[0, 3, 1] = 0.0005  # below the confidence threshold
  scores[0, 4, 1] = 0.6
  ((kept, s, c),) = train_toy.top_detections(scores, boxes, conf=0.001, max_det=100)
  np.testing.assert_array_equal(kept, boxes[0, [0, 1, 4, 2]])  # best first
  np.testing.assert_allclose(s, [0.9, 0.8, 0.6, 0.3])
  np.testing.assert_array_equal(c, [0, 0, 1, 2])
  # max_det keeps the best ones; a higher threshold drops the rest; an image with nothing above it gives nothing.
  ((kept, s, c),) = train_toy.top_detections(scores, boxes, conf=0.001, max_det=2)
  np.testing.assert_array_equal(kept, boxes[0, [0, 1]])
  ((kept, s, c),) = train_toy.top_detections(scores, boxes, conf=0.7)
  np.testing.assert_allclose(s, [0.9, 0.8])
  ((kept, s, c),) = train_toy.top_detections(np.zeros((1, 5, 3), np.float32), boxes)
  assert kept.shape == (0, 4) and s.shape == (0,) and c.shape == (0,)


def test_top_detections_carry_per_anchor_outputs():
  # The YOLO26 pose evaluation: each kept anchor followed by its own keypoints, best first.
  boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40]]], np.float32)
  scores = np.array([[[0.2, 0.0], [0.9, 0.0], [0.0, 0.0005]]], np.float32)
  keypoints = np.arange(3 * 4 * 3, dtype=np.float32).reshape(1, 3, 4, 3)
  ((kept, s, c, k),) = toykit.top_detections(scores, boxes, keypoints)
  np.testing.assert_array_equal(kept, boxes[0, [1, 0]])
  np.testing.assert_array_equal(k, keypoints[0, [1, 0]])


def test_top_detections_per_image():
  boxes = np.tile(np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32), (2, 1, 1))  # two identical boxes
  scores = np.array([[[0.5, 0.1], [0.4, 0.2]], [[0.0, 0.0], [0.1, 0.7]]], np.float32)
  (k0, s0, c0), (k1, s1, c1) = train_toy.top_detections(scores, boxes)
  np.testing.assert_allclose(s0, [0.5, 0.4])  # the same box twice: both kept
  np.testing.assert_array_equal(c0, [0, 0])
  np.testing.assert_array_equal(k0, boxes[0])
  np.testing.assert_allclose(s1, [0.7])
  np.testing.assert_array_equal(c1, [1])


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_predict_decodes_pixel_boxes():
  model = toykit.Detector(rngs=nnx.Rngs(0))
  scores, boxes = train_toy.predict(model, jnp.zeros((2, 64, 64, 3)))
  assert scores.shape == (2, 84, 3) and boxes.shape == (2, 84, 4)
  assert float(scores.min()) >= 0 and float(scores.max()) <= 1
  # The bias prior (flat bins) puts every box around its anchor: centre = anchor centre in pixels.
  anchors, strides = jaxtal.make_anchors([(8, 8), (4, 4), (2, 2)], toykit.CONFIG.strides)
  centres = (boxes[..., :2] + boxes[..., 2:]) / 2
  np.testing.assert_allclose(centres, jnp.broadcast_to(anchors * strides, (2, 84, 2)), atol=2.0)


# --- the one-to-one head (--end2end) ------------------------------------------------------------------


@pytest.mark.slow
def test_one2one_head_starts_as_a_copy_and_reads_detached_features():
  assert toykit.Detector(rngs=nnx.Rngs(0)).heads_o2o is None  # the default model has no second head
  model = toykit.Detector(end2end=True, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  one2many, one2one = model.both(images)
  for a, b, c in zip(one2many, one2one, model(images)):
    np.testing.assert_array_equal(a, c)  # model(x) is the one-to-many head
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # the one-to-one head is a copy at initialisation
  # Separate parameters, and the one-to-one maps send no gradient into the shared layers.
  grads = nnx.grad(lambda m: sum(jnp.sum(f**2) for f in m.both(images)[1]))(model)
  norm = lambda tree: sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(tree))  # noqa: E731
  assert norm(grads["heads_o2o"]) > 0  # (grads is an nnx.State: State.merge is a method, hence the indexing)
  assert norm(grads["down"]) == 0 and norm(grads["merge"]) == 0 and norm(grads["heads"]) == 0


def test_epochs_split_the_steps_evenly():
  epochs = [train_toy.epoch_of(step, 500, 10) for step in range(1, 501)]
  assert epochs[0] == 0 and epochs[-1] == 9
  assert np.bincount(epochs).tolist() == [50] * 10 and epochs == sorted(epochs)
  assert [train_toy.epoch_of(step, 7, 3) for step in range(1, 8)] == [0, 0, 0, 1, 1, 2, 2]


# --- zero-positive fraction -------------------------------------------------------------------------


def test_zero_positive_counts_by_hand():
  positives = jnp.array([[3, 0, 0], [0, 5, 0]])
  mask = np.array([[True, True, False], [True, True, False]])  # padding slots hold 0 too and do not count
  zero, real = train_toy.zero_positive_counts(positives, mask)
  assert (int(zero), int(real)) == (2, 4)


def test_zero_positive_counts_from_detection_targets():
  """Under the original YOLOv8 in-box rule (``min_box_side=0``) a 2.5 px box between the anchor centres (4, 12, ...
  at stride 8, 8, 24, ... at 16, 16, 48 at 32) owns no anchor; a 30 px box owns several. The default floor
  (``strides[1]``, Ultralytics 8.4.190) widens the small box so that it owns some."""
  gt = jaxtal.GroundTruth(
      jnp.array([[0, 1, 0]]), jnp.array([[[5.0, 5.0, 7.5, 7.5], [20.0, 20.0, 50.0, 50.0], [0, 0, 0, 0]]]),
      jnp.array([[True, True, False]]),
  )
  feats = [jnp.zeros((1, s, s, 4 * toykit.CONFIG.reg_max + 3)) for s in (8, 4, 2)]
  _, stal = jax.jit(functools.partial(jaxtal.detection_targets, config=toykit.CONFIG))(feats, gt)
  assert int(stal.positives_per_gt[0, 0]) > 0
  yolov8 = dataclasses.replace(toykit.CONFIG, min_box_side=0.0)
  _, targets = jax.jit(functools.partial(jaxtal.detection_targets, config=yolov8))(feats, gt)  # gt an argument
  assert int(targets.positives_per_gt[0, 0]) == 0 and int(targets.positives_per_gt[0, 1]) > 0
  zero, real = train_toy.zero_positive_counts(targets.positives_per_gt, gt.mask)
  assert (int(zero), int(real)) == (1, 2)


# --- progress output and missing packages ----------------------------------------------------------


def test_progress_is_one_plain_line_per_call_without_a_terminal(capsys):
  assert not sys.stdout.isatty()
  train_toy.report(10, 40, 3.25, 0.015, 1.5)
  train_toy.report(20, 40, 2.5, 0.0, 3.0)
  out = capsys.readouterr().out
  assert "\r" not in out and "[" not in out
  assert out.splitlines() == [
      "step   10/40  loss  3.250  real GTs with no positive  1.50%    1.5 s",
      "step   20/40  loss  2.500  real GTs with no positive  0.00%    3.0 s",
  ]


def test_progress_is_a_bar_redrawn_in_place_on_a_terminal(capsys, monkeypatch):
  monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
  train_toy.report(20, 40, 2.5, 0.0, 3.0)
  train_toy.report(40, 40, 2.0, 0.0, 6.0)
  out = capsys.readouterr().out
  assert out.startswith("\r[" + "#" * 12 + "." * 12 + "] step   20/40") and "\n" not in out[:-1]
  assert "\r[" + "#" * 24 + "] step   40/40" in out and out.endswith("\n")  # the last update ends the line


def test_toy_plot_without_matplotlib_exits_before_training(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
  monkeypatch.setattr(train_toy, "train_step", lambda *a: pytest.fail("trained although --plot cannot work"))
  for name in ("pycocotools", "pycocotools.cocoeval", "cv2"):  # they may be missing too: stand-ins
    monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
  with pytest.raises(SystemExit) as exit_info:
    train_toy.main(["--plot", "out.png", "--steps", "1"])
  message = str(exit_info.value.code)
  assert "--plot needs matplotlib" in message and 'pip install -e ".[examples]"' in message


# --- a short run -------------------------------------------------------------------------------------


@needs_coco
@needs_cv2
@pytest.mark.slow
def test_toy_short_training_run(capsys, tmp_path):
  argv = ["--steps", "4", "--batch-size", "4", "--eval-images", "8", "--log-every", "2"]
  if importlib.util.find_spec("matplotlib") is not None:
    argv += ["--plot", str(tmp_path / "pred.png")]
  result = train_toy.main(argv)
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
  result = train_toy.main(argv)
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


# ======================================================================================================================
# train_obb.py
# ======================================================================================================================


SQ = np.array([20.0, 20.0, 10.0, 10.0, 0.0])  # a 10x10 square, area 100


def turned(box, angle):
  """``box`` with its angle replaced."""
  return np.array([*box[:4], angle])


def obb_moved(box, along):
  """``box`` moved by ``along`` pixels along its own width axis (cos, sin)."""
  return np.array([box[0] + along * math.cos(box[4]), box[1] + along * math.sin(box[4]), *box[2:]])


def obb_dets(boxes, scores, classes):
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
  assert iou(a, obb_moved(a, 5.0)) == pytest.approx(1 / 3, abs=1e-5)
  assert iou(a, obb_moved(a, 2.0)) == pytest.approx(2 / 3, abs=1e-5)
  # Axis-aligned vs turned by 45 degrees about the same centre: a regular octagon of inradius 5,
  # area 8 * 5^2 * tan(pi/8) = 200 (sqrt 2 - 1); IoU = (sqrt 2 - 1) / (2 - sqrt 2) = 1 / sqrt 2.
  assert iou(SQ, turned(SQ, math.pi / 4)) == pytest.approx(1 / math.sqrt(2), abs=1e-5)
  # A cross of two 20x4 bars: overlap 4 x 4 = 16, union 80 + 80 - 16 = 144.
  bar = np.array([30.0, 30.0, 20.0, 4.0, 0.0])
  assert iou(bar, turned(bar, math.pi / 2)) == pytest.approx(16 / 144, abs=1e-5)
  # Far apart, or one without area: 0.
  assert iou(SQ, obb_moved(SQ, 30.0)) == 0.0
  assert iou(SQ, np.array([20.0, 20.0, 0.0, 10.0, 0.0])) == 0.0


def test_intersection_area_by_hand():
  # Unit square (counter-clockwise) and the square [0.5, 1.5] x [0.5, 1.5]: a quarter; a triangle inside: itself.
  unit = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
  assert obb.intersection_area(unit, unit + 0.5) == pytest.approx(0.25)
  assert obb.intersection_area(unit, np.array([[0.2, 0.2], [0.8, 0.2], [0.5, 0.8]])) == pytest.approx(0.18)
  assert obb.intersection_area(unit, unit + 2) == 0.0
  assert obb.intersection_area(unit, unit + [1, 0]) == 0.0  # a shared edge has no area


def test_iou_is_pairwise_and_symmetric():
  a = np.stack([SQ, obb_moved(SQ, 5.0), turned(SQ, math.pi / 4)])
  b = np.stack([SQ, turned(SQ, 1.1)])
  iou = obb.rotated_iou(a, b)
  assert iou.shape == (3, 2)
  np.testing.assert_allclose(iou, obb.rotated_iou(b, a).T, atol=1e-6)
  np.testing.assert_allclose(iou[:2, 0], [1.0, 1 / 3], atol=1e-5)
  assert obb.rotated_iou(a, np.zeros((0, 5))).shape == (3, 0)


# --- AP ----------------------------------------------------------------------------------------------------

# Two images, three classes: image 0 has a class-0 and a class-1 box, image 1 a class-2 box.
OBB_GT_BOXES = [np.array([[15, 15, 12, 6, 0.3], [40, 40, 20, 8, 1.2]]), np.array([[30, 30, 10, 10, 0.0]])]
OBB_GT_CLASSES = [np.array([0, 1]), np.array([2])]


def obb_ap(detections, boxes=OBB_GT_BOXES, classes=OBB_GT_CLASSES, **kw):
  return obb.average_precision(detections, boxes, classes, 3, **kw)


def test_ap_is_one_for_perfect_predictions_and_zero_without_any():
  perfect = [obb_dets(OBB_GT_BOXES[0], [0.9, 0.8], [0, 1]), obb_dets(OBB_GT_BOXES[1], [0.7], [2])]
  m, aps = obb_ap(perfect)
  assert m == pytest.approx(1.0) and aps == pytest.approx([1.0, 1.0, 1.0])
  assert obb_ap([obb_dets([], [], []), obb_dets([], [], [])]) == (0.0, [0.0, 0.0, 0.0])


def test_ap_is_zero_for_the_wrong_class_or_place():
  # Right boxes, wrong classes.
  swapped = [obb_dets(OBB_GT_BOXES[0], [0.9, 0.8], [1, 0]), obb_dets(OBB_GT_BOXES[1], [0.7], [0])]
  assert obb_ap(swapped) == (0.0, [0.0, 0.0, 0.0])
  # Right classes, other image.
  elsewhere = [obb_dets(OBB_GT_BOXES[1], [0.9], [2]), obb_dets(OBB_GT_BOXES[0], [0.9, 0.8], [0, 1])]
  assert obb_ap(elsewhere) == (0.0, [0.0, 0.0, 0.0])


def test_ap_of_a_square_predicted_turned_by_90_degrees():
  # The class-2 GT is a square: predicted at angle pi/2 it is the same box, IoU 1, a match.
  turned90 = [obb_dets(OBB_GT_BOXES[0], [0.9, 0.8], [0, 1]), obb_dets([[30, 30, 10, 10, math.pi / 2]], [0.7], [2])]
  assert obb_ap(turned90)[0] == pytest.approx(1.0)


def test_ap_partial_recall_duplicates_and_threshold():
  one, two = turned(SQ, 0.2), np.array([45.0, 45.0, 10.0, 10.0, 0.9])
  gt_boxes, gt_classes = [np.stack([one, two])], [np.array([0, 0])]
  # One of two GTs found at precision 1: recall 0.5 at precision 1, AP 0.5.
  m, aps = obb.average_precision([obb_dets([one], [0.9], [0])], gt_boxes, gt_classes, 1)
  assert m == pytest.approx(0.5) and aps == pytest.approx([0.5])
  # A duplicate of the first GT ranked between the two: TP, FP (GT already taken), TP. Precision 1, 1/2, 2/3 at
  # recall 1/2, 1/2, 1; the envelope is 1 up to recall 1/2 and 2/3 after: AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
  m, _ = obb.average_precision([obb_dets([one, one, two], [0.9, 0.8, 0.7], [0, 0, 0])], gt_boxes, gt_classes, 1)
  assert m == pytest.approx(5 / 6)
  # The same boxes scored the other way: TP, TP, then the FP: AP 1 (the FP comes after full recall).
  m, _ = obb.average_precision([obb_dets([one, one, two], [0.9, 0.1, 0.7], [0, 0, 0])], gt_boxes, gt_classes, 1)
  assert m == pytest.approx(1.0)
  # A detection moved by half a side (IoU 1/3): a miss at 0.5, a match at 0.3.
  half = [obb_dets([obb_moved(one, 5.0)], [0.9], [0])]
  assert obb.average_precision(half, [one[None]], [np.array([0])], 1)[0] == 0.0
  assert obb.average_precision(half, [one[None]], [np.array([0])], 1, iou=0.3)[0] == pytest.approx(1.0)


def test_ap_leaves_out_classes_without_ground_truth():
  # Class 2 has no GT: its AP is nan and the mean is over classes 0 and 1 (1.0 and 0.0).
  detections = [obb_dets([OBB_GT_BOXES[0][0], OBB_GT_BOXES[0][0]], [0.9, 0.5], [0, 2])]
  m, aps = obb.average_precision(detections, OBB_GT_BOXES[:1], OBB_GT_CLASSES[:1], 3)
  assert m == pytest.approx(0.5) and aps[:2] == [1.0, 0.0] and math.isnan(aps[2])
  assert obb.average_precision(detections, [np.zeros((0, 5))], [np.zeros(0, int)], 3)[0] == 0.0


# --- NMS ---------------------------------------------------------------------------------------------------


def test_rotated_nms_is_greedy_and_class_aware():
  a = turned(SQ, 0.4)
  b = obb_moved(a, 2.0)  # overlap 8 x 10 = 80, union 120: IoU 2/3 with a
  bar = np.array([45.0, 45.0, 20.0, 4.0, 0.0])
  boxes = np.stack([b, a, b, bar, turned(bar, math.pi / 2)])  # the crossed bars: IoU 16/144 = 1/9
  scores = np.array([0.8, 0.9, 0.5, 0.3, 0.2])
  classes = np.array([0, 0, 1, 0, 0])
  # a (0.9) drops b of its class (IoU 2/3 > 0.6); b of class 1 stays; the bars (1/9) both stay. Best first.
  np.testing.assert_array_equal(obb.rotated_nms(boxes, scores, classes, iou=0.6), [1, 2, 3, 4])
  np.testing.assert_array_equal(obb.rotated_nms(boxes, scores, classes, iou=0.7), [1, 0, 2, 3, 4])  # 2/3 < 0.7
  np.testing.assert_array_equal(obb.rotated_nms(boxes, scores, classes, iou=0.1), [1, 2, 3])  # 1/9 > 0.1
  # A dropped box suppresses nothing: c overlaps b (IoU 2/3) but not a (moved 4: IoU 6/14 = 0.43 < 0.6).
  c = obb_moved(a, 4.0)
  np.testing.assert_array_equal(obb.rotated_nms(np.stack([a, b, c]), [0.9, 0.8, 0.7], [0, 0, 0], iou=0.6), [0, 2])
  assert obb.rotated_nms(np.zeros((0, 5)), np.zeros(0), np.zeros(0, int)).shape == (0,)


def test_detect_takes_each_anchors_best_class_above_the_threshold():
  a = turned(SQ, 0.4)
  boxes = np.stack([a, obb_moved(a, 2.0), obb_moved(a, 30.0)])[None]
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

OBB_BOX = np.array([32.0, 30.0, 40.0, 24.0, 0.5])


def pixel(image, box, u, v):
  """The pixel holding the point ``(u, v)`` of the box's own frame (units of w and h, from the centre)."""
  cx, cy, w, h, t = box
  x = cx + u * w * math.cos(t) - v * h * math.sin(t)
  y = cy + u * w * math.sin(t) + v * h * math.cos(t)
  return image[int(y), int(x)]


# Per kind: points (u, v) inside the shape and outside it, 1.5 px or more from its outline (OBB_BOX: 40 x 24 px).
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
  obb.draw_shape(image, kind, OBB_BOX, (1.0, 0.5, 0.25))
  inside, outside = INSIDE_OUTSIDE[name]
  for u, v in inside:
    np.testing.assert_array_equal(pixel(image, OBB_BOX, u, v), [1.0, 0.5, 0.25], err_msg=f"{name} {u, v}")
  for u, v in outside:
    np.testing.assert_array_equal(pixel(image, OBB_BOX, u, v), [0, 0, 0], err_msg=f"{name} {u, v}")
  # The painted area is the shape's area (w h, pi w h / 4, w h / 2) to within 2 % (pixels along the outline).
  assert np.count_nonzero(image[..., 0]) == pytest.approx(AREAS[name], rel=0.02)


@needs_cv2
def test_a_turned_triangle_points_the_other_way():
  image = np.zeros((64, 64, 3), np.float32)
  obb.draw_shape(image, 2, OBB_BOX, (1.0, 1.0, 1.0), turn=True)  # apex at v = +1/2
  for u, v in [(0, 0), (0, 0.35), (0.4, -0.4), (-0.4, -0.4)]:
    assert pixel(image, OBB_BOX, u, v)[0] == 1.0, (u, v)
  for u, v in [(0.4, 0.4), (-0.4, 0.4)]:
    assert pixel(image, OBB_BOX, u, v)[0] == 0.0, (u, v)


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
def test_obb_make_dataset_packs_the_images_labels():
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
  model = obb.OBBDetector(rngs=nnx.Rngs(0))
  out = model(jnp.zeros((2, 64, 64, 3)))
  feats, angles = out.feats, out.angles
  r, nc = obb.CONFIG.reg_max, obb.CONFIG.num_classes
  assert [f.shape for f in feats] == [(2, s, s, 4 * r + nc) for s in (8, 4, 2)]
  assert [a.shape for a in angles] == [(2, s, s, 1) for s in (8, 4, 2)]
  for a in angles:  # (sigmoid - 1/4) pi lies in [-pi/4, 3 pi/4)
    assert float(a.min()) >= -math.pi / 4 and float(a.max()) <= 3 * math.pi / 4
  # The loss call the script's training step makes (the model's Predictions straight into the loss).
  total, parts = jaxtal.OBBLoss(obb.CONFIG)(out, obb.make_dataset(2, np.random.default_rng(0))[1])
  assert np.isfinite(float(total)) and float(parts.angle) >= 0
  scores, boxes = obb.predict(model, jnp.zeros((2, 64, 64, 3)))
  assert scores.shape == (2, 84, nc) and boxes.shape == (2, 84, 5)
  # The bias prior (flat bins) puts every box around its anchor: centre = anchor centre in pixels.
  anchors, strides = jaxtal.make_anchors([(8, 8), (4, 4), (2, 2)], obb.CONFIG.strides)
  np.testing.assert_allclose(boxes[..., :2], jnp.broadcast_to(anchors * strides, (2, 84, 2)), atol=2.0)


# --- missing packages and a short run -------------------------------------------------------------------


def test_obb_plot_without_matplotlib_exits_before_training(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
  monkeypatch.setattr(toykit, "task_step", lambda *a: pytest.fail("trained although --plot cannot work"))
  monkeypatch.setitem(sys.modules, "cv2", sys.modules.get("cv2") or types.ModuleType("cv2"))  # a stand-in if missing
  with pytest.raises(SystemExit) as exit_info:
    obb.main(["--plot", "out.png", "--steps", "1"])
  message = str(exit_info.value.code)
  assert "--plot needs matplotlib" in message and 'pip install -e ".[examples]"' in message


@needs_cv2
@pytest.mark.slow
def test_obb_short_training_run(capsys, tmp_path):
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


# ======================================================================================================================
# train_pose.py
# ======================================================================================================================


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


def test_pose_make_dataset_packs_the_images_labels():
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

POSE_BOX = np.array([20.0, 20.0, 40.0, 40.0])  # area 400
KPTS = np.array([[30, 21, 2], [38, 38, 2], [22, 38, 2], [30, 32, 2]], np.float64)


def pose_dets(keypoints, scores, classes, boxes=None):
  keypoints = np.asarray(keypoints, np.float64).reshape(-1, 4, 3)
  boxes = np.tile(POSE_BOX, (len(keypoints), 1)) if boxes is None else np.asarray(boxes, np.float64)
  return boxes, np.asarray(scores, np.float64), np.asarray(classes), keypoints


def pose_ap(detections, keypoints=KPTS, classes=(0,), boxes=(POSE_BOX,), **kw):
  return pose.keypoint_ap(detections, [np.array(boxes)], [np.array(classes)], [np.asarray(keypoints)[None]], **kw)


def pose_moved(kpts, dx, which=slice(None)):
  out = np.array(kpts, np.float64)
  out[which, 0] += dx
  return out


@needs_coco
def test_perfect_keypoints_give_ap_one_and_none_give_zero():
  assert pose_ap([pose_dets(KPTS, [0.9], [0])]) == pytest.approx((1.0, 1.0))
  assert pose_ap([pose_dets(np.zeros((0, 4, 3)), [], [])]) == (0.0, 0.0)
  assert pose_ap([pose_dets(KPTS, [0.9], [1])]) == (0.0, 0.0)  # the right keypoints, the wrong class


@needs_coco
def test_shifted_keypoints_by_hand():
  # sigma 0.1 everywhere: OKS per keypoint exp(-d^2 / (2 area (2 sigma)^2)) = exp(-d^2 / 32). Every keypoint
  # 4 px off: exp(-1/2) = 0.607, a match at the OKS thresholds 0.50, 0.55, 0.60: 3 of the 10 of AP@0.5:0.95.
  assert pose_ap([pose_dets(pose_moved(KPTS, 4.0), [0.9], [0])], sigmas=(0.1,) * 4) == pytest.approx((0.3, 1.0))
  # The script's own sigmas (0.08 for the corners: exp(-16 / 20.48) = 0.458; 0.1 for the inner point: 0.607)
  # average to 0.495: no match at 0.5.
  assert pose_ap([pose_dets(pose_moved(KPTS, 4.0), [0.9], [0])]) == (0.0, 0.0)
  # Narrower sigmas, the same shift: exp(-16 / 8) = 0.135 for sigma 0.05: no match at all.
  assert pose_ap([pose_dets(pose_moved(KPTS, 4.0), [0.9], [0])], sigmas=(0.05,) * 4) == (0.0, 0.0)


@needs_coco
def test_hidden_keypoints_are_left_out():
  far = pose_moved(KPTS, 30.0, which=0)  # the apex predicted 30 px away, the rest exact
  # Labelled: OKS (exp(-900 / 32) + 3) / 4 = 0.75: a match up to 0.75, 6 of 10 thresholds.
  assert pose_ap([pose_dets(far, [0.9], [0])], sigmas=(0.1,) * 4) == pytest.approx((0.6, 1.0))
  hidden = KPTS.copy()
  hidden[0, 2] = 0
  assert pose_ap([pose_dets(far, [0.9], [0])], keypoints=hidden, sigmas=(0.1,) * 4) == pytest.approx((1.0, 1.0))


@needs_coco
def test_a_shape_with_every_keypoint_hidden_is_ignored():
  # Two shapes of one class; the second has no visible keypoint: COCO ignores it, so the best-scored detection,
  # on it, is neither a hit nor a false positive, and the exact one on the first shape gives AP 1.
  other = np.array([42.0, 42.0, 60.0, 60.0])
  unseen = np.column_stack([np.full(4, 51.0), np.full(4, 51.0), np.zeros(4)])
  truth = [np.stack([POSE_BOX, other])], [np.array([0, 0])], [np.stack([KPTS, unseen])]
  detections = [pose_dets([KPTS, unseen], [0.5, 0.9], [0, 0], boxes=[POSE_BOX, other])]
  assert pose.keypoint_ap(detections, *truth) == pytest.approx((1.0, 1.0))
  seen = unseen.copy()
  seen[:, 2] = 2  # now labelled, and the detection on it 30 px off (OKS ~0): a false positive ranked first
  detections = [pose_dets([KPTS, pose_moved(unseen, 30.0)], [0.5, 0.9], [0, 0], boxes=[POSE_BOX, other])]
  # Precision 0 then 1/2 at recall 1/2 (the second shape is never found): AP 1/2 at every threshold.
  result = pose.keypoint_ap(detections, truth[0], truth[1], [np.stack([KPTS, seen])])
  assert result == pytest.approx((51 / 101 / 2, 51 / 101 / 2), abs=0.01)


# --- detection plumbing -------------------------------------------------------------------------------------


@needs_cv2
def test_detect_keeps_each_kept_anchors_keypoints():
  # The script's detections: toykit.detect's NMS, each kept box followed by its own anchor's keypoints.
  boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40]]], np.float32)
  scores = np.zeros((1, 3, 2), np.float32)
  scores[0, :, 0] = [0.8, 0.9, 0.0]  # anchor 0 overlaps anchor 1 (IoU 0.82): suppressed
  scores[0, 2, 1] = 0.5
  keypoints = np.arange(3 * 4 * 3, dtype=np.float32).reshape(1, 3, 4, 3)  # anchor a holds 12 a ... 12 a + 11
  ((b, s, c, k),) = toykit.detect(scores, boxes, keypoints, conf=0.001, iou=0.6)
  order = np.argsort(-s)
  np.testing.assert_array_equal(b[order], boxes[0, [1, 2]])
  np.testing.assert_array_equal(c[order], [0, 1])
  np.testing.assert_array_equal(k[order], keypoints[0, [1, 2]])
  ((b, s, c),) = toykit.detect(scores, boxes, conf=0.001, iou=0.6)  # without: boxes, scores, classes only
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


def test_pose_plot_without_matplotlib_exits_before_training(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
  monkeypatch.setattr(toykit, "fit", lambda *a, **kw: pytest.fail("trained although --plot cannot work"))
  for name in ("pycocotools", "pycocotools.cocoeval", "cv2"):  # they may be missing too: stand-ins
    monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
  with pytest.raises(SystemExit) as exit_info:
    pose.main(["--plot", "out.png", "--steps", "1"])
  message = str(exit_info.value.code)
  assert message.startswith("train_pose.py: --plot needs matplotlib") and 'pip install -e ".[examples]"' in message


def test_yolo26_pose_model_branches():
  """``--yolo26``'s model: both branches' Predictions carry sigma maps (2K per cell), the one-to-one heads start as
  copies of the one-to-many ones, the one-to-one branch reads detached features, and the model holds a flow."""
  model = pose.PoseDetector(yolo26=True, rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 64, 64, 3)), jnp.float32)
  many, one = model.both(images)
  k = pose.CONFIG26.kpt_shape[0]
  for preds in (many, one):
    assert [m.shape for m in preds.keypoint_sigmas] == [(1, 64 // s, 64 // s, 2 * k) for s in (8, 16, 32)]
    assert [m.shape[-1] for m in preds.feats] == [4 + len(pose.CLASS_NAMES)] * 3  # reg_max 1
  for a, b in zip(jax.tree.leaves((many.feats, many.keypoints, many.keypoint_sigmas)),
                  jax.tree.leaves((one.feats, one.keypoints, one.keypoint_sigmas))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert isinstance(model.flow, jaxtal.RealNVP)
  grads = nnx.grad(lambda m: sum(jnp.sum(x) for x in jax.tree.leaves(m.both(images)[1])))(model)
  assert not any(np.asarray(g).any() for g in jax.tree.leaves(nnx.state(grads.down)))  # detached: no backbone gradient
  assert pose.PoseDetector(rngs=nnx.Rngs(0)).sigma_heads is None


@needs_coco
@needs_cv2
@pytest.mark.slow
def test_short_yolo26_run_learns_keypoints(capsys):
  result = pose.main(["--yolo26", "--steps", "200", "--batch-size", "16", "--eval-images", "60", "--log-every", "100"])
  out = capsys.readouterr().out
  assert result["losses"].shape == (200,) and np.isfinite(result["losses"]).all() and result["compilations"] == 1
  assert result["losses"][-20:].mean() < result["losses"][:20].mean() / 1.5
  assert result["ap50"] > 0.05 and 0.0 <= result["ap"] <= result["ap50"] <= 1.0  # chance is ~0
  assert "one-to-one branch, no NMS" in out and "one-to-many branch + NMS" in out
  assert all("RLE" in x for x in out.splitlines() if x.startswith("step "))


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


# ======================================================================================================================
# train_segment.py
# ======================================================================================================================


SIZE = seg.IMAGE_SIZE


def erode(masks):
  """Each mask less its outline: a pixel stays when it and its four neighbours are set (outside counts as unset)."""
  p = np.pad(masks, [(0, 0), (1, 1), (1, 1)])
  return p[:, 1:-1, 1:-1] & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]


def square(x1, y1, side, size=SIZE):
  """``(size, size)`` bool: the pixels ``[x1, x1 + side) x [y1, y1 + side)``."""
  m = np.zeros((size, size), bool)
  m[y1 : y1 + side, x1 : x1 + side] = True
  return m


@pytest.fixture(scope="module")
def seg_data():
  images, gt = seg.make_dataset(12, np.random.default_rng(5))
  return images, gt, seg.ground_truth(gt)


# --- data --------------------------------------------------------------------------------------------------------


def test_full_resolution_masks_are_the_painted_pixels(seg_data):
  images, gt, (boxes, classes, masks) = seg_data
  palette = toykit.COLOURS
  for image, b, c, m, real, labels, packed in zip(images, boxes, classes, masks, gt.mask, gt.labels, gt.boxes):
    np.testing.assert_array_equal(b, packed[real])
    np.testing.assert_array_equal(c, labels[real])
    assert m.shape == (len(b), SIZE, SIZE) and m.dtype == bool
    assert (m.sum(0) <= 1).all()  # visible parts: disjoint
    # The shapes are painted in flat palette colours over a noisy background: the painted pixels are exactly those
    # holding a palette colour, and each visible part is one colour.
    painted = (image[:, :, None, :] == palette[None, None]).all(-1)  # (H, W, colours)
    np.testing.assert_array_equal(m.any(0), painted.any(-1))
    for part in m:
      assert part.any() and (painted[part].sum(0) == part.sum()).sum() == 1


def test_masks_lie_in_their_boxes_and_fill_them_as_their_class(seg_data):
  _, gt, _ = seg_data
  whole, image = seg.instance_masks(gt, SIZE)  # the whole shapes, before one hides another
  slot = np.nonzero(gt.mask)[1]
  # Fraction of its box a shape fills: rectangle 1, ellipse pi / 4, triangle 1 / 2.
  fill = {0: 1.0, 1: math.pi / 4, 2: 0.5}
  ys, xs = np.mgrid[:SIZE, :SIZE] + 0.5
  for m, i, j in zip(whole, image, slot):
    x1, y1, x2, y2 = gt.boxes[i, j].astype(float)
    assert ((xs[m] >= x1) & (xs[m] <= x2) & (ys[m] >= y1) & (ys[m] <= y2)).all()
    # Its pixel centres reach every side of its box to within a pixel; a triangle's only the bottom one (its apex
    # and base corners are too sharp to hold pixel centres near the other sides), and it is symmetric.
    gaps = [xs[m].min() - x1, x2 - xs[m].max(), ys[m].min() - y1, y2 - ys[m].max()]
    if gt.labels[i, j] == 2:
      gaps = [gaps[3], abs(xs[m].mean() - (x1 + x2) / 2)]
    assert max(gaps) <= 1.0
    area = (x2 - x1) * (y2 - y1)
    assert m.sum() == pytest.approx(fill[int(gt.labels[i, j])] * area, abs=2 * (x2 - x1 + y2 - y1))


def test_training_masks_are_the_shapes_at_a_quarter_resolution_in_their_slots(seg_data):
  _, gt, (_, _, masks) = seg_data
  assert gt.masks.shape == (12, seg.MASK_SIZE, seg.MASK_SIZE) and gt.masks.dtype == np.int32
  assert gt.masks.max() <= seg.MAX_BOXES
  for index, full, real in zip(gt.masks, masks, gt.mask):
    assert set(np.unique(index)) <= set(range(real.sum() + 1))  # 0 and the real slots' j + 1 only
    up = np.repeat(np.repeat(index, 4, 0), 4, 1)  # each 16x16 pixel covers 4x4 input pixels
    for j, m in enumerate(full):
      coarse = up == j + 1
      if m.sum() >= 150:  # big enough for 4x4 blocks to follow the outline: the same shape, in the same place
        assert (coarse & m).sum() / (coarse | m).sum() > 0.6, j
      centre = lambda a: np.array(np.nonzero(a)).mean(1)  # noqa: E731
      if coarse.any():
        np.testing.assert_allclose(centre(coarse), centre(m), atol=2.5)


def test_make_dataset_adds_masks_to_toykits_data():
  images, gt = seg.make_dataset(3, np.random.default_rng(9))
  toy_images, toy_gt = toykit.make_dataset(3, np.random.default_rng(9))  # the same draws
  np.testing.assert_array_equal(images, toy_images)
  np.testing.assert_array_equal(gt.boxes, toy_gt.boxes)
  assert toy_gt.masks is None and gt.masks is not None


# --- mask mAP (pycocotools) ----------------------------------------------------------------------------------


@needs_coco
def test_mask_map_of_hand_made_masks():
  gt_masks = [np.stack([square(10, 10, 20), square(40, 40, 10)])]
  gt_boxes, gt_classes = [np.array([[10, 10, 30, 30], [40, 40, 50, 50]], float)], [np.array([0, 1])]

  def ap(masks, classes=(0, 1)):
    dets = [(gt_boxes[0], np.array([0.9, 0.8]), np.array(classes), np.stack(masks))]
    return toykit.coco_map(dets, gt_boxes, gt_classes, gt_masks)

  assert ap(gt_masks[0]) == pytest.approx((1.0, 1.0))
  # A 16x16 square inside the 20x20 one: IoU 256 / 400 = 0.64, a match at 0.50, 0.55, 0.60 only: 3 of the 10
  # thresholds for class 0, all 10 for class 1: mAP@0.5:0.95 = (0.3 + 1) / 2.
  assert ap([square(12, 12, 16), gt_masks[0][1]]) == pytest.approx((0.65, 1.0))
  # 14x14: IoU 196 / 400 = 0.49, a miss everywhere.
  assert ap([square(13, 13, 14), gt_masks[0][1]]) == pytest.approx((0.5, 0.5))
  # The right masks with the classes swapped, or empty masks in the right boxes: nothing.
  assert ap(gt_masks[0], classes=(1, 0)) == (0.0, 0.0)
  assert ap(np.zeros_like(gt_masks[0])) == (0.0, 0.0)
  # ...although those empty masks' boxes are perfect: box mAP is 1.
  assert toykit.coco_map([(gt_boxes[0], [0.9, 0.8], [0, 1])], gt_boxes, gt_classes) == pytest.approx((1.0, 1.0))


@needs_coco
def test_mask_map_of_the_data_falls_as_the_masks_shrink(seg_data):
  _, _, (boxes, classes, masks) = seg_data
  scores = [np.linspace(0.9, 0.5, len(b)) for b in boxes]

  def ap(shrink):
    dets = [(b, s, c, shrink(m)) for b, s, c, m in zip(boxes, scores, classes, masks)]
    return toykit.coco_map(dets, boxes, classes, masks)

  perfect, thinner, thinnest = ap(lambda m: m), ap(erode), ap(lambda m: erode(erode(erode(m))))
  assert perfect == pytest.approx((1.0, 1.0))
  assert thinner[0] < 0.75 and thinnest[0] < thinner[0] and thinnest[1] < thinner[1] <= 1.0
  assert thinnest[1] < 0.9


# --- masks from coefficients and prototypes, NMS ---------------------------------------------------------------


def test_masks_of_threshold_the_logits_inside_the_box():
  proto = np.zeros((1, 8, 8, 2))
  proto[0, :, :4, 0], proto[0, :, 4:, 0] = 1.0, -1.0  # prototype 0: +1 on the left half, -1 on the right
  proto[0, :, :, 1] = 1.0  # prototype 1: +1 everywhere
  boxes = np.array([[0, 0, 8, 8], [2, 2, 6, 6], [0, 0, 8, 8]], float)
  coefs = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.5]])  # logits: +-1; +-1 in a box; -+1 + 0.5 = -0.5 | 1.5
  ((b, s, c, masks),) = seg.masks_of([(boxes, np.ones(3), np.zeros(3, int), coefs)], proto)
  assert masks.shape == (3, 8, 8) and masks.dtype == bool
  left = np.zeros((8, 8), bool)
  left[:, :4] = True
  np.testing.assert_array_equal(masks[0], left)
  in_box = np.zeros((8, 8), bool)
  in_box[2:6, 2:6] = True  # pixel centres 2.5 .. 5.5 lie in [2, 6]
  np.testing.assert_array_equal(masks[1], left & in_box)
  np.testing.assert_array_equal(masks[2], ~left)
  ((_, _, _, none),) = seg.masks_of([(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), np.zeros((0, 2)))], proto)
  assert none.shape == (0, 8, 8)


@needs_cv2
def test_detect_keeps_the_coefficients_of_the_kept_anchors():
  boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40]]], np.float32)
  scores = np.zeros((1, 3, 3), np.float32)
  scores[0, :, 0] = [0.8, 0.9, 0.0]  # anchor 0 overlaps anchor 1 (IoU 0.82) and scores less: suppressed
  scores[0, 2, 2] = 0.5
  coefs = np.arange(3 * 4, dtype=np.float32).reshape(1, 3, 4)  # anchor a's coefficients: 4a .. 4a + 3
  ((kept, s, c, k),) = toykit.detect(scores, boxes, coefs)
  order = np.argsort(-s)
  np.testing.assert_array_equal(kept[order], boxes[0, [1, 2]])
  np.testing.assert_array_equal(c[order], [0, 2])
  np.testing.assert_array_equal(k[order], coefs[0, [1, 2]])


# --- model, missing packages, training ------------------------------------------------------------------------


@pytest.mark.slow
def test_model_outputs_feed_the_loss_and_predict():
  model = seg.SegmentDetector(rngs=nnx.Rngs(0))
  images, gt = seg.make_dataset(2, np.random.default_rng(0))
  out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))
  feats, coefs, proto = out.feats, out.mask_coefs, out.proto
  r, nc, nm = seg.CONFIG.reg_max, seg.CONFIG.num_classes, seg.NUM_MASKS
  assert [f.shape for f in feats] == [(2, s, s, 4 * r + nc) for s in (8, 4, 2)]
  assert [c.shape for c in coefs] == [(2, s, s, nm) for s in (8, 4, 2)]
  assert proto.shape == (2, seg.MASK_SIZE, seg.MASK_SIZE, nm)
  loss_fn = functools.partial(jaxtal.segment_loss, config=seg.CONFIG)
  total, parts = jax.jit(lambda out, gt: loss_fn(out, gt))(out, gt)  # as the training step calls it
  assert np.isfinite(float(total)) and float(parts.seg) > 0
  scores, boxes, flat, protos = seg.predict(model, jnp.asarray(images))
  assert scores.shape == (2, 84, nc) and boxes.shape == (2, 84, 4) and protos.shape == (2, SIZE, SIZE, nm)
  np.testing.assert_allclose(flat[:, :64], np.asarray(coefs[0]).reshape(2, 64, nm), atol=1e-5)  # head anchor order
  np.testing.assert_allclose(flat[:, 80:], np.asarray(coefs[2]).reshape(2, 4, nm), atol=1e-5)


def test_segment_plot_without_matplotlib_exits_before_training(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
  monkeypatch.setattr(toykit, "task_step", lambda *a: pytest.fail("trained although --plot cannot work"))
  for module in ("cv2", "pycocotools.mask", "pycocotools.cocoeval"):  # stand-ins where the extra is missing
    monkeypatch.setitem(sys.modules, module, sys.modules.get(module) or types.ModuleType(module))
  with pytest.raises(SystemExit) as exit_info:
    seg.main(["--plot", "out.png", "--steps", "1"])
  message = str(exit_info.value.code)
  assert message.startswith("train_segment.py:") and "--plot needs matplotlib" in message
  assert 'pip install -e ".[examples]"' in message


@needs_coco
@needs_cv2
@pytest.mark.slow
def test_short_training_segments_clearly_better_than_chance(capsys, tmp_path):
  argv = ["--steps", "150", "--batch-size", "16", "--eval-images", "60", "--log-every", "75"]
  if importlib.util.find_spec("matplotlib") is not None:
    argv += ["--plot", str(tmp_path / "masks.png")]
  result = seg.main(argv)
  out = capsys.readouterr().out
  assert result["losses"].shape == (150,) and np.isfinite(result["losses"]).all()
  assert result["losses"][-10:].mean() < 0.6 * result["losses"][:10].mean()
  assert result["compilations"] == 1  # gt (masks included) is an argument and shapes are fixed: one compiled step
  # Chance is about 0: a mask must overlap its shape by half its union, with the right class, to count.
  assert result["map50"] > 0.3 and 0.0 < result["map"] <= result["map50"]
  lines = [line for line in out.splitlines() if line.startswith("step ")]
  assert [line.split()[1] for line in lines] == ["75/150", "150/150"] and all("of which mask" in x for x in lines)
  assert "mask mAP@0.5 " in out and "COCOeval segm" in out and "time: training" in out
  if "--plot" in argv:
    assert (tmp_path / "masks.png").stat().st_size > 0


@needs_coco
@needs_cv2
@pytest.mark.slow
def test_short_yolo26_segmentation_run(capsys):
  """``--yolo26``: both branches' predictions (the one-to-one one detached from the features, prototypes and
  semantic logits), the end-to-end segment26 loss compiled once over the weight schedule, NMS-free evaluation."""
  model = seg.SegmentDetector(yolo26=True, rngs=nnx.Rngs(0))
  images, gt = seg.make_dataset(2, np.random.default_rng(0))
  many, one = nnx.jit(lambda m, x: m.both(x))(model, jnp.asarray(images))
  assert many.semantic.shape == one.semantic.shape == (2, 8, 8, seg.CONFIG.num_classes)
  np.testing.assert_array_equal(many.proto, one.proto)

  def one2one_sum(m):
    one = m.both(jnp.asarray(images))[1]
    return sum(jnp.sum(x) for x in jax.tree.leaves(one))

  grads = nnx.grad(one2one_sum)(model)
  zero = lambda tree: not any(np.asarray(x).any() for x in jax.tree.leaves(tree))  # noqa: E731
  assert zero(grads.down) and zero(grads.proto) and zero(grads.semantic) and zero(grads.heads) and not zero(grads.heads_o2o)
  argv = ["--yolo26", "--steps", "6", "--batch-size", "4", "--eval-images", "8", "--log-every", "3"]
  result = seg.main(argv)
  out = capsys.readouterr().out
  assert result["losses"].shape == (6,) and np.isfinite(result["losses"]).all()
  assert result["compilations"] == 1  # the one-to-many weight is traced
  assert 0.0 <= result["map"] <= result["map50"] <= 1.0 and 0.0 <= result["map_o2m_nms"] <= result["map50_o2m_nms"] <= 1.0
  assert "one-to-one branch, no NMS" in out and "one-to-many branch + NMS" in out
