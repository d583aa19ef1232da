"""Tests of examples/train_segment.py: the instance masks against the drawn pixels, their boxes and their
``pack_masks`` slots; mask mAP (pycocotools' ``segm``) on perfect, shrunk and misplaced masks; the masks made of
coefficients and prototypes; the coefficients following NMS; the model's outputs; ``train_toy.fit``, the
training loop; the missing-matplotlib message; and a short training run that must segment clearly better than
chance.

pycocotools and OpenCV come with the ``examples`` extra (``pip install -e ".[examples]"``); the tests that need
them are skipped without it. The expected numbers are worked by hand in the comments beside them.
"""

import importlib.util
import math
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_segment.py"
_spec = importlib.util.spec_from_file_location("train_segment", _PATH)
seg = importlib.util.module_from_spec(_spec)
sys.modules["train_segment"] = seg
_spec.loader.exec_module(seg)
toy = seg.toy

needs_coco = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None,
                                reason="pycocotools: the examples extra")
needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV: the examples extra")

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
def data():
  images, gt = seg.make_dataset(12, np.random.default_rng(5))
  return images, gt, seg.ground_truth(gt)


# --- data ----------------------------------------------------------------------------------------------------


def test_full_resolution_masks_are_the_painted_pixels(data):
  images, gt, (boxes, classes, masks) = data
  palette = toy.COLOURS
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


def test_masks_lie_in_their_boxes_and_fill_them_as_their_class(data):
  _, gt, _ = data
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


def test_training_masks_are_the_shapes_at_a_quarter_resolution_in_their_slots(data):
  _, gt, (_, _, masks) = data
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


def test_make_dataset_adds_masks_to_train_toys_data():
  images, gt = seg.make_dataset(3, np.random.default_rng(9))
  toy_images, toy_gt = toy.make_dataset(3, np.random.default_rng(9))  # the same draws
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
    return toy.coco_map(dets, gt_boxes, gt_classes, gt_masks)

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
  assert toy.coco_map([(gt_boxes[0], [0.9, 0.8], [0, 1])], gt_boxes, gt_classes) == pytest.approx((1.0, 1.0))


@needs_coco
def test_mask_map_of_the_data_falls_as_the_masks_shrink(data):
  _, _, (boxes, classes, masks) = data
  scores = [np.linspace(0.9, 0.5, len(b)) for b in boxes]

  def ap(shrink):
    dets = [(b, s, c, shrink(m)) for b, s, c, m in zip(boxes, scores, classes, masks)]
    return toy.coco_map(dets, boxes, classes, masks)

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
  ((kept, s, c, k),) = toy.detect(scores, boxes, coefs)
  order = np.argsort(-s)
  np.testing.assert_array_equal(kept[order], boxes[0, [1, 2]])
  np.testing.assert_array_equal(c[order], [0, 2])
  np.testing.assert_array_equal(k[order], coefs[0, [1, 2]])


# --- model, missing packages, training ------------------------------------------------------------------------


@pytest.mark.slow
def test_model_outputs_feed_the_loss_and_predict():
  model = seg.SegmentDetector(rngs=seg.nnx.Rngs(0))
  images, gt = seg.make_dataset(2, np.random.default_rng(0))
  feats, coefs, proto = seg.nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))
  r, nc, nm = seg.CONFIG.reg_max, seg.CONFIG.num_classes, seg.NUM_MASKS
  assert [f.shape for f in feats] == [(2, s, s, 4 * r + nc) for s in (8, 4, 2)]
  assert [c.shape for c in coefs] == [(2, s, s, nm) for s in (8, 4, 2)]
  assert proto.shape == (2, seg.MASK_SIZE, seg.MASK_SIZE, nm)
  total, parts = jax.jit(lambda *a: jaxtal.segment_loss(*a, seg.CONFIG))(feats, coefs, proto, gt)
  assert np.isfinite(float(total)) and float(parts.seg) > 0
  scores, boxes, flat, protos = seg.predict(model, jnp.asarray(images))
  assert scores.shape == (2, 84, nc) and boxes.shape == (2, 84, 4) and protos.shape == (2, SIZE, SIZE, nm)
  np.testing.assert_allclose(flat[:, :64], np.asarray(coefs[0]).reshape(2, 64, nm), atol=1e-5)  # head anchor order
  np.testing.assert_allclose(flat[:, 80:], np.asarray(coefs[2]).reshape(2, 4, nm), atol=1e-5)


def test_plot_without_matplotlib_exits_before_training(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
  monkeypatch.setattr(toy, "task_step", lambda *a: pytest.fail("trained although --plot cannot work"))
  for module in ("cv2", "pycocotools.mask", "pycocotools.cocoeval"):  # stand-ins where the extra is missing
    monkeypatch.setitem(sys.modules, module, sys.modules.get(module) or types.ModuleType(module))
  with pytest.raises(SystemExit) as exit_info:
    seg.main(["--plot", "out.png", "--steps", "1"])
  message = str(exit_info.value.code)
  assert message.startswith("train_segment.py:") and "--plot needs matplotlib" in message
  assert 'pip install -e ".[examples]"' in message


def test_fit_trains_on_fresh_batches_and_reports_a_term(capsys):
  args = toy.example_parser("test", 6, "plot").parse_args(["--batch-size", "3", "--log-every", "3", "--seed", "4"])
  assert (args.steps, args.batch_size, args.eval_images, args.plot) == (6, 3, 200, None)
  seen = []

  def make_batch(n, rng):
    seen.append(rng.integers(1000))
    return np.zeros((n, 2, 2, 3)), seen[-1]

  def step(images, gt):  # loss = the batch's draw; the "seg" part = a tenth of it
    assert images.shape == (3, 2, 2, 3)
    return jnp.float32(gt), types.SimpleNamespace(seg=jnp.float32(gt / 10))

  losses = toy.fit(step, make_batch, args, start=0.0, term="seg", label="mask")
  expected = np.random.default_rng(4).integers(1000, size=6)  # one draw per step, from an rng seeded by --seed
  np.testing.assert_array_equal(seen, expected)
  np.testing.assert_allclose(losses, expected)
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[:4] for line in lines] == [["step", "3/6", "loss", f"{expected[:3].mean():.3f}"],
                                                  ["step", "6/6", "loss", f"{expected[3:].mean():.3f}"]]
  assert f"of which mask {expected[3:].mean() / 10:5.3f}" in lines[1]


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
