"""Pose: the config, ``decode_keypoints``, the pose loss against a NumPy oracle, robustness, modules.

Expectations are computed here in NumPy (float64) from the inputs (the assignment by
``oracles.np_assign`` through ``oracles.np_detection_loss``), never by the code under test;
parity with Ultralytics is ``test_parity_pose.py``. The problem is ``problems.py``'s (a 32 x 32
input, levels 4x4 and 2x2, A = 20, nc = 3, R = 4) with K = 3 keypoints; one jitted step
(:func:`step`) serves every test of the main configuration, so it compiles once.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtal
from jaxtal.pose import COCO_SIGMAS
from support.oracles import np_anchors, np_detection_loss, np_pose_terms
from support.problems import FEATURE_SHAPES, NC, R, STRIDES, loss_problem

K = 3
CFG = jaxtal.PoseLossConfig(
    num_classes=NC, strides=STRIDES, reg_max=R, kpt_shape=(K, 3), min_box_side=8.0, sigmas=(0.05, 0.1, 0.2)
)
KW = dict(num_classes=NC, strides=STRIDES, reg_max=R)


# ----------------------------------------------------------------------------- problems and oracle


def keypoint_maps(seed=0, b=2, kpt_shape=(K, 3), layout="NHWC", scale=1.0):
  rng = np.random.default_rng(300 + seed)
  k, d = kpt_shape
  maps = [(scale * rng.normal(0.0, 0.7, (b, h, w, k * d))).astype(np.float32) for h, w in FEATURE_SHAPES]
  return [np.ascontiguousarray(m.transpose(0, 3, 1, 2)) if layout == "NCHW" else m for m in maps]


def pose_problem(seed=0, b=2):
  """Head maps, keypoint maps and a GroundTruth with keypoints (pixels) inside and around each box,
  visibility 0, 1 or 2 (image 0's first row has at least one labelled and one unlabelled)."""
  feats, gt = loss_problem(seed=seed, b=b)
  rng = np.random.default_rng(400 + seed)
  boxes = np.asarray(gt.boxes, np.float64)
  lo, size = boxes[..., None, :2], boxes[..., None, 2:] - boxes[..., None, :2]
  xy = lo + rng.uniform(-0.2, 1.2, (*boxes.shape[:2], K, 2)) * size
  vis = rng.choice([0.0, 1.0, 2.0], (*boxes.shape[:2], K), p=[0.3, 0.3, 0.4])
  vis[0, 0, :2] = [2.0, 0.0]
  kpts = np.concatenate([xy, vis[..., None]], -1).astype(np.float32)
  return feats, keypoint_maps(seed, b), gt._replace(keypoints=jnp.asarray(kpts))


def np_pose_loss(feats, kpt_maps, gt, cfg: jaxtal.PoseLossConfig, layout="NHWC"):
  """``(total, [box, pose, kobj, cls, dfl], assignment)``: the detection oracle's plus :func:`np_pose_terms`."""
  _, (box, cls, dfl), targets = np_detection_loss(
      feats, gt, num_classes=cfg.num_classes, strides=cfg.strides, reg_max=cfg.reg_max, layout=layout, box=cfg.box,
      cls=cfg.cls, dfl=cfg.dfl, topk=cfg.topk, min_box_side=cfg.min_box_side,
  )
  pose, kobj = np_pose_terms(
      kpt_maps, gt.keypoints, targets, strides=cfg.strides, kpt_shape=cfg.kpt_shape, sigmas=cfg.sigmas, layout=layout
  )
  parts = np.array([box, cfg.pose * pose, cfg.kobj * kobj, cls, dfl])
  return parts.sum() * np.shape(feats[0])[0], parts, targets


@functools.partial(jax.jit, static_argnames="config")
def step(feats, kpts, gt, config=CFG):
  """``((total, parts), (head grads, keypoint grads)), module_out``: ``pose_loss``'s value and gradients
  and the :class:`jaxtal.PoseLoss` module's value, the one compilation of the main config."""
  module_out = jaxtal.PoseLoss(config)(jaxtal.Predictions(feats, keypoints=kpts), gt)
  loss = lambda f, k: jaxtal.pose_loss(jaxtal.Predictions(f, keypoints=k), gt, config)  # noqa: E731
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(feats, kpts), module_out


def run(feats, kpts, gt):
  ((total, parts), (g, gk)), _ = step(feats, kpts, gt)
  return float(total), np.array([float(p) for p in parts]), [np.asarray(x) for x in g], [np.asarray(x) for x in gk]


def assert_finite(total, parts, grads, kpt_grads):
  assert np.isfinite(total) and np.isfinite(parts).all() and (parts >= 0).all(), (total, parts)
  for g in (*grads, *kpt_grads):
    assert np.isfinite(g).all()


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_normalisation():
  cfg = jaxtal.PoseLossConfig(num_classes=1, strides=[8, 16, 32])
  assert isinstance(cfg, jaxtal.LossConfig)
  assert (cfg.kpt_shape, cfg.pose, cfg.kobj, cfg.topk, cfg.box) == ((17, 3), 12.0, 1.0, 10, 7.5)
  assert cfg.sigmas == COCO_SIGMAS and len(cfg.sigmas) == 17
  np.testing.assert_allclose(cfg.sigmas[:3], [0.026, 0.025, 0.025])  # COCO's nose and eyes
  same = jaxtal.PoseLossConfig(num_classes=1, strides=(8, 16, 32), kpt_shape=[17.0, 3], sigmas=list(COCO_SIGMAS))
  assert same == cfg and hash(same) == hash(cfg)
  # Other shapes default to 1 / K (the reference's (17, 2) too).
  for shape in ((17, 2), (5, 3), (1, 2)):
    assert jaxtal.PoseLossConfig(num_classes=1, strides=(8,), kpt_shape=shape).sigmas == (1.0 / shape[0],) * shape[0]
  custom = jaxtal.PoseLossConfig(num_classes=1, strides=(8,), kpt_shape=(2, 3), sigmas=np.array([0.5, 1]), pose=3)
  assert custom.sigmas == (0.5, 1.0) and isinstance(custom.sigmas, tuple) and custom.pose == 3.0
  hash(custom)
  # Changing kpt_shape: give sigmas again, or None for the default.
  assert dataclasses.replace(custom, kpt_shape=(4, 2), sigmas=None).sigmas == (0.25,) * 4


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(kpt_shape=(17,)), ValueError, r"kpt_shape must be \(K, D\).*got \(17,\)"),
        (dict(kpt_shape=17), ValueError, r"kpt_shape must be \(K, D\)"),
        (dict(kpt_shape=(0, 3)), ValueError, r"kpt_shape\[0\] \(K, the number of keypoints\) must be a whole"),
        (dict(kpt_shape=(2.5, 3)), ValueError, r"kpt_shape\[0\].*whole number"),
        (dict(kpt_shape=(17, 4)), ValueError, r"kpt_shape\[1\] \(D\) must be 2 \(x, y\) or 3"),
        (dict(kpt_shape=(2, 3), sigmas=(0.1,)), ValueError, r"sigmas must be 2 positive finite numbers, one per"),
        (dict(kpt_shape=(2, 3), sigmas=0.1), ValueError, r"sigmas must be 2 positive finite numbers"),
        (dict(kpt_shape=(2, 3), sigmas="ab"), ValueError, r"sigmas must be 2 positive finite numbers"),
        (dict(kpt_shape=(2, 3), sigmas=(0.1, 0.0)), ValueError, r"sigmas\[1\] must be a positive finite number, got 0"),
        (dict(kpt_shape=(2, 3), sigmas=(np.nan, 0.1)), ValueError, r"sigmas\[0\] must be a finite number, got nan"),
        (dict(kpt_shape=(2, 3), sigmas=(0.1, -1)), ValueError, r"sigmas\[1\] must be a positive finite number, got -1"),
        (dict(pose=float("inf")), ValueError, r"pose must be a finite number, got inf"),
        (dict(kobj=None), ValueError, r"kobj must be a finite number, got None"),
    ],
)
def test_config_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxtal.PoseLossConfig(num_classes=1, strides=(8,), **kwargs)


def test_loss_validation_errors():
  feats, kpts, gt = pose_problem()
  with pytest.raises(TypeError, match=r"pose_loss: config must be a jaxtal.PoseLossConfig, got LossConfig"):
    jaxtal.pose_loss(jaxtal.Predictions(feats, keypoints=kpts), gt, jaxtal.LossConfig(**KW))
  with pytest.raises(TypeError, match=r"pose_loss: unknown configuration keyword\(s\) \['kpt_shap'\]"):
    jaxtal.pose_loss(jaxtal.Predictions(feats, keypoints=kpts), gt, kpt_shap=(3, 3), **KW)
  with pytest.raises(ValueError, match=r"keypoints\[0\] must be \(2, 4, 4, 9\) \(NHWC: 9 per cell.*\(2, 4, 4, 6\)"):
    jaxtal.pose_loss(jaxtal.Predictions(feats, keypoints=keypoint_maps(kpt_shape=(3, 2))), gt, CFG)
  with pytest.raises(TypeError, match=r"pose_loss: keypoints must be a list of per-level maps, one per level of feats"):
    jaxtal.pose_loss(jaxtal.Predictions(feats, keypoints=kpts[:1]), gt, CFG)
  with pytest.raises(ValueError, match=r"pose_loss: gt.keypoints is None; pose needs \(b, M, K, D\) keypoints"):
    jaxtal.pose_loss(jaxtal.Predictions(feats, keypoints=kpts), gt._replace(keypoints=None), CFG)
  with pytest.raises(ValueError, match=r"gt.keypoints must be \(b, M, K, D\) = \(2, 3, 3, 2 or 3\).*\(2, 3, 4, 3\)"):
    jaxtal.pose_loss(jaxtal.Predictions(feats, keypoints=kpts), gt._replace(keypoints=jnp.zeros((2, 3, 4, 3))), CFG)
  with pytest.raises(ValueError, match=r"pose_loss: class_weights must have shape \(nc,\) = \(3,\)"):
    jaxtal.pose_loss(jaxtal.Predictions(feats, keypoints=kpts), gt, CFG, class_weights=np.ones(2, np.float32))


# ----------------------------------------------------------------------------- decode_keypoints


class TestDecodeKeypoints:

  def test_matches_numpy(self, variant):
    for shape, layout in (((K, 3), "NHWC"), ((2, 2), "NCHW")):
      k, d = shape
      maps = keypoint_maps(seed=1, kpt_shape=shape, layout=layout)
      decode = functools.partial(jaxtal.decode_keypoints, strides=STRIDES, kpt_shape=shape, layout=layout)
      got = variant(decode)(maps)
      chex.assert_shape(got, (2, 20, k, d))
      chex.assert_type(got, jnp.float32)
      # NumPy: anchor rows level by level, channel k * D + d; (2 raw + anchor - 0.5) * stride.
      nhwc = [m.transpose(0, 2, 3, 1) if layout == "NCHW" else m for m in maps]
      raw = np.concatenate([m.reshape(2, -1, k, d) for m in nhwc], 1).astype(np.float64)
      anchors, stride = np_anchors(FEATURE_SHAPES, STRIDES)
      want = raw.copy()
      want[..., :2] = (2 * raw[..., :2] + anchors[:, None, :] - 0.5) * stride[:, None, :]
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)

  def test_hand_worked_and_errors(self):
    # One 1x2 level of stride 8, one keypoint (x, y, v): cell (0, 1) has anchor (1.5, 0.5).
    m = np.zeros((1, 1, 2, 3), np.float32)
    m[0, 0, 1] = [0.25, -0.5, 3.0]
    got = np.asarray(jaxtal.decode_keypoints([m], (8,), (1, 3)))
    np.testing.assert_allclose(got[0, :, 0], [[0.0, 0.0, 0.0], [(0.5 + 1.5 - 0.5) * 8, (-1.0 + 0.5 - 0.5) * 8, 3.0]])
    with pytest.raises(ValueError, match=r"decode_keypoints: keypoint_maps\[0\] has 3 channels .*expected 6 \(shape \(1, 1, 2, 3\)\)"):
      jaxtal.decode_keypoints([m], (8,), (2, 3))
    with pytest.raises(ValueError, match=r"keypoint_maps\[0\] must be a rank-4 NHWC array.*\(1, 2, 3\)"):
      jaxtal.decode_keypoints([m[0]], (8,), (1, 3))
    with pytest.raises(TypeError, match=r"decode_keypoints: keypoint_maps must be a non-empty list"):
      jaxtal.decode_keypoints(m, (8,), (1, 3))
    with pytest.raises(ValueError, match=r"decode_keypoints: got 2 strides for 1 feature levels"):
      jaxtal.decode_keypoints([m], (8, 16), (1, 3))
    with pytest.raises(ValueError, match=r"kpt_shape\[1\] \(D\) must be 2"):
      jaxtal.decode_keypoints([m], (8,), (3, 1))
    with pytest.raises(ValueError, match=r"layout must be one of"):
      jaxtal.decode_keypoints([m], (8,), (1, 3), layout="HWC")


# ----------------------------------------------------------------------------- the loss against NumPy


def test_loss_matches_numpy_oracle():
  feats, kpts, gt = pose_problem(seed=0)
  total, parts, grads, kpt_grads = run(feats, kpts, gt)
  want_total, want_parts, targets = np_pose_loss(feats, kpts, gt, CFG)
  fg = targets["fg_mask"]
  assert fg.sum() >= 5 and min(want_parts) > 0, (fg.sum(), want_parts)
  np.testing.assert_allclose(parts, want_parts, rtol=2e-5)
  np.testing.assert_allclose(total, want_total, rtol=2e-5)
  np.testing.assert_allclose(total, parts.sum() * 2, rtol=1e-6)
  assert jaxtal.PoseLossParts._fields == ("box", "pose", "kobj", "cls", "dfl")
  # Keypoint gradients: only foreground anchors' rows are non-zero.
  rows = np.concatenate([g.reshape(2, -1, K * 3) for g in kpt_grads], 1)
  assert not rows[~fg].any() and np.abs(rows[fg]).sum(-1).min() > 0


def test_gains_scale_their_parts_only_and_empty_images_have_no_keypoint_terms():
  feats, kpts, gt = pose_problem(seed=1)
  total, parts, _, kpt_grads = run(feats, kpts, gt)
  empty = gt._replace(mask=jnp.zeros_like(gt.mask))
  e_total, e_parts, _, e_kpt_grads = run(feats, kpts, empty)
  assert e_parts[0] == e_parts[1] == e_parts[2] == e_parts[4] == 0.0 and e_parts[3] > 0
  assert all(not g.any() for g in e_kpt_grads) and any(g.any() for g in kpt_grads)
  np.testing.assert_allclose(e_total, e_parts[3] * 2, rtol=1e-6)


def test_visibility_rules_and_masking():
  """An unlabelled keypoint (visibility 0, NaN or inf values, |x| > COORD_LIMIT) gives the same loss
  and gradients whatever its coordinates; padding rows may hold anything."""
  feats, kpts, gt = pose_problem(seed=2)
  base = run(feats, kpts, gt)
  k = np.array(gt.keypoints)
  unlabelled = k[..., 2] == 0
  assert unlabelled.any()
  spoiled = k.copy()
  spoiled[unlabelled, 0] = np.nan  # the coordinates of unlabelled keypoints do not matter
  spoiled[unlabelled, 1] = 3e7
  spoiled[~np.asarray(gt.mask)] = np.inf  # nor does anything in a padding row
  same = run(feats, kpts, gt._replace(keypoints=jnp.asarray(spoiled)))
  assert_finite(*same)
  chex.assert_trees_all_close(same, base, rtol=1e-6, atol=1e-9)
  # A labelled keypoint with a NaN / huge coordinate or a NaN visibility counts as unlabelled.
  i, j, kk = np.argwhere(~unlabelled & np.asarray(gt.mask)[..., None])[0]
  hidden = k.copy()
  hidden[i, j, kk, 2] = 0.0
  want = run(feats, kpts, gt._replace(keypoints=jnp.asarray(hidden)))
  assert abs(want[1][1] - base[1][1]) > 1e-4 * base[1][1]  # that keypoint mattered
  for spoil in ((0, np.nan), (1, 2.0**21), (2, np.nan), (0, -np.inf)):
    bad = k.copy()
    bad[i, j, kk, spoil[0]] = spoil[1]
    chex.assert_trees_all_close(run(feats, kpts, gt._replace(keypoints=jnp.asarray(bad))), want, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_two_value_ground_truth_keypoints_are_all_labelled():
  """D = 2 ground truth (another compilation, hence slow): the same as visibility 1 everywhere."""
  feats, kpts, gt = pose_problem(seed=2)
  k = np.array(gt.keypoints)
  chex.assert_trees_all_close(
      run(feats, kpts, gt._replace(keypoints=jnp.asarray(k[..., :2]))),
      run(feats, kpts, gt._replace(keypoints=jnp.asarray(np.concatenate([k[..., :2], np.ones_like(k[..., 2:])], -1)))),
      rtol=1e-6, atol=1e-9,
  )


def test_all_invisible_keypoints_give_no_location_term():
  feats, kpts, gt = pose_problem(seed=3)
  k = np.array(gt.keypoints)
  k[..., 2] = 0.0
  total, parts, grads, kpt_grads = run(feats, kpts, gt._replace(keypoints=jnp.asarray(k)))
  assert_finite(total, parts, grads, kpt_grads)
  assert parts[1] == 0.0 and parts[2] > 0  # kobj: every target 0
  for g in kpt_grads:
    assert not g.reshape(*g.shape[:-1], K, 3)[..., :2].any()


def test_degenerate_inputs_are_finite():
  """Zero-area target boxes (a row of width 1e-30 px, assigned through min_box_side), huge logits,
  keypoints at a box corner, NaN everywhere in padding rows: loss and gradients finite."""
  feats, kpts, gt = pose_problem(seed=4)
  boxes, k = np.array(gt.boxes), np.array(gt.keypoints)
  boxes[0, 0, 2] = boxes[0, 0, 0] + 1e-30  # positive, but zero area in float32 grid units
  boxes[1, 0, 3] = boxes[1, 0, 1] + 1e-3
  k[0, 0, :, :2] = boxes[0, 0, :2]
  boxes[:, 2], k[:, 2] = np.nan, np.nan  # padding rows (mask False)
  thin = gt._replace(boxes=jnp.asarray(boxes), keypoints=jnp.asarray(k))
  out = run(feats, kpts, thin)
  assert_finite(*out)
  assert out[1][1] > 0
  for scale in (1e4, -1e4):
    assert_finite(*run([f * np.float32(scale) for f in feats], [m * np.float32(scale) for m in kpts], thin))


# ----------------------------------------------------------------------------- modules and combinators


def test_module_matches_function():
  """(The NCHW layout is tested against the reference in test_parity_pose.py, NHWC against NumPy here.)"""
  feats, kpts, gt = pose_problem(seed=0)
  ((total, parts), _), (m_total, m_parts) = step(feats, kpts, gt)  # the module inside the same jit
  assert isinstance(m_parts, jaxtal.PoseLossParts)
  np.testing.assert_allclose(float(m_total), float(total), rtol=1e-6)
  chex.assert_trees_all_close(m_parts, parts, rtol=1e-6, atol=1e-9)
  module = jaxtal.PoseLoss(num_classes=NC, strides=STRIDES, kpt_shape=(5, 2), class_weights=np.ones(NC, np.float32))
  assert module.config == jaxtal.PoseLossConfig(num_classes=NC, strides=STRIDES, kpt_shape=(5, 2))
  np.testing.assert_array_equal(module.class_weights[...], np.ones(NC))


@pytest.mark.slow
def test_end_to_end_loss_and_module_with_pose_loss():
  """YOLO26-style two branches with keypoints (D = 2 here: kobj is 0): the combinator is w * total(topk
  10) + (1 - w) * total(topk 7, topk2 1), EndToEndLoss holding a PoseLossConfig gives the same."""
  feats, _, gt = pose_problem(seed=5)
  feats2, _, _ = pose_problem(seed=6)
  k1, k2 = keypoint_maps(5, kpt_shape=(K, 2)), keypoint_maps(6, kpt_shape=(K, 2))
  cfg = dataclasses.replace(CFG, kpt_shape=(K, 2), sigmas=None)
  module = jaxtal.EndToEndLoss(cfg, loss_fn=jaxtal.pose_loss)
  w = 0.3

  @nnx.jit
  def run_all(m, f1, k1, f2, k2, g):
    e2e = jaxtal.end_to_end_loss(jaxtal.pose_loss, jaxtal.Predictions(f1, keypoints=k1), jaxtal.Predictions(f2, keypoints=k2), g, weight=w, config=cfg)
    many = jaxtal.pose_loss(jaxtal.Predictions(f1, keypoints=k1), g, config=cfg)
    one = jaxtal.pose_loss(jaxtal.Predictions(f2, keypoints=k2), g, config=cfg, topk=7, topk2=1)
    return e2e, m(jaxtal.Predictions(f1, keypoints=k1), jaxtal.Predictions(f2, keypoints=k2), g, weight=w), many, one

  (total, parts), (m_total, m_parts), many, one = run_all(module, feats, k1, feats2, k2, gt)
  assert isinstance(parts, jaxtal.PoseLossParts) and float(parts.kobj) == 0.0 and float(parts.pose) > 0
  assert float(many[0]) != float(one[0])
  np.testing.assert_allclose(float(total), w * float(many[0]) + (1 - w) * float(one[0]), rtol=1e-5)
  np.testing.assert_allclose([float(p) for p in parts], [float(p) for p in one[1]], rtol=1e-5)
  np.testing.assert_allclose(float(m_total), float(total), rtol=1e-6)
  chex.assert_trees_all_close(m_parts, parts, rtol=1e-6)


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_eager_equals_numpy():
  """``pose_loss`` without jit (op by op: many small compiles, hence slow) equals the oracle."""
  feats, kpts, gt = pose_problem(seed=0)
  total, parts = jaxtal.pose_loss(jaxtal.Predictions(feats, keypoints=kpts), gt, CFG)
  want_total, want_parts, _ = np_pose_loss(feats, kpts, gt, CFG)
  np.testing.assert_allclose([float(p) for p in parts], want_parts, rtol=2e-5)
  np.testing.assert_allclose(float(total), want_total, rtol=2e-5)


@pytest.mark.slow
def test_axis_name_gives_the_global_loss_on_every_shard():
  """Under a mapped axis (vmap stands in for shard_map), each shard returns the global loss (n_fg
  global too) and the gradient of the global loss w.r.t. its own maps."""
  feats, kpts, gt = pose_problem(seed=0)
  total, parts, grads, kpt_grads = run(feats, kpts, gt)
  split = lambda x: np.asarray(x).reshape(2, -1, *np.shape(x)[1:])  # noqa: E731
  cfg = dataclasses.replace(CFG, axis_name="data")

  def local(f, k, g):
    return jax.value_and_grad(lambda f, k: jaxtal.pose_loss(jaxtal.Predictions(f, keypoints=k), g, cfg), argnums=(0, 1), has_aux=True)(f, k)

  mapped = jax.jit(jax.vmap(local, axis_name="data"))
  (t, p), (g, gk) = mapped([split(f) for f in feats], [split(m) for m in kpts], jax.tree.map(split, gt))
  np.testing.assert_allclose(np.asarray(t), total, rtol=1e-5)
  for got, want in zip(p, parts):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-8)
  for got, want in zip((*g, *gk), (*grads, *kpt_grads)):
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
