"""What every benchmark family shares: the workload's constants and random inputs, timing and pairing,
the printed table, XLA memory rows, the Ultralytics driver helpers, the environment and the allocator.

Imported as ``import timing`` by the family modules (``python benchmarks/bench.py`` puts this directory
on ``sys.path``). Only NumPy is imported at module level, so the KerasCV worker's environment can use it.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The Ultralytics drivers (``from support import reference``) are test helpers under tests/support/.
if str(ROOT / "tests") not in sys.path:
  sys.path.insert(0, str(ROOT / "tests"))

BATCH = 16
NUM_CLASSES = 80
IMAGE_SIZE = 640
STRIDES = (8, 16, 32)
REG_MAX = 16
SEED = 0


# ---------------------------------------------------------------------------------------------
# Data (NumPy, fixed seeds), shared by the detection, pose, segmentation and KerasCV rows
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


def median_ms(times: list[float]) -> float:
  return float(np.median(times) * 1e3)


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


# ---------------------------------------------------------------------------------------------
# XLA memory analysis
# ---------------------------------------------------------------------------------------------


def memory_mib(stats) -> float:
  """Temp + argument + output bytes of a ``compiled.memory_analysis()``, in MiB."""
  return (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes) / 2**20


def memory_row(table, name: str, m, compiled) -> None:
  stats = compiled.memory_analysis()
  table.add(name, m, memory_mib(stats), "MiB", note=f"XLA memory analysis: temp {stats.temp_size_in_bytes / 2**20:.0f} MiB + arguments + outputs")


# ---------------------------------------------------------------------------------------------
# Ultralytics (PyTorch, CPU) through the tests' black-box drivers (tests/support/)
# ---------------------------------------------------------------------------------------------


def import_reference(table, module: str = "reference"):
  """``support.<module>`` (tests/support/<module>.py, a black-box driver of Ultralytics), or None with a
  row saying why; sets PyTorch to use every core."""
  try:
    import importlib

    import torch

    driver = importlib.import_module(f"support.{module}")
  except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
    table.add(f"Ultralytics ({module})", None, None, "ms", note=f"skipped: cannot import torch/ultralytics ({type(e).__name__}: {e})")
    return None
  torch.set_num_threads(os.cpu_count())
  return driver


def reference_note(driver) -> str:
  import torch

  return f"ultralytics {driver.VERSION}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def reference_preds(maps_np, num_classes: int, extra: dict | None = None):
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


# ---------------------------------------------------------------------------------------------
# Environment and allocator
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


def allocator() -> str:
  return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"


TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")


def maybe_reexec_with_tcmalloc(args) -> None:
  """Restarts this process with tcmalloc preloaded (both frameworks then share it).

  glibc hands out allocations above 32 MiB with fresh mmap pages every time, so each step of a
  program whose buffers are that large pays page faults on every touch (about 20 ms for one
  56 MiB output here, against 3 ms under tcmalloc). JAX recommends tcmalloc on CPU; PyTorch
  benefits the same way. Debian: ``apt-get install libtcmalloc-minimal4``.
  """
  if args.allocator != "tcmalloc" or allocator() == "tcmalloc":
    return
  lib = next((p for p in TCMALLOC if os.path.exists(p)), None)
  if lib is None:
    print("tcmalloc not found: timing with the system allocator (apt-get install libtcmalloc-minimal4)")
    return
  env = dict(os.environ, LD_PRELOAD=lib)
  os.execve(sys.executable, [sys.executable, *sys.argv], env)
