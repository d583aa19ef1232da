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

The data, the model, the optimiser, the loss calls and the evaluation are ``toykit``'s (``examples/toykit.py``),
which the other training examples share; this script holds the detection training steps and the main loop.
"""

from __future__ import annotations

import importlib
import sys
import time

import jax.numpy as jnp
import numpy as np
import toykit  # the examples' shared data, model, training loop and evaluation (examples/toykit.py)
from flax import nnx

import jaxtal

TRACES = {"train_step": 0, "train_step_e2e": 0}  # side effects run only while tracing: compilations


def zero_positive_counts(positives_per_gt, mask):
  """``(real GTs that own no anchor, real GTs)`` from ``Targets.positives_per_gt`` and ``GroundTruth.mask``."""
  mask = jnp.asarray(mask, bool)
  return jnp.sum(mask & (positives_per_gt == 0)), jnp.sum(mask)


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
    total, _ = loss_fn(one2many, one2one, gt, weight=weight)
    _, targets = jaxtal.detection_targets(one2many, gt, loss_fn.config)  # the one-to-many assignment, to inspect
    return total / images.shape[0], targets.positives_per_gt  # weighted total per image

  (loss, positives), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, zero_positive_counts(positives, gt.mask)


epoch_of = toykit.epoch_of  # 0-based epoch of a 1-based step (the one-to-many weight's schedule)


def report(step: int, total: int, loss: float, zero: float, elapsed: float) -> None:
  """Progress: on a terminal one bar redrawn in place, otherwise one plain line per call."""
  text = f"step {step:4d}/{total}  loss {loss:6.3f}  real GTs with no positive {zero:6.2%}  {elapsed:5.1f} s"
  toykit.progress(step, total, text)


@nnx.jit
def predict(model, images):
  """Sigmoid class scores ``(b, A, nc)`` and xyxy boxes in pixels ``(b, A, 4)``."""
  return toykit.scores_and_boxes(model(images))


@nnx.jit
def predict_both(model, images):
  """``(scores, boxes)`` as :func:`predict` of the one-to-many and of the one-to-one head."""
  one2many, one2one = model.both(images)
  return toykit.scores_and_boxes(one2many), toykit.scores_and_boxes(one2one)


top_detections = toykit.top_detections  # the NMS-free selection (in toykit: train_segment.py --yolo26 uses it too)


def main(argv=None) -> dict:
  parser = toykit.example_parser(__doc__.splitlines()[0], 500, "save detections and ground truth of held-out"
                                 " images (with --end2end: the one-to-one branch's, without NMS)")
  parser.add_argument("--end2end", action="store_true",
                      help="YOLO26-style NMS-free training: a one-to-one head beside the one-to-many one")
  parser.add_argument("--epochs", type=int, default=10,
                      help="with --end2end: epochs the steps make, for the one-to-many weight's schedule")
  args = parser.parse_args(argv)
  start = toykit.start_up(args, "train_toy.py", ("pycocotools.cocoeval", "mAP"), ("cv2", "NMS"))

  model = toykit.Detector(end2end=args.end2end, rngs=nnx.Rngs(args.seed))
  optimizer = toykit.adamw(model, args.steps, args.lr)
  if args.end2end:  # YOLO26's one-to-one assignment; the one-to-many branch keeps toykit.CONFIG's (topk=10)
    loss_fn = jaxtal.EndToEndLoss(toykit.CONFIG, one2one_topk=7, one2one_topk2=1)
    epochs = max(1, min(args.epochs, args.steps))
    print(f"end-to-end: one-to-many weight {jaxtal.one2many_weight(0, epochs):.2f} -> "
          f"{jaxtal.one2many_weight(epochs - 1, epochs):.2f} over {epochs} epochs of ~{args.steps / epochs:g} steps")
  else:
    loss_fn = jaxtal.DetectionLoss(toykit.CONFIG)
  step_name = "train_step_e2e" if args.end2end else "train_step"
  rng = np.random.default_rng(args.seed)
  every = max(1, args.steps // 100) if sys.stdout.isatty() else max(1, args.log_every)
  losses, zero, real = [], 0, 0
  for step in range(1, args.steps + 1):
    images, gt = toykit.make_dataset(args.batch_size, rng)  # fresh images every step
    call = toykit.first_call if step == 1 else lambda f, *a, name: f(*a)  # the first step compiles: say so
    if args.end2end:
      weight = jaxtal.one2many_weight(epoch_of(step, args.steps, epochs), epochs)
      loss, (z, n) = call(train_step_e2e, model, optimizer, loss_fn, jnp.asarray(images), gt, jnp.float32(weight),
                          name=step_name)
    else:
      loss, (z, n) = call(train_step, model, optimizer, loss_fn, jnp.asarray(images), gt, name=step_name)
    losses.append(loss)  # device values: reading one waits for its step, so only when reporting
    zero, real = zero + z, real + n
    if step % every == 0 or step == args.steps:
      mean_loss = float(np.mean(losses[-every:]))
      report(step, args.steps, mean_loss, float(zero) / max(float(real), 1.0), time.perf_counter() - start)
      zero, real = 0, 0
  train_s = time.perf_counter() - start

  images, gt = toykit.make_dataset(args.eval_images, np.random.default_rng(args.seed + 10_000))
  truth = [b[m] for b, m in zip(gt.boxes, gt.mask)], [c[m] for c, m in zip(gt.labels, gt.mask)]
  result = {}
  if args.end2end:
    one2many, one2one = predict_both(model, jnp.asarray(images))
    detections = top_detections(*one2one)  # the NMS-free branch: what --plot shows
    maps = {"o2m+NMS": toykit.coco_map(toykit.detect(*one2many), *truth),
            "o2o, no NMS": toykit.coco_map(detections, *truth),
            "o2o+NMS": toykit.coco_map(toykit.detect(*one2one), *truth)}
    (ap, ap50), (result["map_o2o"], result["map50_o2o"]) = maps["o2m+NMS"], maps["o2o, no NMS"]
    result["map_o2o_nms"], result["map50_o2o_nms"] = maps["o2o+NMS"]
  else:
    detections = toykit.detect(*predict(model, jnp.asarray(images)))
    ap, ap50 = toykit.coco_map(detections, *truth)
  if args.plot:
    toykit.save_plot(importlib.import_module("matplotlib.pyplot"), args.plot, images, gt, detections)
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
