"""YOLO26 pose: the config, the OKS geometry and its level gate, ``pose_task_aligned_assign``, the loss against a
NumPy oracle, the RLE term's rules, robustness, the module and the combinators.

Expectations are computed here in NumPy (float64) from the inputs: the assignment by ``oracles.np_assign_one``
given the OKS pair overlaps and the level gate written out below, the detection terms by
``oracles.np_detection_loss`` on that assignment, ``pose`` and ``kobj`` by ``test_pose.np_pose_terms`` (YOLOv8's
oracle, fed the raw keypoints that its decode turns into YOLO26's: ``2 r' + a - 0.5 = r + a`` for ``r' = (r +
0.5) / 2``), and the RLE term by :func:`np_rle` with the flow's float64 forward (``support.oracles.np_flow_log_prob``).
Parity with Ultralytics is ``test_parity_pose26.py``. The problem is ``pose26_cases``' ``invisible`` case in NHWC
(a 64 x 64 input, levels 8x8, 4x4 and 2x2, A = 84, K = 5, ``reg_max = 1``, GTs without visible keypoints); one
jitted step (:func:`step`) serves every test of the main configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtal
from jaxtal.pose import COCO_SIGMAS, RLE_WEIGHTS_COCO17
from support import pose26_cases
from support.oracles import np_anchors, np_assign_one, np_box_iou, np_detection_loss, np_flat_head, np_flow_log_prob, np_pose_terms, np_sigmoid

TINY = float(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------- problem and oracle


def nhwc(maps):
  return [np.ascontiguousarray(np.asarray(m).transpose(0, 2, 3, 1)) for m in maps]


@functools.cache
def problem():
  """``(feats, kpts, sigmas, gt, flow, cfg)``: the ``invisible`` parity case in NHWC, packed, its config."""
  case = pose26_cases.loss_case("invisible")
  x = case["inputs"]
  kwargs, _ = pose26_cases.split_config(case["config"])
  kwargs.pop("class_weights")
  cfg = jaxtal.Pose26LossConfig(**kwargs)
  flow = jaxtal.FlowParams(**{k: jnp.asarray(v) for k, v in x["flow"].items()})
  gt = jax.tree.map(jnp.asarray, pose26_cases.gt_of(case))
  return nhwc(x["feats"]), nhwc(x["kpts"]), nhwc(x["kpt_sigmas"]), gt, flow, cfg


def np_oks(gt_kpts, gt_boxes, pred_kpts, pred_boxes, sigmas, eps=1e-9):
  """``(M, A)`` OKS of predicted keypoints ``(A, K, 2)`` against each GT's visible ones (visibility > 0, finite,
  within COORD_LIMIT), area = box area * 0.53 (pixels); the box CIoU for a GT with no visible keypoint; 0 for an
  anchor with a non-finite keypoint."""
  g = np.asarray(gt_kpts, np.float64)
  with np.errstate(invalid="ignore"):
    vis = np.isfinite(g[..., :2]).all(-1) & (np.abs(g[..., :2]) <= jaxtal.COORD_LIMIT).all(-1)
    if g.shape[-1] == 3:
      vis &= np.isfinite(g[..., 2]) & (g[..., 2] > 0)
  area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1]) * 0.53
  p = np.asarray(pred_kpts, np.float64)
  finite = np.isfinite(p).all((-2, -1))
  with np.errstate(invalid="ignore", over="ignore"):
    d = ((p[None] - np.where(vis[..., None], g[..., :2], 0)[:, None]) ** 2).sum(-1)  # (M, A, K)
    e = np.exp(-d / ((2 * np.asarray(sigmas)) ** 2 * (area[:, None, None] + eps) * 2))
  oks = np.where(vis[:, None], e, 0).sum(-1) / np.maximum(vis.sum(-1), 1)[:, None]
  oks = np.where(finite[None], oks, 0.0)
  return np.where(vis.any(-1)[:, None], oks, np_box_iou(gt_boxes[:, None], pred_boxes[None], "ciou"))


def np_gate(gt_boxes, anchor_strides, level_range=(2.0, 12.0)):
  """``(M, A)``: ``lo s <= sqrt(box area) <= hi s``, the finest level open below, the coarsest above."""
  side = np.sqrt(np.maximum((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1]), 0))[:, None]
  s = np.asarray(anchor_strides, np.float64)[None]
  lo, hi = level_range
  return ((side >= lo * s) | (s == s.min())) & ((side <= hi * s) | (s == s.max()))


def np_decoded(feats, kpts, cfg):
  """Float64 decode: ``(scores (b, A, nc), boxes px (b, A, 4), raw keypoints (b, A, K, D), anchors (A, 2) grid,
  strides (A, 1))``."""
  dist, logits = np_flat_head(feats, cfg.num_classes, cfg.reg_max)
  shapes = [f.shape[1:3] for f in feats]
  anchors, stride = np_anchors(shapes, cfg.strides)
  assert cfg.reg_max == 1
  boxes = np.concatenate([anchors - dist[..., :2], anchors + dist[..., 2:]], -1) * stride
  k, d = cfg.kpt_shape
  raw = np.concatenate([np.asarray(m, np.float64).reshape(m.shape[0], -1, k * d) for m in kpts], 1).reshape(len(boxes), -1, k, d)
  return np_sigmoid(logits), boxes, raw, anchors, stride


def np_targets(feats, kpts, gt, cfg):
  """The YOLO26 pose assignment of every image (``np_assign_one`` with :func:`np_oks` and :func:`np_gate`)."""
  scores, boxes, raw, anchors, stride = np_decoded(feats, kpts, cfg)
  pred_px = (raw[..., :2] + anchors[:, None]) * stride[:, None]
  image = feats[0].shape[1] * cfg.strides[0]
  out = []
  for i in range(len(boxes)):
    gb = np.asarray(gt.boxes[i], np.float64)
    out.append(np_assign_one(
        scores[i], boxes[i], anchors * stride, np.asarray(gt.labels[i]), gb, np.asarray(gt.mask[i]), topk=cfg.topk,
        topk2=cfg.topk2, min_box_side=cfg.side_floor, image_hw=(image, image),
        pair_overlap=np_oks(gt.keypoints[i], gb, pred_px[i], boxes[i], cfg.sigmas), gate=np_gate(gb, stride[:, 0], cfg.level_range),
    ))
  return {k: np.stack([o[k] for o in out]) for k in ("scores", "boxes", "fg_mask", "gt_index")}


def np_rle(raw, sigma_logits, gt_keypoints, targets, anchors, stride, flow, weights):
  """The RLE term before its gain, row by row: labelled keypoints of foreground anchors, non-finite residuals
  dropped, residuals clipped to +-100, ``max(0, sum w (log s + log 2s + |e|) - 2 w log p(e)) / rows)``."""
  gtk = np.asarray(gt_keypoints, np.float64)
  logit = np.concatenate([np.asarray(m, np.float64).reshape(m.shape[0], -1, m.shape[-1]) for m in sigma_logits], 1)
  total, rows = 0.0, 0
  for i, a in zip(*np.nonzero(targets["fg_mask"])):
    g = gtk[i, targets["gt_index"][i, a]]
    for k in range(len(weights)):
      with np.errstate(invalid="ignore"):
        ok = np.isfinite(g[k]).all() and (np.abs(g[k, :2]) <= jaxtal.COORD_LIMIT).all() and (g.shape[-1] == 2 or g[k, 2] != 0)
      if not ok:
        continue
      with np.errstate(over="ignore", invalid="ignore"):
        sigma = np.maximum(1 / (1 + np.exp(-logit[i, a, 2 * k : 2 * k + 2])), TINY)
        e = (raw[i, a, k, :2] + anchors[a] - g[k, :2] / stride[a]) / (sigma + 1e-9)
      if not np.isfinite(e).all():
        continue
      e = np.clip(e, -100, 100)
      log_phi = np_flow_log_prob(flow, e[None].astype(np.float32))[0]
      total += weights[k] * (np.sum(np.log(sigma) + np.log(2 * sigma) + np.abs(e)) - 2 * log_phi)
      rows += 1
  return max(total / rows, 0.0) if rows else 0.0


def np_pose26_loss(feats, kpts, sigmas, gt, flow, cfg):
  """``(total, parts [box, pose, kobj, cls, dfl, rle], targets)`` in float64."""
  targets = np_targets(feats, kpts, gt, cfg)
  _, (box, cls, dfl), _ = np_detection_loss(feats, gt, num_classes=cfg.num_classes, strides=cfg.strides,
                                            reg_max=cfg.reg_max, targets=targets)
  k, d = cfg.kpt_shape
  v8 = [np.asarray(m, np.float64).reshape(*m.shape[:3], k, d).copy() for m in kpts]
  for m in v8:
    m[..., :2] = (m[..., :2] + 0.5) / 2  # YOLOv8's decode of these is YOLO26's of the originals
  pose, kobj = np_pose_terms([m.reshape(*m.shape[:3], k * d) for m in v8], gt.keypoints, targets, strides=cfg.strides,
                             kpt_shape=cfg.kpt_shape, sigmas=cfg.sigmas)
  _, _, raw, anchors, stride = np_decoded(feats, kpts, cfg)
  rle = np_rle(raw, sigmas, gt.keypoints, targets, anchors, stride[:, 0], flow, cfg.rle_weights)
  parts = np.array([box, cfg.pose * pose, cfg.kobj * kobj, cls, dfl, cfg.rle * rle])
  return parts.sum() * len(raw), parts, targets


@functools.partial(jax.jit, static_argnames="config")
def step(feats, kpts, sigmas, gt, flow, config):
  """``((total, parts), grads w.r.t. (feats, kpts, sigmas, flow)), targets, module_out``: the one compilation of
  the main configuration (the module holds the same flow)."""
  preds = lambda f, k, s: jaxtal.Predictions(f, keypoints=k, keypoint_sigmas=s)  # noqa: E731
  module_out = jaxtal.Pose26Loss(config, flow=flow)(preds(feats, kpts, sigmas), gt)
  loss = lambda f, k, s, fl: jaxtal.pose26_loss(preds(f, k, s), gt, config, flow=fl)  # noqa: E731
  out = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(feats, kpts, sigmas, flow)
  return out, jaxtal.pose26_targets(preds(feats, kpts, sigmas), gt, config)[1], module_out


def run(feats, kpts, sigmas, gt, flow=None, cfg=None):
  p = problem()
  out = step(feats, kpts, sigmas, gt, p[4] if flow is None else flow, config=p[5] if cfg is None else cfg)
  ((total, parts), grads), targets, module_out = out
  return float(total), np.array([float(v) for v in parts]), jax.tree.map(np.asarray, grads), targets, module_out


def assert_finite(total, parts, grads):
  assert np.isfinite(total) and np.isfinite(parts).all() and (parts >= 0).all(), (total, parts)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_normalisation():
  cfg = jaxtal.Pose26LossConfig(num_classes=1, strides=(8, 16, 32))
  assert isinstance(cfg, jaxtal.PoseLossConfig)
  assert (cfg.rle, cfg.level_range, cfg.pose, cfg.kobj, cfg.kpt_shape) == (1.0, (2.0, 12.0), 12.0, 1.0, (17, 3))
  assert cfg.sigmas == COCO_SIGMAS and cfg.rle_weights == RLE_WEIGHTS_COCO17
  assert cfg.rle_weights[9:11] == (1.5, 1.5) and cfg.rle_weights[7] == 1.2  # wrists, elbows
  other = jaxtal.Pose26LossConfig(num_classes=1, strides=(8,), kpt_shape=(17, 2))
  assert other.rle_weights == (1.0,) * 17 and other.sigmas == (1 / 17,) * 17  # the reference's rule: only (17, 3)
  same = jaxtal.Pose26LossConfig(num_classes=1, strides=[8, 16, 32], rle=1, level_range=[2, 12], rle_weights=list(RLE_WEIGHTS_COCO17))
  assert same == cfg and hash(same) == hash(cfg)
  off = jaxtal.Pose26LossConfig(num_classes=1, strides=(8,), kpt_shape=(2, 3), rle_weights=(0, 2), level_range=(0, np.inf))
  assert off.rle_weights == (0.0, 2.0) and off.level_range == (0.0, float("inf"))
  assert dataclasses.replace(off, kpt_shape=(3, 3), rle_weights=None, sigmas=None).rle_weights == (1.0,) * 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rle=float("nan")), r"rle must be a finite number, got nan"),
        (dict(kpt_shape=(2, 3), rle_weights=(1.0,)), r"rle_weights must be 2 non-negative finite numbers, one per keypoint"),
        (dict(kpt_shape=(2, 3), rle_weights=(1.0, -1.0)), r"rle_weights\[1\] must be a non-negative finite number, got -1"),
        (dict(level_range=(12, 2)), r"level_range must be \(lo, hi\) with 0 <= lo <= hi"),
        (dict(level_range=(-1, 2)), r"level_range must be \(lo, hi\)"),
        (dict(level_range=2), r"level_range must be \(lo, hi\)"),
        (dict(kpt_shape=(2, 3), sigmas=(0.1, 0.0)), r"sigmas\[1\] must be a positive finite number, got 0"),
    ],
)
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jaxtal.Pose26LossConfig(num_classes=1, strides=(8,), **kwargs)


# ----------------------------------------------------------------------------- the geometry


def test_keypoint_oks_geometry_matches_numpy():
  """OKS (visible keypoints only, area * 0.53, the box CIoU without visible keypoints, 0 for a non-finite predicted
  keypoint), the in-box candidate test and the level gate, against NumPy on random pairs (eager)."""
  rng = np.random.default_rng(0)
  m, a, k = 5, 12, 4
  sigmas = (0.05, 0.1, 0.2, 0.4)
  geo = jaxtal.keypoint_oks(sigmas, eps=1e-9)
  assert geo.gate is not None and geo.box_dim == 4 and jaxtal.keypoint_oks(list(sigmas)) is geo  # cached
  ctr = rng.uniform(10, 50, (m, 2))
  wh = rng.uniform(2, 40, (m, 2))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], -1).astype(np.float32)
  kp = np.concatenate([ctr[:, None] + rng.normal(0, 5, (m, k, 2)), rng.choice([0.0, 1.0, 2.0, -1.0], (m, k, 1))], -1)
  kp[1, :, 2] = 0.0  # no visible keypoint: the box CIoU
  kp[2, 0, :2] = np.nan  # visible, but a NaN coordinate: not visible
  kp[3, 1, 0] = 2e7  # beyond COORD_LIMIT: not visible
  anchors = rng.uniform(0, 64, (a, 2)).astype(np.float32)
  pred_boxes = np.concatenate([anchors - 8, anchors + 8], -1).astype(np.float32)
  pred_kp = (anchors[:, None] + rng.normal(0, 6, (a, k, 2))).astype(np.float32)
  pred_kp[4, 2, 1] = np.inf  # every OKS of anchor 4 is 0
  strides = np.array([8.0] * 6 + [16.0] * 4 + [32.0] * 2, np.float32)
  kp[[0, 2, 3, 4], 2, 2] = 2.0  # at least one visible keypoint on every GT but 1
  kp = kp.astype(np.float32)

  @jax.jit
  def pairs(kp, pred_kp):
    """Every (GT, anchor) pair's overlap, gate and candidate flag."""
    g = geo.gt_data(jnp.asarray(boxes), jnp.ones(m, bool), 0.0, kp)
    p = geo.pred_data(jnp.asarray(pred_boxes), jnp.asarray(anchors), (pred_kp, jnp.asarray(strides)))
    g, p = jax.tree.map(lambda x: x[:, None], g), jax.tree.map(lambda x: x[None], p)
    return geo.overlap(g, p), geo.gate(g, p), geo.candidate(g, p, 1e-9)

  overlap, gate, cand = pairs(kp, pred_kp)
  want = np_oks(kp, boxes.astype(np.float64), pred_kp, pred_boxes.astype(np.float64), sigmas)
  np.testing.assert_allclose(overlap, want, rtol=2e-5, atol=1e-7)
  assert (want[[0, 2, 3, 4], 4] == 0).all() and want[1, 4] != 0  # GT 1's CIoU survives a non-finite keypoint
  np.testing.assert_array_equal(gate, np_gate(boxes.astype(np.float64), strides))
  inside = (anchors[None] > boxes[:, None, :2]).all(-1) & (anchors[None] < boxes[:, None, 2:]).all(-1)
  np.testing.assert_array_equal(cand, inside)
  # Two-value GT keypoints are all visible.
  ones = np.concatenate([kp[..., :2], np.ones_like(kp[..., 2:])], -1)
  np.testing.assert_allclose(pairs(np.ascontiguousarray(kp[..., :2]), pred_kp)[0],
                             np_oks(ones, boxes.astype(np.float64), pred_kp, pred_boxes.astype(np.float64), sigmas), rtol=2e-5, atol=1e-7)
  with pytest.raises(ValueError, match=r"keypoint_oks: sigmas must be positive finite numbers"):
    jaxtal.keypoint_oks((0.1, 0.0))
  with pytest.raises(ValueError, match=r"level_range must be \(lo, hi\)"):
    jaxtal.keypoint_oks((0.1,), level_range=(3, 1))


def test_pose_task_aligned_assign_matches_numpy_and_its_errors():
  """The standalone assigner against ``np_assign_one`` with the OKS overlaps and the gate (on the decoded predictions
  of the main problem), and its trace-time errors."""
  feats, kpts, _, gt, _, cfg = problem()
  scores, boxes, raw, anchors, stride = np_decoded(feats, kpts, cfg)
  pred_px = ((raw[..., :2] + anchors[:, None]) * stride[:, None]).astype(np.float32)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  args = (f32(scores), f32(boxes), pred_px, f32(anchors * stride), f32(stride[:, 0]), gt)
  got = jax.jit(functools.partial(jaxtal.pose_task_aligned_assign, sigmas=cfg.sigmas))(*args)
  for i in range(len(boxes)):
    gb = np.asarray(gt.boxes[i], np.float64)
    want = np_assign_one(scores[i], boxes[i], anchors * stride, np.asarray(gt.labels[i]), gb, np.asarray(gt.mask[i]),
                         pair_overlap=np_oks(gt.keypoints[i], gb, pred_px[i], boxes[i], cfg.sigmas), gate=np_gate(gb, stride[:, 0]))
    np.testing.assert_array_equal(got.fg_mask[i], want["fg_mask"])
    np.testing.assert_array_equal(np.asarray(got.gt_index[i])[want["fg_mask"]], want["gt_index"][want["fg_mask"]])
    np.testing.assert_allclose(got.scores[i], want["scores"], rtol=2e-5, atol=1e-6)
  caller = "pose_task_aligned_assign"
  with pytest.raises(ValueError, match=rf"{caller}: pred_keypoints must be \(b, A, K, 2\) = \(2, 84, 5, 2\)"):
    jaxtal.pose_task_aligned_assign(*args[:2], pred_px[..., :3, :], *args[3:], sigmas=cfg.sigmas)
  with pytest.raises(ValueError, match=rf"{caller}: anchor_strides must be \(A,\) or \(A, 1\) with A = 84"):
    jaxtal.pose_task_aligned_assign(*args[:4], args[4][:10], gt, sigmas=cfg.sigmas)
  with pytest.raises(ValueError, match=rf"{caller}: gt.keypoints is None"):
    jaxtal.pose_task_aligned_assign(*args[:5], gt._replace(keypoints=None), sigmas=cfg.sigmas)
  with pytest.raises(ValueError, match=rf"{caller}: the pose assigner's overlap is OKS"):
    jaxtal.pose_task_aligned_assign(*args, sigmas=cfg.sigmas, overlap="iou")


# ----------------------------------------------------------------------------- the loss against NumPy


@pytest.mark.slow
def test_loss_matches_numpy_oracle_and_the_module():
  feats, kpts, sigmas, gt, flow, cfg = problem()
  total, parts, grads, targets, (m_total, m_parts) = run(feats, kpts, sigmas, gt)
  want_total, want_parts, want_targets = np_pose26_loss(feats, kpts, sigmas, gt, flow, cfg)
  fg = want_targets["fg_mask"]
  np.testing.assert_array_equal(np.asarray(targets.fg_mask), fg)
  assert fg.sum() >= 20 and min(want_parts[[0, 1, 2, 3, 4, 5]]) > 0, want_parts
  np.testing.assert_allclose(parts, want_parts, rtol=5e-5)
  np.testing.assert_allclose(total, want_total, rtol=5e-5)
  np.testing.assert_allclose(total, parts.sum() * 2, rtol=1e-6)
  assert jaxtal.Pose26LossParts._fields == ("box", "pose", "kobj", "cls", "dfl", "rle")
  # Keypoint gradients live on the foreground anchors only (all of them: kobj), sigma gradients on those whose GT
  # has a labelled keypoint; the flow's gradient is non-zero in every field.
  g_feats, g_kpts, g_sig, g_flow = grads
  kpt_rows = np.concatenate([x.reshape(2, -1, 15) for x in g_kpts], 1)
  assert not kpt_rows[~fg].any() and np.abs(kpt_rows[fg]).sum(-1).min() > 0
  labelled = (np.asarray(gt.keypoints)[..., 2] != 0).any(-1)  # (b, M)
  has_rows = fg & np.take_along_axis(labelled, want_targets["gt_index"], 1)
  sig_rows = np.concatenate([x.reshape(2, -1, 10) for x in g_sig], 1)
  assert (fg & ~has_rows).any() and not sig_rows[~has_rows].any() and np.abs(sig_rows[has_rows]).sum(-1).min() > 0
  assert all(np.abs(v).max() > 0 for v in g_flow)
  assert isinstance(m_parts, jaxtal.Pose26LossParts)
  np.testing.assert_allclose(float(m_total), total, rtol=1e-6)
  chex.assert_trees_all_close(np.asarray(m_parts), parts, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_flow_over_kept_rows_equals_the_flow_over_every_row():
  """The RLE term's kernel (kernels.flow_rows; chunking is tested in test_kernels) against its plain twin."""
  feats, kpts, sigmas, gt, flow, cfg = problem()
  kernel = run(feats, kpts, sigmas, gt)
  plain = run(feats, kpts, sigmas, gt, cfg=dataclasses.replace(cfg, plain_kernels=("flow_rows",)))
  assert kernel[1][5] > 0
  np.testing.assert_allclose(kernel[1], plain[1], rtol=2e-6, atol=1e-9)
  for g, p in zip(jax.tree.leaves(kernel[2]), jax.tree.leaves(plain[2])):
    np.testing.assert_allclose(g, p, rtol=1e-5, atol=1e-6 * float(np.abs(p).max()))


def test_rle_rules_non_finite_sigma_logits_and_the_clamp():
  """A NaN sigma logit drops its keypoint's RLE row (the loss equals the oracle without that row; every gradient
  finite, 0 at the NaN); +-inf logits are kept (sigma 1, or the float32 floor with the residual clipped). A negative
  sum is clamped to 0, with no gradient to the sigmas or the flow."""
  feats, kpts, sigmas, gt, flow, cfg = problem()
  _, _, _, targets, _ = run(feats, kpts, sigmas, gt)
  fg = np.argwhere(np.asarray(targets.fg_mask)[:, :64])
  spoiled = [s.copy() for s in sigmas]
  for (i, a), value in zip(fg[::4], [np.nan, np.inf, -np.inf, np.nan, np.nan]):
    spoiled[0].reshape(2, 64, 10)[i, a, [0, 3, 6]] = value
  total, parts, grads, _, _ = run(feats, kpts, spoiled, gt)
  assert_finite(total, parts, grads)
  assert not any(g[np.isnan(s)].any() for g, s in zip(grads[2], spoiled))
  _, want, _ = np_pose26_loss(feats, kpts, spoiled, gt, flow, cfg)
  np.testing.assert_allclose(parts, want, rtol=5e-5)
  assert abs(parts[5] - run(feats, kpts, sigmas, gt)[1][5]) > 1e-3 * parts[5]
  # Keypoints on their GT with small sigmas: the term's sum is negative, so it is 0 (no gradient to sigmas, flow).
  # (Moving keypoints moves the assignment: repeat until the foreground anchors' keypoints sit on their own GT's.)
  _, _, raw, anchors, stride = np_decoded(feats, kpts, cfg)
  gtk = np.asarray(gt.keypoints, np.float64)
  on_gt, t = kpts, np_targets(feats, kpts, gt, cfg)
  for _ in range(4):
    exact = raw.copy()
    for i, a in zip(*np.nonzero(t["fg_mask"])):
      exact[i, a, :, :2] = gtk[i, t["gt_index"][i, a], :, :2] / stride[a] - anchors[a] + 1e-3
    level_rows = np.split(exact.reshape(2, -1, 15), np.cumsum([64, 16]), axis=1)
    on_gt = [r.reshape(2, h, h, 15).astype(np.float32) for r, h in zip(level_rows, (8, 4, 2))]
    t, before = np_targets(feats, on_gt, gt, cfg), t
    if (t["fg_mask"] == before["fg_mask"]).all() and (t["gt_index"] == before["gt_index"]).all():
      break
  small = [np.full_like(s, -6.0) for s in sigmas]
  total, parts, grads, _, _ = run(feats, on_gt, small, gt)
  assert_finite(total, parts, grads)
  assert parts[5] == 0.0 and not any(g.any() for g in grads[2]) and not any(np.asarray(v).any() for v in grads[3])
  _, want, _ = np_pose26_loss(feats, on_gt, small, gt, flow, cfg)
  assert want[5] == 0.0


def test_degenerate_ground_truth_keypoints_are_masked():
  """Unlabelled GT keypoints (visibility 0, NaN, inf, beyond COORD_LIMIT) and padding rows of anything give the same
  loss and gradients as clean ones; the assignment and every term stay finite."""
  feats, kpts, sigmas, gt, _, _ = problem()
  base = run(feats, kpts, sigmas, gt)
  k = np.array(gt.keypoints)
  hidden = k[..., 2] == 0
  assert hidden.any()
  spoiled = k.copy()
  spoiled[hidden, 0] = np.nan
  spoiled[hidden, 1] = 3e7
  spoiled[~np.asarray(gt.mask)] = np.inf
  same = run(feats, kpts, sigmas, gt._replace(keypoints=jnp.asarray(spoiled)))
  assert_finite(*same[:3])
  chex.assert_trees_all_close(same[:3], base[:3], rtol=1e-6, atol=1e-9)
  # A labelled keypoint with a NaN / huge coordinate or a NaN visibility counts as unlabelled everywhere.
  i, j, kk = np.argwhere(~hidden & np.asarray(gt.mask)[..., None])[0]
  hide = k.copy()
  hide[i, j, kk, 2] = 0.0
  want = run(feats, kpts, sigmas, gt._replace(keypoints=jnp.asarray(hide)))
  for where, value in ((0, np.nan), (1, 2.0**21), (2, np.nan), (0, -np.inf)):
    bad = k.copy()
    bad[i, j, kk, where] = value
    chex.assert_trees_all_close(run(feats, kpts, sigmas, gt._replace(keypoints=jnp.asarray(bad)))[:3], want[:3], rtol=1e-6, atol=1e-9)


def test_non_finite_predicted_keypoints():
  """A non-finite predicted keypoint never reaches the assignment (its anchor's OKS is 0) and drops its RLE row; on a
  background anchor nothing changes. In the pose term it is not masked (jaxtal's rule for predictions: a diverging
  model shows as NaN)."""
  feats, kpts, sigmas, gt, _, _ = problem()
  _, parts, grads, targets, _ = run(feats, kpts, sigmas, gt)
  fg = np.asarray(targets.fg_mask)
  listed = np.zeros_like(fg)
  for i in range(2):
    listed[i, np.asarray(targets.entries.anchor[i])] = True
  bg = np.argwhere(~listed[:, :64])[0]
  spoiled = [m.copy() for m in kpts]
  spoiled[0].reshape(2, 64, 5, 3)[bg[0], bg[1], 1, 0] = np.nan
  out = run(feats, spoiled, sigmas, gt)
  np.testing.assert_array_equal(np.asarray(out[3].fg_mask), fg)
  assert_finite(*out[:3])
  chex.assert_trees_all_close(out[1], parts, rtol=1e-6)
  i, a = np.argwhere(fg[:, :64])[0]
  spoiled = [m.copy() for m in kpts]
  spoiled[0].reshape(2, 64, 5, 3)[i, a, 1, 0] = np.inf
  total, p2, g2, t2, _ = run(feats, spoiled, sigmas, gt)
  assert np.isfinite(p2[[0, 3, 4, 5]]).all() and all(np.isfinite(v).all() for v in g2[3])  # box, cls, dfl, rle, flow


def test_validation_errors():
  feats, kpts, sigmas, gt, flow, cfg = problem()
  preds = jaxtal.Predictions(feats, keypoints=kpts, keypoint_sigmas=sigmas)
  with pytest.raises(TypeError, match=r"pose26_loss: flow is None; the RLE term needs the flow's parameters"):
    jaxtal.pose26_loss(preds, gt, cfg, flow=None)
  with pytest.raises(TypeError, match=r"missing 1 required keyword-only argument: 'flow'"):
    jaxtal.pose26_loss(preds, gt, cfg)  # noqa
  small = flow._replace(s_w2=flow.s_w2[:, :32])
  with pytest.raises(ValueError, match=r"pose26_loss: flow params s_w2 must have shape \(6, 64, 64\), got \(6, 32, 64\)"):
    jaxtal.pose26_loss(preds, gt, cfg, flow=small)
  with pytest.raises(TypeError, match=r"the pose26 loss needs preds.keypoint_sigmas"):
    jaxtal.pose26_loss(preds._replace(keypoint_sigmas=None), gt, cfg, flow=flow)
  with pytest.raises(ValueError, match=r"keypoint_sigmas\[0\] must be \(2, 8, 8, 10\).*2K = 10, K from kpt_shape"):
    jaxtal.pose26_loss(preds._replace(keypoint_sigmas=[s[..., :5] for s in sigmas]), gt, cfg, flow=flow)
  with pytest.raises(TypeError, match=r"does not read preds.proto"):
    jaxtal.pose26_loss(preds._replace(proto=feats[0]), gt, cfg, flow=flow)
  with pytest.raises(ValueError, match=r"pose26_loss: gt.keypoints is None"):
    jaxtal.pose26_loss(preds, gt._replace(keypoints=None), cfg, flow=flow)
  with pytest.raises(TypeError, match=r"pose26_loss: config must be a jaxtal.Pose26LossConfig, got PoseLossConfig"):
    jaxtal.pose26_loss(preds, gt, jaxtal.PoseLossConfig(num_classes=1, strides=(8, 16, 32)), flow=flow)
  with pytest.raises(TypeError, match=r"Pose26Loss: pass exactly one of rngs="):
    jaxtal.Pose26Loss(cfg)


def test_entry_points_follow_the_calling_convention():
  """The task's seven entry points, with the flow as a keyword (``test_task.py``'s rules, plus ``flow``)."""
  import inspect  # noqa: PLC0415

  names = ("Pose26LossConfig", "Pose26LossParts", "pose26_targets", "pose26_loss_from_targets", "pose26_loss",
           "Pose26Loss", "checked_pose26_loss")
  assert all(n in jaxtal.__all__ for n in names)
  params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
  for f in (jaxtal.pose26_loss, jaxtal.checked_pose26_loss, jaxtal.pose26_targets):
    assert params(f)[:3] == ["preds", "gt", "config"]
  assert params(jaxtal.pose26_loss_from_targets)[:4] == ["preds", "targets", "gt", "config"]
  for f in (jaxtal.pose26_loss, jaxtal.checked_pose26_loss, jaxtal.pose26_loss_from_targets):
    assert inspect.signature(f).parameters["flow"].kind is inspect.Parameter.KEYWORD_ONLY
    assert f is jaxtal.pose26_loss_from_targets or f.config_class is jaxtal.Pose26LossConfig
  assert jaxtal.Pose26Loss.loss_fn is jaxtal.pose26_loss


def test_decode_keypoints_yolo26():
  m = np.zeros((1, 1, 2, 3), np.float32)
  m[0, 0, 1] = [0.25, -0.5, 3.0]  # cell (0, 1): anchor (1.5, 0.5)
  got = np.asarray(jaxtal.decode_keypoints([m], (8,), (1, 3), yolo26=True))
  np.testing.assert_allclose(got[0, 1, 0], [(0.25 + 1.5) * 8, (-0.5 + 0.5) * 8, 3.0])


# ----------------------------------------------------------------------------- slow: modules, combinators, sharding


@pytest.mark.slow
def test_module_owns_a_trainable_flow():
  """``Pose26Loss(rngs=...)`` initialises a flow that ``nnx.grad`` reaches (the same gradient as the function's w.r.t.
  ``flow``); an explicit ``flow=`` in the call is used instead."""
  feats, kpts, sigmas, gt, flow, cfg = problem()
  preds = jaxtal.Predictions(feats, keypoints=kpts, keypoint_sigmas=sigmas)
  module = jaxtal.Pose26Loss(cfg, rngs=nnx.Rngs(3))
  fresh = module.flow.params()
  assert float(jnp.abs(fresh.s_w1).max()) < 0.01 * math.sqrt(6 / 66) + 1e-9  # the 0.01-gain init

  @nnx.jit
  def grads(m):
    return nnx.grad(lambda m: m(preds, gt)[0])(m)

  g = grads(module)
  want = jax.jit(jax.grad(lambda f: jaxtal.pose26_loss(preds, gt, cfg, flow=f)[0]))(fresh)
  for name in jaxtal.FlowParams._fields:
    np.testing.assert_allclose(getattr(g.flow, name)[...], getattr(want, name), rtol=1e-5, atol=1e-7)
  t_given, _ = jax.jit(lambda: module(preds, gt, flow=flow))()
  np.testing.assert_allclose(t_given, jaxtal.pose26_loss(preds, gt, cfg, flow=flow)[0], rtol=1e-6)


@pytest.mark.slow
def test_end_to_end_loss_and_module_share_the_flow():
  """``end_to_end_loss(pose26_loss, ..., flow=)`` is ``w * total(topk 10) + (1 - w) * total(topk 7, topk2 1)``, both
  branches reading the one flow; ``EndToEndLoss`` forwards ``flow=`` the same way."""
  feats, kpts, sigmas, gt, flow, cfg = problem()
  one = jaxtal.Predictions([f[::-1] for f in feats], keypoints=[k[::-1] for k in kpts], keypoint_sigmas=sigmas)
  many = jaxtal.Predictions(feats, keypoints=kpts, keypoint_sigmas=sigmas)
  module = jaxtal.EndToEndLoss(cfg, loss_fn=jaxtal.pose26_loss)
  w = 0.3

  @nnx.jit
  def run_all(m, fl):
    e2e = jaxtal.end_to_end_loss(jaxtal.pose26_loss, many, one, gt, weight=w, flow=fl, config=cfg)
    a = jaxtal.pose26_loss(many, gt, cfg, flow=fl)
    b = jaxtal.pose26_loss(one, gt, cfg, flow=fl, topk=7, topk2=1)
    return e2e, m(many, one, gt, weight=w, flow=fl), a, b

  (total, parts), (m_total, m_parts), a, b = run_all(module, flow)
  np.testing.assert_allclose(float(total), w * float(a[0]) + (1 - w) * float(b[0]), rtol=1e-5)
  chex.assert_trees_all_close(parts, b[1], rtol=1e-5)
  np.testing.assert_allclose(float(m_total), float(total), rtol=1e-6)
  g = jax.jit(jax.grad(lambda f: jaxtal.end_to_end_loss(jaxtal.pose26_loss, many, one, gt, weight=w, flow=f, config=cfg)[0]))(flow)
  ga = jax.jit(jax.grad(lambda f: jaxtal.pose26_loss(many, gt, cfg, flow=f)[0]))(flow)
  gb = jax.jit(jax.grad(lambda f: jaxtal.pose26_loss(one, gt, cfg, flow=f, topk=7, topk2=1)[0]))(flow)
  for got, a_, b_ in zip(g, ga, gb):  # float32 sums in another order: max|diff| <= 1e-4 max|want| per field
    want = w * np.asarray(a_) + (1 - w) * np.asarray(b_)
    assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.slow
def test_loss_from_targets_and_checked_form():
  feats, kpts, sigmas, gt, flow, cfg = problem()
  preds = jaxtal.Predictions(feats, keypoints=kpts, keypoint_sigmas=sigmas)
  total, parts = jax.jit(lambda p: jaxtal.pose26_loss(p, gt, cfg, flow=flow))(preds)
  _, targets = jax.jit(lambda p: jaxtal.pose26_targets(p, gt, cfg))(preds)
  t2, p2 = jax.jit(lambda p, t: jaxtal.pose26_loss_from_targets(p, t, gt, cfg, flow=flow))(preds, targets)
  np.testing.assert_allclose(t2, total, rtol=1e-6)
  chex.assert_trees_all_close(p2, parts, rtol=1e-6)
  from jax.experimental import checkify  # noqa: PLC0415

  checked = jax.jit(checkify.checkify(lambda p: jaxtal.checked_pose26_loss(p, gt, cfg, flow=flow)))
  err, (t3, _) = checked(preds)
  err.throw()
  np.testing.assert_allclose(t3, total, rtol=1e-6)
  bad = [s.copy() for s in sigmas]
  bad[1][0, 0, 0, 0] = np.nan
  err, _ = checked(preds._replace(keypoint_sigmas=bad))
  with pytest.raises(Exception, match=r"keypoint_sigmas\[1\].*non-finite"):
    err.throw()


@pytest.mark.slow
def test_axis_name_gives_the_global_loss_on_every_shard():
  """Under a mapped axis (vmap stands in for shard_map) each shard returns the global loss (the RLE row count and
  its clamp global too) and the gradient of the global loss w.r.t. its own maps and its share of the flow's."""
  feats, kpts, sigmas, gt, flow, cfg = problem()
  total, parts, grads, _, _ = run(feats, kpts, sigmas, gt)
  split = lambda x: np.asarray(x).reshape(2, -1, *np.shape(x)[1:])  # noqa: E731
  mapped_cfg = dataclasses.replace(cfg, axis_name="data")

  def local(f, k, s, g):
    loss = lambda f, k, s, fl: jaxtal.pose26_loss(jaxtal.Predictions(f, keypoints=k, keypoint_sigmas=s), g, mapped_cfg, flow=fl)  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(f, k, s, flow)

  mapped = jax.jit(jax.vmap(local, axis_name="data"))
  (t, p), (gf, gk, gs, gfl) = mapped([split(f) for f in feats], [split(m) for m in kpts], [split(m) for m in sigmas],
                                     jax.tree.map(split, gt))
  np.testing.assert_allclose(np.asarray(t), total, rtol=1e-5)
  for got, want in zip(p, parts):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-8)
  for got, want in zip((*gf, *gk, *gs), (*grads[0], *grads[1], *grads[2])):
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
  for got, want in zip(gfl, grads[3]):  # each shard's share of the flow's gradient; the shares add up
    np.testing.assert_allclose(np.asarray(got).sum(0), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_windowed_assignment_equals_the_dense_one():
  """The keypoint geometry declares its box's bounds, so the assigner's windowed pass (crowded scenes) can run it:
  the targets equal the dense pass's (discrete fields exactly, scores to float32 rounding), gate and all."""
  feats, kpts, sigmas, gt, flow, cfg = problem()
  preds = jaxtal.Predictions(feats, keypoints=kpts, keypoint_sigmas=sigmas)
  run = lambda c: jax.jit(lambda p: jaxtal.pose26_targets(p, gt, c))(preds)[1]  # noqa: E731
  dense, windowed = run(dataclasses.replace(cfg, windows=False)), run(dataclasses.replace(cfg, windows=True))
  assert int(np.asarray(dense.fg_mask).sum()) > 0
  for name in ("labels", "fg_mask", "gt_index", "positives_per_gt"):
    np.testing.assert_array_equal(np.asarray(getattr(windowed, name)), np.asarray(getattr(dense, name)), err_msg=name)
  np.testing.assert_allclose(np.asarray(windowed.weights), np.asarray(dense.weights), rtol=1e-5, atol=1e-7)
