"""Train the toy detector with KEYPOINTS on generated shapes with jaxtal's pose loss (CPU, about a minute).

    pip install -e ".[examples]"    # pycocotools (keypoint AP), OpenCV (NMS), matplotlib (--plot)
    python examples/train_pose.py
    python examples/train_pose.py --steps 1000 --plot pose.png
    python examples/train_pose.py --yolo26    # YOLO26 pose, end to end: OKS assignment, RLE, NMS-free evaluation

64x64 images of filled isosceles triangles and darts (a triangle with a notch cut into its base; class =
shape), pointing up give or take 60 degrees, each with K = 4 keypoints: the apex, the right and the left base
corner (seen from the apex pointing up), and an inner point (the triangle's centroid, the dart's notch). Some
keypoints are hidden: a square around one keypoint of a shape is erased back to the background, and every
keypoint under it is labelled with visibility 0 (the others 2). The box is the shape's tight box, hidden
corners included.

The model is ``toykit``'s ``Detector`` (``examples/toykit.py``, the pieces the training examples share) plus, per
level, a keypoint branch: a block and a 1x1 convolution to ``K * 3`` channels (per keypoint x, y and a visibility
logit), decoded as Ultralytics does, ``(2 raw + anchor - 1/2) * stride``. ``jaxtal.PoseLoss`` (task-aligned
assignment, BCE + CIoU + DFL + OKS keypoint loss + keypoint visibility BCE) trains it with optax's AdamW.

Evaluation on held-out images: OpenCV's class-aware NMS on the boxes (``toykit.detect``), each kept box
with its anchor's keypoints, then pycocotools' ``COCOeval(iouType="keypoints")`` with this script's OKS sigmas
(``SIGMAS``, the ones the loss uses) in ``params.kpt_oks_sigmas``: keypoint AP@0.5 and AP@0.5:0.95 over OKS.
A ground truth's OKS area is its box's area, as in the loss (COCO uses the segmented area); hidden keypoints
do not count, and a shape with every keypoint hidden is ignored (COCO's rules).

``--yolo26`` trains as Ultralytics trains YOLO26-pose: a ``reg_max = 1`` head whose keypoints decode as ``(raw +
anchor) * stride``, a second 1x1 convolution per level giving two sigma logits per keypoint, a one-to-one copy of
the heads fed detached features, and a RealNVP flow (``jaxtal.RealNVP``, trained with the model);
``jaxtal.end_to_end_loss(jaxtal.pose26_loss, ...)`` (OKS assignment with the level gate, the RLE keypoint term, the
one-to-many weight decaying over ``--epochs``). Evaluation is NMS-free: the one-to-one branch's best-scoring
anchors, nothing suppressed (``toykit.top_detections``), with the same keypoint AP; the one-to-many branch with
NMS is printed beside it.
"""

from __future__ import annotations

import importlib
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import toykit  # the examples' shared model, training loop, NMS, COCOeval, plots (examples/toykit.py)
from flax import nnx

import jaxtal

SCRIPT = "train_pose.py"
CLASS_NAMES = ("triangle", "dart")
KEYPOINT_NAMES = ("apex", "right", "left", "inner")
# OKS sigmas: the corners are sharp features (like COCO's wrists and ankles, 0.062 and 0.089), the inner point
# is not drawn on a triangle and only placed by its shape (like COCO's hips, 0.107).
SIGMAS = (0.08, 0.08, 0.08, 0.1)
IMAGE_SIZE, MAX_BOXES = 64, 3  # an image holds 1 to MAX_BOXES shapes
MIN_HEIGHT, MAX_HEIGHT = 14.0, 30.0  # apex to base, pixels
# Shapes point up, turned by up to 60 degrees either way. At any angle the corners' names must be read from the
# orientation alone, which this small model learns slowly: with the defaults keypoint AP@0.5 is 0.15, not 0.97.
MAX_TURN = np.pi / 3
NOTCH = 0.4  # a dart's notch: this fraction of the height above the base's middle
HIDE = 0.4  # chance that a shape has one keypoint erased
CONFIG = jaxtal.PoseLossConfig(
    num_classes=len(CLASS_NAMES), strides=(8, 16, 32), reg_max=8, kpt_shape=(len(KEYPOINT_NAMES), 3), sigmas=SIGMAS
)
# --yolo26: YOLO26's head (reg_max 1) and loss (OKS assignment, RLE; the one-to-one branch: topk 7, topk2 1).
CONFIG26 = jaxtal.Pose26LossConfig(
    num_classes=len(CLASS_NAMES), strides=(8, 16, 32), reg_max=1, kpt_shape=(len(KEYPOINT_NAMES), 3), sigmas=SIGMAS
)


# --- data -----------------------------------------------------------------------------------------


def keypoints_of(kind: int, centroid, height: float, half_base: float, angle: float) -> np.ndarray:
  """``(4, 2)`` keypoints ``(apex, right, left, inner)`` in pixels of a shape of class ``kind`` whose triangle has
  its centroid at ``centroid``, apex-to-base ``height``, base half-width ``half_base``, and points up (to -y)
  turned by ``angle`` radians clockwise on the screen (``y`` points down). ``right`` is the base corner met
  first going clockwise from the apex. The inner point is the centroid (triangle) or the notch (dart)."""
  up = np.array([np.sin(angle), -np.cos(angle)])  # from the base to the apex
  side = np.array([np.cos(angle), np.sin(angle)])  # along the base, to the right of an upright shape
  centroid = np.asarray(centroid, np.float64)
  base = centroid - up * height / 3
  inner = centroid if kind == 0 else base + up * NOTCH * height
  return np.stack([centroid + up * 2 * height / 3, base + side * half_base, base - side * half_base, inner])


def _in_triangle(corners, xs, ys) -> np.ndarray:
  """Whether the points ``(xs, ys)`` lie in the triangle ``corners (3, 2)`` (either winding, edges included)."""
  a, b = corners, np.roll(corners, -1, axis=0)
  side = [(q[0] - p[0]) * (ys - p[1]) - (q[1] - p[1]) * (xs - p[0]) for p, q in zip(a, b)]
  return np.all(np.stack(side) >= 0, axis=0) | np.all(np.stack(side) <= 0, axis=0)


def shape_mask(kind: int, keypoints, size: int = IMAGE_SIZE) -> np.ndarray:
  """``(size, size)`` bool: the pixels whose centres lie in the shape of class ``kind`` with ``keypoints (4, 2)``
  (pixel ``i`` covers ``[i, i + 1)``). A dart is the two triangles apex-right-notch and apex-notch-left."""
  ys, xs = np.mgrid[:size, :size] + 0.5
  apex, right, left, inner = np.asarray(keypoints, np.float64)
  if kind == 0:
    return _in_triangle(np.stack([apex, right, left]), xs, ys)
  return _in_triangle(np.stack([apex, right, inner]), xs, ys) | _in_triangle(np.stack([apex, inner, left]), xs, ys)


def random_shapes(rng: np.random.Generator, count: int) -> list[tuple[int, np.ndarray]]:
  """Up to ``count`` ``(class, keypoints (4, 2))``: heights ``MIN_HEIGHT`` to ``MAX_HEIGHT``, base half-widths
  0.3 to 0.45 of the height (the apex is the sharpest corner), turned by up to ``MAX_TURN`` either way, wholly
  inside the image, their boxes overlapping by at most a 2 px strip."""
  shapes, boxes = [], []
  for _ in range(20 * count):
    height = rng.uniform(MIN_HEIGHT, MAX_HEIGHT)
    kind = int(rng.integers(len(CLASS_NAMES)))
    points = keypoints_of(kind, (0.0, 0.0), height, rng.uniform(0.3, 0.45) * height, rng.uniform(-1, 1) * MAX_TURN)
    low, high = points[:3].min(0), points[:3].max(0)  # the three corners span the box
    points = points + rng.uniform(-low, IMAGE_SIZE - high)
    box = np.concatenate([points[:3].min(0), points[:3].max(0)])
    if all((np.minimum(box[2:], b[2:]) - np.maximum(box[:2], b[:2])).min() < 2 for b in boxes):
      shapes.append((kind, points))
      boxes.append(box)
    if len(shapes) == count:
      break
  return shapes


def in_squares(points, squares) -> np.ndarray:
  """``(...)`` bool: whether the points ``(..., 2)`` lie in any of the axis-aligned squares ``(n, 3)`` (centre
  x, y and half side), edges included."""
  points = np.asarray(points, np.float64)
  squares = np.asarray(squares, np.float64).reshape((-1,) + (1,) * (points.ndim - 1) + (3,))
  return np.any(np.all(np.abs(points - squares[..., :2]) <= squares[..., 2:], axis=-1), axis=0)


def render(background, shapes, colours, squares):
  """The image ``(64, 64, 3)`` float32 in [0, 1], label rows ``(k, 5)`` ``[class, x1, y1, x2, y2]`` and keypoints
  ``(k, 4, 3)`` ``(x, y, visibility)`` (pixels) of ``shapes`` (``(class, keypoints (4, 2))`` each) painted in
  ``colours (k, 3)`` over ``background (64, 64, 3)``, then the ``squares (n, 3)`` (centre x, y, half side)
  erased back to the background: a keypoint under a square has visibility 0, the others 2. The box is the
  corners' box, hidden ones included."""
  background = np.asarray(background, np.float64)
  image = background.copy()
  for (kind, kpts), colour in zip(shapes, colours):
    image[shape_mask(kind, kpts)] = colour
  erased = in_squares(np.stack(np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE][::-1], -1) + 0.5, squares)  # pixel centres
  image[erased] = background[erased]
  points = np.reshape([kpts for _, kpts in shapes], (-1, len(KEYPOINT_NAMES), 2))
  rows = np.reshape([[kind, *kpts[:3].min(0), *kpts[:3].max(0)] for kind, kpts in shapes], (-1, 5))
  kpts = np.concatenate([points, np.where(in_squares(points, squares), 0.0, 2.0)[..., None]], axis=-1)
  return np.clip(image, 0.0, 1.0).astype(np.float32), rows, kpts


def make_image(rng: np.random.Generator):
  """One image ``(64, 64, 3)`` float32 in [0, 1], its label rows ``(k, 5)`` and keypoints ``(k, 4, 3)``
  (:func:`render`'s). Shapes are flat colour on a grey background, plain or noisy; with chance ``HIDE`` a shape
  has a square of 5 to 8 px around one of its keypoints (give or take a pixel) erased."""
  noise = rng.choice([0.0, rng.uniform(0.02, 0.08)])
  background = rng.uniform(0.0, 0.3) + rng.normal(0.0, 1.0, (IMAGE_SIZE, IMAGE_SIZE, 3)) * noise
  shapes = random_shapes(rng, int(rng.integers(1, MAX_BOXES + 1)))
  colours = rng.uniform(0.15, 1.0, (len(shapes), 3))
  bright = rng.integers(3, size=len(shapes))  # one bright channel: the shape stands out of the background
  colours[np.arange(len(shapes)), bright] = rng.uniform(0.6, 1.0, len(shapes))
  squares = [[*kpts[rng.integers(len(KEYPOINT_NAMES))] + rng.uniform(-1.0, 1.0, 2), rng.uniform(2.5, 4.0)]
             for _, kpts in shapes if rng.uniform() < HIDE]
  return render(background, shapes, colours, squares)


def make_dataset(num_images: int, rng: np.random.Generator):
  """``num_images`` images ``(n, 64, 64, 3)`` float32 and their ``jaxtal.GroundTruth`` with ``keypoints
  (n, MAX_BOXES, 4, 3)`` in pixels."""
  images, rows, kpts = [], [], []  # YOLO label rows [image, class, cx, cy, w, h] and keypoints, normalised
  for i in range(num_images):
    image, labels, points = make_image(rng)
    images.append(image)
    centre, size = (labels[:, 1:3] + labels[:, 3:5]) / 2, labels[:, 3:5] - labels[:, 1:3]
    rows += [[i, row[0], *c, *s] for row, c, s in zip(labels, centre / IMAGE_SIZE, size / IMAGE_SIZE)]
    kpts.append(np.concatenate([points[..., :2] / IMAGE_SIZE, points[..., 2:]], axis=-1))
  kpts = np.concatenate(kpts).reshape(-1, len(KEYPOINT_NAMES), 3)
  gt = jaxtal.pack_labels(np.reshape(rows, (-1, 6)), num_images, MAX_BOXES, IMAGE_SIZE, keypoints=kpts)
  return np.stack(images), gt


# --- model and training ------------------------------------------------------------------------------


class PoseDetector(toykit.Detector):
  """``toykit.Detector`` (backbone, top-down merge, per-level box/class head maps) with, per level, a
  keypoint branch: a block and a 1x1 convolution to ``K * 3`` raw channels (channel ``3 k + d``).

  ``yolo26=True``: ``CONFIG26``'s head, per level a sigma branch (a block and a 1x1 convolution to ``2K`` sigma
  logits), one-to-one copies of every head (:meth:`both`) and the RLE flow ``self.flow``.
  """

  def __init__(self, width: int = 48, *, yolo26: bool = False, rngs: nnx.Rngs):
    config = CONFIG26 if yolo26 else CONFIG
    super().__init__(width, end2end=yolo26, config=config, rngs=rngs)
    k = config.kpt_shape[0]
    branch = lambda channels: nnx.List([  # noqa: E731
        nnx.Sequential(toykit.Block(width, width, 1, rngs), nnx.Conv(width, channels, (1, 1), rngs=rngs))
        for _ in config.strides
    ])
    self.keypoint_heads = branch(k * 3)
    self.sigma_heads = branch(2 * k) if yolo26 else None
    if yolo26:  # Ultralytics deep-copies its one-to-one heads; both branches read one flow
      self.keypoint_heads_o2o, self.sigma_heads_o2o = nnx.clone(self.keypoint_heads), nnx.clone(self.sigma_heads)
      self.flow = jaxtal.RealNVP(rngs)

  @staticmethod
  def _branch(levels, heads, keypoint_heads, sigma_heads):
    return toykit.Predictions(
        [head(p) for head, p in zip(heads, levels)], keypoints=[k(p) for k, p in zip(keypoint_heads, levels)],
        keypoint_sigmas=None if sigma_heads is None else [s(p) for s, p in zip(sigma_heads, levels)],
    )

  def __call__(self, x):
    """``Predictions(head maps, keypoints=keypoint maps[, keypoint_sigmas=sigma maps])``: per level ``(b, H, W,
    4R + nc)``, ``(b, H, W, 3K)`` raw (and ``(b, H, W, 2K)`` sigma logits); with ``yolo26`` the one-to-many branch."""
    return self._branch(self.features(x), self.heads, self.keypoint_heads, self.sigma_heads)

  def both(self, x):
    """``(one-to-many, one-to-one)`` Predictions of a ``yolo26`` model; the one-to-one heads read detached features."""
    levels = self.features(x)
    detached = [jax.lax.stop_gradient(p) for p in levels]
    return (self._branch(levels, self.heads, self.keypoint_heads, self.sigma_heads),
            self._branch(detached, self.heads_o2o, self.keypoint_heads_o2o, self.sigma_heads_o2o))


TRACES = {"train_step26": 0}  # side effects run only while tracing: compilations


@nnx.jit
def train_step26(model, optimizer, images, gt, weight):
  """One AdamW step of YOLO26's end-to-end pose loss: both branches, the model's flow (trained with it), the
  one-to-many weight ``weight`` a traced scalar (one compilation for the whole schedule). Returns the loss per
  image and the one-to-one branch's parts."""
  TRACES["train_step26"] += 1

  def loss_of(model):
    many, one = model.both(images)
    total, parts = jaxtal.end_to_end_loss(jaxtal.pose26_loss, many, one, gt, weight=weight, flow=model.flow.params(),
                                          config=CONFIG26)
    return total / images.shape[0], parts

  (loss, parts), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, parts


def _decoded(out, config, yolo26: bool):
  scores, boxes = toykit.scores_and_boxes(out.feats, config)
  keypoints = jaxtal.decode_keypoints(out.keypoints, config.strides, config.kpt_shape, yolo26=yolo26)  # visibility: a logit
  return scores, boxes, jnp.concatenate([keypoints[..., :2], jax.nn.sigmoid(keypoints[..., 2:])], axis=-1)


@nnx.jit
def predict(model, images):
  """Sigmoid class scores ``(b, A, nc)``, xyxy pixel boxes ``(b, A, 4)`` and keypoints ``(b, A, K, 3)``: pixel
  ``x, y`` and the visibility probability."""
  return _decoded(model(images), CONFIG, False)


@nnx.jit
def predict_both(model, images):
  """:func:`predict`'s outputs of a ``yolo26`` model's one-to-many and one-to-one branches."""
  many, one = model.both(images)
  return _decoded(many, CONFIG26, True), _decoded(one, CONFIG26, True)


# --- keypoint AP ---------------------------------------------------------------------------------------


def keypoint_ap(detections, gt_boxes, gt_classes, gt_keypoints, sigmas=SIGMAS) -> tuple[float, float]:
  """``(AP@0.5:0.95, AP@0.5)`` over OKS from pycocotools' ``COCOeval(iouType="keypoints")`` with
  ``params.kpt_oks_sigmas = sigmas`` (``K`` values).

  ``detections``: per image ``(boxes (k, 4) xyxy, scores (k,), classes (k,), keypoints (k, K, 3))`` (the third
  keypoint value is not used); ground truth per image: ``gt_boxes (m, 4)`` xyxy, ``gt_classes (m,)``,
  ``gt_keypoints (m, K, 3)`` with visibility 0 for a hidden keypoint. A GT's OKS area is its box's area.
  """
  anns, dets = [], []
  for i, (boxes, classes, kpts) in enumerate(zip(gt_boxes, gt_classes, gt_keypoints)):
    for b, c, k in zip(np.asarray(boxes, np.float64), classes, np.asarray(kpts, np.float64)):
      w, h = b[2:] - b[:2]
      anns.append(dict(id=len(anns) + 1, image_id=i, category_id=int(c), iscrowd=0, bbox=[*b[:2], w, h],
                       area=w * h, keypoints=k.reshape(-1).tolist(), num_keypoints=int(np.sum(k[:, 2] > 0))))
  for i, (_, scores, classes, kpts) in enumerate(detections):
    for s, c, k in zip(scores, classes, np.asarray(kpts, np.float64)):
      dets.append(dict(image_id=i, category_id=int(c), score=float(s), keypoints=k.reshape(-1).tolist()))
  return toykit.coco_eval(anns, dets, len(gt_boxes), "keypoints", CLASS_NAMES,
                          kpt_oks_sigmas=np.asarray(sigmas, np.float64))


# --- output ------------------------------------------------------------------------------------------------

MARKERS = ("^", ">", "<", "o")  # per keypoint: apex, right, left, inner
KEYPOINT_NAMES = ("apex", "right", "left", "inner")


def draw_keypoints(ax, gt_keypoints, detections, min_score: float = 0.3) -> None:
  """Onto ``ax``: the ground-truth keypoints ``(m, K, 3)`` (lime outlines; hidden ones as grey crosses) and, for
  detections ``(boxes, scores, classes, keypoints (k, K, 3))`` scoring ``min_score`` or more, the keypoints
  predicted visible (probability 0.5 or more; red), the corners joined apex - right - left."""
  for k in gt_keypoints:
    for (x, y, v), marker in zip(k, MARKERS):
      if v > 0:
        ax.plot(x, y, marker, ms=5, mfc="none", mec="lime", mew=1.0)
      else:
        ax.plot(x, y, "x", ms=4, color="0.7", mew=1.0)
  _, scores, _, kpts = detections
  for s, k in zip(scores, kpts):
    if s >= min_score:
      ax.plot(k[[0, 1, 2, 0], 0], k[[0, 1, 2, 0], 1], color="red", lw=0.6)
      for (x, y, v), marker in zip(k, MARKERS):
        if v >= 0.5:
          ax.plot(x, y, marker, ms=3, color="red")


def save_plot(plt, path: str, images, gt, detections, min_score: float = 0.3) -> None:
  """``toykit.save_plot``'s boxes on held-out images with the ground-truth and predicted keypoints
  (:func:`draw_keypoints`)."""
  from matplotlib.lines import Line2D

  def draw(ax, i):
    draw_keypoints(ax, gt.keypoints[i][gt.mask[i]], detections[i], min_score)

  legend = [Line2D([], [], ls="", marker="o", ms=5, mfc="none", mec="lime", label="keypoint (ground truth)"),
            Line2D([], [], ls="", marker="x", ms=4, color="0.7", label="hidden keypoint"),
            Line2D([], [], color="red", lw=0.6, marker="o", ms=3, label="predicted visible keypoints"),
            *(Line2D([], [], ls="", marker=m, ms=4, color="0.3", label=n) for m, n in zip(MARKERS, KEYPOINT_NAMES))]
  toykit.save_plot(plt, path, images, gt, detections, min_score=min_score, class_names=CLASS_NAMES, draw=draw,
                   legend=legend, title="held-out images: keypoints and boxes")


def main(argv=None) -> dict:
  plot_help = "save keypoints, boxes and ground truth of held-out images"
  parser = toykit.example_parser(__doc__.splitlines()[0], 800, plot_help)
  parser.add_argument("--yolo26", action="store_true",
                      help="YOLO26 pose, end to end: OKS assignment, RLE keypoint term, NMS-free evaluation")
  parser.add_argument("--epochs", type=int, default=10,
                      help="with --yolo26: epochs the steps make, for the one-to-many weight's schedule")
  parser.set_defaults(batch_size=16)
  args = parser.parse_args(argv)
  start = toykit.start_up(args, SCRIPT, ("pycocotools.cocoeval", "keypoint AP"), ("cv2", "NMS"))

  model = PoseDetector(yolo26=args.yolo26, rngs=nnx.Rngs(args.seed))
  if args.yolo26:
    optimizer, epochs, steps = toykit.adamw(model, args.steps, args.lr), max(1, min(args.epochs, args.steps)), itertools.count(1)
    traces = TRACES["train_step26"]

    def step(images, gt):  # the one-to-many weight of this step's epoch, as Ultralytics' trainer sets it
      weight = jaxtal.one2many_weight(toykit.epoch_of(next(steps), args.steps, epochs), epochs)
      return train_step26(model, optimizer, images, gt, jnp.float32(weight))

    losses = toykit.fit(step, make_dataset, args, start, term="rle", label="RLE")
    compilations, train_s = TRACES["train_step26"] - traces, time.perf_counter() - start
  else:
    losses, compilations, train_s = toykit.train_task(model, jaxtal.PoseLoss(CONFIG), make_dataset, args, start,
                                                      term="pose", label="keypoints")  # fresh images every step

  images, gt = make_dataset(args.eval_images, np.random.default_rng(args.seed + 10_000))
  truth = [[x[m] for x, m in zip(field, gt.mask)] for field in (gt.boxes, gt.labels, gt.keypoints)]
  result = {}
  if args.yolo26:
    many, one = predict_both(model, jnp.asarray(images))
    detections = toykit.top_detections(*one)  # the one-to-one branch, no NMS: each kept anchor with its keypoints
    result["ap_o2m_nms"], result["ap50_o2m_nms"] = keypoint_ap(toykit.detect(*many), *truth)
  else:
    detections = toykit.detect(*predict(model, jnp.asarray(images)))  # each kept box with its anchor's keypoints
  ap, ap50 = keypoint_ap(detections, *truth)
  box_ap, box_ap50 = toykit.coco_map([d[:3] for d in detections], *truth[:2])  # the boxes, for reference
  if args.plot:
    save_plot(importlib.import_module("matplotlib.pyplot"), args.plot, images, gt, detections)
  wall = time.perf_counter() - start
  hidden = float(np.mean(gt.keypoints[gt.mask][..., 2] == 0))
  how = " (one-to-one branch, no NMS)" if args.yolo26 else ""
  print(f"held-out, {args.eval_images} images ({hidden:.0%} of keypoints hidden){how}: keypoint AP@0.5 {ap50:.3f},"
        f" AP@0.5:0.95 {ap:.3f} (COCOeval OKS, sigmas {', '.join(map(str, SIGMAS))}); box mAP@0.5 {box_ap50:.3f}")
  if args.yolo26:
    print(f"  one-to-many branch + NMS: keypoint AP@0.5 {result['ap50_o2m_nms']:.3f}, AP@0.5:0.95 {result['ap_o2m_nms']:.3f}")
  print(f"time: training {train_s:.1f} s ({args.steps} steps of {args.batch_size} images, the step compiled"
        f" {compilations}x), total {wall:.1f} s")
  return dict(losses=losses, ap=ap, ap50=ap50, box_map=box_ap, box_map50=box_ap50, compilations=compilations,
              train_s=train_s, wall_s=wall, **result)


if __name__ == "__main__":
  main()
