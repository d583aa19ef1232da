"""Pose rows: jitted ``jaxtal.pose_loss`` fwd+bwd w.r.t. head and keypoint maps, b = 16, nc = 1, 640 px,
K = 17, M = 20 and 100; Ultralytics' ``v8PoseLoss`` on the same numbers, paired ratio. The YOLO26 rows
(:func:`rows26`): ``jaxtal.pose26_loss`` fwd+bwd w.r.t. head, keypoint and sigma maps and the flow's
parameters on the same workload (plus the sigma maps, and the reference's freshly initialised flow on
both sides), against ``PoseLoss26``."""

from __future__ import annotations

import jax
import numpy as np

import ablation
import jaxtal
import timing
from timing import BATCH, IMAGE_SIZE, REG_MAX, SEED, STRIDES

POSE_NUM_CLASSES = 1  # person
POSE_KPT_SHAPE = (17, 3)  # COCO keypoints
POSE_BOX_COUNTS = (20, 100)  # a few people, a crowd
NAME = "pose loss fwd+bwd (b16 nc1 640px K17)"
NAME26 = "YOLO26 pose loss fwd+bwd (b16 nc1 640px K17)"


def loss_total(feats, keypoints, gt, cfg):
  """jaxtal's pose loss total: the one call of it in this file."""
  return jaxtal.pose_loss(jaxtal.Predictions(feats, keypoints=keypoints), gt, cfg)[0]


def make_pose_keypoints(rows: np.ndarray, seed: int = SEED) -> np.ndarray:
  """``(n, 17, 3)`` normalised keypoints: uniform inside each row's box, visibility 0, 1 or 2 (a quarter unlabelled)."""
  rng = np.random.default_rng(seed + 17)
  n, k = rows.shape[0], POSE_KPT_SHAPE[0]
  lo, hi = rows[:, None, 2:4] - rows[:, None, 4:6] / 2, rows[:, None, 2:4] + rows[:, None, 4:6] / 2
  xy = lo + rng.uniform(size=(n, k, 2)) * (hi - lo)
  vis = rng.choice([0.0, 1.0, 2.0], size=(n, k, 1), p=[0.25, 0.25, 0.5])
  return np.concatenate([xy, vis], axis=-1).astype(np.float32)


def rows(args, table) -> None:
  k, d = POSE_KPT_SHAPE
  maps_np = timing.make_head_maps(num_classes=POSE_NUM_CLASSES)
  kpts_np = timing.make_side_maps(k * d, seed=SEED + 3, scale=0.5)
  feats, kpts = [jax.device_put(m) for m in maps_np], [jax.device_put(m) for m in kpts_np]
  cfg = jaxtal.PoseLossConfig(num_classes=POSE_NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX, kpt_shape=POSE_KPT_SHAPE, min_box_side=0.0)

  @jax.jit
  def step(feats, kpts, gt):
    return jax.value_and_grad(lambda f, p: loss_total(f, p, gt, cfg), argnums=(0, 1))(feats, kpts)

  rows_by_m = {m: timing.make_label_rows(m, seed=SEED + 5, num_classes=POSE_NUM_CLASSES) for m in POSE_BOX_COUNTS}
  keypoints_by_m = {m: make_pose_keypoints(r) for m, r in rows_by_m.items()}
  runs = {}
  for m in POSE_BOX_COUNTS:
    gt = jax.device_put(jaxtal.pack_labels(rows_by_m[m], BATCH, m, IMAGE_SIZE, keypoints=keypoints_by_m[m]))
    runs[m] = lambda gt=gt: jax.block_until_ready(step(feats, kpts, gt))  # noqa: E731
  reference = None if args.no_ultralytics else timing.import_reference(table)
  if reference is None:
    timing.compare_rows(args, table, NAME, "jaxtal.pose_loss", runs)
    return
  from ultralytics.utils.loss import v8PoseLoss

  preds, leaves = timing.reference_preds(maps_np, POSE_NUM_CLASSES, extra={"kpts": kpts_np})
  gains = dict(box=7.5, cls=0.5, dfl=1.5, pose=12.0, kobj=1.0)
  model = reference.Model(POSE_NUM_CLASSES, REG_MAX, list(STRIDES), gains, None)
  model.model[-1].kpt_shape = list(POSE_KPT_SHAPE)
  crit = v8PoseLoss(model, tal_topk=10)
  crit.assigner.stride_val = 0.0  # min_box_side=0 on both sides
  ref_runs = _reference_runs(crit, preds, leaves, rows_by_m, keypoints_by_m)
  timing.compare_rows(
      args, table, NAME, "jaxtal.pose_loss", runs,
      "Ultralytics v8PoseLoss fwd+bwd", ref_runs, timing.reference_note(reference), "pose loss", "target >= 2.5",
  )  # fmt: skip


def rows26(args, table) -> None:
  """The YOLO26 pose rows: ``pose26_loss`` (OKS assignment, RLE term) against ``PoseLoss26``, the v8 rows' workload."""
  k, d = POSE_KPT_SHAPE
  maps_np = timing.make_head_maps(num_classes=POSE_NUM_CLASSES)
  kpts_np = timing.make_side_maps(k * d, seed=SEED + 3, scale=0.5)
  sigmas_np = timing.make_side_maps(2 * k, seed=SEED + 4, scale=0.5)
  feats, kpts, sigmas = ([jax.device_put(m) for m in x] for x in (maps_np, kpts_np, sigmas_np))
  cfg = jaxtal.Pose26LossConfig(num_classes=POSE_NUM_CLASSES, strides=STRIDES, reg_max=REG_MAX, kpt_shape=POSE_KPT_SHAPE, min_box_side=0.0)
  reference = None if args.no_ultralytics else timing.import_reference(table)
  if reference is None:
    flow = jaxtal.init_flow_params(jax.random.key(SEED))
  else:
    import torch
    from ultralytics.nn.modules.block import RealNVP

    torch.manual_seed(SEED)
    flow_model = RealNVP()
    flow = jaxtal.flow_params_from_torch({k_: v.detach().numpy() for k_, v in flow_model.state_dict().items()})

  def make_step26(cfg):
    def step(feats, kpts, sigmas, flow, gt):
      def total(f, p, s, fl):
        return jaxtal.pose26_loss(jaxtal.Predictions(f, keypoints=p, keypoint_sigmas=s), gt, cfg, flow=fl)[0]

      return jax.value_and_grad(total, argnums=(0, 1, 2, 3))(feats, kpts, sigmas, flow)

    return step

  step = jax.jit(make_step26(cfg))

  rows_by_m = {m: timing.make_label_rows(m, seed=SEED + 5, num_classes=POSE_NUM_CLASSES) for m in POSE_BOX_COUNTS}
  keypoints_by_m = {m: make_pose_keypoints(r) for m, r in rows_by_m.items()}
  runs, inputs_by_m = {}, {}
  for m in POSE_BOX_COUNTS:
    gt = jax.device_put(jaxtal.pack_labels(rows_by_m[m], BATCH, m, IMAGE_SIZE, keypoints=keypoints_by_m[m]))
    inputs_by_m[m] = (feats, kpts, sigmas, flow, gt)
    runs[m] = lambda gt=gt: jax.block_until_ready(step(feats, kpts, sigmas, flow, gt))  # noqa: E731
  if reference is None:
    medians = timing.compare_rows(args, table, NAME26, "jaxtal.pose26_loss", runs)
    ablation.task_rows(args, table, "pose26_loss", "YOLO26 pose loss", cfg, make_step26, inputs_by_m, medians)
    return
  from ultralytics.utils.loss import PoseLoss26

  preds, leaves = timing.reference_preds(maps_np, POSE_NUM_CLASSES, extra={"kpts": kpts_np, "kpts_sigma": sigmas_np})
  gains = dict(box=7.5, cls=0.5, dfl=1.5, pose=12.0, kobj=1.0, rle=1.0)
  model = reference.Model(POSE_NUM_CLASSES, REG_MAX, list(STRIDES), gains, None)
  model.model[-1].kpt_shape = list(POSE_KPT_SHAPE)
  model.model[-1].flow_model = flow_model
  crit = PoseLoss26(model, tal_topk=10)
  crit.assigner.stride_val = 0.0  # min_box_side=0 on both sides
  leaves = leaves + list(flow_model.parameters())  # its gradients are cleared between runs too
  ref_runs = _reference_runs(crit, preds, leaves, rows_by_m, keypoints_by_m)
  medians = timing.compare_rows(
      args, table, NAME26, "jaxtal.pose26_loss", runs,
      "Ultralytics PoseLoss26 fwd+bwd", ref_runs, timing.reference_note(reference), "YOLO26 pose loss", "target >= v8's",
  )  # fmt: skip
  ablation.task_rows(args, table, "pose26_loss", "YOLO26 pose loss", cfg, make_step26, inputs_by_m, medians)


def _reference_runs(crit, preds, leaves, rows_by_m, keypoints_by_m) -> dict:
  """The reference criterion timed at every ``M`` of the pose rows (v8 and YOLO26 alike)."""
  import torch

  runs = {}
  for m in POSE_BOX_COUNTS:
    t = torch.from_numpy(rows_by_m[m])
    batch = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:6], "keypoints": torch.from_numpy(keypoints_by_m[m])}
    runs[m] = timing.reference_run(crit, preds, batch, leaves)
  return runs
