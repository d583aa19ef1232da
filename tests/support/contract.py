"""The input contract's small problem, shared by test_contract.py (which inputs are errors and which are
data) and test_checks.py (the value checks that turn the same data into errors): two 32 x 32 images,
levels 8x8 and 4x4 (strides 4 and 8, A = 80 anchors), nc = 3, R = 4, M = 4 GT slots."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import jaxtal

NC, R = 3, 4
SHAPES = ((8, 8), (4, 4))
STRIDES = (4, 8)
IMAGE = 32  # pixels, both sides
A = sum(h * w for h, w in SHAPES)  # 80
B, M = 2, 4
KW = dict(num_classes=NC, strides=STRIDES, reg_max=R)


def make_feats(seed=0, b=B, layout="NHWC", dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  out = []
  for h, w in SHAPES:
    x = rng.normal(0.0, 1.0, (b, h, w, 4 * R + NC)).astype(np.float32)
    if layout == "NCHW":
      x = np.transpose(x, (0, 3, 1, 2))
    out.append(jnp.asarray(x, dtype))
  return out


def make_gt(b=B, m=M):
  """Image 0: two real boxes; image 1: one real box; the rest padding."""
  labels = np.zeros((b, m), np.int32)
  boxes = np.zeros((b, m, 4), np.float32)
  mask = np.zeros((b, m), bool)
  labels[0, :2], boxes[0, :2], mask[0, :2] = [1, 2], [[4.0, 5.0, 20.0, 18.0], [14.0, 12.0, 29.0, 30.0]], True
  labels[1, 0], boxes[1, 0], mask[1, 0] = 0, [6.0, 8.0, 26.0, 24.0], True
  return jaxtal.GroundTruth(jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(mask))


def assign_inputs(seed=0, b=B):
  rng = np.random.default_rng(seed)
  anchors, strides = jaxtal.make_anchors(SHAPES, STRIDES)
  anchors_px = anchors * strides
  scores = jnp.asarray(rng.uniform(0.05, 0.95, (b, A, NC)), jnp.float32)
  ltrb = rng.uniform(2.0, 10.0, (b, A, 4)).astype(np.float32)
  boxes = jnp.concatenate([anchors_px - ltrb[..., :2], anchors_px + ltrb[..., 2:]], -1)
  return scores, boxes, anchors_px, make_gt(b)


def replace(gt, **fields):
  return gt._replace(**{k: jnp.asarray(v) for k, v in fields.items()})
