"""What the training examples share: the toy shapes, the toy detector, the training loop and the evaluation.

Not an example to run: ``train_toy.py``, ``train_obb.py``, ``train_pose.py`` and ``train_segment.py`` do
``import toykit`` (Python puts a script's own folder on ``sys.path``, so it needs no install). It holds

* data: 64x64 images of filled rectangles, ellipses and triangles (:func:`make_dataset`, :func:`shape_mask`);
* model: :class:`Detector`, a few Flax NNX conv layers with three NHWC head maps (strides 8/16/32), which the
  other tasks extend with their own branches, returning :class:`Predictions`;
* the task-loss call: a model returns ``jaxtal.Predictions``, and every task's loss takes ``(preds, gt)``;
* training: :func:`example_parser` (the shared command line), :func:`adamw`, :func:`task_step`, :func:`fit`,
  :func:`train_task`, :func:`progress` and :func:`start_up` (the check for the optional packages);
* evaluation and output: :func:`scores_and_boxes`, OpenCV's class-aware NMS (:func:`detect`), the NMS-free
  detections of a one-to-one branch (:func:`top_detections`), pycocotools' ``COCOeval`` (:func:`coco_map`,
  :func:`coco_eval`) and :func:`save_plot`; :func:`epoch_of` for the end-to-end weight's schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import math
import pathlib
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


def require(module: str, purpose: str, script: str | None = None):
  """Imports ``module``, or exits naming ``script`` (by default the running script) and the install command
  (called at startup, before training)."""
  try:
    return importlib.import_module(module)
  except ImportError:
    package = module.split(".")[0]
    script = script or pathlib.Path(sys.argv[0]).name
    sys.exit(f'{script}: {purpose} needs {package}, which is not installed: pip install -e ".[examples]"')


# --- data ------------------------------------------------------------------------------------------------


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


# --- model -----------------------------------------------------------------------------------------------


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


# --- the task-loss calls ---------------------------------------------------------------------------------


# A model's outputs by name, the one container every jaxtal task loss takes.
Predictions = jaxtal.Predictions


# --- training --------------------------------------------------------------------------------------------

TRACES = {"task_step": 0}  # side effects run only while tracing: compilations


@nnx.jit
def task_step(model, optimizer, loss_fn, images, gt):
  """One AdamW step of a task loss on the model's outputs, ``loss_fn(model(images), gt)`` (a model
  returning :class:`Predictions`: head maps and its task's maps: OBB angles, mask coefficients and prototypes,
  keypoints); returns the loss per image ``total / b`` and the parts. ``gt`` is an argument: a closure over it
  would compile it in as a constant (and recompile for every batch)."""
  TRACES["task_step"] += 1

  def loss_of(model):
    total, parts = loss_fn(model(images), gt)
    return total / images.shape[0], parts

  (loss, parts), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, parts


def first_call(step, *args, name: str = "the training step"):
  """``step(*args)``, the first call of a jitted step: says it is compiling (the silent 10-40 s of an example's
  start) and, once the step has run, how long that took (compiling and the step itself)."""
  print(f"compiling {name} ...", end="", flush=True)
  begin = time.perf_counter()
  out = jax.block_until_ready(step(*args))
  print(f" done in {time.perf_counter() - begin:.1f} s", flush=True)
  return out


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
  ("of which ``label``"), and the seconds since ``start``; the first step through :func:`first_call` (a line saying
  it compiles, and how long it took). Returns the losses ``(steps,)``."""
  rng = np.random.default_rng(args.seed)
  every = max(1, args.steps // 100) if sys.stdout.isatty() else max(1, args.log_every)
  losses, terms = [], []
  for n in range(1, args.steps + 1):
    images, gt = make_batch(args.batch_size, rng)
    loss, parts = (first_call if n == 1 else lambda f, *a: f(*a))(step, jnp.asarray(images), gt)
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


# --- evaluation ------------------------------------------------------------------------------------------


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


def top_detections(scores, boxes, *per_anchor, conf: float = 0.001, max_det: int = 100):
  """Per image ``(boxes xyxy, scores, classes)`` with NO NMS, for a one-to-one branch: each anchor's best
  class, the anchors scoring above ``conf``, the ``max_det`` best of them, best first. Nothing is suppressed.
  Followed, as in :func:`detect`, by the kept anchors' rows of each further per-anchor output given.

  (Ultralytics' end-to-end postprocess ranks (anchor, class) pairs, so an anchor may give two classes; one class
  per anchor, as :func:`detect`, leaves NMS the only difference between the two evaluations.)
  """
  out = []
  outputs = [np.asarray(scores), np.asarray(boxes, np.float64), *(np.asarray(x) for x in per_anchor)]
  for s, b, *rest in zip(*outputs):
    best, cls = s.max(-1), s.argmax(-1)
    keep = np.flatnonzero(best > conf)
    keep = keep[np.argsort(-best[keep], kind="stable")[:max_det]]
    out.append((b[keep], best[keep], cls[keep], *(y[keep] for y in rest)))
  return out


def epoch_of(step: int, steps: int, epochs: int) -> int:
  """0-based epoch of 1-based ``step`` when ``steps`` steps make ``epochs`` epochs (as equal as they split)."""
  return (step - 1) * epochs // steps


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


# --- output ----------------------------------------------------------------------------------------------


def box_label(ax, box, text: str, colour) -> None:
  """``text`` at the top left of ``box`` (xyxy pixels): above it, or just inside when the box touches the image's
  top edge; never clipped by the panel (``clip_on=False``; :func:`finish_plot` saves every artist)."""
  above = box[1] >= 8
  ax.text(box[0], box[1] - 1 if above else box[1] + 1, text, color=colour, fontsize=6, va="bottom" if above else "top",
          clip_on=False)


def finish_plot(fig, path: str, handles, title: str) -> None:
  """Title, a legend of ``handles`` (matplotlib artists with labels) under the panels, and the file saved with
  every artist inside it (``bbox_inches="tight"``: labels beyond a panel's edge are not cut off)."""
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 5),
             fontsize=8,
             frameon=False)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  print(f"saved {path}")


def save_plot(plt, path: str, images, gt, detections, count: int = 6, min_score: float = 0.3, *,
              class_names=CLASS_NAMES, draw=None, legend=(), title=None) -> None:
  """Ground truth (green) and detections scoring ``min_score`` or more (red, dashed, with class and score) on the
  first held-out images, with a legend; ``draw(ax, i)``, if given, adds more to the panel of image ``i`` (e.g.
  keypoints), ``legend`` its legend entries and ``title`` replaces the default title."""
  from matplotlib.lines import Line2D

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
        box_label(ax, b, f"{class_names[c][:4]} {s:.2f}", "red")
    if draw is not None:
      draw(ax, i)
  handles = [Line2D([], [], color="lime", lw=1.5, label="ground truth"),
             Line2D([], [], color="red", lw=1, ls="--", label=f"detection (score >= {min_score}): class, score"),
             *legend]
  finish_plot(fig, path, handles, title or "held-out images")
