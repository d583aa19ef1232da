"""Train a small YOLO-style detector on generated shapes with jaxtal's loss (CPU, a few minutes).

    python examples/train_toy.py                      # defaults: no arguments needed
    python examples/train_toy.py --steps 300 --plot predictions.png

What happens:

1. ``make_dataset`` draws 64x64 images of filled rectangles, ellipses and triangles in a few colours
   (class = shape kind; the colour is noise the network must learn to ignore) with NumPy, together
   with their YOLO label rows, packed by ``jaxtal.pack_labels`` into a fixed-size ``GroundTruth``.
2. ``Detector`` is a few Flax NNX conv layers with three output levels (strides 8/16/32, maps
   8x8/4x4/2x2), each an NHWC head map of ``4 * reg_max + nc`` channels: the layout jaxtal expects.
3. ``train_step`` (``nnx.jit``, compiled once: every batch has the same shapes) minimises
   ``jaxtal.DetectionLoss`` (task-aligned assignment, BCE + CIoU + DFL) with optax's AdamW.
4. ``evaluate`` decodes predictions (sigmoid scores, ``jaxtal.decode_boxes`` times strides, a
   confidence threshold, class-aware NMS) and scores them with VOC-style mAP@0.5 on held-out images,
   once with the untrained model (same initialisation) and once after training.
"""

from __future__ import annotations

import argparse
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
IMAGE_SIZE = 64
STRIDES = (8, 16, 32)
REG_MAX = 16
MAX_BOXES = 4  # M: box slots per image (images hold 1 to MAX_BOXES shapes)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def draw_shape(image: np.ndarray, kind: int, box: np.ndarray, colour: np.ndarray) -> None:
  """Paints one filled shape of class ``kind`` that exactly fills ``box`` (xyxy pixels) into ``image`` (H, W, 3)."""
  x1, y1, x2, y2 = box
  ys, xs = np.mgrid[: image.shape[0], : image.shape[1]] + 0.5  # pixel centres
  if kind == 0:  # rectangle
    inside = (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
  elif kind == 1:  # ellipse
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
  else:  # triangle, apex at the top centre, base along the bottom edge
    half_width = (ys - y1) / (y2 - y1) * (x2 - x1) / 2
    inside = (ys >= y1) & (ys <= y2) & (np.abs(xs - (x1 + x2) / 2) <= half_width)
  image[inside] = colour


def random_boxes(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
  """Up to ``count`` xyxy boxes (sides 12 to 32 px) inside a ``size`` square that overlap little (IoU < 0.2)."""
  boxes = []
  for _ in range(20 * count):
    w, h = rng.uniform(12, 32, size=2)
    x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    box = np.array([x1, y1, x1 + w, y1 + h])
    if all(iou_matrix(box[None], b[None])[0, 0] < 0.2 for b in boxes):
      boxes.append(box)
    if len(boxes) == count:
      break
  return np.array(boxes, np.float32).reshape(-1, 4)


def make_dataset(num_images: int, rng: np.random.Generator, size: int = IMAGE_SIZE):
  """Generates ``num_images`` images of coloured shapes and their labels.

  Returns:
    ``images``: ``(n, size, size, 3)`` float32 in ``[0, 1]``;
    ``rows``: ``(k, 6)`` YOLO label rows ``[image_idx, cls, cx, cy, w, h]`` (normalised);
    ``gt``: the rows packed by ``jaxtal.pack_labels`` into a ``GroundTruth`` with ``M = MAX_BOXES``.
  """
  images = np.empty((num_images, size, size, 3), np.float32)
  rows = []
  for i in range(num_images):
    background = rng.uniform(0.0, 0.35)
    images[i] = background + rng.normal(0.0, 0.04, size=(size, size, 3))
    for box in random_boxes(rng, int(rng.integers(1, MAX_BOXES + 1)), size):
      kind = int(rng.integers(len(CLASS_NAMES)))
      draw_shape(images[i], kind, box, COLOURS[rng.integers(len(COLOURS))])
      cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
      rows.append([i, kind, cx / size, cy / size, w / size, h / size])
  rows = np.array(rows, np.float32).reshape(-1, 6)
  gt = jaxtal.pack_labels(rows, batch_size=num_images, max_boxes=MAX_BOXES, image_size=(size, size))
  return np.clip(images, 0.0, 1.0), rows, gt


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class ConvBlock(nnx.Module):
  """3x3 convolution, GroupNorm and SiLU."""

  def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
    self.norm = nnx.GroupNorm(cout, num_groups=8, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.silu(self.norm(self.conv(x)))


class Head(nnx.Module):
  """One output level: separate box and class branches, concatenated to ``4 * reg_max + nc`` channels."""

  def __init__(self, cin: int, num_classes: int, stride: int, reg_max: int, rngs: nnx.Rngs):
    self.box = nnx.Sequential(ConvBlock(cin, 64, 1, rngs), nnx.Conv(64, 4 * reg_max, (1, 1), rngs=rngs))
    self.cls = nnx.Sequential(ConvBlock(cin, 64, 1, rngs), nnx.Conv(64, num_classes, (1, 1), rngs=rngs))
    # YOLOv8-style bias priors: flat box distributions, and ~5 objects per image spread over the cells.
    self.box.layers[-1].bias[...] = jnp.ones(4 * reg_max, jnp.float32)
    prior = math.log(5 / num_classes / (IMAGE_SIZE / stride) ** 2)
    self.cls.layers[-1].bias[...] = jnp.full(num_classes, prior, jnp.float32)  # explicit dtype: a weak-typed
    # bias would change type after the first update and force a second compilation

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.box(x), self.cls(x)], axis=-1)


class Detector(nnx.Module):
  """A tiny detector: strided conv backbone, top-down merge, three head maps ``(b, H/s, W/s, 4R + nc)``."""

  def __init__(self, num_classes: int = len(CLASS_NAMES), reg_max: int = REG_MAX, *, rngs: nnx.Rngs):
    self.stem = nnx.Sequential(ConvBlock(3, 16, 2, rngs), ConvBlock(16, 32, 2, rngs))  # stride 4
    self.down8 = ConvBlock(32, 64, 2, rngs)
    self.down16 = ConvBlock(64, 64, 2, rngs)
    self.down32 = ConvBlock(64, 64, 2, rngs)
    self.merge16 = ConvBlock(128, 64, 1, rngs)
    self.merge8 = ConvBlock(128, 64, 1, rngs)
    self.heads = nnx.List([Head(64, num_classes, s, reg_max, rngs) for s in STRIDES])

  def __call__(self, images: jax.Array) -> list[jax.Array]:
    p8 = self.down8(self.stem(images))
    p16 = self.down16(p8)
    p32 = self.down32(p16)
    # Top-down: coarse context (what shape is this?) reaches the fine levels.
    p16 = self.merge16(jnp.concatenate([p16, upsample2(p32)], axis=-1))
    p8 = self.merge8(jnp.concatenate([p8, upsample2(p16)], axis=-1))
    return [head(p) for head, p in zip(self.heads, (p8, p16, p32))]


def upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling of ``(b, H, W, C)``."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

TRACES = {"train_step": 0}  # Python side effects run only while tracing: counts compilations


@nnx.jit
def train_step(model: Detector, optimizer: nnx.Optimizer, loss_fn: jaxtal.DetectionLoss, images, gt):
  """One AdamW step on a batch; returns ``(loss per image, LossParts)``."""
  TRACES["train_step"] += 1

  def loss_of(model):
    _, parts = loss_fn(model(images), gt)
    return parts.box + parts.cls + parts.dfl, parts  # per image (the returned total is this times b)

  (loss, parts), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, parts


@nnx.jit
def eval_step(model: Detector, loss_fn: jaxtal.DetectionLoss, images, gt):
  """Forward pass without gradients: ``(loss per image, head maps)``."""
  feats = model(images)
  _, parts = loss_fn(feats, gt)
  return parts.box + parts.cls + parts.dfl, feats


def progress(step: int, total: int, loss: float, parts, start: float) -> None:
  """One-line text progress bar, redrawn in place with ``\\r``."""
  done = int(30 * step / total)
  rate = step / max(time.perf_counter() - start, 1e-9)
  sys.stdout.write(
      f"\r[{'#' * done}{'.' * (30 - done)}] step {step:4d}/{total}  loss {loss:6.3f}"
      f"  (box {float(parts.box):.3f} cls {float(parts.cls):.3f} dfl {float(parts.dfl):.3f})  {rate:5.1f} step/s"
  )
  sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Decoding, NMS and mAP (NumPy, host side)
# ---------------------------------------------------------------------------------------------


def decode_predictions(feats, num_classes: int, conf: float = 0.05, reg_max: int = REG_MAX):
  """Per-image detections from raw head maps.

  Returns a list (one per image) of ``(boxes (k, 4) xyxy pixels, scores (k,), classes (k,))``:
  every anchor whose best class score passes ``conf``, before NMS.
  """
  pred_dist, pred_logits = jaxtal.flatten_head(feats, num_classes, reg_max)
  anchors, strides = jaxtal.make_anchors([f.shape[1:3] for f in feats], STRIDES)
  boxes = np.asarray(jaxtal.decode_boxes(pred_dist, anchors, reg_max) * strides)  # (b, A, 4) pixels
  probs = np.asarray(jax.nn.sigmoid(pred_logits))  # (b, A, nc)
  scores, classes = probs.max(-1), probs.argmax(-1)
  out = []
  for b in range(boxes.shape[0]):
    keep = scores[b] > conf
    out.append((boxes[b][keep], scores[b][keep], classes[b][keep]))
  return out


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Plain IoU of every box in ``a (n, 4)`` with every box in ``b (m, 4)`` (xyxy): ``(n, m)``."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
  area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
  return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float = 0.5, max_det: int = 50):
  """Greedy class-aware NMS: a box is dropped when a higher-scoring box of the same class overlaps it more than
  ``iou_threshold``. Returns the kept indices, highest score first."""
  order = np.argsort(-scores, kind="stable")
  keep = []
  while order.size and len(keep) < max_det:
    best, rest = order[0], order[1:]
    keep.append(best)
    same_class = classes[rest] == classes[best]
    overlap = iou_matrix(boxes[best][None], boxes[rest])[0] > iou_threshold
    order = rest[~(same_class & overlap)]
  return np.array(keep, np.int64)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
  """VOC all-point AP: area under the precision envelope (precision made non-increasing in recall)."""
  r = np.concatenate([[0.0], recall, [1.0]])
  p = np.concatenate([[1.0], precision, [0.0]])
  p = np.maximum.accumulate(p[::-1])[::-1]
  changed = np.flatnonzero(r[1:] != r[:-1])
  return float(np.sum((r[changed + 1] - r[changed]) * p[changed + 1]))


def mean_average_precision(detections, gt_boxes, gt_classes, num_classes: int, iou_threshold: float = 0.5) -> float:
  """mAP@``iou_threshold``, VOC style, averaged over the classes that have ground truth.

  Args:
    detections: per image ``(boxes (k, 4), scores (k,), classes (k,))``.
    gt_boxes, gt_classes: per image ``(m, 4)`` xyxy boxes and ``(m,)`` classes.
  """
  aps = []
  for c in range(num_classes):
    num_gt = sum(int(np.sum(g == c)) for g in gt_classes)
    if num_gt == 0:
      continue
    # All detections of class c over the data set, best first; each GT can be matched once.
    found = [(s, i, box) for i, (bx, sc, cl) in enumerate(detections) for box, s in zip(bx[cl == c], sc[cl == c])]
    found.sort(key=lambda t: -t[0])
    matched = [np.zeros(int(np.sum(g == c)), bool) for g in gt_classes]
    tp = np.zeros(len(found))
    for k, (_, i, box) in enumerate(found):
      gts = gt_boxes[i][gt_classes[i] == c]
      if len(gts) == 0:
        continue
      ious = iou_matrix(box[None], gts)[0]
      j = int(np.argmax(ious))
      if ious[j] >= iou_threshold and not matched[i][j]:
        matched[i][j] = True
        tp[k] = 1
    cum_tp = np.cumsum(tp)
    recall = cum_tp / num_gt
    precision = cum_tp / np.arange(1, len(found) + 1)
    aps.append(average_precision(recall, precision))
  return float(np.mean(aps)) if aps else 0.0


def evaluate(model: Detector, loss_fn, images, gt, conf: float):
  """Held-out loss per image, mAP@0.5, and the post-NMS detections of every image."""
  loss, feats = eval_step(model, loss_fn, jnp.asarray(images), gt)
  detections = []
  for boxes, scores, classes in decode_predictions(feats, loss_fn.num_classes, conf):
    keep = nms(boxes, scores, classes)
    detections.append((boxes[keep], scores[keep], classes[keep]))
  mask = np.asarray(gt.mask)
  gt_boxes = [np.asarray(gt.boxes)[i][mask[i]] for i in range(len(images))]
  gt_classes = [np.asarray(gt.labels)[i][mask[i]] for i in range(len(images))]
  return float(loss), mean_average_precision(detections, gt_boxes, gt_classes, loss_fn.num_classes), detections


def save_plot(path: str, images, gt, detections, count: int = 6, min_score: float = 0.25) -> None:
  """Draws ground truth (green) and predictions scoring ``min_score`` or more (red, class and score) on the
  first ``count`` held-out images."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no picture saved.")
    return
  count = min(count, len(images))
  fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 2.8))
  for ax, i in zip(np.atleast_1d(axes), range(count)):
    ax.imshow(images[i])
    ax.set_axis_off()
    for box, cls, real in zip(np.asarray(gt.boxes[i]), np.asarray(gt.labels[i]), np.asarray(gt.mask[i])):
      if real:
        ax.add_patch(plt.Rectangle(box[:2], *(box[2:] - box[:2]), fill=False, color="lime", lw=1.5))
    for box, score, cls in zip(*detections[i]):
      if score < min_score:
        continue
      ax.add_patch(plt.Rectangle(box[:2], *(box[2:] - box[:2]), fill=False, color="red", lw=1, ls="--"))
      ax.text(box[0], box[1] - 1, f"{CLASS_NAMES[cls][:4]} {score:.2f}", color="red", fontsize=6)
  fig.suptitle(f"held-out images: ground truth (green), predictions after NMS scoring >= {min_score} (red)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"saved {path}")


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600, help="training steps")
  parser.add_argument("--batch-size", type=int, default=32, help="images per step")
  parser.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation")
  parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
  parser.add_argument("--eval-images", type=int, default=200, help="held-out images for the evaluation")
  parser.add_argument("--conf", type=float, default=0.01, help="confidence threshold of the detections")
  parser.add_argument("--plot", metavar="FILE.png", help="save predictions vs ground truth on held-out images")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  eval_images, _, eval_gt = make_dataset(args.eval_images, np.random.default_rng(args.seed + 10_000))

  model = Detector(rngs=nnx.Rngs(args.seed))
  loss_fn = jaxtal.DetectionLoss(num_classes=len(CLASS_NAMES), strides=STRIDES, reg_max=REG_MAX)
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 20, 1), max(args.steps, 2))
  tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adamw(schedule, weight_decay=5e-4))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  loss0, map0, _ = evaluate(model, loss_fn, eval_images, eval_gt, args.conf)
  print(f"untrained: held-out loss {loss0:.3f}, mAP@0.5 {map0:.3f}  ({args.eval_images} images)")

  train_start = time.perf_counter()
  history = []
  for step in range(1, args.steps + 1):
    images, _, gt = make_dataset(args.batch_size, rng)  # fresh images every step
    loss, parts = train_step(model, optimizer, loss_fn, jnp.asarray(images), gt)
    history.append(loss)  # a device array: reading it waits for the step, so only do that when printing
    if step % 10 == 0 or step in (1, args.steps):
      progress(step, args.steps, float(loss), parts, train_start)
  print()
  train_losses = np.array([float(x) for x in history])
  train_time = time.perf_counter() - train_start

  loss1, map1, detections = evaluate(model, loss_fn, eval_images, eval_gt, args.conf)
  print(f"trained:   held-out loss {loss1:.3f}, mAP@0.5 {map1:.3f}")
  if args.plot:
    save_plot(args.plot, eval_images, eval_gt, detections)

  tail = train_losses[-max(len(train_losses) // 10, 1) :].mean()
  wall = time.perf_counter() - start
  print(
      "\nsummary\n"
      f"  train loss per image: first step {train_losses[0]:.3f} -> last 10% of steps {tail:.3f}\n"
      f"  held-out loss:        untrained {loss0:.3f} -> trained {loss1:.3f}\n"
      f"  held-out mAP@0.5:     untrained {map0:.3f} -> trained {map1:.3f}\n"
      f"  train_step compiled {TRACES['train_step']} time(s); training {train_time:.1f} s"
      f" ({args.steps} steps of {args.batch_size}); total wall time {wall:.1f} s"
  )
  return {
      "train_losses": train_losses,
      "loss_untrained": loss0,
      "loss_trained": loss1,
      "map_untrained": map0,
      "map_trained": map1,
      "compilations": TRACES["train_step"],
      "wall_s": wall,
  }


if __name__ == "__main__":
  main()
