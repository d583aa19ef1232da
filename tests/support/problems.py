"""Small shared test problems, jitted entry points and assertion helpers.

Shapes are fixed and small (a 32 x 32 input, levels 4x4 and 2x2 with strides 8 and 16, A = 20
anchors, nc = 3, R = 4) so that one compilation per configuration serves every test file: the
jitted functions here take a hashable config as a static argument and are shared through this
module, so equal configurations compile once per pytest process.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxtal

FEATURE_SHAPES = ((4, 4), (2, 2))
STRIDES = (8, 16)  # a 32 x 32 input, A = 20 anchors
IMAGE = 32
A = sum(h * w for h, w in FEATURE_SHAPES)
NC, R = 3, 4
LOSS_CFG = jaxtal.LossConfig(num_classes=NC, strides=STRIDES, reg_max=R)

# Library bug (reported, not fixed here): jaxtal/_validate.py tests float dtypes with
# np.issubdtype(dtype, np.floating), which is False for bfloat16 (an ml_dtypes type), so bf16 head
# maps are rejected as "must be a float array". jnp.issubdtype(dtype, jnp.floating) accepts them.


# --------------------------------------------------------------------------------------------------
# Jitted entry points, static config: one compilation per (shapes, config) for the whole session.


@functools.partial(jax.jit, static_argnames="config")
def _assign_jit(scores, boxes, anchors, gt, config):
  return jaxtal.task_aligned_assign(scores, boxes, anchors, gt, config)


def assign(scores, boxes, anchors, gt, config=None, **overrides):
  """``jaxtal.task_aligned_assign`` jitted, configuration as keywords or an ``AssignerConfig``."""
  cfg = jaxtal.AssignerConfig(**overrides) if config is None else config
  return _assign_jit(scores, boxes, anchors, gt, config=cfg)


@functools.partial(jax.jit, static_argnames="config")
def loss_jit(feats, gt, config=LOSS_CFG, class_weights=None):
  return jaxtal.detection_loss(feats, gt, config, class_weights=class_weights)


@functools.partial(jax.jit, static_argnames="config")
def loss_and_grad(feats, gt, config=LOSS_CFG):
  """``((total, parts), grads)`` of ``detection_loss`` w.r.t. the head maps."""
  return jax.value_and_grad(lambda f: jaxtal.detection_loss(f, gt, config), has_aux=True)(feats)


@functools.partial(jax.jit, static_argnames="config")
def targets_jit(feats, gt, config=LOSS_CFG):
  return jaxtal.detection_targets(feats, gt, config)


@functools.partial(jax.jit, static_argnames="config")
def loss_from_targets_and_grad(feats, targets, config=LOSS_CFG):
  """``((total, parts), grads)`` of ``loss_from_targets`` w.r.t. the head maps."""
  return jax.value_and_grad(lambda f: jaxtal.loss_from_targets(f, targets, None, config), has_aux=True)(feats)


def loss_config(**overrides) -> jaxtal.LossConfig:
  return jaxtal.LossConfig(**dict(dict(num_classes=NC, strides=STRIDES, reg_max=R), **overrides))


# --------------------------------------------------------------------------------------------------
# Problems


def random_boxes(rng, shape, lo=0.0, hi=32.0, min_side=2.0, max_side=20.0):
  wh = rng.uniform(min_side, max_side, (*shape, 2))
  xy = rng.uniform(lo, hi, (*shape, 2))
  return np.concatenate([xy - wh / 2, xy + wh / 2], axis=-1).astype(np.float32)


def anchors_px():
  anchors, strides = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
  return np.asarray(anchors * strides)


def assign_problem(seed=0, b=3, m=4):
  """Predictions around the anchors and overlapping GTs; image 1 is mostly padding whose rows hold junk."""
  rng = np.random.default_rng(seed)
  anchor_px = anchors_px()
  a = len(anchor_px)
  half = rng.uniform(3.0, 12.0, (b, a, 4)).astype(np.float32)
  pred_boxes = np.concatenate([anchor_px - half[..., :2], anchor_px + half[..., 2:]], axis=-1)
  pred_scores = rng.uniform(0.05, 0.95, (b, a, NC)).astype(np.float32)
  boxes = random_boxes(rng, (b, m), lo=6, hi=26, min_side=8, max_side=24)
  labels = rng.integers(0, NC, (b, m)).astype(np.int32)
  mask = np.ones((b, m), bool)
  mask[0, 3] = False
  mask[1, 1:] = False
  boxes[0, 3] = [0, 0, 32, 32]  # padding rows with real-looking content: must never own anchors
  boxes[1, 1:] = [[0, 0, 32, 32], [4, 4, 28, 28], [8, 8, 24, 24]]
  labels[1, 1:] = 2
  gt = jaxtal.GroundTruth(jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(mask))
  return jnp.asarray(pred_scores), jnp.asarray(pred_boxes), jnp.asarray(anchor_px), gt


def head_maps(seed=0, b=2, layout="NHWC", reg_max=R, nc=NC, scale=1.0):
  rng = np.random.default_rng(seed)
  c = 4 * reg_max + nc
  maps = [(scale * rng.standard_normal((b, h, w, c))).astype(np.float32) for h, w in FEATURE_SHAPES]
  if layout == "NCHW":
    maps = [np.transpose(f, (0, 3, 1, 2)) for f in maps]
  return [jnp.asarray(f) for f in maps]


def loss_problem(seed=0, b=2, empty=False, layout="NHWC", reg_max=R):
  """Head maps and a GroundTruth (b, 3): image 0 has two real boxes, the others one."""
  rng = np.random.default_rng(100 + seed)
  feats = head_maps(seed=seed, b=b, layout=layout, reg_max=reg_max)
  boxes = random_boxes(rng, (b, 3), lo=8, hi=24, min_side=10, max_side=24)
  labels = rng.integers(0, NC, (b, 3)).astype(np.int32)
  mask = np.array([[True, True, False]] + [[True, False, False]] * (b - 1))
  if empty:
    mask[:] = False
  return feats, jaxtal.GroundTruth(jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(mask))


def crowded_loss_problem(seed=0, b=2, m=4):
  """Head maps and ``m`` large overlapping GTs per image: anchors listed by several GTs' top-k."""
  rng = np.random.default_rng(200 + seed)
  feats = head_maps(seed=seed, b=b)
  xy = rng.uniform(12.0, 20.0, (b, m, 2))
  wh = rng.uniform(14.0, 30.0, (b, m, 2))
  boxes = np.concatenate([xy - wh / 2, xy + wh / 2], -1).astype(np.float32)
  labels = rng.integers(0, NC, (b, m)).astype(np.int32)
  mask = np.ones((b, m), bool)
  mask[1, -1] = False
  return feats, jaxtal.GroundTruth(jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(mask))


def many_anchor_problem(rng, nc, m, b=2):
  """A 320 x 320 input (A = 2100 anchors: levels of 1600, 400 and 100) with ``m`` GTs per image, some
  large; returns NumPy scores, predicted boxes, anchor pixels, a GroundTruth and the level split points."""
  shapes, strides = ((40, 40), (20, 20), (10, 10)), (8, 16, 32)
  anchors, anchor_strides = jaxtal.make_anchors(shapes, strides)
  anchor_px = np.asarray(anchors * anchor_strides)
  a = anchor_px.shape[0]
  half = rng.uniform(4.0, 60.0, (b, a, 4)).astype(np.float32)
  pred_boxes = np.concatenate([anchor_px - half[..., :2], anchor_px + half[..., 2:]], axis=-1)
  scores = rng.uniform(0.01, 0.99, (b, a, nc)).astype(np.float32)
  gt = jaxtal.GroundTruth(
      jnp.asarray(rng.integers(0, nc, (b, m)), jnp.int32),
      jnp.asarray(random_boxes(rng, (b, m), lo=40, hi=280, min_side=10, max_side=200)),
      jnp.ones((b, m), bool),
  )
  return scores, pred_boxes, anchor_px, gt, np.cumsum([h * w for h, w in shapes])[:-1]


def pad_gt_slots(gt, m):
  """``gt`` with padding slots (zeros, mask False) appended up to ``m`` slots per image."""
  return jax.tree.map(lambda x: jnp.pad(x, [(0, 0), (0, m - x.shape[1])] + [(0, 0)] * (x.ndim - 2)), gt)


# --------------------------------------------------------------------------------------------------
# Assertions


def assert_assignment_shapes(target, b, a, nc, m=None):
  chex.assert_shape(target.labels, (b, a))
  chex.assert_shape(target.boxes, (b, a, 4))
  chex.assert_shape(target.scores, (b, a, nc))
  chex.assert_shape(target.fg_mask, (b, a))
  chex.assert_shape(target.gt_index, (b, a))
  if m is not None:
    chex.assert_shape(target.positives_per_gt, (b, m))
  chex.assert_type([target.labels, target.boxes, target.scores, target.fg_mask, target.gt_index, target.positives_per_gt],
                   [jnp.int32, jnp.float32, jnp.float32, jnp.bool_, jnp.int32, jnp.int32])


def assert_assignment_equal(got, expected, rtol=1e-5, atol=1e-7):
  """``got`` (an Assignment) against an oracle dict: masks, indices and counts exactly, floats closely."""
  np.testing.assert_array_equal(np.asarray(got.fg_mask), expected["fg_mask"])
  np.testing.assert_array_equal(np.asarray(got.gt_index), expected["gt_index"])
  np.testing.assert_array_equal(np.asarray(got.labels), expected["labels"])
  np.testing.assert_array_equal(np.asarray(got.positives_per_gt), expected["positives_per_gt"])
  np.testing.assert_allclose(np.asarray(got.boxes), expected["boxes"], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got.scores), expected["scores"], rtol=rtol, atol=atol)


def np_entries_keep_contract(fg_mask, gt_index, entries) -> np.ndarray:
  """``(b,)`` whether each image's entry list keeps the contract of ``jaxtal.targets``, in NumPy."""
  fg, gi = np.asarray(fg_mask), np.asarray(gt_index)
  anchor, gt, valid = (np.asarray(x) for x in entries)
  out = []
  for i in range(fg.shape[0]):
    counts = np.bincount(anchor[i][valid[i]], minlength=fg.shape[1])
    owners = (gi[i][anchor[i]] == gt[i])[valid[i]]
    out.append(bool(np.array_equal(counts, fg[i].astype(int)) and owners.all()))
  return np.array(out)


def with_entries(t, anchor=None, gt=None, valid=None):
  e = t.entries
  return t._replace(entries=jaxtal.ForegroundEntries(
      e.anchor if anchor is None else anchor, e.gt if gt is None else gt, e.valid if valid is None else valid))


def broken(t, how, image=0):
  """``t`` with image ``image``'s entry list broken in one way."""
  e = jax.tree.map(np.array, t.entries)
  fg, gi = np.asarray(t.fg_mask[image]), np.asarray(t.gt_index[image])
  first_valid = int(np.flatnonzero(e.valid[image])[0])
  spare = int(np.flatnonzero(~e.valid[image])[0])  # an invalid entry to reuse
  if how == "duplicate":  # a foreground anchor listed twice as valid
    e.anchor[image, spare], e.gt[image, spare], e.valid[image, spare] = e.anchor[image, first_valid], e.gt[image, first_valid], True
  elif how == "missing":  # a foreground anchor not listed
    e.valid[image, first_valid] = False
  elif how == "background":  # a background anchor listed as valid
    bg = int(np.flatnonzero(~fg)[0])
    e.anchor[image, spare], e.gt[image, spare], e.valid[image, spare] = bg, 0, True
  elif how == "wrong_gt":  # a valid entry naming another GT
    e.gt[image, first_valid] = (gi[e.anchor[image, first_valid]] + 1) % t.positives_per_gt.shape[1]
  return with_entries(t, *(jnp.asarray(x) for x in e))


def random_flow_params(seed: int = 0, std: float = 0.3) -> jaxtal.FlowParams:
  """A flow with N(0, std) weights and biases (far from the near-identity init: every layer matters)."""
  rng = np.random.default_rng(seed)
  return jaxtal.FlowParams(
      **{name: jnp.asarray(rng.normal(0.0, std, shape).astype(np.float32)) for name, shape in jaxtal.flow.FIELD_SHAPES.items()}
  )
