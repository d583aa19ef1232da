"""Train the toy detector on generated ROTATED shapes with jaxtal's OBB loss (CPU, about a minute).

    pip install -e ".[examples]"    # OpenCV (drawing), matplotlib (--plot)
    python examples/train_obb.py
    python examples/train_obb.py --steps 1000 --plot obb.png

64x64 images of filled rotated rectangles, ellipses and triangles (class = shape; random angles, sizes and
colours on a plain or noisy background), drawn with OpenCV (``cv2.fillPoly``, ``cv2.ellipse``) and labelled
as ``xywhr`` boxes in Ultralytics' convention (angle in ``[0, pi/2)``, sides swapped to get there), packed by
``jaxtal.pack_rotated_labels``. The model is ``toykit``'s ``Detector`` (``examples/toykit.py``, the pieces the
training examples share) plus, per level, an angle branch whose output goes through Ultralytics' activation
``(sigmoid(x) - 1/4) * pi`` (``[-pi/4, 3pi/4)``); ``jaxtal.OBBLoss`` (rotated task-aligned assignment, BCE +
ProbIoU + DFL + angle) trains it with ``toykit``'s task step and AdamW schedule (``train_task``).

Evaluation on held-out images: boxes decoded with ``jaxtal.decode_rotated_boxes``, a greedy class-aware
rotated NMS, and a VOC-style all-point AP@0.5 per class averaged over the classes (pycocotools has no rotated
boxes). Both the NMS and the matching use the POLYGON IoU of the rotated rectangles (their exact shared area,
by clipping one by the other), not ProbIoU: the geometric overlap DOTA-style evaluations use, and not the
loss's own measure. The NMS and the IoU are small NumPy loops over the detections of one image: fine for an
example, not for a real evaluation.
"""

from __future__ import annotations

import importlib
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import toykit  # the examples' shared model, training loop and start-up checks (examples/toykit.py)
from flax import nnx

import jaxtal

CLASS_NAMES = ("rectangle", "ellipse", "triangle")
IMAGE_SIZE, MAX_BOXES = 64, 4  # an image holds 1 to MAX_BOXES shapes
MIN_SIDE, MAX_SIDE = 8.0, 30.0  # box sides in pixels
CONFIG = jaxtal.OBBLossConfig(num_classes=len(CLASS_NAMES), strides=(8, 16, 32), reg_max=8)
IOU_NAME = "polygon IoU"
SCRIPT = "train_obb.py"


# --- data -----------------------------------------------------------------------------------------


def corners(boxes) -> np.ndarray:
  """``(..., 4, 2)`` corners of ``xywhr`` boxes ``(..., 5)``: centre + R(angle) (+-w/2, +-h/2), in order."""
  boxes = np.asarray(boxes, np.float64)
  cos, sin = np.cos(boxes[..., 4, None]), np.sin(boxes[..., 4, None])
  u = np.array([-0.5, 0.5, 0.5, -0.5]) * boxes[..., 2, None]  # along the box's width axis (cos, sin)
  v = np.array([-0.5, -0.5, 0.5, 0.5]) * boxes[..., 3, None]  # along its height axis (-sin, cos)
  return np.stack([boxes[..., 0, None] + u * cos - v * sin, boxes[..., 1, None] + u * sin + v * cos], -1)


def draw_shape(image: np.ndarray, kind: int, box, colour, turn: bool = False) -> None:
  """Paints a filled shape of class ``kind`` exactly filling the rotated ``box`` (xywhr pixels) into ``image``.

  A triangle has its apex at the middle of the box's top side (``-h/2``), its base along the bottom one; with
  ``turn`` it points the other way (the same box). Coordinates are continuous, pixel ``i`` covering ``[i, i+1)``;
  OpenCV puts pixel centres at integers, hence the half-pixel shift, and draws to 1/16 px (``shift=4``). The
  painted pixels are those OpenCV's anti-aliased fill covers fully: the pixels whose centres lie inside the shape,
  to a pixel along the outline (its plain fill also paints every pixel the outline touches: some 10 % too many).
  """
  cv2 = toykit.require("cv2", "drawing", SCRIPT)
  one, mask = 16, np.zeros(image.shape[:2], np.uint8)  # one pixel in OpenCV's fixed point (2**shift)
  if kind == 1:  # ellipse
    cx, cy, w, h, angle = box
    centre, axes = (round((cx - 0.5) * one), round((cy - 0.5) * one)), (round(w / 2 * one), round(h / 2 * one))
    cv2.ellipse(mask, centre, axes, math.degrees(angle), 0, 360, 255, -1, cv2.LINE_AA, 4)
  else:
    c = corners(box)
    if kind == 2:  # triangle: apex, then the two corners of the opposite side
      c = np.stack([(c[2] + c[3]) / 2, c[0], c[1]]) if turn else np.stack([(c[0] + c[1]) / 2, c[2], c[3]])
    cv2.fillPoly(mask, [np.round((c - 0.5) * one).astype(np.int32)], 255, cv2.LINE_AA, 4)
  image[mask == 255] = colour


def regularize(box: np.ndarray) -> np.ndarray:
  """The same rotated box with its angle in ``[0, pi/2)``, swapping ``w`` and ``h`` when it turns by ``pi/2``
  (Ultralytics' ``regularize_rboxes``)."""
  cx, cy, w, h, angle = box
  if angle % math.pi >= math.pi / 2:
    w, h = h, w
  return np.array([cx, cy, w, h, angle % (math.pi / 2)])


def random_rotated_boxes(rng: np.random.Generator, count: int) -> list[np.ndarray]:
  """Up to ``count`` xywhr boxes (angle in ``[0, pi)``), sides ``MIN_SIDE`` to ``MAX_SIDE`` px, wholly inside the
  image, any two sharing at most 4 px^2."""
  boxes = []
  for _ in range(20 * count):
    w, h = rng.uniform(MIN_SIDE, MAX_SIDE, 2)
    angle = rng.uniform(0, math.pi)
    ex = (abs(w * math.cos(angle)) + abs(h * math.sin(angle))) / 2  # half extents of the turned box
    ey = (abs(w * math.sin(angle)) + abs(h * math.cos(angle))) / 2
    box = np.array([rng.uniform(ex, IMAGE_SIZE - ex), rng.uniform(ey, IMAGE_SIZE - ey), w, h, angle])
    if all(intersection_area(corners(box), corners(b)) <= 4 for b in boxes):
      boxes.append(box)
    if len(boxes) == count:
      break
  return boxes


def make_image(rng: np.random.Generator):
  """One image ``(64, 64, 3)`` float32 in [0, 1], its label rows ``(k, 6)`` ``[class, cx, cy, w, h, angle]``
  (pixels, angle in ``[0, pi/2)``) and the shapes' colours ``(k, 3)``. Shapes are flat colour; the background
  a grey level, plain or with noise."""
  noise = rng.choice([0.0, rng.uniform(0.02, 0.08)])
  image = rng.uniform(0.0, 0.3) + rng.normal(0.0, 1.0, (IMAGE_SIZE, IMAGE_SIZE, 3)) * noise
  image = np.clip(image, 0.0, 1.0).astype(np.float32)
  rows, colours = [], []
  for box in random_rotated_boxes(rng, int(rng.integers(1, MAX_BOXES + 1))):
    kind = int(rng.integers(len(CLASS_NAMES)))
    colour = rng.uniform(0.15, 1.0, 3)
    colour[rng.integers(3)] = rng.uniform(0.6, 1.0)  # one bright channel: the shape stands out of the background
    draw_shape(image, kind, box, colour, turn=bool(rng.integers(2)))
    rows.append([kind, *regularize(box)])
    colours.append(colour.astype(np.float32))
  return image, np.reshape(rows, (-1, 6)), np.reshape(colours, (-1, 3))


def make_dataset(num_images: int, rng: np.random.Generator):
  """``num_images`` images ``(n, 64, 64, 3)`` float32 and their ``jaxtal.GroundTruth`` of xywhr pixel boxes."""
  images, rows = [], []  # YOLO OBB label rows [image, class, cx, cy, w, h, angle], normalised
  for i in range(num_images):
    image, labels, _ = make_image(rng)
    images.append(image)
    rows += [[i, row[0], *(row[1:5] / IMAGE_SIZE), row[5]] for row in labels]
  gt = jaxtal.pack_rotated_labels(np.reshape(rows, (-1, 7)), num_images, MAX_BOXES, IMAGE_SIZE)
  return np.stack(images), gt


# --- model and training ------------------------------------------------------------------------------


class OBBDetector(toykit.Detector):
  """``toykit.Detector`` (backbone, top-down merge, per-level box/class head maps) with, per level, an angle
  branch: a block and a 1x1 convolution to one channel, activated as Ultralytics does, ``(sigmoid(x) - 1/4) pi``.
  """

  def __init__(self, width: int = 48, *, rngs: nnx.Rngs):
    super().__init__(width, config=CONFIG, rngs=rngs)
    self.angle_heads = nnx.List([
        nnx.Sequential(toykit.Block(width, width, 1, rngs), nnx.Conv(width, 1, (1, 1), rngs=rngs))
        for _ in CONFIG.strides
    ])

  def __call__(self, x):
    """``Predictions(head maps, angles=angle maps)``: per level ``(b, H, W, 4R + nc)`` and ``(b, H, W, 1)``
    radians."""
    levels = self.features(x)
    feats = [head(p) for head, p in zip(self.heads, levels)]
    angles = [(jax.nn.sigmoid(head(p)) - 0.25) * jnp.pi for head, p in zip(self.angle_heads, levels)]
    return toykit.Predictions(feats, angles=angles)


@nnx.jit
def predict(model, images):
  """Sigmoid class scores ``(b, A, nc)`` and rotated xywhr boxes ``(b, A, 5)``, centre and sides in pixels."""
  out = model(images)
  feats, angles = out.feats, out.angles
  pred_dist, logits = jaxtal.flatten_head(feats, CONFIG.num_classes, CONFIG.reg_max)
  anchors, strides = jaxtal.make_anchors([f.shape[1:3] for f in feats], CONFIG.strides)
  angle = jnp.concatenate([a.reshape(a.shape[0], -1, 1) for a in angles], axis=1)
  boxes = jaxtal.decode_rotated_boxes(pred_dist, angle, anchors, CONFIG.reg_max)  # grid units
  return jax.nn.sigmoid(logits), boxes * jnp.concatenate([jnp.repeat(strides, 4, -1), jnp.ones_like(strides)], -1)


# --- rotated IoU, NMS, AP ----------------------------------------------------------------------------


def intersection_area(p: np.ndarray, q: np.ndarray) -> float:
  """Area shared by two convex polygons ``(k, 2)`` whose vertices turn the same way as :func:`corners`' (positive
  shoelace area): ``p`` clipped by each edge of ``q`` in turn (Sutherland-Hodgman), then the shoelace formula.

  Written out because OpenCV 5.0's ``cv2.intersectConvexConvex`` and ``cv2.rotatedRectangleIntersection`` get
  the area wrong when edges nearly coincide (a box moved along its own axis, or turned by 180 degrees): the very
  case of a good detection.
  """
  for a, b in zip(q, np.roll(q, -1, axis=0)):
    if len(p) == 0:
      return 0.0
    side = (b[0] - a[0]) * (p[:, 1] - a[1]) - (b[1] - a[1]) * (p[:, 0] - a[0])  # >= 0: on the inner side
    after, side_after = np.roll(p, -1, axis=0), np.roll(side, -1)
    keep, cut = side >= 0, (side >= 0) != (side_after >= 0)  # the vertex stays; the edge to the next one crosses
    t = side / np.where(cut, side - side_after, 1.0)
    both = np.stack([p, p + t[:, None] * (after - p)], axis=1).reshape(-1, 2)  # each vertex, then its crossing
    p = both[np.stack([keep, cut], axis=1).reshape(-1)]
  return 0.0 if len(p) < 3 else 0.5 * abs(p[:, 0] @ np.roll(p[:, 1], -1) - p[:, 1] @ np.roll(p[:, 0], -1))


def rotated_iou(a, b) -> np.ndarray:
  """``(n, m)`` polygon IoU of xywhr boxes ``a (n, 5)`` and ``b (m, 5)``: the exact area the two rotated
  rectangles share (:func:`intersection_area`) over their union. A loop over the pairs whose circumscribed
  circles meet; boxes without area overlap nothing."""
  a, b = np.asarray(a, np.float64).reshape(-1, 5), np.asarray(b, np.float64).reshape(-1, 5)
  out = np.zeros((len(a), len(b)))
  area_a, area_b = a[:, 2] * a[:, 3], b[:, 2] * b[:, 3]
  reach = np.hypot(a[:, 2], a[:, 3])[:, None] / 2 + np.hypot(b[:, 2], b[:, 3])[None] / 2
  near = np.hypot(*np.moveaxis(a[:, None, :2] - b[None, :, :2], -1, 0)) < reach
  near &= (area_a[:, None] > 0) & (area_b[None] > 0)
  pa, pb = corners(a), corners(b)
  for i, j in zip(*np.nonzero(near)):
    inter = min(intersection_area(pa[i], pb[j]), area_a[i], area_b[j])
    out[i, j] = inter / (area_a[i] + area_b[j] - inter)
  return out


def rotated_nms(boxes, scores, classes, iou: float = 0.6) -> np.ndarray:
  """Greedy class-aware NMS by :func:`rotated_iou`: indices of the kept boxes, best first. A plain loop over the
  sorted detections of one image: each kept box drops the later boxes of its class overlapping it by more than
  ``iou``."""
  boxes, classes = np.asarray(boxes).reshape(-1, 5), np.asarray(classes)
  order = np.argsort(-np.asarray(scores), kind="stable")
  dropped = np.zeros(len(order), bool)
  keep = []
  for n, i in enumerate(order):
    if dropped[i]:
      continue
    keep.append(i)
    rest = order[n + 1 :]
    rest = rest[~dropped[rest] & (classes[rest] == classes[i])]
    dropped[rest[rotated_iou(boxes[i], boxes[rest])[0] > iou]] = True
  return np.array(keep, int)


def detect(scores, boxes, conf: float = 0.01, iou: float = 0.6, max_det: int = 100):
  """Per image ``(boxes xywhr, scores, classes)``: each anchor's best class above ``conf``, :func:`rotated_nms`,
  the ``max_det`` best."""
  out = []
  for s, b in zip(np.asarray(scores), np.asarray(boxes, np.float64)):
    best, cls = s.max(-1), s.argmax(-1)
    cand = np.flatnonzero(best > conf)
    keep = cand[rotated_nms(b[cand], best[cand], cls[cand], iou)][:max_det]
    out.append((b[keep], best[keep], cls[keep]))
  return out


def average_precision(detections, gt_boxes, gt_classes, num_classes: int, iou: float = 0.5):
  """``(mAP, AP per class)``: VOC-style all-point AP at ``rotated_iou >= iou``, averaged over the classes that
  have ground truth (a class without any is ``nan`` and left out; no ground truth at all gives 0).

  ``detections``: per image ``(boxes (k, 5), scores (k,), classes (k,))``; ``gt_boxes``, ``gt_classes``: per
  image ``(m, 5)`` and ``(m,)``. Detections of a class, best first, each take the unmatched GT of their image
  and class they overlap most (VOC: the best-overlapping GT; if it is already taken, a false positive).
  Matching image by image in score order gives what one global score order gives.
  """
  aps = []
  for c in range(num_classes):
    hits, confidences, total = [], [], 0  # per detection: true positive? its score; GTs of the class
    for (boxes, scores, classes), g_boxes, g_classes in zip(detections, gt_boxes, gt_classes):
      g = np.asarray(g_boxes).reshape(-1, 5)[np.asarray(g_classes) == c]
      total += len(g)
      mine = np.asarray(classes) == c
      order = np.argsort(-np.asarray(scores)[mine], kind="stable")
      d, s = np.asarray(boxes).reshape(-1, 5)[mine][order], np.asarray(scores)[mine][order]
      overlaps, taken = rotated_iou(d, g), np.zeros(len(g), bool)
      for k in range(len(d)):
        j = int(overlaps[k].argmax()) if len(g) else -1
        hit = j >= 0 and overlaps[k, j] >= iou and not taken[j]
        if hit:
          taken[j] = True
        hits.append(hit)
      confidences += list(s)
    if total == 0:
      aps.append(math.nan)
      continue
    hit = np.array(hits, bool)[np.argsort(-np.array(confidences), kind="stable")]
    tp = np.cumsum(hit)
    recall = np.concatenate([[0.0], tp / total, [1.0]])
    precision = np.concatenate([[0.0], tp / np.maximum(np.arange(1, len(hit) + 1), 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope: best precision at >= this recall
    step = np.flatnonzero(recall[1:] != recall[:-1])
    aps.append(float(np.sum((recall[step + 1] - recall[step]) * precision[step + 1])))
  real = [ap for ap in aps if not math.isnan(ap)]
  return (float(np.mean(real)) if real else 0.0), aps


# --- output ------------------------------------------------------------------------------------------


def save_plot(plt, path: str, images, gt, detections, count: int = 6, min_score: float = 0.3) -> None:
  """Ground truth (green) and detections scoring ``min_score`` or more (red, dashed) on held-out images, with a
  legend (:func:`toykit.finish_plot`)."""
  from matplotlib.lines import Line2D

  fig, axes = plt.subplots(1, count, figsize=(3.2 * count, 3.5))
  for ax, image, boxes, real, (dets, scores, classes) in zip(axes, images, gt.boxes, gt.mask, detections):
    ax.imshow(image)
    ax.set_axis_off()
    for c in corners(boxes[real]):  # imshow centres pixel i at i: corners shift by half a pixel
      ax.add_patch(plt.Polygon(c - 0.5, closed=True, fill=False, color="lime", lw=1.5))
    for b, s, k in zip(dets, scores, classes):
      if s >= min_score:
        c = corners(b) - 0.5
        ax.add_patch(plt.Polygon(c, closed=True, fill=False, color="red", lw=1, ls="--"))
        top = c[c[:, 1].argmin()]
        toykit.box_label(ax, (*top, *top), f"{CLASS_NAMES[k][:4]} {s:.2f}", "red")
  handles = [Line2D([], [], color="lime", lw=1.5, label="ground truth"),
             Line2D([], [], color="red", lw=1, ls="--", label=f"detection (score >= {min_score}): class, score")]
  toykit.finish_plot(fig, path, handles, "held-out images: rotated boxes")


def main(argv=None) -> dict:
  plot_help = "save rotated detections and ground truth of held-out images"
  parser = toykit.example_parser(__doc__.splitlines()[0], 600, plot_help)
  args = parser.parse_args(argv)
  start = toykit.start_up(args, SCRIPT, ("cv2", "drawing"))

  model = OBBDetector(rngs=nnx.Rngs(args.seed))
  losses, compilations, train_s = toykit.train_task(model, jaxtal.OBBLoss(CONFIG), make_dataset, args, start,
                                                    term="angle")  # fresh images every step

  images, gt = make_dataset(args.eval_images, np.random.default_rng(args.seed + 10_000))
  detections = detect(*predict(model, jnp.asarray(images)))
  truth = [b[m] for b, m in zip(gt.boxes, gt.mask)], [c[m] for c, m in zip(gt.labels, gt.mask)]
  map50, aps = average_precision(detections, *truth, CONFIG.num_classes, iou=0.5)
  if args.plot:
    save_plot(importlib.import_module("matplotlib.pyplot"), args.plot, images, gt, detections)
  wall = time.perf_counter() - start
  per_class = ", ".join(f"{name} {ap:.3f}" for name, ap in zip(CLASS_NAMES, aps))
  print(f"held-out, {args.eval_images} images: rotated mAP@0.5 {map50:.3f} ({IOU_NAME}, VOC all-point AP;"
        f" {per_class})")
  print(f"time: training {train_s:.1f} s ({args.steps} steps of {args.batch_size} images, the step compiled"
        f" {compilations}x), total {wall:.1f} s")
  return dict(losses=losses, map50=map50, aps=aps, compilations=compilations, train_s=train_s, wall_s=wall)


if __name__ == "__main__":
  main()
