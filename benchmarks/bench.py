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
   and 100, against ``v8PoseLoss``, and ``jaxtal.pose26_loss`` (also w.r.t. the sigma maps and the
   flow) on the same workload against ``PoseLoss26`` (``--no-pose26`` skips it); segmentation: ``jaxtal.segment_loss`` w.r.t. head,
   coefficient and prototype maps at b=16, nc=80, 640 px, 160x160x32 prototypes, M = 50, against
   ``v8SegmentationLoss``, and XLA's memory analysis of that step (and of b=16, M=100);
9. kernel ablation (``--ablation-box-counts``, default M = 50): the loss step (and for ``top_k``
   the assignment) with one ``jaxtal.kernels`` trick replaced by its plain twin (the config's
   ``plain_kernels`` field); a trick stays only while it saves at least 5% of the step.
10. crowded scenes (``--crowded-box-counts``, default M = 1000 and 3000; none to skip): b = 4,
   640 px, nc 80, boxes of 4-64 px: ``task_aligned_assign`` with the anchors' grid (the windowed
   pass) against ``TaskAlignedAssigner`` and the detection loss step against ``v8DetectionLoss``
   (paired ratios), each also with the ``windows`` kernel plain (dense), and the assignment's XLA
   memory.

Layout: ``timing.py`` (shared inputs, timing and pairing, the table, memory rows, the Ultralytics
driver helpers, environment, tcmalloc), one module per workload family (``detection.py``: rows 1-5
and 7; ``obb.py``, ``pose.py``, ``segment.py``: row 8; ``kerascv.py``: row 6 and its worker;
``ablation.py``: row 9; ``crowded.py``: row 10), and this runner.

Times are medians over ``--repeats`` timed runs after ``--warmup`` untimed ones, each run
ending in ``block_until_ready`` (JAX) or after ``backward()`` returns (PyTorch, CPU).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import crowded
import detection
import kerascv
import obb
import pose
import segment
import timing

BOX_COUNTS = (8, 50, 200)
MEMORY_BOX_COUNTS = (50, 500, 1000)


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
  parser.add_argument(
      "--crowded-box-counts", type=int, nargs="*", default=list(crowded.CROWDED_BOX_COUNTS),
      help="M values of the crowded-scene rows (b=4, boxes of 4-64 px); none to skip them",
  )  # fmt: skip
  parser.add_argument("--no-ultralytics", action="store_true", help="skip the Ultralytics rows")
  parser.add_argument("--no-obb", action="store_true", help="skip the oriented-box rows")
  parser.add_argument("--no-pose", action="store_true", help="skip the pose rows (YOLOv8 and YOLO26)")
  parser.add_argument("--no-pose26", action="store_true", help="skip the YOLO26 pose rows")
  parser.add_argument("--no-segment", action="store_true", help="skip the instance-segmentation rows")
  parser.add_argument("--no-segment26", action="store_true", help="skip the YOLO26 segmentation rows")
  parser.add_argument("--segment26-only", action="store_true", help="of the segmentation rows, only YOLO26's")
  parser.add_argument("--tasks-only", action="store_true", help="only the OBB, pose and segmentation rows")
  parser.add_argument("--kerascv-python", default="/tmp/kcv/bin/python", help="Python of an env with keras-cv")
  parser.add_argument("--kerascv-timeout", type=int, default=1800, help="seconds")
  parser.add_argument(
      "--allocator", choices=("tcmalloc", "system"), default="tcmalloc",
      help="run under tcmalloc when it is installed (default; JAX's advice for CPU), or the system malloc",
  )  # fmt: skip
  args = parser.parse_args(argv)
  if args.warmup is None:
    args.warmup = 1 if args.quick else 2
  if args.repeats is None:
    args.repeats = 3 if args.quick else 10
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if argv is None:
    timing.maybe_reexec_with_tcmalloc(args)
  env = timing.environment()
  print(
      f"jaxtal benchmarks {env['date']}: jax {env['jax']} on {env['jax_backend']} ({len(env['jax_devices'])} device(s)),"
      f" {env['cpu_count']} CPUs, python {env['python']}; medians of {args.repeats} runs after {args.warmup} warm-up"
      + (" [--quick]" if args.quick else "")
      + f"; allocator: {timing.allocator()}"
  )
  start = time.perf_counter()
  maps_np = timing.make_head_maps()
  rows_by_m = {m: timing.make_label_rows(m) for m in args.box_counts}
  table = timing.Table()
  if not args.tasks_only:
    jaxtal_ms, jaxtal_runs = detection.jaxtal_rows(args, table, maps_np, rows_by_m)
    detection.memory_rows(args, table)
    if not args.no_ultralytics:
      detection.ultralytics_rows(args, table, maps_np, rows_by_m, jaxtal_ms, jaxtal_runs)
    if args.crowded_box_counts:
      crowded.rows(args, table)
  if not args.no_obb:
    obb.rows(args, table)
  if not args.no_pose:
    pose.rows(args, table)
    if not args.no_pose26:
      pose.rows26(args, table)
  if not args.no_segment:
    segment.rows(args, table)
  if not args.tasks_only:
    kerascv.rows(args, table, maps_np, rows_by_m, jaxtal_ms)
  print(f"total wall time {time.perf_counter() - start:.0f} s")
  if args.json:
    pathlib.Path(args.json).write_text(
        json.dumps(dict(environment=env, quick=args.quick, warmup=args.warmup, repeats=args.repeats, rows=table.rows), indent=2)
    )
    print(f"wrote {args.json}")
  return table.rows


if __name__ == "__main__":
  main()
