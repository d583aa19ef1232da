"""Train the toy detector with a tiny prototype branch to SEGMENT generated shapes with jaxtal's loss (CPU).

    pip install -e ".[examples]"    # pycocotools (mask mAP), OpenCV (NMS), matplotlib (--plot)
    python examples/train_segment.py
    python examples/train_segment.py --steps 1000 --plot masks.png
    python examples/train_segment.py --yolo26      # YOLO26: end-to-end, mask-aware assignment, NMS-free evaluation

``toykit``'s 64x64 images of filled rectangles, ellipses and triangles (``examples/toykit.py``, the pieces the
training examples share) with an instance mask per shape: the same shape drawn again on the 16x16 grid of the
prototypes (input / 4, as YOLO's ``mask_ratio=4``) and packed by ``jaxtal.pack_masks`` into an index map in
``GroundTruth.masks``. The model is ``toykit``'s ``Detector`` plus YOLACT/YOLO-style mask pieces: per level a
branch of ``NUM_MASKS`` mask coefficients, and a prototype branch (a block on the stride-8 features, a 2x bilinear
upsampling to stride 4, a block, a 1x1 convolution to ``NUM_MASKS`` prototypes). ``jaxtal.SegmentLoss`` (box,
mask, class, DFL) trains it with optax's AdamW, on ``toykit``'s training loop.

An instance's predicted mask is ``sigmoid(coefficients . prototypes) > 0.5`` inside its predicted box, the
prototypes upsampled bilinearly to the input first (as Ultralytics' ``process_mask(..., upsample=True)``; a pixel
is in the box when its centre is, where Ultralytics tests its top-left corner). On held-out images: OpenCV's
class-aware NMS on the boxes (``toykit``), then COCO mask mAP from pycocotools' ``COCOeval(iouType="segm")`` on
RLE masks, against ground-truth masks at the input's resolution (the visible part of each shape where two overlap).
Box mAP is printed beside it.

``--yolo26`` trains as YOLO26-seg does: ``jaxtal.segment26_loss`` (its assignment also scores each anchor's
predicted mask, plus a semantic term on a semantic-logit branch beside the prototypes) under
``jaxtal.EndToEndLoss``, with a one-to-one head (box/class and coefficient heads fed the features under
``jax.lax.stop_gradient``, a detached copy of the prototypes and semantic logits; one-to-one assignment ``topk=7,
topk2=1``). The one-to-one branch is evaluated without NMS (``toykit.top_detections``), the one-to-many one with it.
"""

from __future__ import annotations

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import toykit  # the examples' shared data, model, training loop, NMS, COCO mAP (examples/toykit.py)
from flax import nnx

import jaxtal

CLASS_NAMES, IMAGE_SIZE, MAX_BOXES = toykit.CLASS_NAMES, toykit.IMAGE_SIZE, toykit.MAX_BOXES
MASK_SIZE = IMAGE_SIZE // 4  # prototypes and training masks: input / 4
NUM_MASKS = 8  # prototypes, and coefficients per anchor
CONFIG = jaxtal.SegmentLossConfig(num_classes=toykit.CONFIG.num_classes, strides=toykit.CONFIG.strides,
                                  reg_max=toykit.CONFIG.reg_max)
CONFIG26 = jaxtal.Segment26LossConfig(num_classes=CONFIG.num_classes, strides=CONFIG.strides, reg_max=CONFIG.reg_max)
SCRIPT = "train_segment.py"
MASK_COLOURS = {"cyan": (0.0, 0.9, 0.9), "magenta": (1.0, 0.2, 1.0), "orange": (1.0, 0.6, 0.0)}  # per class, --plot


# --- data -----------------------------------------------------------------------------------------------


def instance_masks(gt, size: int) -> tuple[np.ndarray, np.ndarray]:
  """``(masks (n, size, size) bool, image index (n,))`` of the real rows of ``gt`` in row order (image, then
  slot): each row's shape (its class and box) drawn as ``toykit.draw_shape`` draws it, on a ``size`` grid
  covering the input (the box scaled by ``size / IMAGE_SIZE``)."""
  image, slot = np.nonzero(np.asarray(gt.mask))
  scale = size / IMAGE_SIZE
  kinds, boxes = np.asarray(gt.labels)[image, slot], np.asarray(gt.boxes, np.float64)[image, slot]
  masks = [toykit.shape_mask(int(k), b * scale, (size, size)) for k, b in zip(kinds, boxes)]
  return np.reshape(np.array(masks, bool), (-1, size, size)), image


def make_dataset(num_images: int, rng: np.random.Generator):
  """``toykit.make_dataset``'s images ``(n, 64, 64, 3)`` and ``GroundTruth``, with ``masks``: the
  ``(n, 16, 16)`` int32 index map of the instances (``jaxtal.pack_masks``; where shapes overlap, the later one)."""
  images, gt = toykit.make_dataset(num_images, rng)
  masks, image = instance_masks(gt, MASK_SIZE)
  return images, gt._replace(masks=jaxtal.pack_masks(masks, image, num_images, MAX_BOXES))


def ground_truth(gt):
  """Per image ``(boxes (m, 4) xyxy, classes (m,), masks (m, 64, 64) bool)`` of the real rows: the masks at the
  input's resolution, each the visible part of its shape (slot ``j`` of ``jaxtal.pack_masks``' index map)."""
  index = jaxtal.pack_masks(*instance_masks(gt, IMAGE_SIZE), len(gt.mask), MAX_BOXES)
  slots = np.arange(1, MAX_BOXES + 1)[:, None, None]
  real = np.asarray(gt.mask)
  return ([b[m] for b, m in zip(np.asarray(gt.boxes), real)], [c[m] for c, m in zip(np.asarray(gt.labels), real)],
          [(i[None] == slots)[m] for i, m in zip(index, real)])


# --- model and training ------------------------------------------------------------------------------


def upsample(x):
  """``(b, H, W, C)`` -> ``(b, 2H, 2W, C)``, bilinear (half-pixel centres, as PyTorch's ``align_corners=False``)."""
  return jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), "bilinear")


class SegmentDetector(toykit.Detector):
  """``toykit.Detector`` (backbone, top-down merge, per-level box/class head maps) with, per level, a branch of
  ``num_masks`` mask coefficients (a block and a 1x1 convolution, no activation), and a prototype branch on the
  stride-8 features, YOLO's ``Proto`` made smaller: a block to ``proto_width`` channels, a 2x bilinear upsampling
  (to input / 4; YOLO's 2x2 transposed convolution alone cost more on XLA:CPU than this whole branch), a block
  and a 1x1 convolution to ``num_masks`` prototypes.
  """

  def __init__(self, width: int = 48, num_masks: int = NUM_MASKS, proto_width: int = 32, *, yolo26: bool = False,
               rngs: nnx.Rngs):
    super().__init__(width, end2end=yolo26, config=CONFIG, rngs=rngs)
    self.coef_heads = nnx.List([
        nnx.Sequential(toykit.Block(width, width, 1, rngs), nnx.Conv(width, num_masks, (1, 1), rngs=rngs))
        for _ in CONFIG.strides
    ])
    # YOLO26: the one-to-one coefficient heads (a copy, as the box/class ones) and semantic logits on the stride-8
    # features (Proto26's semantic branch made smaller: a block and a 1x1 convolution to nc channels).
    self.coef_heads_o2o = nnx.clone(self.coef_heads) if yolo26 else None
    self.semantic = nnx.Sequential(toykit.Block(width, width, 1, rngs), nnx.Conv(width, CONFIG.num_classes, (1, 1), rngs=rngs)) if yolo26 else None
    self.proto = nnx.Sequential(
        toykit.Block(width, proto_width, 1, rngs),
        upsample,
        toykit.Block(proto_width, proto_width, 1, rngs),
        nnx.Conv(proto_width, num_masks, (1, 1), rngs=rngs),
    )

  def __call__(self, x):
    """``Predictions(head maps, mask_coefs=coefficient maps, proto=prototypes)``: per level ``(b, H, W, 4R + nc)``
    and ``(b, H, W, nm)``, and ``(b, 16, 16, nm)`` for a 64x64 input."""
    levels = self.features(x)
    feats = [head(p) for head, p in zip(self.heads, levels)]
    coefs = [head(p) for head, p in zip(self.coef_heads, levels)]
    return toykit.Predictions(feats, mask_coefs=coefs, proto=self.proto(levels[0]))

  def both(self, x):
    """YOLO26: ``(one-to-many, one-to-one)`` predictions, each ``Predictions(head maps, mask_coefs, proto,
    semantic)``; the one-to-one heads read the features under ``stop_gradient`` and a detached copy of the
    prototypes and semantic logits (as Ultralytics' ``Segment26`` head hands them to its loss)."""
    levels = self.features(x)
    proto, semantic = self.proto(levels[0]), self.semantic(levels[0])
    many = toykit.Predictions([h(p) for h, p in zip(self.heads, levels)], mask_coefs=[h(p) for h, p in zip(self.coef_heads, levels)],
                              proto=proto, semantic=semantic)
    detached = [jax.lax.stop_gradient(p) for p in levels]
    one = toykit.Predictions([h(p) for h, p in zip(self.heads_o2o, detached)],
                             mask_coefs=[h(p) for h, p in zip(self.coef_heads_o2o, detached)],
                             proto=jax.lax.stop_gradient(proto), semantic=jax.lax.stop_gradient(semantic))
    return many, one


@nnx.jit
def e2e_step(model, optimizer, loss_fn, images, gt, weight):
  """One AdamW step of ``jaxtal.EndToEndLoss(segment26_loss)``: the weighted total per image and the one-to-one
  parts. ``weight`` (the one-to-many weight) is a traced scalar: one compilation serves every epoch."""
  toykit.TRACES["task_step"] += 1

  def loss_of(model):
    total, parts = loss_fn(*model.both(images), gt, weight=weight)
    return total / images.shape[0], parts

  (loss, parts), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, parts


def train_yolo26(model, args, start: float, epochs: int = 10):
  """Trains ``model`` with ``EndToEndLoss(segment26_loss)`` for ``toykit.fit``'s steps, the one-to-many weight
  decaying over ``epochs`` equal runs of steps (``jaxtal.one2many_weight``); returns what ``toykit.train_task`` does."""
  traces = toykit.TRACES["task_step"]
  loss_fn = jaxtal.EndToEndLoss(CONFIG26, loss_fn=jaxtal.segment26_loss, one2one_topk=7, one2one_topk2=1)
  optimizer = toykit.adamw(model, args.steps, args.lr)
  count = [0]

  def step(images, gt):
    count[0] += 1
    epoch = (count[0] - 1) * epochs // args.steps  # the 0-based epoch of this step
    return e2e_step(model, optimizer, loss_fn, images, gt, jnp.float32(jaxtal.one2many_weight(epoch, epochs)))

  losses = toykit.fit(step, make_dataset, args, start, term="seg", label="mask")
  return losses, toykit.TRACES["task_step"] - traces, time.perf_counter() - start


@nnx.jit
def predict(model, images):
  """Sigmoid class scores ``(b, A, nc)``, xyxy pixel boxes ``(b, A, 4)``, mask coefficients ``(b, A, nm)`` (in
  the head's anchor order) and the prototypes upsampled bilinearly to the input ``(b, 64, 64, nm)``."""
  return outputs(model(images), images.shape[1:3])


@nnx.jit
def predict_both(model, images):
  """YOLO26: :func:`predict`'s outputs of the one-to-many and of the one-to-one branch."""
  many, one = model.both(images)
  return outputs(many, images.shape[1:3]), outputs(one, images.shape[1:3])


def outputs(out, hw):
  """:func:`predict`'s outputs of one branch's ``Predictions``."""
  feats, coefs, proto = out.feats, out.mask_coefs, out.proto
  scores, boxes = toykit.scores_and_boxes(feats, CONFIG)
  coefs = jnp.concatenate([c.reshape(c.shape[0], -1, c.shape[-1]) for c in coefs], axis=1)
  proto = jax.image.resize(proto, (proto.shape[0], *hw, proto.shape[-1]), "bilinear")
  return scores, boxes, coefs, proto


# --- masks and evaluation ------------------------------------------------------------------------------


def masks_of(detections, protos):
  """Per image ``(boxes, scores, classes, masks (k, H, W) bool)``: each detection's mask, ``sigmoid(coefficients
  . prototypes) > 0.5`` (the logit above 0) at the pixels whose centres lie in its box.

  ``detections``: per image ``(boxes (k, 4) xyxy pixels, scores (k,), classes (k,), coefficients (k, nm))``;
  ``protos``: ``(b, H, W, nm)`` prototypes at the input's resolution.
  """
  out = []
  for (boxes, scores, classes, coefs), proto in zip(detections, np.asarray(protos, np.float64)):
    ys, xs = np.mgrid[: proto.shape[0], : proto.shape[1]] + 0.5  # pixel centres
    b = np.asarray(boxes, np.float64).reshape(-1, 4)[:, :, None, None]
    inside = (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])
    logits = np.moveaxis(proto @ np.asarray(coefs, np.float64).reshape(-1, proto.shape[-1]).T, -1, 0)
    out.append((boxes, scores, classes, (logits > 0) & inside))
  return out


def save_plot(plt, path: str, images, truth, detections, count: int = 6, min_score: float = 0.3) -> None:
  """Predicted masks scoring ``min_score`` or more (filled, a colour per class, their boxes dashed) and the
  ground-truth masks' outlines (green) on the first held-out images, shown in grey."""
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch

  fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 2.9))
  extent = (0, IMAGE_SIZE, IMAGE_SIZE, 0)  # pixel i covers [i, i + 1), as the boxes' coordinates
  centres = np.arange(IMAGE_SIZE) + 0.5
  colours = list(MASK_COLOURS.values())
  for ax, image, gt_masks, (boxes, scores, classes, masks) in zip(axes, images, truth[2], detections):
    ax.imshow(image.mean(-1), cmap="gray", vmin=0.0, vmax=1.0, extent=extent)
    ax.set_axis_off()
    for b, s, c, m in zip(boxes, scores, classes, masks):
      if s >= min_score:
        overlay = np.zeros((*m.shape, 4))
        overlay[m] = (*colours[c], 0.55)
        ax.imshow(overlay, extent=extent)
        ax.add_patch(plt.Rectangle(b[:2], *(b[2:] - b[:2]), fill=False, color=colours[c], lw=0.8, ls="--"))
        toykit.box_label(ax, b, f"{CLASS_NAMES[c][:4]} {s:.2f}", colours[c])
    for m in gt_masks:
      ax.contour(centres, centres, m.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
  handles = [Line2D([], [], color="lime", lw=0.8, label="ground-truth mask"),
             *(Patch(color=(*colour, 0.55), label=f"predicted {name} (score >= {min_score})")
               for name, colour in zip(CLASS_NAMES, colours))]
  toykit.finish_plot(fig, path, handles, "held-out images: instance masks")


def main(argv=None) -> dict:
  plot_help = "save predicted and ground-truth masks of held-out images"
  parser = toykit.example_parser(__doc__.splitlines()[0], 600, plot_help)
  parser.add_argument("--yolo26", action="store_true",
                      help="YOLO26-seg: segment26_loss end-to-end (one-to-one head, semantic logits), NMS-free evaluation")
  args = parser.parse_args(argv)
  start = toykit.start_up(args, SCRIPT, ("pycocotools.mask", "mask mAP"), ("pycocotools.cocoeval", "mask mAP"),
                          ("cv2", "NMS"))

  model = SegmentDetector(yolo26=args.yolo26, rngs=nnx.Rngs(args.seed))
  if args.yolo26:
    losses, compilations, train_s = train_yolo26(model, args, start)
  else:
    losses, compilations, train_s = toykit.train_task(model, jaxtal.SegmentLoss(CONFIG), make_dataset, args, start,
                                                      term="seg", label="mask")  # fresh images every step

  images, gt = make_dataset(args.eval_images, np.random.default_rng(args.seed + 10_000))
  truth = ground_truth(gt)
  extra = {}
  if args.yolo26:
    many, (scores, boxes, coefs, protos) = predict_both(model, jnp.asarray(images))
    detections = masks_of(toykit.top_detections(scores, boxes, coefs), protos)  # one-to-one, no NMS
    many_detections = masks_of(toykit.detect(many[0], many[1], many[2]), many[3])
    extra["map_o2m_nms"], extra["map50_o2m_nms"] = toykit.coco_map(many_detections, *truth)
  else:
    scores, boxes, coefs, protos = predict(model, jnp.asarray(images))
    detections = masks_of(toykit.detect(scores, boxes, coefs), protos)  # each kept box with its anchor's coefficients
  mask_ap, mask_ap50 = toykit.coco_map(detections, *truth)
  box_ap, box_ap50 = toykit.coco_map(detections, *truth[:2])
  if args.plot:
    save_plot(importlib.import_module("matplotlib.pyplot"), args.plot, images, truth, detections)
  wall = time.perf_counter() - start
  branch = " (one-to-one branch, no NMS)" if args.yolo26 else ""
  print(f"held-out, {args.eval_images} images{branch}: mask mAP@0.5:0.95 {mask_ap:.3f}, mask mAP@0.5 {mask_ap50:.3f}"
        f" (COCOeval segm); box mAP@0.5:0.95 {box_ap:.3f}, box mAP@0.5 {box_ap50:.3f}")
  if args.yolo26:
    print(f"  one-to-many branch + NMS: mask mAP@0.5:0.95 {extra['map_o2m_nms']:.3f}, mask mAP@0.5 {extra['map50_o2m_nms']:.3f}")
  print(f"time: training {train_s:.1f} s ({args.steps} steps of {args.batch_size} images, the step compiled"
        f" {compilations}x), total {wall:.1f} s")
  return dict(losses=losses, map=mask_ap, map50=mask_ap50, box_map=box_ap, box_map50=box_ap50,
              compilations=compilations, train_s=train_s, wall_s=wall, **extra)


if __name__ == "__main__":
  main()
