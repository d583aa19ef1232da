"""Train the toy detector with a tiny prototype branch to SEGMENT generated shapes with jaxtal's loss (CPU).

    pip install -e ".[examples]"    # pycocotools (mask mAP), OpenCV (NMS), matplotlib (--plot)
    python examples/train_segment.py
    python examples/train_segment.py --steps 1000 --plot masks.png

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

  def __init__(self, width: int = 48, num_masks: int = NUM_MASKS, proto_width: int = 32, *, rngs: nnx.Rngs):
    super().__init__(width, config=CONFIG, rngs=rngs)
    self.coef_heads = nnx.List([
        nnx.Sequential(toykit.Block(width, width, 1, rngs), nnx.Conv(width, num_masks, (1, 1), rngs=rngs))
        for _ in CONFIG.strides
    ])
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


@nnx.jit
def predict(model, images):
  """Sigmoid class scores ``(b, A, nc)``, xyxy pixel boxes ``(b, A, 4)``, mask coefficients ``(b, A, nm)`` (in
  the head's anchor order) and the prototypes upsampled bilinearly to the input ``(b, 64, 64, nm)``."""
  out = model(images)
  feats, coefs, proto = out.feats, out.mask_coefs, out.proto
  scores, boxes = toykit.scores_and_boxes(feats, CONFIG)
  coefs = jnp.concatenate([c.reshape(c.shape[0], -1, c.shape[-1]) for c in coefs], axis=1)
  proto = jax.image.resize(proto, (proto.shape[0], *images.shape[1:3], proto.shape[-1]), "bilinear")
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
  args = parser.parse_args(argv)
  start = toykit.start_up(args, SCRIPT, ("pycocotools.mask", "mask mAP"), ("pycocotools.cocoeval", "mask mAP"),
                          ("cv2", "NMS"))

  model = SegmentDetector(rngs=nnx.Rngs(args.seed))
  losses, compilations, train_s = toykit.train_task(model, jaxtal.SegmentLoss(CONFIG), make_dataset, args, start,
                                                    term="seg", label="mask")  # fresh images every step

  images, gt = make_dataset(args.eval_images, np.random.default_rng(args.seed + 10_000))
  scores, boxes, coefs, protos = predict(model, jnp.asarray(images))
  detections = masks_of(toykit.detect(scores, boxes, coefs), protos)  # each kept box with its anchor's coefficients
  truth = ground_truth(gt)
  mask_ap, mask_ap50 = toykit.coco_map(detections, *truth)
  box_ap, box_ap50 = toykit.coco_map(detections, *truth[:2])
  if args.plot:
    save_plot(importlib.import_module("matplotlib.pyplot"), args.plot, images, truth, detections)
  wall = time.perf_counter() - start
  print(f"held-out, {args.eval_images} images: mask mAP@0.5:0.95 {mask_ap:.3f}, mask mAP@0.5 {mask_ap50:.3f}"
        f" (COCOeval segm); box mAP@0.5:0.95 {box_ap:.3f}, box mAP@0.5 {box_ap50:.3f}")
  print(f"time: training {train_s:.1f} s ({args.steps} steps of {args.batch_size} images, the step compiled"
        f" {compilations}x), total {wall:.1f} s")
  return dict(losses=losses, map=mask_ap, map50=mask_ap50, box_map=box_ap, box_map50=box_ap50,
              compilations=compilations, train_s=train_s, wall_s=wall)


if __name__ == "__main__":
  main()
