"""KerasCV 0.9's ``YOLOV8LabelEncoder`` on the JAX backend, same inputs as jaxtal's assign row.

KerasCV needs Keras 3 and TensorFlow, which are not jaxtal dependencies, so it runs in the Python of a
separate virtual environment (``--kerascv-python``): this file is also that worker's entry point
(``python benchmarks/kerascv.py INPUTS.npz --warmup N --repeats N``, with ``KERAS_BACKEND=jax``). Only
NumPy and ``timing`` are imported at module level; the worker's environment need not have jaxtal.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import tempfile

import numpy as np

from timing import BATCH, IMAGE_SIZE, NUM_CLASSES, REG_MAX, STRIDES, median_ms, time_runs

NAME = "KerasCV YOLOV8LabelEncoder"
HINT = (
    "python -m venv --system-site-packages /tmp/kcv && /tmp/kcv/bin/pip install 'keras-cv==0.9.*' 'keras>=3'"
    " tensorflow-cpu  (KerasCV imports TensorFlow even on the JAX backend)"
)
RESULT = "KERASCV_RESULT "


def write_inputs(path: pathlib.Path, maps_np, rows_by_m, box_counts) -> None:
  """Writes the assignment inputs (the same predictions as jaxtal's assign row) for the worker."""
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


def worker(path: str, warmup: int, repeats: int) -> None:
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
    inputs = (scores, boxes, anchors, labels, gt_boxes, mask)
    times = time_runs(lambda: jax.block_until_ready(encode(*inputs)), warmup, repeats)  # noqa: B023
    out["rows"].append(dict(M=m, median_ms=median_ms(times), runs=len(times)))
  print(RESULT + json.dumps(out), flush=True)


def rows(args, table, maps_np, rows_by_m, jaxtal_ms: dict) -> None:
  """KerasCV's YOLOV8LabelEncoder in its own environment, and its ratio to jaxtal's assign row; or why it
  could not run."""
  python = pathlib.Path(args.kerascv_python)
  if not python.exists():
    table.add(NAME, None, None, "ms", note=f"skipped: {python} not found; to set up: {HINT}")
    return
  with tempfile.TemporaryDirectory() as tmp:
    inputs = pathlib.Path(tmp) / "kerascv_inputs.npz"
    write_inputs(inputs, maps_np, rows_by_m, args.box_counts)
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [str(python), str(pathlib.Path(__file__).resolve()), str(inputs), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.kerascv_timeout)
    except subprocess.TimeoutExpired:
      table.add(NAME, None, None, "ms", note=f"failed: timed out after {args.kerascv_timeout} s")
      return
  lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
  if proc.returncode != 0 or not lines:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    table.add(NAME, None, None, "ms", note=f"failed (rc {proc.returncode}): {last[:150]}")
    return
  result = json.loads(lines[-1][len(RESULT) :])
  for row in result["rows"]:
    m = row["M"]
    table.add(f"{NAME} (jax)", m, row["median_ms"], "ms", row["runs"], result["versions"])
    table.add("ratio KerasCV / jaxtal assign", m, row["median_ms"] / jaxtal_ms[("assign", m)], "x")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description="KerasCV worker of benchmarks/bench.py (run in the KerasCV environment)")
  parser.add_argument("inputs", help="the .npz written by write_inputs")
  parser.add_argument("--warmup", type=int, required=True)
  parser.add_argument("--repeats", type=int, required=True)
  worker_args = parser.parse_args()
  worker(worker_args.inputs, worker_args.warmup, worker_args.repeats)
