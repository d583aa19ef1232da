"""Train a small YOLO-style detector on generated shapes with jaxtal's loss (CPU, under a minute).

    pip install -e ".[examples]"    # pycocotools (mAP), OpenCV (NMS), matplotlib (--plot)
    python examples/train_toy.py
    python examples/train_toy.py --steps 1000 --plot predictions.png
    python examples/train_toy.py --end2end      # YOLO26-style NMS-free training, both branches evaluated

64x64 images of filled rectangles, ellipses and triangles (class = shape; the colour is noise), a few Flax
NNX conv layers with three NHWC head maps (strides 8/16/32), ``jaxtal.DetectionLoss`` with optax's AdamW,
then COCO mAP on held-out images: OpenCV's class-aware NMS and pycocotools' ``COCOeval``. Shapes can be
smaller than the stride-8 anchor spacing, so a few GTs get no anchor at all: the progress lines count them.

``--end2end`` trains as YOLO26 does for NMS-free detection: a second (one-to-one) head on the same features,
fed them under ``jax.lax.stop_gradient``, and ``jaxtal.EndToEndLoss`` (one-to-one assignment ``topk=7,
topk2=1``) mixing the two branches with ``jaxtal.one2many_weight`` over ``--epochs`` epochs of the steps. Both
branches are evaluated: the one-to-many one with NMS, the one-to-one one without (and with, for reference).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxtal

CLASS_NAMES = ("rectangle", "ellipse", "triangle")
COLOURS = np.array([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.25, 0.4, 0.95], [0.95, 0.85, 0.2]], np.float32)
IMAGE_SIZE, MAX_BOXES = 64, 4  # an image holds 1 to MAX_BOXES shapes
CONFIG = jaxtal.LossConfig(num_classes=len(CLASS_NAMES), strides=(8, 16, 32), reg_max=8)


def require(module: str, purpose: str, script: str = "train_toy.py"):
  """Imports ``module``, or exits naming ``script`` and the install command (called at startup, before training)."""
  try:
    return importlib.import_module(module)
  except ImportError:
    package = module.split(".")[0]
    sys.exit(f'{script}: {purpose} needs {package}, which is not installed: pip install -e ".[examples]"')


def draw_shape(image: np.ndarray, kind: int, box, colour) -> None:
  """Paints a filled shape of class ``kind`` exactly filling ``box`` (xyxy pixels) into ``image (H, W, 3)``."""
  image[shape_mask(kind, box, image.shape[:2])] = colour


def shape_mask(kind: int, box, size: tuple[int, int]) -> np.ndarray:
  """``(H, W)`` bool: the pixels of a grid of ``size = (H, W)`` whose centres lie in the filled shape of class
  ``kind`` exactly filling ``box`` (xyxy, in that grid's pixels): what :func:`draw_shape` paints."""
  x1, y1, x2, y2 = box
  ys, xs = np.mgrid[: size[0], : size[1]] + 0.5  # pixel centres
  if kind == 0:  # rectangle
    inside = (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
  elif kind == 1:  # ellipse
    inside = ((2 * xs - x1 - x2) / (x2 - x1)) ** 2 + ((2 * ys - y1 - y2) / (y2 - y1)) ** 2 <= 1.0
  else:  # triangle: apex at the top centre, base along the bottom edge
    inside = (ys >= y1) & (ys <= y2) & (np.abs(xs - (x1 + x2) / 2) <= (ys - y1) / (y2 - y1) * (x2 - x1) / 2)
  return inside


def random_boxes(rng: np.random.Generator, count: int) -> list[np.ndarray]:
  """Up to ``count`` xyxy boxes, sides 6 to 32 px, any two overlapping by at most a 2 px strip."""
  boxes = []
  for _ in range(20 * count):
    w, h = rng.uniform(6, 32, 2)
    x1, y1 = rng.uniform(0, IMAGE_SIZE - w), rng.uniform(0, IMAGE_SIZE - h)
    box = np.array([x1, y1, x1 + w, y1 + h])
    if all((np.minimum(box[2:], b[2:]) - np.maximum(box[:2], b[:2])).min() < 2 for b in boxes):
      boxes.append(box)
    if len(boxes) == count:
      break
  return boxes


def make_dataset(num_images: int, rng: np.random.Generator):
  """``num_images`` images ``(n, 64, 64, 3)`` float32 in [0, 1] and their ``jaxtal.GroundTruth``."""
  shape = (num_images, IMAGE_SIZE, IMAGE_SIZE, 3)
  images = rng.uniform(0.0, 0.35, (num_images, 1, 1, 1)) + rng.normal(0.0, 0.04, shape)  # background, noise
  rows = []  # YOLO label rows [image, class, cx, cy, w, h], normalised
  for i in range(num_images):
    for box in random_boxes(rng, int(rng.integers(1, MAX_BOXES + 1))):
      kind = int(rng.integers(len(CLASS_NAMES)))
      draw_shape(images[i], kind, box, COLOURS[rng.integers(len(COLOURS))])
      rows.append([i, kind, *((box[:2] + box[2:]) / 2 / IMAGE_SIZE), *((box[2:] - box[:2]) / IMAGE_SIZE)])
  gt = jaxtal.pack_labels(np.reshape(rows, (-1, 6)), num_images, MAX_BOXES, IMAGE_SIZE)
  return np.clip(images, 0.0, 1.0).astype(np.float32), gt


class Block(nnx.Module):
  """3x3 convolution, GroupNorm, SiLU."""

  def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
    self.norm = nnx.GroupNorm(cout, num_groups=8, rngs=rngs)

  def __call__(self, x):
    return nnx.silu(self.norm(self.conv(x)))


class Detector(nnx.Module):
  """Strided backbone (to stride 32), a top-down merge, and per level an NHWC head map of ``4R + nc`` channels.

  With ``end2end=True`` it also holds a one-to-one head: a copy of the (one-to-many) head at initialisation, as
  Ultralytics deep-copies it, that :meth:`both` feeds the same features under ``jax.lax.stop_gradient``.
  """

  def __init__(self, width: int = 48, *, end2end: bool = False, config: jaxtal.LossConfig | None = None,
               rngs: nnx.Rngs):
    config = CONFIG if config is None else config  # another config (e.g. other classes): strides (8, 16, 32)
    r, nc = config.reg_max, config.num_classes
    chans = [3, 16, 32, width, width, width]  # strides 2, 4, 8, 16, 32
    self.down = nnx.List([Block(a, b, 2, rngs) for a, b in zip(chans, chans[1:])])
    self.merge = nnx.List([Block(2 * width, width, 1, rngs) for _ in range(2)])
    self.heads = nnx.List([nnx.Sequential(Block(width, width, 1, rngs), nnx.Conv(width, 4 * r + nc, (1, 1), rngs=rngs))
                           for _ in config.strides])
    for head, s in zip(self.heads, config.strides):  # YOLOv8's bias priors: flat bins, ~5 objects an image
      cls_prior = math.log(5 / nc / (IMAGE_SIZE / s) ** 2)
      head.layers[-1].bias[...] = jnp.concatenate([jnp.ones(4 * r), jnp.full(nc, cls_prior)]).astype(jnp.float32)
    self.heads_o2o = nnx.clone(self.heads) if end2end else None  # its own parameters, the same initial values

  def features(self, x):
    """The three levels ``(p8, p16, p32)`` the heads read."""
    levels = []
    for block in self.down:
      levels.append(x := block(x))
    p8, p16, p32 = levels[-3:]
    up = lambda t: jnp.repeat(jnp.repeat(t, 2, axis=1), 2, axis=2)  # noqa: E731  (nearest, 2x)
    p16 = self.merge[0](jnp.concatenate([p16, up(p32)], -1))  # coarse context reaches the finer levels
    p8 = self.merge[1](jnp.concatenate([p8, up(p16)], -1))
    return p8, p16, p32

  def __call__(self, x):
    """The one-to-many head's maps (the only head without ``end2end``)."""
    return [head(p) for head, p in zip(self.heads, self.features(x))]

  def both(self, x):
    """``(one-to-many maps, one-to-one maps)``; the one-to-one head's input is detached, as in YOLO26."""
    levels = self.features(x)
    one2many = [head(p) for head, p in zip(self.heads, levels)]
    one2one = [head(jax.lax.stop_gradient(p)) for head, p in zip(self.heads_o2o, levels)]
    return one2many, one2one


def zero_positive_counts(positives_per_gt, mask):
  """``(real GTs that own no anchor, real GTs)`` from ``Targets.positives_per_gt`` and ``GroundTruth.mask``."""
  mask = jnp.asarray(mask, bool)
  return jnp.sum(mask & (positives_per_gt == 0)), jnp.sum(mask)


TRACES = {"train_step": 0, "train_step_e2e": 0, "task_step": 0}  # side effects run only while tracing: compilations


@nnx.jit
def train_step(model, optimizer, loss_fn, images, gt):
  """One AdamW step. ``gt`` is an argument: a closure over it would compile it in as a constant."""
  TRACES["train_step"] += 1

  def loss_of(model):
    feats = model(images)
    _, parts = loss_fn(feats, gt)
    _, targets = jaxtal.detection_targets(feats, gt, loss_fn.config)  # the loss's own assignment, to inspect
    return parts.box + parts.cls + parts.dfl, targets.positives_per_gt  # loss per image

  (loss, positives), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, zero_positive_counts(positives, gt.mask)


@nnx.jit
def train_step_e2e(model, optimizer, loss_fn, images, gt, weight):
  """One AdamW step of ``jaxtal.EndToEndLoss``. ``weight`` (the one-to-many weight) is a traced scalar: the step
  compiles once for every epoch of the schedule."""
  TRACES["train_step_e2e"] += 1

  def loss_of(model):
    one2many, one2one = model.both(images)
    total, _ = loss_fn((one2many,), (one2one,), gt, weight=weight)
    _, targets = jaxtal.detection_targets(one2many, gt, loss_fn.config)  # the one-to-many assignment, to inspect
    return total / images.shape[0], targets.positives_per_gt  # weighted total per image

  (loss, positives), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, zero_positive_counts(positives, gt.mask)


@nnx.jit
def task_step(model, optimizer, loss_fn, images, gt):
  """One AdamW step of a task loss fed all the model's outputs, ``loss_fn(*model(images), gt) -> (total, parts)``
  (a model returning the head maps and its task's maps: OBB angles, mask coefficients and prototypes, keypoints);
  returns the loss per image ``total / b`` and the parts. ``gt`` is an argument: a closure over it would compile
  it in as a constant (and recompile for every batch)."""
  TRACES["task_step"] += 1

  def loss_of(model):
    total, parts = loss_fn(*model(images), gt)
    return total / images.shape[0], parts

  (loss, parts), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, parts


def epoch_of(step: int, steps: int, epochs: int) -> int:
  """0-based epoch of 1-based ``step`` when ``steps`` steps make ``epochs`` epochs (as equal as they split)."""
  return (step - 1) * epochs // steps


def report(step: int, total: int, loss: float, zero: float, elapsed: float) -> None:
  """Progress: on a terminal one bar redrawn in place, otherwise one plain line per call."""
  text = f"step {step:4d}/{total}  loss {loss:6.3f}  real GTs with no positive {zero:6.2%}  {elapsed:5.1f} s"
  progress(step, total, text)


def progress(step: int, total: int, text: str) -> None:
  """Writes ``text`` for ``step`` of ``total``: on a terminal after a bar, redrawn in place; otherwise as a line."""
  if sys.stdout.isatty():
    bar = "#" * (24 * step // total)
    sys.stdout.write(f"\r[{bar:.<24}] {text}" + ("\n" if step == total else ""))
  else:
    sys.stdout.write(text + "\n")
  sys.stdout.flush()


def example_parser(description: str, steps: int, plot_help: str) -> argparse.ArgumentParser:
  """The command line the examples share: steps, batch size, peak learning rate, seed, held-out images, progress
  spacing and ``--plot FILE.png`` (``plot_help`` says what it draws)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--steps", type=int, default=steps)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=4e-3, help="peak AdamW learning rate")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval-images", type=int, default=200)
  parser.add_argument("--log-every", type=int, default=50, help="steps per progress line when not on a terminal")
  parser.add_argument("--plot", metavar="FILE.png", help=plot_help)
  return parser


def adamw(model, steps: int, lr: float) -> nnx.Optimizer:
  """The examples' optimiser: AdamW (weight decay 5e-4) on the model's parameters, the learning rate rising
  linearly to ``lr`` over the first 5% of ``steps``, then falling as a cosine."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), max(steps, 2))
  return nnx.Optimizer(model, optax.adamw(schedule, weight_decay=5e-4), wrt=nnx.Param)


def fit(step, make_batch, args, start: float, term: str | None = None, label: str | None = None) -> np.ndarray:
  """Runs ``args.steps`` training steps ``step(images, gt) -> (loss, parts)``, each on fresh images
  ``make_batch(args.batch_size, rng)`` (``rng`` seeded by ``args.seed``), with a progress line (:func:`progress`)
  every ``args.log_every`` steps off a terminal: the mean loss and, with ``term``, the mean of ``parts.<term>``
  ("of which ``label``"), and the seconds since ``start``. Returns the losses ``(steps,)``."""
  rng = np.random.default_rng(args.seed)
  every = max(1, args.steps // 100) if sys.stdout.isatty() else max(1, args.log_every)
  losses, terms = [], []
  for n in range(1, args.steps + 1):
    images, gt = make_batch(args.batch_size, rng)
    loss, parts = step(jnp.asarray(images), gt)
    losses.append(loss)  # device values: reading one waits for its step, so only when reporting
    terms.append(loss if term is None else getattr(parts, term))
    if n % every == 0 or n == args.steps:
      text = f"step {n:4d}/{args.steps}  loss {float(np.mean(losses[-every:])):6.3f}"
      if term is not None:
        text += f"  of which {label or term} {float(np.mean(terms[-every:])):5.3f}"
      progress(n, args.steps, f"{text}  {time.perf_counter() - start:5.1f} s")
  return np.array([float(x) for x in losses])


def train_task(model, loss_fn, make_batch, args, start: float, term: str | None = None, label: str | None = None):
  """Trains ``model`` on a task loss with :func:`task_step` and :func:`adamw` for :func:`fit`'s steps (same
  arguments); returns ``(losses (steps,), compilations of the step, seconds since start)``."""
  traces = TRACES["task_step"]
  step = functools.partial(task_step, model, adamw(model, args.steps, args.lr), loss_fn)
  losses = fit(step, make_batch, args, start, term, label)
  return losses, TRACES["task_step"] - traces, time.perf_counter() - start


def start_up(args, script: str, *needs: tuple[str, str]) -> float:
  """Before any training: imports each ``(module, purpose)`` of ``needs`` and, with ``args.plot``, matplotlib
  (Agg backend), or exits naming ``script`` and the install command (:func:`require`). Returns the start time."""
  for module, purpose in needs:
    require(module, purpose, script)
  if args.plot:
    require("matplotlib", "--plot", script).use("Agg")
  return time.perf_counter()


@nnx.jit
def predict(model, images):
  """Sigmoid class scores ``(b, A, nc)`` and xyxy boxes in pixels ``(b, A, 4)``."""
  return scores_and_boxes(model(images))


@nnx.jit
def predict_both(model, images):
  """``(scores, boxes)`` as :func:`predict` of the one-to-many and of the one-to-one head."""
  one2many, one2one = model.both(images)
  return scores_and_boxes(one2many), scores_and_boxes(one2one)


def scores_and_boxes(feats, config: jaxtal.LossConfig = CONFIG):
  """Sigmoid class scores ``(b, A, nc)`` and xyxy pixel boxes ``(b, A, 4)`` of per-level head maps."""
  head = jaxtal.decode_head(feats, config)
  return jax.nn.sigmoid(jnp.concatenate(head.logits, axis=1)), head.boxes * head.strides


def detect(scores, boxes, *per_anchor, conf: float = 0.001, iou: float = 0.6, max_det: int = 100):
  """Per image ``(boxes xyxy, scores, classes)``: each anchor's best class, OpenCV's class-aware NMS; followed by
  the kept anchors' rows of each further per-anchor output ``(b, A, ...)`` given (keypoints, mask coefficients)."""
  kept = detect_indices(scores, boxes, conf, iou, max_det)
  outputs = [np.asarray(boxes, np.float64), *(np.asarray(x) for x in per_anchor)]
  return [(x[0][keep], best[keep], cls[keep], *(y[keep] for y in x[1:])) for x, (keep, best, cls) in
          zip(zip(*outputs), kept)]


def detect_indices(scores, boxes, conf: float = 0.001, iou: float = 0.6, max_det: int = 100):
  """Per image ``(kept anchors (k,), best score (A,), best class (A,))``: what :func:`detect` keeps, as anchor
  indices, so that other per-anchor outputs (keypoints, mask coefficients) can follow the kept boxes."""
  nms = require("cv2", "NMS").dnn.NMSBoxesBatched
  out = []
  for s, b in zip(np.asarray(scores), np.asarray(boxes, np.float64)):
    best, cls = s.max(-1), s.argmax(-1)
    keep = np.asarray(nms(np.c_[b[:, :2], b[:, 2:] - b[:, :2]], best, cls.astype(np.int32), conf, iou, top_k=max_det))
    out.append((keep.astype(int).reshape(-1), best, cls))
  return out


def top_detections(scores, boxes, conf: float = 0.001, max_det: int = 100):
  """Per image ``(boxes xyxy, scores, classes)`` with NO NMS, for the one-to-one branch: each anchor's best
  class, the anchors scoring above ``conf``, the ``max_det`` best of them, best first. Nothing is suppressed.

  (Ultralytics' end-to-end postprocess ranks (anchor, class) pairs, so an anchor may give two classes; one class
  per anchor, as :func:`detect`, leaves NMS the only difference between the two evaluations.)
  """
  out = []
  for s, b in zip(np.asarray(scores), np.asarray(boxes, np.float64)):
    best, cls = s.max(-1), s.argmax(-1)
    keep = np.flatnonzero(best > conf)
    keep = keep[np.argsort(-best[keep], kind="stable")[:max_det]]
    out.append((b[keep], best[keep], cls[keep]))
  return out


def coco_map(detections, gt_boxes, gt_classes, gt_masks=None) -> tuple[float, float]:
  """``(mAP@0.5:0.95, mAP@0.5)`` from pycocotools' ``COCOeval``.

  ``detections``: per image ``(boxes (k, 4) xyxy, scores (k,), classes (k,))``; ``gt_boxes``, ``gt_classes``:
  per image ``(m, 4)`` xyxy and ``(m,)``. With ``gt_masks`` (per image ``(m, H, W)`` bool) it is MASK mAP
  (``iouType="segm"``: IoU of the masks, as pycocotools' RLE) and each image's detections carry their masks,
  ``(boxes, scores, classes, masks (k, H, W) bool)``.
  """
  encode = None if gt_masks is None else require("pycocotools.mask", "mask mAP").encode
  xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]  # noqa: E731

  def region(box, mask) -> dict:  # a detection's mask goes without its box: loadRes would read the box first
    if mask is None:
      x, y, w, h = xywh(box)
      return dict(bbox=[x, y, w, h], area=w * h)
    return dict(segmentation=encode(np.asfortranarray(mask, np.uint8)), area=float(np.sum(mask)))

  anns, dets = [], []
  for i, (boxes, classes) in enumerate(zip(gt_boxes, gt_classes)):
    masks = [None] * len(boxes) if encode is None else gt_masks[i]
    for b, c, m in zip(boxes, classes, masks):
      anns.append(dict(id=len(anns) + 1, image_id=i, category_id=int(c), iscrowd=0, **region(b, m)))
  for i, (boxes, scores, classes, *masks) in enumerate(detections):
    for b, s, c, m in zip(boxes, scores, classes, [None] * len(boxes) if encode is None else masks[0]):
      dets.append(dict(image_id=i, category_id=int(c), score=float(s), **region(b, m)))
  return coco_eval(anns, dets, len(gt_boxes), "bbox" if encode is None else "segm")


def coco_eval(anns, dets, num_images: int, iou_type: str, class_names=CLASS_NAMES, **params) -> tuple[float, float]:
  """``(AP@0.5:0.95, AP@0.5)`` of pycocotools' ``COCOeval(iouType=iou_type)`` over COCO-format ground-truth
  annotations ``anns`` and detections ``dets`` (lists of dicts) on images ``0 .. num_images - 1``, categories
  ``0 .. len(class_names) - 1``; ``params`` set fields of ``COCOeval.params`` (e.g. ``kpt_oks_sigmas``)."""
  coco, cocoeval = require("pycocotools.coco", "mAP"), require("pycocotools.cocoeval", "mAP")
  if not anns or not dets:  # COCOeval needs both
    return 0.0, 0.0
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
    truth = coco.COCO()
    images = [dict(id=i, height=IMAGE_SIZE, width=IMAGE_SIZE) for i in range(num_images)]  # segm reads the size
    categories = [dict(id=c, name=n) for c, n in enumerate(class_names)]
    truth.dataset = dict(images=images, annotations=anns, categories=categories)
    truth.createIndex()
    ev = cocoeval.COCOeval(truth, truth.loadRes(dets), iou_type)
    for name, value in params.items():
      setattr(ev.params, name, value)
    ev.evaluate(), ev.accumulate(), ev.summarize()
  return max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0)


def save_plot(plt, path: str, images, gt, detections, count: int = 6, min_score: float = 0.3, *,
              class_names=CLASS_NAMES, draw=None) -> None:
  """Ground truth (green) and detections scoring ``min_score`` or more (red) on the first held-out images;
  ``draw(ax, i)``, if given, adds more to the panel of image ``i`` (e.g. keypoints)."""
  fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 2.8))
  for i, (ax, image, boxes, real, (dets, scores, classes, *_)) in enumerate(
      zip(axes, images, gt.boxes, gt.mask, detections)):
    ax.imshow(image, extent=(0, image.shape[1], image.shape[0], 0))  # pixel i covers [i, i + 1), as the boxes'
    ax.set_axis_off()
    for b in boxes[real]:
      ax.add_patch(plt.Rectangle(b[:2], *(b[2:] - b[:2]), fill=False, color="lime", lw=1.5))
    for b, s, c in zip(dets, scores, classes):
      if s >= min_score:
        ax.add_patch(plt.Rectangle(b[:2], *(b[2:] - b[:2]), fill=False, color="red", lw=1, ls="--"))
        ax.text(b[0], b[1] - 1, f"{class_names[c][:4]} {s:.2f}", color="red", fontsize=6)
    if draw is not None:
      draw(ax, i)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"saved {path}")


def main(argv=None) -> dict:
  parser = example_parser(__doc__.splitlines()[0], 500, "save detections and ground truth of held-out images"
                          " (with --end2end: the one-to-one branch's, without NMS)")
  parser.add_argument("--end2end", action="store_true",
                      help="YOLO26-style NMS-free training: a one-to-one head beside the one-to-many one")
  parser.add_argument("--epochs", type=int, default=10,
                      help="with --end2end: epochs the steps make, for the one-to-many weight's schedule")
  args = parser.parse_args(argv)
  start = start_up(args, "train_toy.py", ("pycocotools.cocoeval", "mAP"), ("cv2", "NMS"))

  model = Detector(end2end=args.end2end, rngs=nnx.Rngs(args.seed))
  optimizer = adamw(model, args.steps, args.lr)
  if args.end2end:  # YOLO26's one-to-one assignment; the one-to-many branch keeps CONFIG's (topk=10)
    loss_fn = jaxtal.EndToEndLoss(CONFIG, one2one_topk=7, one2one_topk2=1)
    epochs = max(1, min(args.epochs, args.steps))
    print(f"end-to-end: one-to-many weight {jaxtal.one2many_weight(0, epochs):.2f} -> "
          f"{jaxtal.one2many_weight(epochs - 1, epochs):.2f} over {epochs} epochs of ~{args.steps / epochs:g} steps")
  else:
    loss_fn = jaxtal.DetectionLoss(CONFIG)
  step_name = "train_step_e2e" if args.end2end else "train_step"
  rng = np.random.default_rng(args.seed)
  every = max(1, args.steps // 100) if sys.stdout.isatty() else max(1, args.log_every)
  losses, zero, real = [], 0, 0
  for step in range(1, args.steps + 1):
    images, gt = make_dataset(args.batch_size, rng)  # fresh images every step
    if args.end2end:
      weight = jaxtal.one2many_weight(epoch_of(step, args.steps, epochs), epochs)
      loss, (z, n) = train_step_e2e(model, optimizer, loss_fn, jnp.asarray(images), gt, jnp.float32(weight))
    else:
      loss, (z, n) = train_step(model, optimizer, loss_fn, jnp.asarray(images), gt)
    losses.append(loss)  # device values: reading one waits for its step, so only when reporting
    zero, real = zero + z, real + n
    if step % every == 0 or step == args.steps:
      mean_loss = float(np.mean(losses[-every:]))
      report(step, args.steps, mean_loss, float(zero) / max(float(real), 1.0), time.perf_counter() - start)
      zero, real = 0, 0
  train_s = time.perf_counter() - start

  images, gt = make_dataset(args.eval_images, np.random.default_rng(args.seed + 10_000))
  truth = [b[m] for b, m in zip(gt.boxes, gt.mask)], [c[m] for c, m in zip(gt.labels, gt.mask)]
  result = {}
  if args.end2end:
    one2many, one2one = predict_both(model, jnp.asarray(images))
    detections = top_detections(*one2one)  # the NMS-free branch: what --plot shows
    maps = {"o2m+NMS": coco_map(detect(*one2many), *truth), "o2o, no NMS": coco_map(detections, *truth),
            "o2o+NMS": coco_map(detect(*one2one), *truth)}
    (ap, ap50), (result["map_o2o"], result["map50_o2o"]) = maps["o2m+NMS"], maps["o2o, no NMS"]
    result["map_o2o_nms"], result["map50_o2o_nms"] = maps["o2o+NMS"]
  else:
    detections = detect(*predict(model, jnp.asarray(images)))
    ap, ap50 = coco_map(detections, *truth)
  if args.plot:
    save_plot(importlib.import_module("matplotlib.pyplot"), args.plot, images, gt, detections)
  wall = time.perf_counter() - start
  if args.end2end:
    print(f"held-out, {args.eval_images} images:  mAP@0.5:0.95  mAP@0.5")
    labels = {"o2m+NMS": "one-to-many + NMS", "o2o, no NMS": "one-to-one, no NMS", "o2o+NMS": "one-to-one + NMS"}
    for key, (a, a50) in maps.items():
      print(f"  {labels[key]:<26} {a:12.3f} {a50:8.3f}")
  else:
    print(f"held-out, {args.eval_images} images: mAP@0.5:0.95 {ap:.3f}, mAP@0.5 {ap50:.3f}")
  print(f"time: training {train_s:.1f} s ({args.steps} steps of {args.batch_size} images, {step_name} compiled"
        f" {TRACES[step_name]}x), total {wall:.1f} s")
  losses = np.array([float(x) for x in losses])
  return dict(losses=losses, map=ap, map50=ap50, compilations=TRACES[step_name], wall_s=wall, **result)


if __name__ == "__main__":
  main()
