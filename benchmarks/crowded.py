"""Crowded-scene rows: thousands of small boxes per image (aerial images, retail shelves, crowds).

b = 4, nc = 80, 640 px input (strides 8/16/32, A = 8400), reg_max 16, M = 1000 and 3000 GT boxes of 4-64 px in
every image, Ultralytics 8.4.190's candidate floor (GT sides below ``strides[1]`` = 16 px widened for the in-box
test: jaxtal's ``min_box_side=16``, Ultralytics' ``stride_val = 16``). Rows: jaxtal's assignment
(``task_aligned_assign`` with the head's ``grid``, so the windowed pass of ``jaxtal.windows`` runs) against
Ultralytics' ``TaskAlignedAssigner``, jaxtal's detection loss step against ``v8DetectionLoss`` (paired ratios),
each with the ``windows`` kernel plain (the dense pass: the ablation), and XLA's memory analysis of the assignment.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxtal
import timing
from detection import assignment_inputs
from timing import IMAGE_SIZE, NUM_CLASSES, REG_MAX, SEED, STRIDES, median_ms, memory_mib, paired_ratio, time_runs

CROWDED_BATCH = 4
CROWDED_BOX_COUNTS = (1000, 3000)
SIDES = (4.0, 64.0)  # pixels
MIN_BOX_SIDE = float(STRIDES[1])  # Ultralytics 8.4.190's default candidate floor, given to both
GRID = tuple((IMAGE_SIZE // s, IMAGE_SIZE // s, float(s)) for s in STRIDES)  # the anchors' grid (make_anchors)
TARGETS = {"assign": "target >= 12", "loss": "target >= 8"}


def loss_total(feats, gt, cfg):
  """jaxtal's detection loss total: the one call of it in this file."""
  return jaxtal.detection_loss(feats, gt, cfg)[0]


def assign_call(cfg):
  """jaxtal's assignment with the anchors' grid (the windowed pass where ``cfg`` lets it run)."""
  return lambda scores, boxes, anchors, gt: jaxtal.task_aligned_assign(scores, boxes, anchors, gt, cfg, grid=GRID)


def make_crowded_rows(num_boxes: int, seed: int = SEED, batch: int = CROWDED_BATCH) -> np.ndarray:
  """``num_boxes`` GT boxes in every image as YOLO rows ``[image, cls, cx, cy, w, h]`` (normalised): sides
  uniform in 4-64 px (independently, so elongated boxes too), centres uniform with the box inside the image,
  classes uniform in [0, nc)."""
  rng = np.random.default_rng(seed + 7000 + num_boxes)
  n = batch * num_boxes
  w, h = rng.uniform(*SIDES, n), rng.uniform(*SIDES, n)
  cx, cy = rng.uniform(w / 2, IMAGE_SIZE - w / 2), rng.uniform(h / 2, IMAGE_SIZE - h / 2)
  image = np.repeat(np.arange(batch), num_boxes)
  rows = np.stack([image, rng.integers(0, NUM_CLASSES, n), cx / IMAGE_SIZE, cy / IMAGE_SIZE, w / IMAGE_SIZE, h / IMAGE_SIZE], 1)
  return rows.astype(np.float32)


def _time(args, table, name, m, run, note="") -> float:
  times = time_runs(run, args.warmup, args.repeats)
  table.add(name, m, median_ms(times), "ms", len(times), note)
  return median_ms(times)


def rows(args, table) -> None:
  b = CROWDED_BATCH
  maps_np = timing.make_head_maps(seed=SEED + 11, batch=b)
  feats = [jax.device_put(jnp.asarray(m)) for m in maps_np]
  assign_inputs = assignment_inputs(feats)
  a = assign_inputs[2].shape[0]
  loss_cfg = jaxtal.LossConfig(num_classes=NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX, min_box_side=MIN_BOX_SIDE)
  assign_cfg = jaxtal.AssignerConfig(min_box_side=MIN_BOX_SIDE)
  steps, assigns = {}, {}
  for tag, plain in (("", ()), (", plain windows", ("windows",))):
    lc, ac = dataclasses.replace(loss_cfg, plain_kernels=plain), dataclasses.replace(assign_cfg, plain_kernels=plain)
    steps[tag] = jax.jit(lambda f, g, c=lc: jax.value_and_grad(lambda f: loss_total(f, g, c))(f))
    assigns[tag] = jax.jit(assign_call(ac))
  reference = None if args.no_ultralytics else timing.import_reference(table, "reference")
  for m in args.crowded_box_counts:
    rows_np = make_crowded_rows(m, batch=b)
    gt = jax.tree.map(jnp.asarray, jaxtal.pack_labels(rows_np, b, m, (IMAGE_SIZE, IMAGE_SIZE)))
    note = f"b={b} A={a} nc={NUM_CLASSES}, boxes 4-64 px, min_box_side={MIN_BOX_SIDE:g}"
    runs, ms = {}, {}
    for tag in ("", ", plain windows"):
      step = steps[tag].lower(feats, gt).compile()
      runs["loss" + tag] = lambda step=step, gt=gt: jax.block_until_ready(step(feats, gt))
      assign = assigns[tag].lower(*assign_inputs, gt).compile()
      runs["assign" + tag] = lambda assign=assign, gt=gt: jax.block_until_ready(assign(*assign_inputs, gt))
      ms["assign" + tag] = _time(args, table, f"crowded task_aligned_assign{tag}", m, runs["assign" + tag], note if not tag else "")
      ms["loss" + tag] = _time(args, table, f"crowded loss fwd+bwd{tag}", m, runs["loss" + tag])
      stats = assign.memory_analysis()
      if stats is not None:
        table.add(f"crowded assign XLA memory{tag}", m, memory_mib(stats), "MiB",
                  note=f"temp {stats.temp_size_in_bytes / 2**20:.1f} MiB + arguments + outputs")
    for what in ("assign", "loss"):
      saving = 100 * (ms[what + ", plain windows"] - ms[what]) / ms[what + ", plain windows"]
      table.add(f"crowded {what}: windows save", m, saving, "%", note="of the plain (dense) pass's time")
    if reference is not None:
      _reference_rows(args, table, reference, m, rows_np, maps_np, assign_inputs, runs)


def _reference_rows(args, table, reference, m, rows_np, maps_np, assign_inputs, runs) -> None:
  """Ultralytics' TaskAlignedAssigner and v8DetectionLoss on the same numbers, and the paired ratios."""
  import torch
  from ultralytics.utils.loss import v8DetectionLoss
  from ultralytics.utils.tal import TaskAlignedAssigner

  torch.set_num_threads(os.cpu_count())
  b = CROWDED_BATCH
  note = timing.reference_note(reference)
  preds, leaves = timing.reference_preds(maps_np, NUM_CLASSES)
  model = reference.Model(NUM_CLASSES, REG_MAX, list(STRIDES), dict(box=7.5, cls=0.5, dfl=1.5), None)
  crit = v8DetectionLoss(model, tal_topk=10)
  crit.assigner.stride_val = MIN_BOX_SIDE
  t = torch.from_numpy(rows_np)
  batch = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:6]}
  loss_run = timing.reference_run(crit, preds, batch, leaves)
  assigner = TaskAlignedAssigner(topk=10, num_classes=NUM_CLASSES, alpha=0.5, beta=6.0, eps=1e-9)
  assigner.stride_val = MIN_BOX_SIDE
  scores, boxes, anchors = (torch.from_numpy(np.asarray(x)) for x in assign_inputs)
  xyxy = np.concatenate([rows_np[:, 2:4] - rows_np[:, 4:6] / 2, rows_np[:, 2:4] + rows_np[:, 4:6] / 2], axis=1) * IMAGE_SIZE
  gt_boxes = torch.from_numpy(xyxy.astype(np.float32)).reshape(b, m, 4)
  gt_labels = t[:, 1].reshape(b, m, 1)
  mask = torch.ones(b, m, 1, dtype=torch.bool)

  def assign_run():
    with torch.no_grad():
      assigner(scores, boxes, anchors, gt_labels, gt_boxes, mask)

  for what, ref_run, name in (("assign", assign_run, "TaskAlignedAssigner"), ("loss", loss_run, "v8DetectionLoss fwd+bwd")):
    _time(args, table, f"Ultralytics {name} (crowded)", m, ref_run, note)
    ratio = paired_ratio(ref_run, runs[what], args.repeats)
    table.add(f"ratio Ultralytics / jaxtal crowded {what}, paired", m, ratio, "x", args.repeats, f"median of alternating pairs; {TARGETS[what]}")
