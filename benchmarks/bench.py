"""Benchmarks of jaxtal's loss and assigner, with Ultralytics and KerasCV for comparison.

    python benchmarks/bench.py                 # full run (repeats as printed)
    python benchmarks/bench.py --quick         # smoke run: fewer repeats
    python benchmarks/bench.py --json out.json # also write every row as JSON

Rows (see benchmarks/README.md for what each one measures):

1. ``loss fwd+bwd``: ``jax.jit(jax.value_and_grad(total of jaxtal.detection_loss))`` w.r.t. the
   list of NHWC head maps, b=16, nc=80, input 640 (strides 8/16/32, A=8400), reg_max 16, for
   M = 8, 50, 200 GT boxes per image;
   and the same step with the assignment precomputed (its targets made outside the timing), to
   split the time over the floor between the assignment and the rest of the loss;
2. ``assign``: jitted ``jaxtal.task_aligned_assign`` on the same predictions;
3. ``floor``: fwd+bwd of only the BCE over all (b, A, nc) logits plus the DFL softmax
   expectation, per level on the NHWC maps: work any implementation of the loss must do,
   written with jaxtal's kernels (``jaxtal.kernels``); also written plainly with optax,
   ``jax.nn.softmax`` and autodiff;
4. Ultralytics 8.4.190 (when ``torch`` and ``ultralytics`` import): ``v8DetectionLoss``
   forward+backward and ``TaskAlignedAssigner`` alone on the same numbers (NCHW);
5. compile time of the loss step, and XLA's compiled memory analysis of the assignment at
   b=8, A=8400, M = 50, 500, 1000, automatic GT chunking vs dense (``gt_chunk=M``);
6. KerasCV 0.9's ``YOLOV8LabelEncoder`` on the JAX backend, run by the Python of a separate
   virtual environment (``--kerascv-python``, default ``/tmp/kcv/bin/python``) if one exists.

7. end-to-end (``--e2e-box-counts``, default M = 50): ``end_to_end_loss`` over
   ``detection_loss`` fwd+bwd w.r.t. both branches' maps, its ratio to the detection step, and
   Ultralytics' ``E2ELoss`` on the same numbers (paired ratio);
8. oriented boxes: ``jaxtal.obb_loss`` fwd+bwd w.r.t. head and angle maps at b=16, nc=15 (DOTA),
   1024 px, M = 50 and 200, and Ultralytics' ``v8OBBLoss`` on the same numbers (paired ratio);
   pose: ``jaxtal.pose_loss`` w.r.t. head and keypoint maps at b=16, nc=1, 640 px, K=17, M = 20
   and 100, against ``v8PoseLoss``; segmentation: ``jaxtal.segment_loss`` w.r.t. head,
   coefficient and prototype maps at b=16, nc=80, 640 px, 160x160x32 prototypes, M = 50, against
   ``v8SegmentationLoss``, and XLA's memory analysis of that step (and of b=16, M=100);
9. kernel ablation (``--ablation-box-counts``, default M = 50): the loss step (and for ``top_k``
   the assignment) with one ``jaxtal.kernels`` trick replaced by its plain twin; a trick stays
   only while it saves at least 5% of the step.

Times are medians over ``--repeats`` timed runs after ``--warmup`` untimed ones, each run
ending in ``block_until_ready`` (JAX) or after ``backward()`` returns (PyTorch, CPU).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH = 16
NUM_CLASSES = 80
IMAGE_SIZE = 640
STRIDES = (8, 16, 32)
REG_MAX = 16
BOX_COUNTS = (8, 50, 200)
MEMORY_BATCH = 8
MEMORY_BOX_COUNTS = (50, 500, 1000)
SEED = 0


# ---------------------------------------------------------------------------------------------
# Data (NumPy, fixed seeds)
# ---------------------------------------------------------------------------------------------


def make_head_maps(seed: int = SEED, batch: int = BATCH, num_classes: int = NUM_CLASSES) -> list[np.ndarray]:
  """Random NHWC head maps ``(b, 640/s, 640/s, 4R + nc)`` float32: box-bin logits N(0, 1), class logits N(-4, 1)."""
  rng = np.random.default_rng(seed)
  maps = []
  for s in STRIDES:
    h = IMAGE_SIZE // s
    box = rng.standard_normal((batch, h, h, 4 * REG_MAX), dtype=np.float32)
    cls = rng.standard_normal((batch, h, h, num_classes), dtype=np.float32) - 4.0
    maps.append(np.concatenate([box, cls], axis=-1))
  return maps


def make_side_maps(channels: int, seed: int, batch: int = BATCH, scale: float = 1.0) -> list[np.ndarray]:
  """Random NHWC maps ``(b, 640/s, 640/s, channels)`` float32, N(0, scale^2): keypoint or mask-coefficient heads."""
  rng = np.random.default_rng(seed)
  return [scale * rng.standard_normal((batch, IMAGE_SIZE // s, IMAGE_SIZE // s, channels), dtype=np.float32) for s in STRIDES]


def make_label_rows(num_boxes: int, seed: int = SEED, batch: int = BATCH, num_classes: int = NUM_CLASSES) -> np.ndarray:
  """``num_boxes`` GT boxes in every image as YOLO rows ``[image, cls, cx, cy, w, h]`` (normalised).

  Sides are log-uniform in 6 to 400 pixels with aspect ratios log-uniform in [1/3, 3] (small
  and large objects, as in COCO), centres uniform with the box kept inside the image, classes
  uniform in [0, nc).
  """
  rng = np.random.default_rng(seed + 1000 * num_boxes)
  n = batch * num_boxes
  area_side = np.exp(rng.uniform(np.log(6.0), np.log(400.0), n))
  aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3.0), n))
  w = np.clip(area_side * np.sqrt(aspect), 2.0, IMAGE_SIZE - 1.0)
  h = np.clip(area_side / np.sqrt(aspect), 2.0, IMAGE_SIZE - 1.0)
  cx = rng.uniform(w / 2, IMAGE_SIZE - w / 2)
  cy = rng.uniform(h / 2, IMAGE_SIZE - h / 2)
  image = np.repeat(np.arange(batch), num_boxes)
  cls = rng.integers(0, num_classes, n)
  rows = np.stack([image, cls, cx / IMAGE_SIZE, cy / IMAGE_SIZE, w / IMAGE_SIZE, h / IMAGE_SIZE], axis=1)
  return rows.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def time_runs(run, warmup: int, repeats: int) -> list[float]:
  """Wall times in seconds of ``repeats`` calls of ``run`` (which must wait for its result) after ``warmup`` calls."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return times


class Table:
  """Collects rows and prints them as they come."""

  def __init__(self):
    self.rows = []
    print(f"{'row':<42} {'M':>5} {'median':>12} {'runs':>5}  note")
    print("-" * 108)

  def add(self, name: str, m, value: float | None, unit: str, runs: int | None = None, note: str = "", **extra):
    self.rows.append(dict(name=name, M=m, value=value, unit=unit, runs=runs, note=note, **extra))
    if value is None:
      shown = "n/a"
    elif unit == "x":
      shown = f"{value:10.2f} x"
    else:
      shown = f"{value:.1f} {unit}"
    print(f"{name:<42} {'' if m is None else m:>5} {shown:>12} {'' if runs is None else runs:>5}  {note}", flush=True)


def paired_ratio(run_a, run_b, repeats: int) -> float:
  """Median over ``repeats`` pairs of (time of ``run_a``) / (time of ``run_b``), the two calls alternating.

  Both calls of a pair see the same state of the machine, so drift on a shared VM (which moves single
  medians by up to ~15% between runs here) largely cancels out of the ratio.
  """
  ratios = []
  for i in range(repeats):
    first, second = (run_a, run_b) if i % 2 == 0 else (run_b, run_a)
    start = time.perf_counter()
    first()
    middle = time.perf_counter()
    second()
    end = time.perf_counter()
    t_first, t_second = middle - start, end - middle
    ratios.append(t_first / t_second if first is run_a else t_second / t_first)
  return float(np.median(ratios))


def median_ms(times: list[float]) -> float:
  return float(np.median(times) * 1e3)


# ---------------------------------------------------------------------------------------------
# jaxtal
# ---------------------------------------------------------------------------------------------


def jaxtal_benchmarks(args, table: Table, maps_np, rows_by_m) -> dict:
  """Rows 1, 2, 3 and 5; returns the median times (ms) keyed by (row, M), and the timed calls by the same keys."""
  import jax
  import jax.numpy as jnp
  import optax

  import jaxtal

  kw = dict(num_classes=NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX)
  feats = [jax.device_put(jnp.asarray(m)) for m in maps_np]  # NHWC, prepared outside the timing
  shapes = [m.shape[1:3] for m in maps_np]
  anchors, anchor_strides = jaxtal.make_anchors(shapes, STRIDES)
  pred_dist, pred_logits = jaxtal.flatten_head(feats, NUM_CLASSES, REG_MAX)
  pred_scores = jax.block_until_ready(jax.nn.sigmoid(pred_logits))
  pred_boxes = jax.block_until_ready(jaxtal.decode_boxes(pred_dist, anchors, REG_MAX) * anchor_strides)
  anchor_px = anchors * anchor_strides
  medians, runs = {}, {}

  def loss_step(feats, gt):
    return jax.value_and_grad(lambda f: jaxtal.detection_loss(f, gt, **kw)[0])(feats)

  def loss_given_step(feats, targets):
    return jax.value_and_grad(lambda f: jaxtal.loss_from_targets(f, targets, **kw)[0])(feats)

  loss_given_jit = jax.jit(loss_given_step)
  assign = jax.jit(jaxtal.task_aligned_assign)

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

  floor_jit = jax.jit(floor_step)
  floor_autodiff_jit = jax.jit(floor_autodiff_step)
  for m in args.box_counts:
    # jax.tree.map: the packed GroundTruth's optional fields (keypoints, masks) are None and stay None.
    gt = jax.tree.map(jnp.asarray, jaxtal.pack_labels(rows_by_m[m], BATCH, m, (IMAGE_SIZE, IMAGE_SIZE)))
    # Compile time: the first lower + compile of the step (no cache hit: a new computation).
    start = time.perf_counter()
    compiled = jax.jit(loss_step).lower(feats, gt).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    runs[("loss", m)] = lambda compiled=compiled, gt=gt: jax.block_until_ready(compiled(feats, gt))
    times = time_runs(runs[("loss", m)], args.warmup, args.repeats)
    medians[("loss", m)] = median_ms(times)
    table.add("jaxtal loss fwd+bwd", m, medians[("loss", m)], "ms", len(times), f"b={BATCH} A={anchors.shape[0]} nc={NUM_CLASSES}")

    # The same step with the assignment taken out (its targets computed once, outside the timing),
    # so the table shows how the time over the floor splits between the assignment and the rest.
    _, targets = jax.jit(functools.partial(jaxtal.detection_targets, **kw))(feats, gt)
    times = time_runs(lambda t=targets: jax.block_until_ready(loss_given_jit(feats, t)), args.warmup, args.repeats)
    medians[("loss_given", m)] = median_ms(times)
    table.add("jaxtal loss fwd+bwd, assignment precomputed", m, medians[("loss_given", m)], "ms", len(times))

    runs[("assign", m)] = lambda gt=gt: jax.block_until_ready(assign(pred_scores, pred_boxes, anchor_px, gt))
    times = time_runs(runs[("assign", m)], args.warmup, args.repeats)
    medians[("assign", m)] = median_ms(times)
    table.add("jaxtal task_aligned_assign", m, medians[("assign", m)], "ms", len(times))

    # The floor uses the real targets of this M (computed once, outside the timing).
    target = assign(pred_scores, pred_boxes, anchor_px, gt)
    labels, weight = target.labels, jnp.sum(target.scores, axis=-1)
    times = time_runs(lambda: jax.block_until_ready(floor_jit(feats, labels, weight)), args.warmup, args.repeats)
    medians[("floor", m)] = median_ms(times)
    table.add("floor: BCE + DFL expectation", m, medians[("floor", m)], "ms", len(times), "jaxtal.kernels")
    times = time_runs(lambda: jax.block_until_ready(floor_autodiff_jit(feats, labels, weight)), args.warmup, args.repeats)
    medians[("floor_autodiff", m)] = median_ms(times)
    table.add("floor, optax + autodiff", m, medians[("floor_autodiff", m)], "ms", len(times), "for reference")
    table.add(
        "ratio loss / floor", m, medians[("loss", m)] / medians[("floor", m)], "x", note="full loss time over the floor"
    )
    table.add(
        "ratio loss (assignment precomputed) / floor",
        m,
        medians[("loss_given", m)] / medians[("floor", m)],
        "x",
        note="the same, the assignment's time taken out",
    )
    table.add("jaxtal loss step compile", m, compile_s * 1e3, "ms", 1, "jit lower + compile, wall time")
    if mem is not None:
      table.add(
          "jaxtal loss step XLA memory", m, memory_mib(mem), "MiB", note="temp + argument + output bytes"
      )
    if m in args.e2e_box_counts:
      # End-to-end (YOLO26): the loss on a one-to-many and a one-to-one branch, gradients w.r.t. both.
      feats_o2o = [f * 0.5 for f in feats]

      def e2e_step(many, one, gt):
        def total(many, one):
          return jaxtal.end_to_end_loss(jaxtal.detection_loss, (many,), (one,), gt, weight=0.5, **kw)[0]

        return jax.value_and_grad(total, argnums=(0, 1))(many, one)

      e2e = jax.jit(e2e_step).lower(feats, feats_o2o, gt).compile()
      runs[("e2e", m)] = lambda e2e=e2e, gt=gt, o=feats_o2o: jax.block_until_ready(e2e(feats, o, gt))
      times = time_runs(runs[("e2e", m)], args.warmup, args.repeats)
      medians[("e2e", m)] = median_ms(times)
      table.add("jaxtal end_to_end_loss fwd+bwd", m, medians[("e2e", m)], "ms", len(times), "both branches' maps")
      table.add("ratio end-to-end / detection step", m, medians[("e2e", m)] / medians[("loss", m)], "x", note="target <= 2.1")
    if m in args.ablation_box_counts:
      ablation_rows(args, table, m, feats, gt, loss_step, medians, (pred_scores, pred_boxes, anchor_px))
  return medians, runs


def ablation_rows(args, table, m, feats, gt, loss_step, medians, assign_inputs) -> None:
  """Rows 7: the loss step with one kernel replaced by its plain twin, and what the kernel saves.

  A kernel stays in jaxtal.kernels only while its saving is at least 5% of the loss step.
  """
  import jax

  import jaxtal

  for name in jaxtal.kernels.KERNELS:
    if name in jaxtal.kernels.TASK_KERNELS:  # timed with its task's loss (segment_benchmarks)
      continue
    with jaxtal.kernels._plain(name):
      # Fresh lambdas: jit caches traces per function, and these must be traced with the plain twin.
      step = jax.jit(lambda f, g: loss_step(f, g)).lower(feats, gt).compile()
      assign = jax.jit(lambda *a: jaxtal.task_aligned_assign(*a)).lower(*assign_inputs, gt).compile()
    times = time_runs(lambda: jax.block_until_ready(step(feats, gt)), args.warmup, args.repeats)
    plain = median_ms(times)
    saving = 100 * (plain - medians[("loss", m)]) / plain
    table.add(f"loss fwd+bwd, plain {name}", m, plain, "ms", len(times), f"kernel saves {saving:.0f}% of the step")
    if name == "top_k":
      times = time_runs(lambda: jax.block_until_ready(assign(*assign_inputs, gt)), args.warmup, args.repeats)
      plain = median_ms(times)
      saving = 100 * (plain - medians[("assign", m)]) / plain
      table.add(f"task_aligned_assign, plain {name}", m, plain, "ms", len(times), f"kernel saves {saving:.0f}% of the assignment")


def memory_mib(stats) -> float:
  return (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes) / 2**20


def memory_benchmarks(args, table: Table) -> None:
  """Row 5b: compiled memory of the assignment alone, automatic chunking vs dense, from shapes only."""
  import jax
  import jax.numpy as jnp

  import jaxtal

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
      fn = jax.jit(lambda s, p, an, gt, chunk=chunk: jaxtal.task_aligned_assign(s, p, an, gt, gt_chunk=chunk))
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


def ultralytics_benchmarks(args, table: Table, maps_np, rows_by_m, jaxtal_ms: dict, jaxtal_runs: dict) -> None:
  """Row 4: v8DetectionLoss forward+backward and TaskAlignedAssigner alone, same numbers as jaxtal's rows."""
  try:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import reference  # tests/reference.py: the fake model v8DetectionLoss reads its settings from
    from ultralytics.utils.loss import v8DetectionLoss
    from ultralytics.utils.tal import TaskAlignedAssigner
  except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
    table.add("Ultralytics", None, None, "ms", note=f"skipped: cannot import torch/ultralytics ({type(e).__name__}: {e})")
    return
  torch.set_num_threads(os.cpu_count())
  version = reference.VERSION
  note_v = f"ultralytics {version}, torch {torch.__version__}, {torch.get_num_threads()} threads"
  if version != reference.REFERENCE_VERSION:
    note_v += f" (the pinned reference is {reference.REFERENCE_VERSION})"

  b = BATCH
  nchw = [torch.from_numpy(np.ascontiguousarray(m.transpose(0, 3, 1, 2))) for m in maps_np]
  # v8DetectionLoss's native input: what its Detect head returns in training, built outside the timing.
  boxes = torch.cat([f[:, : 4 * REG_MAX].reshape(b, 4 * REG_MAX, -1) for f in nchw], -1).contiguous()
  scores = torch.cat([f[:, 4 * REG_MAX :].reshape(b, NUM_CLASSES, -1) for f in nchw], -1).contiguous()
  boxes.requires_grad_(True)
  scores.requires_grad_(True)
  feats_meta = [f[:1, :1] for f in nchw]  # only their spatial shapes are read (anchors)
  model = reference._Model(NUM_CLASSES, REG_MAX, list(STRIDES), dict(box=7.5, cls=0.5, dfl=1.5), None)
  crit = v8DetectionLoss(model, tal_topk=10)
  crit.assigner.stride_val = 0.0  # jaxtal's default min_box_side=0 (the original YOLOv8 in-box test)

  # Assignment inputs: the same predictions jaxtal's assign row uses, computed here in PyTorch.
  with torch.no_grad():
    from ultralytics.utils.tal import make_anchors

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
      total, _ = crit(preds, batch)
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
      e2e_crit.o2m, e2e_crit.o2o = 0.5, 0.5  # the weight jaxtal's row uses
      boxes_o2o = (boxes.detach() * 0.5).requires_grad_(True)
      scores_o2o = (scores.detach() * 0.5).requires_grad_(True)
      e2e_preds = {"one2many": preds, "one2one": {"boxes": boxes_o2o, "scores": scores_o2o, "feats": feats_meta}}

      def e2e_run():
        boxes.grad = scores.grad = boxes_o2o.grad = scores_o2o.grad = None
        total, _ = e2e_crit(e2e_preds, batch)
        total.sum().backward()

      times = time_runs(e2e_run, args.warmup, args.repeats)
      ms = median_ms(times)
      table.add("Ultralytics E2ELoss fwd+bwd", m, ms, "ms", len(times), note_v)
      ratio = paired_ratio(e2e_run, jaxtal_runs[("e2e", m)], args.repeats)
      table.add("ratio Ultralytics / jaxtal end-to-end, paired", m, ratio, "x", args.repeats, "target >= 2.5")

    gt_labels = rows[:, 1].reshape(b, m, 1)
    gt_boxes = torch.from_numpy(
        np.concatenate(
            [(rows_by_m[m][:, 2:4] - rows_by_m[m][:, 4:6] / 2), (rows_by_m[m][:, 2:4] + rows_by_m[m][:, 4:6] / 2)], axis=1
        ).astype(np.float32)
        * IMAGE_SIZE
    ).reshape(b, m, 4)
    mask = torch.ones(b, m, 1, dtype=torch.bool)

    def assign_run():
      with torch.no_grad():
        assigner(pred_scores, pred_boxes, anchor_px, gt_labels, gt_boxes, mask)

    times = time_runs(assign_run, args.warmup, args.repeats)
    ms = median_ms(times)
    table.add("Ultralytics TaskAlignedAssigner", m, ms, "ms", len(times))
    table.add("ratio Ultralytics / jaxtal assign", m, ms / jaxtal_ms[("assign", m)], "x", note="of the two medians")
    ratio = paired_ratio(assign_run, jaxtal_runs[("assign", m)], args.repeats)
    table.add("ratio Ultralytics / jaxtal assign, paired", m, ratio, "x", args.repeats, "median of alternating pairs")


# ---------------------------------------------------------------------------------------------
# Oriented boxes (jaxtal.obb_loss and Ultralytics' v8OBBLoss)
# ---------------------------------------------------------------------------------------------

OBB_BATCH = 16
OBB_NUM_CLASSES = 15  # DOTA
OBB_IMAGE_SIZE = 1024
OBB_BOX_COUNTS = (50, 200)


def make_obb_inputs(seed: int = SEED):
  """NHWC head maps ``(b, 1024/s, 1024/s, 4R + 15)``, angle maps ``(b, 1024/s, 1024/s, 1)`` in the
  head's range ``[-pi/4, 3pi/4]``, float32; box-bin logits N(0, 1), class logits N(-4, 1)."""
  rng = np.random.default_rng(seed)
  maps, angles = [], []
  for s in STRIDES:
    h = OBB_IMAGE_SIZE // s
    box = rng.standard_normal((OBB_BATCH, h, h, 4 * REG_MAX), dtype=np.float32)
    cls = rng.standard_normal((OBB_BATCH, h, h, OBB_NUM_CLASSES), dtype=np.float32) - 4.0
    maps.append(np.concatenate([box, cls], axis=-1))
    angles.append(rng.uniform(-np.pi / 4, 3 * np.pi / 4, (OBB_BATCH, h, h, 1)).astype(np.float32))
  return maps, angles


def make_obb_rows(num_boxes: int, seed: int = SEED) -> np.ndarray:
  """``num_boxes`` rotated boxes per image, rows ``[image, cls, cx, cy, w, h, angle]`` (box normalised):
  sides log-uniform in 6 to 400 px, aspect log-uniform in [1/6, 6], angle uniform in [0, pi/2)
  (Ultralytics' range), the box's bounding box inside the image."""
  rng = np.random.default_rng(seed + 1000 * num_boxes + 7)
  n, size = OBB_BATCH * num_boxes, OBB_IMAGE_SIZE
  side = np.exp(rng.uniform(np.log(6.0), np.log(400.0), n))
  aspect = np.exp(rng.uniform(np.log(1 / 6), np.log(6.0), n))
  w, h = np.maximum(side * np.sqrt(aspect), 2.0), np.maximum(side / np.sqrt(aspect), 2.0)
  r = rng.uniform(0, np.pi / 2, n)
  ex = (w * np.abs(np.cos(r)) + h * np.abs(np.sin(r))) / 2
  ey = (w * np.abs(np.sin(r)) + h * np.abs(np.cos(r))) / 2
  cx, cy = rng.uniform(ex, size - ex), rng.uniform(ey, size - ey)
  image = np.repeat(np.arange(OBB_BATCH), num_boxes)
  cls = rng.integers(0, OBB_NUM_CLASSES, n)
  return np.stack([image, cls, cx / size, cy / size, w / size, h / size, r], axis=1).astype(np.float32)


def obb_benchmarks(args, table) -> None:
  """OBB rows: jitted ``jaxtal.obb_loss`` fwd+bwd w.r.t. head and angle maps, b=16, nc=15, input 1024
  (A = 21504), M = 50 and 200; Ultralytics' ``v8OBBLoss`` fwd+bwd on the same numbers and the
  paired ratio. Both use min_box_side 0 (jaxtal's default)."""
  import jax

  import jaxtal

  maps_np, angles_np = make_obb_inputs()
  feats = [jax.device_put(m) for m in maps_np]
  angles = [jax.device_put(a) for a in angles_np]
  cfg = jaxtal.OBBLossConfig(num_classes=OBB_NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX)

  @jax.jit
  def step(feats, angles, gt):
    return jax.value_and_grad(lambda f, a: jaxtal.obb_loss(f, a, gt, cfg)[0], argnums=(0, 1))(feats, angles)

  runs = {}
  for m in OBB_BOX_COUNTS:
    gt = jax.device_put(jaxtal.pack_rotated_labels(make_obb_rows(m), OBB_BATCH, m, OBB_IMAGE_SIZE))
    runs[m] = lambda gt=gt: jax.block_until_ready(step(feats, angles, gt))  # noqa: E731
  reference = None if args.no_ultralytics else import_reference(table, "reference")
  if reference is None:
    compare_rows(args, table, "OBB loss fwd+bwd (b16 nc15 1024px)", "jaxtal.obb_loss", runs)
    return
  import torch
  from ultralytics.utils.loss import v8OBBLoss

  b, r, nc = OBB_BATCH, REG_MAX, OBB_NUM_CLASSES
  # v8OBBLoss's native input: what its OBB head returns in training, built outside the timing.
  preds, leaves = reference_preds(maps_np, nc, extra={"angle": angles_np})
  model = reference._Model(nc, r, list(STRIDES), dict(box=7.5, cls=0.5, dfl=1.5, angle=1.0), None)
  crit = v8OBBLoss(model, tal_topk=10)
  crit.assigner.stride_val = 0.0  # jaxtal's default min_box_side=0
  ref_runs = {}
  for m in OBB_BOX_COUNTS:
    rows = torch.from_numpy(make_obb_rows(m))
    batch = {"batch_idx": rows[:, 0], "cls": rows[:, 1:2], "bboxes": rows[:, 2:7]}
    ref_runs[m] = reference_run(crit, preds, batch, leaves)
  compare_rows(
      args, table, "OBB loss fwd+bwd (b16 nc15 1024px)", "jaxtal.obb_loss", runs,
      "Ultralytics v8OBBLoss fwd+bwd", ref_runs, reference_note(reference), "OBB loss", "target >= 2.5",
  )


# ---------------------------------------------------------------------------------------------
# Shared by the task rows (OBB, pose, segmentation): the reference's inputs and the paired comparison
# ---------------------------------------------------------------------------------------------


def import_reference(table, module: str):
  """``tests/<module>.py`` (a black-box driver of Ultralytics), or None with a row saying why."""
  try:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    driver = __import__(module)
  except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
    table.add(f"Ultralytics ({module})", None, None, "ms", note=f"skipped: cannot import torch/ultralytics ({type(e).__name__}: {e})")
    return None
  torch.set_num_threads(os.cpu_count())
  return driver


def reference_note(driver) -> str:
  import torch

  return f"ultralytics {driver.VERSION}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def reference_preds(maps_np, num_classes: int, extra: dict | None = None, image_size: int | None = None):
  """``(preds, leaves)``: the dict a YOLO head hands its loss in training (``boxes (b, 4R, A)``,
  ``scores (b, nc, A)``, ``feats`` for the anchor shapes, and each ``extra`` name's per-level NHWC maps
  as ``(b, C, A)``; a non-list ``extra`` value, e.g. prototypes, is passed as the NCHW tensor of its NHWC
  array), as leaf tensors built outside the timing, and the leaves to clear between runs."""
  import torch

  b, r = maps_np[0].shape[0], REG_MAX
  nchw = [torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2))) for f in maps_np]
  preds = {
      "boxes": torch.cat([f[:, : 4 * r].reshape(b, 4 * r, -1) for f in nchw], -1).contiguous(),
      "scores": torch.cat([f[:, 4 * r :].reshape(b, num_classes, -1) for f in nchw], -1).contiguous(),
  }
  for name, value in (extra or {}).items():
    if isinstance(value, list):
      preds[name] = torch.cat([torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))).reshape(b, v.shape[-1], -1) for v in value], -1).contiguous()
    else:
      preds[name] = torch.from_numpy(np.ascontiguousarray(value.transpose(0, 3, 1, 2)))
  leaves = [t.requires_grad_(True) for t in preds.values()]
  preds["feats"] = [f[:1, :1] for f in nchw]  # only their spatial shapes are read (anchors)
  return preds, leaves


def reference_run(crit, preds, batch, leaves):
  """A timed call of a reference loss: forward and ``backward()``, gradients cleared first."""

  def run():
    for t in leaves:
      t.grad = None
    total, _ = crit(preds, batch)
    total.sum().backward()

  return run


def compare_rows(args, table, name, note, runs, ref_name=None, ref_runs=None, ref_note="", short="", target=""):
  """Times ``runs[m]`` (jaxtal) and, if given, ``ref_runs[m]`` (Ultralytics) for every ``m``, and the
  paired ratio of the two; returns jaxtal's medians (ms) by ``m``."""
  medians = {}
  for m, run in runs.items():
    times = time_runs(run, args.warmup, args.repeats)
    medians[m] = median_ms(times)
    table.add(name, m, medians[m], "ms", len(times), f"{note}, jit(value_and_grad)")
    if ref_runs is None:
      continue
    times = time_runs(ref_runs[m], args.warmup, args.repeats)
    table.add(ref_name, m, median_ms(times), "ms", len(times), ref_note)
    ratio = paired_ratio(ref_runs[m], run, args.repeats)
    table.add(f"ratio Ultralytics / jaxtal {short}, paired", m, ratio, "x", args.repeats, f"median of alternating pairs; {target}")
  return medians


def memory_row(table, name: str, m, compiled) -> None:
  stats = compiled.memory_analysis()
  table.add(name, m, memory_mib(stats), "MiB", note=f"XLA memory analysis: temp {stats.temp_size_in_bytes / 2**20:.0f} MiB + arguments + outputs")


# ---------------------------------------------------------------------------------------------
# Pose (jaxtal.pose_loss and Ultralytics' v8PoseLoss)
# ---------------------------------------------------------------------------------------------

POSE_NUM_CLASSES = 1  # person
POSE_KPT_SHAPE = (17, 3)  # COCO keypoints
POSE_BOX_COUNTS = (20, 100)  # a few people, a crowd


def make_pose_keypoints(rows: np.ndarray, seed: int = SEED) -> np.ndarray:
  """``(n, 17, 3)`` normalised keypoints: uniform inside each row's box, visibility 0, 1 or 2 (a quarter unlabelled)."""
  rng = np.random.default_rng(seed + 17)
  n, k = rows.shape[0], POSE_KPT_SHAPE[0]
  lo, hi = rows[:, None, 2:4] - rows[:, None, 4:6] / 2, rows[:, None, 2:4] + rows[:, None, 4:6] / 2
  xy = lo + rng.uniform(size=(n, k, 2)) * (hi - lo)
  vis = rng.choice([0.0, 1.0, 2.0], size=(n, k, 1), p=[0.25, 0.25, 0.5])
  return np.concatenate([xy, vis], axis=-1).astype(np.float32)


def pose_benchmarks(args, table) -> None:
  """Pose rows: jitted ``jaxtal.pose_loss`` fwd+bwd w.r.t. head and keypoint maps, b = 16, nc = 1,
  640 px, K = 17, M = 20 and 100; Ultralytics' ``v8PoseLoss`` on the same numbers, paired ratio."""
  import jax

  import jaxtal

  k, d = POSE_KPT_SHAPE
  maps_np = make_head_maps(num_classes=POSE_NUM_CLASSES)
  kpts_np = make_side_maps(k * d, seed=SEED + 3, scale=0.5)
  feats, kpts = [jax.device_put(m) for m in maps_np], [jax.device_put(m) for m in kpts_np]
  cfg = jaxtal.PoseLossConfig(num_classes=POSE_NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX, kpt_shape=POSE_KPT_SHAPE)

  @jax.jit
  def step(feats, kpts, gt):
    return jax.value_and_grad(lambda f, p: jaxtal.pose_loss(f, p, gt, cfg)[0], argnums=(0, 1))(feats, kpts)

  rows_by_m = {m: make_label_rows(m, seed=SEED + 5, num_classes=POSE_NUM_CLASSES) for m in POSE_BOX_COUNTS}
  keypoints_by_m = {m: make_pose_keypoints(rows) for m, rows in rows_by_m.items()}
  runs = {}
  for m in POSE_BOX_COUNTS:
    gt = jax.device_put(jaxtal.pack_labels(rows_by_m[m], BATCH, m, IMAGE_SIZE, keypoints=keypoints_by_m[m]))
    runs[m] = lambda gt=gt: jax.block_until_ready(step(feats, kpts, gt))  # noqa: E731
  name = "pose loss fwd+bwd (b16 nc1 640px K17)"
  reference = None if args.no_ultralytics else import_reference(table, "reference")
  if reference is None:
    compare_rows(args, table, name, "jaxtal.pose_loss", runs)
    return
  import torch
  from ultralytics.utils.loss import v8PoseLoss

  preds, leaves = reference_preds(maps_np, POSE_NUM_CLASSES, extra={"kpts": kpts_np})
  model = reference._Model(POSE_NUM_CLASSES, REG_MAX, list(STRIDES), dict(box=7.5, cls=0.5, dfl=1.5, pose=12.0, kobj=1.0), None)
  model.model[-1].kpt_shape = list(POSE_KPT_SHAPE)
  crit = v8PoseLoss(model, tal_topk=10)
  crit.assigner.stride_val = 0.0  # jaxtal's default min_box_side=0
  ref_runs = {}
  for m in POSE_BOX_COUNTS:
    rows = torch.from_numpy(rows_by_m[m])
    batch = {"batch_idx": rows[:, 0], "cls": rows[:, 1:2], "bboxes": rows[:, 2:6], "keypoints": torch.from_numpy(keypoints_by_m[m])}
    ref_runs[m] = reference_run(crit, preds, batch, leaves)
  compare_rows(args, table, name, "jaxtal.pose_loss", runs, "Ultralytics v8PoseLoss fwd+bwd", ref_runs, reference_note(reference), "pose loss", "target >= 2.5")


# ---------------------------------------------------------------------------------------------
# Instance segmentation (jaxtal.segment_loss and Ultralytics' v8SegmentationLoss)
# ---------------------------------------------------------------------------------------------

SEG_PROTO = (160, 160, 32)  # YOLOv8-seg: input / 4, 32 prototypes
SEG_BOX_COUNTS = (50,)
SEG_MEMORY = (16, 100)  # b, M of the memory bound (2 GB)


def make_index_maps(rows: np.ndarray, batch: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """``(rows, index maps (b, mh, mw))``: the rows sorted largest-area first within each image (as Ultralytics'
  pipeline orders them) and an ellipse filling each box drawn in that order (``jaxtal.pack_masks``)."""
  import jaxtal

  order = np.lexsort((-rows[:, 4] * rows[:, 5], rows[:, 0]))
  rows = rows[order]
  ys, xs = np.mgrid[: size[0], : size[1]] + 0.5
  cx, cy, w, h = (rows[:, i, None, None] * s for i, s in ((2, size[1]), (3, size[0]), (4, size[1]), (5, size[0])))
  masks = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1.0
  return rows, jaxtal.pack_masks(masks, rows[:, 0], batch, int(np.bincount(rows[:, 0].astype(int)).max()))


def segment_benchmarks(args, table) -> None:
  """Segmentation rows: jitted ``jaxtal.segment_loss`` fwd+bwd w.r.t. head, coefficient and prototype
  maps, b = 16, nc = 80, 640 px, 160 x 160 x 32 prototypes, M = 50; Ultralytics' ``v8SegmentationLoss``
  (``overlap_mask=True``) on the same numbers, paired ratio; XLA's memory analysis of the step."""
  import jax

  import jaxtal

  mh, mw, nm = SEG_PROTO
  maps_np = make_head_maps()
  coefs_np = make_side_maps(nm, seed=SEED + 7)
  proto_np = np.random.default_rng(SEED + 9).standard_normal((BATCH, mh, mw, nm), dtype=np.float32)
  feats, coefs, proto = [jax.device_put(m) for m in maps_np], [jax.device_put(m) for m in coefs_np], jax.device_put(proto_np)
  cfg = jaxtal.SegmentLossConfig(num_classes=NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX)

  def loss_grad(feats, coefs, proto, gt):
    return jax.value_and_grad(lambda f, c, p: jaxtal.segment_loss(f, c, p, gt, cfg)[0], argnums=(0, 1, 2))(feats, coefs, proto)

  step = jax.jit(loss_grad)
  data = {m: make_index_maps(make_label_rows(m, seed=SEED + 11), BATCH, (mh, mw)) for m in SEG_BOX_COUNTS}
  runs = {}
  for m, (rows, index_maps) in data.items():
    gt = jaxtal.pack_labels(rows, BATCH, m, IMAGE_SIZE)._replace(masks=index_maps)
    gt = jax.device_put(gt)
    memory_row(table, "segment loss step XLA memory", m, step.lower(feats, coefs, proto, gt).compile())
    runs[m] = lambda gt=gt: jax.block_until_ready(step(feats, coefs, proto, gt))  # noqa: E731
  b_mem, m_mem = SEG_MEMORY
  shape = lambda *s, dt=np.float32: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
  abstract = (
      [shape(b_mem, IMAGE_SIZE // s, IMAGE_SIZE // s, 4 * REG_MAX + NUM_CLASSES) for s in STRIDES],
      [shape(b_mem, IMAGE_SIZE // s, IMAGE_SIZE // s, nm) for s in STRIDES],
      shape(b_mem, mh, mw, nm),
      jaxtal.GroundTruth(shape(b_mem, m_mem, dt=np.int32), shape(b_mem, m_mem, 4), shape(b_mem, m_mem, dt=bool), masks=shape(b_mem, mh, mw, dt=np.int32)),
  )
  memory_row(table, f"segment loss step XLA memory, b{b_mem}", m_mem, jax.jit(loss_grad).lower(*abstract).compile())
  name = "segment loss fwd+bwd (b16 nc80 640px 160x160x32)"
  reference = None if args.no_ultralytics else import_reference(table, "reference")
  if reference is None:
    medians = compare_rows(args, table, name, "jaxtal.segment_loss", runs)
    segment_ablation_rows(args, table, loss_grad, feats, coefs, proto, data, medians)
    return
  import torch
  from ultralytics.utils.loss import v8SegmentationLoss

  preds, leaves = reference_preds(maps_np, NUM_CLASSES, extra={"mask_coefficient": coefs_np, "proto": proto_np})
  model = reference._Model(NUM_CLASSES, REG_MAX, list(STRIDES), dict(box=7.5, cls=0.5, dfl=1.5, overlap_mask=True), None)
  crit = v8SegmentationLoss(model, tal_topk=10)
  crit.assigner.stride_val = 0.0  # jaxtal's default min_box_side=0
  ref_runs = {}
  for m, (rows, index_maps) in data.items():
    t = torch.from_numpy(rows)
    batch = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:6], "masks": torch.from_numpy(index_maps)}
    ref_runs[m] = reference_run(crit, preds, batch, leaves)
  medians = compare_rows(
      args, table, name, "jaxtal.segment_loss", runs, "Ultralytics v8SegmentationLoss fwd+bwd", ref_runs,
      reference_note(reference), "segment loss", "target >= 3",
  )
  segment_ablation_rows(args, table, loss_grad, feats, coefs, proto, data, medians)


def segment_ablation_rows(args, table, loss_grad, feats, coefs, proto, data, medians) -> None:
  """The segmentation step with each task kernel (``jaxtal.kernels.TASK_KERNELS``) replaced by its plain twin."""
  import jax

  import jaxtal

  for kernel in (k for k, task in jaxtal.kernels.TASK_KERNELS.items() if task == "segment_loss"):
    for m, (rows, index_maps) in data.items():
      gt = jax.device_put(jaxtal.pack_labels(rows, BATCH, m, IMAGE_SIZE)._replace(masks=index_maps))
      with jaxtal.kernels._plain(kernel):
        step = jax.jit(lambda *a: loss_grad(*a)).lower(feats, coefs, proto, gt).compile()
      times = time_runs(lambda: jax.block_until_ready(step(feats, coefs, proto, gt)), args.warmup, args.repeats)  # noqa: B023
      plain = median_ms(times)
      saving = 100 * (plain - medians[m]) / plain
      table.add(f"segment loss fwd+bwd, plain {kernel}", m, plain, "ms", len(times), f"kernel saves {saving:.0f}% of the step")


# ---------------------------------------------------------------------------------------------
# KerasCV (separate virtual environment, JAX backend)
# ---------------------------------------------------------------------------------------------

KERASCV_HINT = (
    "python -m venv --system-site-packages /tmp/kcv && /tmp/kcv/bin/pip install 'keras-cv==0.9.*' 'keras>=3'"
    " tensorflow-cpu  (KerasCV imports TensorFlow even on the JAX backend)"
)


def kerascv_inputs(path: pathlib.Path, maps_np, rows_by_m, box_counts) -> None:
  """Writes the assignment inputs (the same predictions as jaxtal's assign row) for the KerasCV worker."""
  import jax

  import jaxtal

  feats = [jax.numpy.asarray(m) for m in maps_np]
  anchors, anchor_strides = jaxtal.make_anchors([m.shape[1:3] for m in maps_np], STRIDES)
  pred_dist, pred_logits = jaxtal.flatten_head(feats, NUM_CLASSES, REG_MAX)
  data = dict(
      scores=np.asarray(jax.nn.sigmoid(pred_logits)),
      boxes=np.asarray(jaxtal.decode_boxes(pred_dist, anchors, REG_MAX) * anchor_strides),
      anchors=np.asarray(anchors * anchor_strides),
      box_counts=np.array(box_counts),
  )
  for m in box_counts:
    gt = jaxtal.pack_labels(rows_by_m[m], BATCH, m, (IMAGE_SIZE, IMAGE_SIZE))
    data[f"labels{m}"], data[f"gt_boxes{m}"], data[f"mask{m}"] = gt.labels, gt.boxes, gt.mask
  np.savez(path, **data)


def kerascv_worker(path: str, warmup: int, repeats: int) -> None:
  """Runs inside the KerasCV environment (KERAS_BACKEND=jax); prints one JSON line of results."""
  import jax
  import jax.numpy as jnp
  import keras
  import keras_cv
  from keras_cv.src.models.object_detection.yolo_v8.yolo_v8_label_encoder import YOLOV8LabelEncoder

  if keras.backend.backend() != "jax":
    raise SystemExit(f"KerasCV worker: Keras backend is {keras.backend.backend()!r}, expected 'jax' (KERAS_BACKEND=jax)")
  data = np.load(path)
  scores, boxes, anchors = (jnp.asarray(data[k]) for k in ("scores", "boxes", "anchors"))
  encoder = YOLOV8LabelEncoder(num_classes=scores.shape[-1], max_anchor_matches=10, alpha=0.5, beta=6.0, epsilon=1e-9)
  encode = jax.jit(lambda s, b, a, labels, gt_boxes, mask: encoder(s, b, a, labels, gt_boxes, mask))
  out = dict(versions=f"keras-cv {keras_cv.__version__}, keras {keras.__version__}, jax {jax.__version__}", rows=[])
  for m in data["box_counts"].tolist():
    labels = jnp.asarray(data[f"labels{m}"])
    gt_boxes = jnp.asarray(data[f"gt_boxes{m}"])
    mask = jnp.asarray(data[f"mask{m}"])[..., None]  # KerasCV broadcasts a (b, M, 1) mask over anchors
    args = (scores, boxes, anchors, labels, gt_boxes, mask)
    times = time_runs(lambda: jax.block_until_ready(encode(*args)), warmup, repeats)
    out["rows"].append(dict(M=m, median_ms=median_ms(times), runs=len(times)))
  print("KERASCV_RESULT " + json.dumps(out), flush=True)


def kerascv_benchmarks(args, table: Table, maps_np, rows_by_m, jaxtal_ms: dict) -> None:
  """Row 6: KerasCV's YOLOV8LabelEncoder in its own environment, or why it could not run."""
  python = pathlib.Path(args.kerascv_python)
  if not python.exists():
    table.add("KerasCV YOLOV8LabelEncoder", None, None, "ms", note=f"skipped: {python} not found; to set up: {KERASCV_HINT}")
    return
  with tempfile.TemporaryDirectory() as tmp:
    inputs = pathlib.Path(tmp) / "kerascv_inputs.npz"
    kerascv_inputs(inputs, maps_np, rows_by_m, args.box_counts)
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [
        str(python), str(pathlib.Path(__file__).resolve()), "--kerascv-worker", str(inputs),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
    ]  # fmt: skip
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.kerascv_timeout)
    except subprocess.TimeoutExpired:
      table.add("KerasCV YOLOV8LabelEncoder", None, None, "ms", note=f"failed: timed out after {args.kerascv_timeout} s")
      return
  lines = [line for line in proc.stdout.splitlines() if line.startswith("KERASCV_RESULT ")]
  if proc.returncode != 0 or not lines:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    table.add("KerasCV YOLOV8LabelEncoder", None, None, "ms", note=f"failed (rc {proc.returncode}): {last[:150]}")
    return
  result = json.loads(lines[-1][len("KERASCV_RESULT ") :])
  for row in result["rows"]:
    m = row["M"]
    table.add("KerasCV YOLOV8LabelEncoder (jax)", m, row["median_ms"], "ms", row["runs"], result["versions"])
    table.add("ratio KerasCV / jaxtal assign", m, row["median_ms"] / jaxtal_ms[("assign", m)], "x")


# ---------------------------------------------------------------------------------------------


def environment() -> dict:
  import jax

  import jaxtal

  info = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      python=platform.python_version(),
      platform=platform.platform(),
      cpu_count=os.cpu_count(),
      jax=jax.__version__,
      jax_backend=jax.default_backend(),
      jax_devices=[str(d) for d in jax.devices()],
      jaxtal=jaxtal.__version__,
  )
  try:
    import torch
    import ultralytics

    info.update(torch=torch.__version__, ultralytics=ultralytics.__version__)
  except Exception:  # noqa: BLE001
    pass
  return info


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up and 3 timed runs per row")
  parser.add_argument("--json", metavar="FILE", help="write the rows and the environment as JSON")
  parser.add_argument("--warmup", type=int, default=None, help="untimed runs per row (default 2, --quick 1)")
  parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 10, --quick 3)")
  parser.add_argument("--box-counts", type=int, nargs="+", default=list(BOX_COUNTS), help="M values of rows 1-4, 6")
  parser.add_argument("--memory-box-counts", type=int, nargs="+", default=list(MEMORY_BOX_COUNTS))
  parser.add_argument("--e2e-box-counts", type=int, nargs="*", default=[50], help="M values of the end-to-end rows")
  parser.add_argument("--ablation-box-counts", type=int, nargs="*", default=[50], help="M values of the kernel ablation rows")
  parser.add_argument("--no-ultralytics", action="store_true", help="skip the Ultralytics rows")
  parser.add_argument("--no-obb", action="store_true", help="skip the oriented-box rows")
  parser.add_argument("--no-pose", action="store_true", help="skip the pose rows")
  parser.add_argument("--no-segment", action="store_true", help="skip the instance-segmentation rows")
  parser.add_argument("--tasks-only", action="store_true", help="only the OBB, pose and segmentation rows")
  parser.add_argument("--kerascv-python", default="/tmp/kcv/bin/python", help="Python of an env with keras-cv")
  parser.add_argument("--kerascv-timeout", type=int, default=1800, help="seconds")
  parser.add_argument("--kerascv-worker", metavar="NPZ", help=argparse.SUPPRESS)
  parser.add_argument(
      "--allocator", choices=("tcmalloc", "system"), default="tcmalloc",
      help="run under tcmalloc when it is installed (default; JAX's advice for CPU), or the system malloc",
  )
  args = parser.parse_args(argv)
  if args.warmup is None:
    args.warmup = 1 if args.quick else 2
  if args.repeats is None:
    args.repeats = 3 if args.quick else 10
  return args


TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")


def maybe_reexec_with_tcmalloc(args) -> None:
  """Restarts this process with tcmalloc preloaded (both frameworks then share it).

  glibc hands out allocations above 32 MiB with fresh mmap pages every time, so each step of a
  program whose buffers are that large pays page faults on every touch (about 20 ms for one
  56 MiB output here, against 3 ms under tcmalloc). JAX recommends tcmalloc on CPU; PyTorch
  benefits the same way. Debian: ``apt-get install libtcmalloc-minimal4``.
  """
  if args.allocator != "tcmalloc" or args.kerascv_worker or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
    return
  lib = next((p for p in TCMALLOC if os.path.exists(p)), None)
  if lib is None:
    print("tcmalloc not found: timing with the system allocator (apt-get install libtcmalloc-minimal4)")
    return
  env = dict(os.environ, LD_PRELOAD=lib)
  os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if argv is None:
    maybe_reexec_with_tcmalloc(args)
  if args.kerascv_worker:
    kerascv_worker(args.kerascv_worker, args.warmup, args.repeats)
    return []
  env = environment()
  print(
      f"jaxtal benchmarks {env['date']}: jax {env['jax']} on {env['jax_backend']} ({len(env['jax_devices'])} device(s)),"
      f" {env['cpu_count']} CPUs, python {env['python']}; medians of {args.repeats} runs after {args.warmup} warm-up"
      + (" [--quick]" if args.quick else "")
      + f"; allocator: {'tcmalloc' if 'tcmalloc' in os.environ.get('LD_PRELOAD', '') else 'system malloc'}"
  )
  start = time.perf_counter()
  maps_np = make_head_maps()
  rows_by_m = {m: make_label_rows(m) for m in args.box_counts}
  table = Table()
  if not args.tasks_only:
    jaxtal_ms, jaxtal_runs = jaxtal_benchmarks(args, table, maps_np, rows_by_m)
    memory_benchmarks(args, table)
    if not args.no_ultralytics:
      ultralytics_benchmarks(args, table, maps_np, rows_by_m, jaxtal_ms, jaxtal_runs)
  if not args.no_obb:
    obb_benchmarks(args, table)
  if not args.no_pose:
    pose_benchmarks(args, table)
  if not args.no_segment:
    segment_benchmarks(args, table)
  if not args.tasks_only:
    kerascv_benchmarks(args, table, maps_np, rows_by_m, jaxtal_ms)
  print(f"total wall time {time.perf_counter() - start:.0f} s")
  if args.json:
    pathlib.Path(args.json).write_text(
        json.dumps(dict(environment=env, quick=args.quick, warmup=args.warmup, repeats=args.repeats, rows=table.rows), indent=2)
    )
    print(f"wrote {args.json}")
  return table.rows


if __name__ == "__main__":
  main()
