"""Oriented-box rows: jitted ``jaxtal.obb_loss`` fwd+bwd w.r.t. head and angle maps, b = 16, nc = 15 (DOTA),
1024 px input (A = 21504), M = 50 and 200; Ultralytics' ``v8OBBLoss`` fwd+bwd on the same numbers and the
paired ratio. Both use min_box_side 0 (the original YOLOv8 rule)."""

from __future__ import annotations

import jax
import numpy as np

import jaxtal
import timing
from timing import REG_MAX, SEED, STRIDES

OBB_BATCH = 16
OBB_NUM_CLASSES = 15  # DOTA
OBB_IMAGE_SIZE = 1024
OBB_BOX_COUNTS = (50, 200)
NAME = "OBB loss fwd+bwd (b16 nc15 1024px)"


def loss_total(feats, angles, gt, cfg):
  """jaxtal's OBB loss total: the one call of it in this file."""
  return jaxtal.obb_loss(jaxtal.Predictions(feats, angles=angles), gt, cfg)[0]


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


def rows(args, table) -> None:
  maps_np, angles_np = make_obb_inputs()
  feats = [jax.device_put(m) for m in maps_np]
  angles = [jax.device_put(a) for a in angles_np]
  cfg = jaxtal.OBBLossConfig(num_classes=OBB_NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX, min_box_side=0.0)

  @jax.jit
  def step(feats, angles, gt):
    return jax.value_and_grad(lambda f, a: loss_total(f, a, gt, cfg), argnums=(0, 1))(feats, angles)

  runs = {}
  for m in OBB_BOX_COUNTS:
    gt = jax.device_put(jaxtal.pack_rotated_labels(make_obb_rows(m), OBB_BATCH, m, OBB_IMAGE_SIZE))
    runs[m] = lambda gt=gt: jax.block_until_ready(step(feats, angles, gt))  # noqa: E731
  reference = None if args.no_ultralytics else timing.import_reference(table)
  if reference is None:
    timing.compare_rows(args, table, NAME, "jaxtal.obb_loss", runs)
    return
  import torch
  from ultralytics.utils.loss import v8OBBLoss

  # v8OBBLoss's native input: what its OBB head returns in training, built outside the timing.
  preds, leaves = timing.reference_preds(maps_np, OBB_NUM_CLASSES, extra={"angle": angles_np})
  model = reference.Model(OBB_NUM_CLASSES, REG_MAX, list(STRIDES), dict(box=7.5, cls=0.5, dfl=1.5, angle=1.0), None)
  crit = v8OBBLoss(model, tal_topk=10)
  crit.assigner.stride_val = 0.0  # min_box_side=0 on both sides
  ref_runs = {}
  for m in OBB_BOX_COUNTS:
    t = torch.from_numpy(make_obb_rows(m))
    batch = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:7]}
    ref_runs[m] = timing.reference_run(crit, preds, batch, leaves)
  timing.compare_rows(
      args, table, NAME, "jaxtal.obb_loss", runs,
      "Ultralytics v8OBBLoss fwd+bwd", ref_runs, timing.reference_note(reference), "OBB loss", "target >= 2.5",
  )  # fmt: skip
