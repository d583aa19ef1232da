"""Detection rows: jaxtal's loss, assignment, floor, compile time and memory, end-to-end, and Ultralytics'
``v8DetectionLoss``, ``E2ELoss`` and ``TaskAlignedAssigner`` on the same numbers (see benchmarks/README.md).

b = 16, nc = 80, 640 px input (strides 8/16/32, A = 8400), reg_max 16, M GT boxes in every image.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ablation
import jaxtal
import timing
from timing import BATCH, IMAGE_SIZE, NUM_CLASSES, REG_MAX, STRIDES, median_ms, memory_mib, paired_ratio, time_runs

MEMORY_BATCH = 8
E2E_WEIGHT = 0.5  # the one-to-many weight of the end-to-end rows (and of Ultralytics' E2ELoss there)


# ---------------------------------------------------------------------------------------------
# jaxtal's loss entry points: every call of them in this file goes through these three lines
# ---------------------------------------------------------------------------------------------


def loss_total(feats, gt, cfg):
  return jaxtal.detection_loss(feats, gt, cfg)[0]


def loss_given_total(feats, targets, cfg):
  return jaxtal.loss_from_targets(feats, targets, None, cfg)[0]


def e2e_total(many, one, gt, cfg):
  return jaxtal.end_to_end_loss(jaxtal.detection_loss, many, one, gt, weight=E2E_WEIGHT, config=cfg)[0]


def make_loss_step(cfg):
  """``step(feats, gt) -> (total, d total / d feats)`` under ``cfg`` (the kernel ablation passes its variants)."""

  def step(feats, gt):
    return jax.value_and_grad(lambda f: loss_total(f, gt, cfg))(feats)

  return step


# ---------------------------------------------------------------------------------------------
# The floor: the elementwise work every implementation of the loss must do
# ---------------------------------------------------------------------------------------------


def floor_step(feats, labels, weight):
  """BCE over every logit against one-hot(labels) * weight, plus the DFL softmax expectation; per level.

  The minimal work any implementation of the loss must do, with jaxtal's kernels
  (jaxtal.kernels: analytic gradients, one-concatenation split), so the ratio loss / floor is
  the cost of everything else (assignment, CIoU, DFL cross-entropy, gathering the gradient).
  """

  def floor(feats):
    total, lo = 0.0, 0
    for f in feats:
      x = f.reshape(f.shape[0], -1, f.shape[-1])
      hi = lo + x.shape[1]
      dist, cls_logits = jaxtal.kernels.split_channels(x, 4 * REG_MAX)
      total = total + jaxtal.kernels.bce_sum(cls_logits, labels[:, lo:hi], weight[:, lo:hi])
      dist = dist.reshape(x.shape[0], -1, 4, REG_MAX)
      total = total + jnp.sum(jaxtal.kernels.softmax_stats(dist)[0])
      lo = hi
    return total

  return jax.value_and_grad(floor)(feats)


def floor_autodiff_step(feats, labels, weight):
  """The same floor written the plain way: optax's BCE, jax.nn.softmax and autodiff."""

  def floor(feats):
    total, lo = 0.0, 0
    bins = jnp.arange(REG_MAX, dtype=jnp.float32)
    for f in feats:
      x = f.reshape(f.shape[0], -1, f.shape[-1])
      hi = lo + x.shape[1]
      z = jax.nn.one_hot(labels[:, lo:hi], NUM_CLASSES, dtype=jnp.float32) * weight[:, lo:hi, None]
      total = total + jnp.sum(optax.sigmoid_binary_cross_entropy(x[..., 4 * REG_MAX :], z))
      probs = jax.nn.softmax(x[..., : 4 * REG_MAX].reshape(x.shape[0], -1, 4, REG_MAX), axis=-1)
      total = total + jnp.sum(jnp.sum(probs * bins, axis=-1))  # expectation as an elementwise weighted sum
      lo = hi
    return total

  return jax.value_and_grad(floor)(feats)


# ---------------------------------------------------------------------------------------------
# jaxtal rows
# ---------------------------------------------------------------------------------------------


def assignment_inputs(feats):
  """``(scores, pixel boxes, pixel anchors)``: the assigner's inputs decoded from the head maps."""
  shapes = [f.shape[1:3] for f in feats]
  anchors, anchor_strides = jaxtal.make_anchors(shapes, STRIDES)
  pred_dist, pred_logits = jaxtal.flatten_head(feats, NUM_CLASSES, REG_MAX)
  pred_scores = jax.block_until_ready(jax.nn.sigmoid(pred_logits))
  pred_boxes = jax.block_until_ready(jaxtal.decode_boxes(pred_dist, anchors, REG_MAX) * anchor_strides)
  return pred_scores, pred_boxes, anchors * anchor_strides


def pack_gt(rows, m):
  """The packed :class:`jaxtal.GroundTruth` of ``rows`` as JAX arrays (the optional fields stay None)."""
  return jax.tree.map(jnp.asarray, jaxtal.pack_labels(rows, BATCH, m, (IMAGE_SIZE, IMAGE_SIZE)))


def jaxtal_rows(args, table, maps_np, rows_by_m) -> tuple[dict, dict]:
  """Loss, assignment, floor, compile, memory, end-to-end and ablation rows for every M; returns the median
  times (ms) keyed by (row, M), and the timed calls by the same keys (for the paired ratios)."""
  cfg = jaxtal.LossConfig(num_classes=NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX, min_box_side=0.0)  # as the reference below
  feats = [jax.device_put(jnp.asarray(m)) for m in maps_np]  # NHWC, prepared outside the timing
  assign_inputs = assignment_inputs(feats)
  num_anchors = assign_inputs[2].shape[0]
  loss_step = make_loss_step(cfg)
  loss_given_jit = jax.jit(lambda feats, targets: jax.value_and_grad(lambda f: loss_given_total(f, targets, cfg))(feats))
  assign = jax.jit(functools.partial(jaxtal.task_aligned_assign, min_box_side=0.0))
  targets_jit = jax.jit(functools.partial(jaxtal.detection_targets, config=cfg))
  floor_jit = jax.jit(floor_step)
  floor_autodiff_jit = jax.jit(floor_autodiff_step)
  medians, runs = {}, {}
  for m in args.box_counts:
    gt = pack_gt(rows_by_m[m], m)
    # Compile time: the first lower + compile of the step (no cache hit: a new computation).
    start = time.perf_counter()
    compiled = jax.jit(loss_step).lower(feats, gt).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    runs[("loss", m)] = lambda compiled=compiled, gt=gt: jax.block_until_ready(compiled(feats, gt))
    times = time_runs(runs[("loss", m)], args.warmup, args.repeats)
    medians[("loss", m)] = median_ms(times)
    table.add("jaxtal loss fwd+bwd", m, medians[("loss", m)], "ms", len(times), f"b={BATCH} A={num_anchors} nc={NUM_CLASSES}")

    # The same step with the assignment taken out (its targets computed once, outside the timing),
    # so the table shows how the time over the floor splits between the assignment and the rest.
    _, targets = targets_jit(feats, gt)
    times = time_runs(lambda t=targets: jax.block_until_ready(loss_given_jit(feats, t)), args.warmup, args.repeats)
    medians[("loss_given", m)] = median_ms(times)
    table.add("jaxtal loss fwd+bwd, assignment precomputed", m, medians[("loss_given", m)], "ms", len(times))

    runs[("assign", m)] = lambda gt=gt: jax.block_until_ready(assign(*assign_inputs, gt))
    times = time_runs(runs[("assign", m)], args.warmup, args.repeats)
    medians[("assign", m)] = median_ms(times)
    table.add("jaxtal task_aligned_assign", m, medians[("assign", m)], "ms", len(times))

    # The floor uses the real targets of this M (computed once, outside the timing).
    target = assign(*assign_inputs, gt)
    labels, weight = target.labels, jnp.sum(target.scores, axis=-1)
    times = time_runs(lambda: jax.block_until_ready(floor_jit(feats, labels, weight)), args.warmup, args.repeats)  # noqa: B023
    medians[("floor", m)] = median_ms(times)
    table.add("floor: BCE + DFL expectation", m, medians[("floor", m)], "ms", len(times), "jaxtal.kernels")
    times = time_runs(lambda: jax.block_until_ready(floor_autodiff_jit(feats, labels, weight)), args.warmup, args.repeats)  # noqa: B023
    medians[("floor_autodiff", m)] = median_ms(times)
    table.add("floor, optax + autodiff", m, medians[("floor_autodiff", m)], "ms", len(times), "for reference")
    table.add("ratio loss / floor", m, medians[("loss", m)] / medians[("floor", m)], "x", note="full loss time over the floor")
    table.add(
        "ratio loss (assignment precomputed) / floor",
        m,
        medians[("loss_given", m)] / medians[("floor", m)],
        "x",
        note="the same, the assignment's time taken out",
    )
    table.add("jaxtal loss step compile", m, compile_s * 1e3, "ms", 1, "jit lower + compile, wall time")
    if mem is not None:
      table.add("jaxtal loss step XLA memory", m, memory_mib(mem), "MiB", note="temp + argument + output bytes")
    if m in args.e2e_box_counts:
      e2e_rows(args, table, m, feats, gt, cfg, medians, runs)
    if m in args.ablation_box_counts:
      ablation.detection_rows(args, table, m, feats, gt, cfg, make_loss_step, assign_inputs, medians)
  return medians, runs


def e2e_rows(args, table, m, feats, gt, cfg, medians, runs) -> None:
  """End-to-end (YOLO26): the loss on a one-to-many and a one-to-one branch, gradients w.r.t. both."""
  feats_o2o = [f * 0.5 for f in feats]

  def e2e_step(many, one, gt):
    return jax.value_and_grad(lambda a, b: e2e_total(a, b, gt, cfg), argnums=(0, 1))(many, one)

  e2e = jax.jit(e2e_step).lower(feats, feats_o2o, gt).compile()
  runs[("e2e", m)] = lambda: jax.block_until_ready(e2e(feats, feats_o2o, gt))
  times = time_runs(runs[("e2e", m)], args.warmup, args.repeats)
  medians[("e2e", m)] = median_ms(times)
  table.add("jaxtal end_to_end_loss fwd+bwd", m, medians[("e2e", m)], "ms", len(times), "both branches' maps")
  table.add("ratio end-to-end / detection step", m, medians[("e2e", m)] / medians[("loss", m)], "x", note="target <= 2.1")


def memory_rows(args, table) -> None:
  """Compiled memory of the assignment alone, automatic chunking vs dense, from shapes only."""
  a = sum((IMAGE_SIZE // s) ** 2 for s in STRIDES)
  b = MEMORY_BATCH
  spec = jax.ShapeDtypeStruct
  for m in args.memory_box_counts:
    inputs = (
        spec((b, a, NUM_CLASSES), jnp.float32),
        spec((b, a, 4), jnp.float32),
        spec((a, 2), jnp.float32),
        jaxtal.GroundTruth(spec((b, m), jnp.int32), spec((b, m, 4), jnp.float32), spec((b, m), jnp.bool_)),
    )
    for label, chunk in (("auto", None), ("dense", m)):
      fn = jax.jit(functools.partial(jaxtal.task_aligned_assign, gt_chunk=chunk, min_box_side=0.0))
      try:
        stats = fn.lower(*inputs).compile().memory_analysis()
      except Exception as e:  # noqa: BLE001 - report whatever stops XLA (e.g. a buffer too large)
        table.add(f"assign memory, {label}", m, None, "MiB", note=f"b={b} A={a}: {type(e).__name__}: {e}"[:120])
        continue
      peak = getattr(stats, "peak_memory_in_bytes", 0) / 2**20
      table.add(
          f"assign memory, {label}",
          m,
          memory_mib(stats),
          "MiB",
          note=f"b={b} A={a} nc={NUM_CLASSES}; of which temp {stats.temp_size_in_bytes / 2**20:.1f} MiB",
          temp_mib=stats.temp_size_in_bytes / 2**20,
          xla_peak_mib=peak or None,  # JSON only: on CPU it did not track the temp size
      )


# ---------------------------------------------------------------------------------------------
# Ultralytics (PyTorch, CPU)
# ---------------------------------------------------------------------------------------------


def ultralytics_rows(args, table, maps_np, rows_by_m, jaxtal_ms: dict, jaxtal_runs: dict) -> None:
  """v8DetectionLoss forward+backward, E2ELoss, and TaskAlignedAssigner alone, same numbers as jaxtal's rows."""
  try:
    import torch
    from support import reference  # tests/support/reference.py: the fake model v8DetectionLoss reads its settings from
    from ultralytics.utils.loss import v8DetectionLoss
    from ultralytics.utils.tal import TaskAlignedAssigner, make_anchors
  except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
    table.add("Ultralytics", None, None, "ms", note=f"skipped: cannot import torch/ultralytics ({type(e).__name__}: {e})")
    return
  torch.set_num_threads(os.cpu_count())
  note_v = timing.reference_note(reference)
  if reference.VERSION != reference.REFERENCE_VERSION:
    note_v += f" (the pinned reference is {reference.REFERENCE_VERSION})"

  b = BATCH
  nchw = [torch.from_numpy(np.ascontiguousarray(m.transpose(0, 3, 1, 2))) for m in maps_np]
  # v8DetectionLoss's native input: what its Detect head returns in training, built outside the timing.
  boxes = torch.cat([f[:, : 4 * REG_MAX].reshape(b, 4 * REG_MAX, -1) for f in nchw], -1).contiguous()
  scores = torch.cat([f[:, 4 * REG_MAX :].reshape(b, NUM_CLASSES, -1) for f in nchw], -1).contiguous()
  boxes.requires_grad_(True)
  scores.requires_grad_(True)
  feats_meta = [f[:1, :1] for f in nchw]  # only their spatial shapes are read (anchors)
  model = reference.Model(NUM_CLASSES, REG_MAX, list(STRIDES), dict(box=7.5, cls=0.5, dfl=1.5), None)
  crit = v8DetectionLoss(model, tal_topk=10)
  crit.assigner.stride_val = 0.0  # min_box_side=0 on both sides (the original YOLOv8 in-box test), as in every earlier table

  # Assignment inputs: the same predictions jaxtal's assign row uses, computed here in PyTorch.
  with torch.no_grad():
    anchor_points, stride_tensor = make_anchors(nchw, torch.tensor(STRIDES, dtype=torch.float32), 0.5)
    pred_scores = scores.detach().permute(0, 2, 1).sigmoid().contiguous()
    pred_boxes = crit.bbox_decode(anchor_points, boxes.detach().permute(0, 2, 1).contiguous()) * stride_tensor
    anchor_px = anchor_points * stride_tensor
  assigner = TaskAlignedAssigner(topk=10, num_classes=NUM_CLASSES, alpha=0.5, beta=6.0, eps=1e-9)
  assigner.stride_val = 0.0

  for m in args.box_counts:
    rows = torch.from_numpy(rows_by_m[m])
    batch = {"batch_idx": rows[:, 0], "cls": rows[:, 1:2], "bboxes": rows[:, 2:6]}
    preds = {"boxes": boxes, "scores": scores, "feats": feats_meta}

    def loss_run():
      boxes.grad = scores.grad = None
      total, _ = crit(preds, batch)  # noqa: B023
      total.sum().backward()

    times = time_runs(loss_run, args.warmup, args.repeats)
    ms = median_ms(times)
    table.add("Ultralytics v8DetectionLoss fwd+bwd", m, ms, "ms", len(times), note_v)
    table.add("ratio Ultralytics / jaxtal loss", m, ms / jaxtal_ms[("loss", m)], "x", note="of the two medians")
    ratio = paired_ratio(loss_run, jaxtal_runs[("loss", m)], args.repeats)
    table.add("ratio Ultralytics / jaxtal loss, paired", m, ratio, "x", args.repeats, "median of alternating pairs")

    if ("e2e", m) in jaxtal_runs:
      from ultralytics.utils.loss import E2ELoss

      model.args.epochs = 100
      e2e_crit = E2ELoss(model)
      for c in (e2e_crit.one2many, e2e_crit.one2one):
        c.assigner.stride_val = 0.0
      e2e_crit.o2m, e2e_crit.o2o = E2E_WEIGHT, 1 - E2E_WEIGHT  # the weight jaxtal's row uses
      boxes_o2o = (boxes.detach() * 0.5).requires_grad_(True)
      scores_o2o = (scores.detach() * 0.5).requires_grad_(True)
      e2e_preds = {"one2many": preds, "one2one": {"boxes": boxes_o2o, "scores": scores_o2o, "feats": feats_meta}}

      def e2e_run():
        boxes.grad = scores.grad = boxes_o2o.grad = scores_o2o.grad = None  # noqa: B023
        total, _ = e2e_crit(e2e_preds, batch)  # noqa: B023
        total.sum().backward()

      times = time_runs(e2e_run, args.warmup, args.repeats)
      ms = median_ms(times)
      table.add("Ultralytics E2ELoss fwd+bwd", m, ms, "ms", len(times), note_v)
      ratio = paired_ratio(e2e_run, jaxtal_runs[("e2e", m)], args.repeats)
      table.add("ratio Ultralytics / jaxtal end-to-end, paired", m, ratio, "x", args.repeats, "target >= 2.5")

    rows_np = rows_by_m[m]
    gt_labels = rows[:, 1].reshape(b, m, 1)
    xyxy = np.concatenate([rows_np[:, 2:4] - rows_np[:, 4:6] / 2, rows_np[:, 2:4] + rows_np[:, 4:6] / 2], axis=1)
    gt_boxes = torch.from_numpy(xyxy.astype(np.float32) * IMAGE_SIZE).reshape(b, m, 4)
    mask = torch.ones(b, m, 1, dtype=torch.bool)

    def assign_run():
      with torch.no_grad():
        assigner(pred_scores, pred_boxes, anchor_px, gt_labels, gt_boxes, mask)  # noqa: B023

    times = time_runs(assign_run, args.warmup, args.repeats)
    ms = median_ms(times)
    table.add("Ultralytics TaskAlignedAssigner", m, ms, "ms", len(times))
    table.add("ratio Ultralytics / jaxtal assign", m, ms / jaxtal_ms[("assign", m)], "x", note="of the two medians")
    ratio = paired_ratio(assign_run, jaxtal_runs[("assign", m)], args.repeats)
    table.add("ratio Ultralytics / jaxtal assign, paired", m, ratio, "x", args.repeats, "median of alternating pairs")
