"""Instance-segmentation rows: jitted ``jaxtal.segment_loss`` fwd+bwd w.r.t. head, coefficient and prototype
maps, b = 16, nc = 80, 640 px, 160 x 160 x 32 prototypes, M = 50; Ultralytics' ``v8SegmentationLoss``
(``overlap_mask=True``) on the same numbers, paired ratio; the step's compile time and XLA's memory analysis
(also at the issue's b = 16, M = 100 bound); the step with each task kernel plain (``ablation.segment_rows``);
and the step when every box fills the image, where the box windows fall back to the full plane.

YOLO26 rows (:func:`segment26_rows`): ``jaxtal.segment26_loss`` fwd+bwd (also w.r.t. the semantic logits,
``(b, 80, 80, 80)`` at stride 8) on the same numbers against ``SegmentLoss26``, paired; XLA's memory
analysis of the mask-IoU assignment alone and of the step at b = 16, M = 100."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

import ablation
import jaxtal
import timing
from timing import BATCH, IMAGE_SIZE, NUM_CLASSES, REG_MAX, SEED, STRIDES

SEG_PROTO = (160, 160, 32)  # YOLOv8-seg: input / 4, 32 prototypes
SEG_BOX_COUNTS = (50,)
SEG_MEMORY = (16, 100)  # b, M of the memory bound (2 GB)
NAME = "segment loss fwd+bwd (b16 nc80 640px 160x160x32)"


def loss_total(feats, coefs, proto, gt, cfg):
  """jaxtal's segmentation loss total: the one call of it in this file."""
  return jaxtal.segment_loss(jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto), gt, cfg)[0]


def make_step(cfg):
  """``step(feats, coefs, proto, gt) -> (total, grads w.r.t. the three)`` under ``cfg`` (the ablation passes variants)."""

  def step(feats, coefs, proto, gt):
    return jax.value_and_grad(lambda f, c, p: loss_total(f, c, p, gt, cfg), argnums=(0, 1, 2))(feats, coefs, proto)

  return step


def make_index_maps(rows: np.ndarray, batch: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """``(rows, index maps (b, mh, mw))``: the rows sorted largest-area first within each image (as Ultralytics'
  pipeline orders them) and an ellipse filling each box drawn in that order (``jaxtal.pack_masks``)."""
  order = np.lexsort((-rows[:, 4] * rows[:, 5], rows[:, 0]))
  rows = rows[order]
  ys, xs = np.mgrid[: size[0], : size[1]] + 0.5
  cx, cy, w, h = (rows[:, i, None, None] * s for i, s in ((2, size[1]), (3, size[0]), (4, size[1]), (5, size[0])))
  masks = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1.0
  return rows, jaxtal.pack_masks(masks, rows[:, 0], batch, int(np.bincount(rows[:, 0].astype(int)).max()))


def rows(args, table) -> None:
  if not getattr(args, "segment26_only", False):
    v8_rows(args, table)
  if not getattr(args, "no_segment26", False):
    segment26_rows(args, table)


def v8_rows(args, table) -> None:
  mh, mw, nm = SEG_PROTO
  maps_np = timing.make_head_maps()
  coefs_np = timing.make_side_maps(nm, seed=SEED + 7)
  proto_np = np.random.default_rng(SEED + 9).standard_normal((BATCH, mh, mw, nm), dtype=np.float32)
  feats, coefs, proto = [jax.device_put(m) for m in maps_np], [jax.device_put(m) for m in coefs_np], jax.device_put(proto_np)
  cfg = jaxtal.SegmentLossConfig(num_classes=NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX, min_box_side=0.0)
  data = {m: make_index_maps(timing.make_label_rows(m, seed=SEED + 11), BATCH, (mh, mw)) for m in SEG_BOX_COUNTS}
  inputs_by_m, runs = {}, {}
  for m, (label_rows, index_maps) in data.items():
    gt = jax.device_put(jaxtal.pack_labels(label_rows, BATCH, m, IMAGE_SIZE)._replace(masks=index_maps))
    inputs_by_m[m] = (feats, coefs, proto, gt)
    start = time.perf_counter()
    compiled = jax.jit(make_step(cfg)).lower(*inputs_by_m[m]).compile()
    table.add("segment loss step compile", m, (time.perf_counter() - start) * 1e3, "ms", 1, "jit lower + compile, wall time")
    timing.memory_row(table, "segment loss step XLA memory", m, compiled)
    runs[m] = lambda gt=gt, c=compiled: jax.block_until_ready(c(feats, coefs, proto, gt))  # noqa: E731
  b_mem, m_mem = SEG_MEMORY
  shape = lambda *s, dt=np.float32: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
  abstract = (
      [shape(b_mem, IMAGE_SIZE // s, IMAGE_SIZE // s, 4 * REG_MAX + NUM_CLASSES) for s in STRIDES],
      [shape(b_mem, IMAGE_SIZE // s, IMAGE_SIZE // s, nm) for s in STRIDES],
      shape(b_mem, mh, mw, nm),
      jaxtal.GroundTruth(shape(b_mem, m_mem, dt=np.int32), shape(b_mem, m_mem, 4), shape(b_mem, m_mem, dt=bool), masks=shape(b_mem, mh, mw, dt=np.int32)),
  )
  timing.memory_row(table, f"segment loss step XLA memory, b{b_mem}", m_mem, jax.jit(make_step(cfg)).lower(*abstract).compile())
  whole_image_rows(args, table, cfg, feats, coefs, proto, data)
  reference = None if args.no_ultralytics else timing.import_reference(table)
  if reference is None:
    medians = timing.compare_rows(args, table, NAME, "jaxtal.segment_loss", runs)
    ablation.segment_rows(args, table, cfg, make_step, inputs_by_m, medians)
    return
  import torch
  from ultralytics.utils.loss import v8SegmentationLoss

  preds, leaves = timing.reference_preds(maps_np, NUM_CLASSES, extra={"mask_coefficient": coefs_np, "proto": proto_np})
  model = reference.Model(NUM_CLASSES, REG_MAX, list(STRIDES), dict(box=7.5, cls=0.5, dfl=1.5, overlap_mask=True), None)
  crit = v8SegmentationLoss(model, tal_topk=10)
  crit.assigner.stride_val = 0.0  # min_box_side=0 on both sides
  ref_runs = {}
  for m, (label_rows, index_maps) in data.items():
    t = torch.from_numpy(label_rows)
    batch = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:6], "masks": torch.from_numpy(index_maps)}
    ref_runs[m] = timing.reference_run(crit, preds, batch, leaves)
  medians = timing.compare_rows(
      args, table, NAME, "jaxtal.segment_loss", runs,
      "Ultralytics v8SegmentationLoss fwd+bwd", ref_runs, timing.reference_note(reference), "segment loss", "target >= 3",
  )  # fmt: skip
  ablation.segment_rows(args, table, cfg, make_step, inputs_by_m, medians)


def whole_image_rows(args, table, cfg, feats, coefs, proto, data) -> None:
  """The step when every GT box covers most of the image (centres within 10% of the middle, sides 80-100% of
  the image's; the label rows' classes): the box windows would cost more than the full plane, so the mask
  term falls back to it at run time; against the step with windows off (``plain_kernels=("mask_windows",)``,
  the full plane always)."""
  mh, mw, _ = SEG_PROTO
  rng = np.random.default_rng(SEED + 13)
  for m, (label_rows, _) in data.items():
    rows = label_rows.copy()
    rows[:, 2:4] = rng.uniform(0.4, 0.6, (len(rows), 2))
    rows[:, 4:6] = rng.uniform(0.8, 1.0, (len(rows), 2))
    rows, index_maps = make_index_maps(rows, BATCH, (mh, mw))
    gt = jax.device_put(jaxtal.pack_labels(rows, BATCH, m, IMAGE_SIZE)._replace(masks=index_maps))
    times = {}
    for name, c in (("windows (auto)", cfg), ("plain mask_windows", dataclasses.replace(cfg, plain_kernels=("mask_windows",)))):
      step = jax.jit(make_step(c)).lower(feats, coefs, proto, gt).compile()
      times[name] = timing.median_ms(timing.time_runs(lambda s=step: jax.block_until_ready(s(feats, coefs, proto, gt)), args.warmup, args.repeats))
      table.add(f"segment loss fwd+bwd, boxes filling the image, {name}", m, times[name], "ms", args.repeats)
    ratio = times["windows (auto)"] / times["plain mask_windows"]
    table.add("ratio windows (auto) / full plane, boxes filling the image", m, ratio, "x", args.repeats, "the fallback's cost: 1.0 is none")


# ----------------------------------------------------------------------------- YOLO26


NAME26 = "segment26 loss fwd+bwd (b16 nc80 640px 160x160x32 + semantic 80x80)"


def segment26_rows(args, table) -> None:
  """``segment26_loss`` fwd+bwd against ``SegmentLoss26`` (the v8 rows' workload plus semantic logits), and the
  XLA memory of its mask-IoU assignment (``segment26_targets``) and its step at b = 16, M = 100."""
  mh, mw, nm = SEG_PROTO
  sh = IMAGE_SIZE // STRIDES[0]
  maps_np = timing.make_head_maps()
  coefs_np = timing.make_side_maps(nm, seed=SEED + 7)
  proto_np = np.random.default_rng(SEED + 9).standard_normal((BATCH, mh, mw, nm), dtype=np.float32)
  sem_np = np.random.default_rng(SEED + 13).standard_normal((BATCH, sh, sh, NUM_CLASSES), dtype=np.float32)
  preds = jaxtal.Predictions(
      [jax.device_put(m) for m in maps_np], mask_coefs=[jax.device_put(m) for m in coefs_np], proto=jax.device_put(proto_np),
      semantic=jax.device_put(sem_np),
  )
  cfg = jaxtal.Segment26LossConfig(num_classes=NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX)  # min_box_side: strides[1]

  def make_step26(cfg):
    return lambda p, gt: jax.value_and_grad(lambda p: jaxtal.segment26_loss(p, gt, cfg)[0])(p)

  step = jax.jit(make_step26(cfg))
  data = {m: make_index_maps(timing.make_label_rows(m, seed=SEED + 11), BATCH, (mh, mw)) for m in SEG_BOX_COUNTS}
  runs, inputs_by_m = {}, {}
  for m, (label_rows, index_maps) in data.items():
    gt = jax.device_put(jaxtal.pack_labels(label_rows, BATCH, m, IMAGE_SIZE)._replace(masks=index_maps))
    inputs_by_m[m] = (preds, gt)
    runs[m] = lambda gt=gt: jax.block_until_ready(step(preds, gt))  # noqa: E731
  b_mem, m_mem = SEG_MEMORY
  shape = lambda *s, dt=np.float32: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
  abstract = (
      jaxtal.Predictions(
          [shape(b_mem, IMAGE_SIZE // s, IMAGE_SIZE // s, 4 * REG_MAX + NUM_CLASSES) for s in STRIDES],
          mask_coefs=[shape(b_mem, IMAGE_SIZE // s, IMAGE_SIZE // s, nm) for s in STRIDES],
          proto=shape(b_mem, mh, mw, nm), semantic=shape(b_mem, sh, sh, NUM_CLASSES),
      ),
      jaxtal.GroundTruth(shape(b_mem, m_mem, dt=np.int32), shape(b_mem, m_mem, 4), shape(b_mem, m_mem, dt=bool), masks=shape(b_mem, mh, mw, dt=np.int32)),
  )
  assign = jax.jit(lambda p, gt: jaxtal.segment26_targets(p, gt, cfg)[1])
  timing.memory_row(table, f"segment26 mask-IoU assignment XLA memory, b{b_mem}", m_mem, assign.lower(*abstract).compile())
  timing.memory_row(table, f"segment26 loss step XLA memory, b{b_mem}", m_mem, step.lower(*abstract).compile())
  reference = None if args.no_ultralytics else timing.import_reference(table)
  if reference is None:
    medians = timing.compare_rows(args, table, NAME26, "jaxtal.segment26_loss", runs)
    ablation.task_rows(args, table, "segment26_loss", "segment26 loss", cfg, make_step26, inputs_by_m, medians)
    return
  import torch
  from ultralytics.utils.loss import SegmentLoss26

  ref_preds, leaves = timing.reference_preds(
      maps_np, NUM_CLASSES, extra={"mask_coefficient": coefs_np, "proto": proto_np, "semantic": sem_np}
  )
  ref_preds["proto"] = (ref_preds["proto"], ref_preds.pop("semantic"))  # Proto26 in training: (prototypes, semantic logits)
  model = reference.Model(NUM_CLASSES, REG_MAX, list(STRIDES), dict(box=7.5, cls=0.5, dfl=1.5, overlap_mask=True), None)
  crit = SegmentLoss26(model, tal_topk=10)
  # Both at their default min_box_side, strides[1] (the reference's stride_val).
  ref_runs = {}
  for m, (label_rows, index_maps) in data.items():
    t = torch.from_numpy(label_rows)
    classes = np.concatenate([[0.0], label_rows[:, 1]])  # the pipeline's sem_masks: the class the map names
    offsets = np.concatenate([[0], np.cumsum(np.bincount(label_rows[:, 0].astype(int), minlength=BATCH))[:-1]])
    sem = np.where(index_maps > 0, classes[np.where(index_maps > 0, index_maps + offsets[:, None, None], 0)], 0.0)
    batch = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:6], "masks": torch.from_numpy(index_maps),
             "sem_masks": torch.from_numpy(sem.astype(np.float32))}
    ref_runs[m] = timing.reference_run(crit, ref_preds, batch, leaves)
  medians = timing.compare_rows(
      args, table, NAME26, "jaxtal.segment26_loss", runs,
      "Ultralytics SegmentLoss26 fwd+bwd", ref_runs, timing.reference_note(reference), "segment26 loss", "target >= 4.06 (v8's)",
  )  # fmt: skip
  ablation.task_rows(args, table, "segment26_loss", "segment26 loss", cfg, make_step26, inputs_by_m, medians)
