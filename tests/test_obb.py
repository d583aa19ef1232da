"""Oriented boxes: packing, ProbIoU, rotated decode, the rotated geometry, the rotated assigner and the OBB loss.

Expectations are hand-worked or computed here in NumPy (float64) from the inputs, never by the
code under test; parity with Ultralytics is ``test_parity_obb.py``. Property tests (hypothesis)
run one jitted function per shape, so each compiles once (checked for the degenerate-input test).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings

import jaxtal
from support import obb_cases
from jaxtal.boxes import xywhr_to_ltrb
from support.oracles import np_dfl_expectation

NC, R = 3, 4
SHAPES = ((8, 8), (4, 4))
STRIDES = (4, 8)
IMAGE = 32
A = sum(h * w for h, w in SHAPES)
B, M = 2, 5
KW = dict(num_classes=NC, strides=STRIDES, reg_max=R)
PI = math.pi

ANCHORS, ANCHOR_STRIDES = (np.asarray(x) for x in jaxtal.make_anchors(SHAPES, STRIDES))
ANCHORS_PX = (ANCHORS * ANCHOR_STRIDES).astype(np.float32)

# Fixed example order (CI stays deterministic); shapes are fixed so each jitted function compiles once.
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- NumPy expectations


def np_probiou(box1, box2, eps=1e-7, floor=0.0):
  """ProbIoU from Llerena et al. 2021 in float64, with the YOLO reference's eps placement.

  Gaussians N(c, R diag(w^2/12 + floor, h^2/12 + floor) R^T); Bhattacharyya distance of N1, N2
  with S = S1 + S2: B = d^T S^-1 d / 4 + ln(det S / (4 sqrt(det S1 det S2))) / 2, clamped to
  [eps, 100]; ProbIoU = 1 - sqrt(1 - exp(-B) + eps).
  """
  b1, b2 = np.broadcast_arrays(np.asarray(box1, np.float64), np.asarray(box2, np.float64))

  def cov(b):
    vw, vh = b[..., 2] ** 2 / 12 + floor, b[..., 3] ** 2 / 12 + floor
    c, s = np.cos(b[..., 4]), np.sin(b[..., 4])
    return vw * c * c + vh * s * s, vw * s * s + vh * c * c, (vw - vh) * c * s

  a1, p1, c1 = cov(b1)
  a2, p2, c2 = cov(b2)
  a, p, c = a1 + a2, p1 + p2, c1 + c2
  dx, dy = b1[..., 0] - b2[..., 0], b1[..., 1] - b2[..., 1]
  det = a * p - c * c
  quad = (p * dx * dx + a * dy * dy - 2 * c * dx * dy) / (det + eps) / 4  # d^T adj(S) d / det(S) / 4
  d1, d2 = np.maximum(a1 * p1 - c1 * c1, 0), np.maximum(a2 * p2 - c2 * c2, 0)
  log = np.log(det / (4 * np.sqrt(d1 * d2) + eps) + eps) / 2
  bd = np.clip(quad + log, eps, 100.0)
  return 1 - np.sqrt(1 - np.exp(-bd) + eps)


def np_rotated_inside(anchors, boxes):
  """``(G, A)``: anchor centre within the rotated box, edges included (projections on the box axes)."""
  d = anchors[None, :, :] - boxes[:, None, :2]
  c, s = np.cos(boxes[:, 4:5]), np.sin(boxes[:, 4:5])
  u, v = d[..., 0] * c + d[..., 1] * s, d[..., 1] * c - d[..., 0] * s
  return (np.abs(u) <= boxes[:, 2:3] / 2 + 1e-9) & (np.abs(v) <= boxes[:, 3:4] / 2 + 1e-9)


def hellinger2(iou):
  return (1 - np.asarray(iou, np.float64)) ** 2


# ----------------------------------------------------------------------------- shared problems


def head(seed=0, b=B, layout="NHWC", reg_max=R, nc=NC):
  """Random head maps and angle maps (angles in the head's range [-pi/4, 3pi/4])."""
  rng = np.random.default_rng(seed)
  feats, angles = [], []
  for h, w in SHAPES:
    f = rng.normal(0.0, 1.0, (b, h, w, 4 * reg_max + nc)).astype(np.float32)
    f[..., 4 * reg_max :] += 1.0
    a = rng.uniform(-PI / 4, 3 * PI / 4, (b, h, w, 1)).astype(np.float32)
    if layout == "NCHW":
      f, a = f.transpose(0, 3, 1, 2), a.transpose(0, 3, 1, 2)
    feats.append(np.ascontiguousarray(f))
    angles.append(np.ascontiguousarray(a))
  return feats, angles


def gt_of(rows_per_image, m=M):
  """rows_per_image: per image a list of (class, [cx, cy, w, h, angle]) in pixels."""
  labels = np.zeros((len(rows_per_image), m), np.int32)
  boxes = np.zeros((len(rows_per_image), m, 5), np.float32)
  mask = np.zeros((len(rows_per_image), m), bool)
  for i, rows in enumerate(rows_per_image):
    for j, (c, box) in enumerate(rows):
      labels[i, j], boxes[i, j], mask[i, j] = c, box, True
  return jaxtal.GroundTruth(labels, boxes, mask)


BASE_GT_ROWS = [
    [(0, [12.0, 14.0, 14.0, 8.0, 0.4]), (2, [22.0, 20.0, 10.0, 10.0, 0.0]), (1, [8.0, 24.0, 16.0, 3.0, -PI / 4])],
    [(1, [16.0, 16.0, 20.0, 6.0, PI / 2])],
]
BASE_GT = gt_of(BASE_GT_ROWS)


@functools.cache
def loss_step(**overrides):
  """One jitted value_and_grad of obb_loss w.r.t. (feats, angles), per configuration."""
  kw = {**KW, **overrides}

  def f(feats, angles, gt, class_weights=None):
    return jaxtal.obb_loss(jaxtal.Predictions(feats, angles=angles), gt, class_weights=class_weights, **kw)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def run_loss(feats, angles, gt, **overrides):
  (total, parts), (g, ga) = loss_step(**overrides)(feats, angles, gt)
  return float(total), jaxtal.OBBLossParts(*(float(p) for p in parts)), [np.asarray(x) for x in g], [np.asarray(x) for x in ga]


def assert_finite(total, parts, grads, angle_grads):
  assert np.isfinite(total) and all(np.isfinite(p) and p >= 0 for p in parts), (total, parts)
  for g in (*grads, *angle_grads):
    assert np.isfinite(g).all()


# ----------------------------------------------------------------------------- probiou


def test_probiou_hand_worked():
  # Concentric squares of sides 2 and 4: B = ln((2^2 + 4^2) / (2 * 2 * 4)) = ln(1.25), so 1 - sqrt(0.2).
  sq = jaxtal.probiou(jnp.array([5.0, 5.0, 2.0, 2.0, 0.3]), jnp.array([5.0, 5.0, 4.0, 4.0, -1.1]))
  np.testing.assert_allclose(sq, 1 - math.sqrt(0.2 + 1e-7), atol=2e-6)
  # The same 6 x 3 box moved 2 along its width: B = (1/4) * 4 / (2 * 36 / 12) = 1/6.
  a = jnp.array([[0.0, 0.0, 6.0, 3.0, 0.0]])
  b = jnp.array([[2.0, 0.0, 6.0, 3.0, 0.0]])
  np.testing.assert_allclose(jaxtal.probiou(a, b), [1 - math.sqrt(1 - math.exp(-1 / 6))], atol=2e-6)
  # ... and turned by 90 degrees with the move: the same distance along its width.
  np.testing.assert_allclose(
      jaxtal.probiou(jnp.array([0.0, 0.0, 6.0, 3.0, PI / 2]), jnp.array([0.0, 2.0, 6.0, 3.0, PI / 2])),
      1 - math.sqrt(1 - math.exp(-1 / 6)), atol=2e-6,
  )
  # Identical boxes: B is clamped to eps, 1 - sqrt(1 - exp(-1e-7) + 1e-7) = 0.99955 in exact
  # arithmetic, not 1 (float32 rounds 1 - exp(-1e-7) to 0.6e-7 or 1.2e-7: 0.99953 to 0.99960).
  np.testing.assert_allclose(jaxtal.probiou(a, a), [1 - math.sqrt(2e-7)], atol=5e-5)
  # Far apart: B clamps at 100, 1 - sqrt(1 + 1e-7) < 0 is clamped to 0.
  assert float(jaxtal.probiou(a, a + jnp.array([1000.0, 0, 0, 0, 0]))[0]) == 0.0


def test_probiou_broadcasts_and_matches_numpy():
  rng = np.random.default_rng(0)
  g = np.c_[rng.uniform(0, 40, (6, 2)), rng.uniform(2, 20, (6, 2)), rng.uniform(-2, 2, 6)].astype(np.float32)
  p = np.c_[rng.uniform(0, 40, (9, 2)), rng.uniform(2, 20, (9, 2)), rng.uniform(-2, 2, 9)].astype(np.float32)
  got = np.asarray(jax.jit(jaxtal.probiou)(g[:, None], p[None]))
  assert got.shape == (6, 9)
  np.testing.assert_allclose(got, np_probiou(g[:, None], p[None]), atol=2e-5)
  got = np.asarray(jaxtal.probiou(g[:, None], p[None], floor=0.5))
  np.testing.assert_allclose(got, np_probiou(g[:, None], p[None], floor=0.5), atol=2e-5)


def test_probiou_gradient_matches_finite_differences():
  """No custom VJP: autodiff through the guarded formula, checked against finite differences
  (well-conditioned pairs, one with a zero-width box)."""
  b1 = jnp.array([[3.0, 4.0, 6.0, 3.0, 0.4], [0.0, 0.0, 2.0, 5.0, -1.0], [0.0, 0.0, 4.0, 4.0, 0.3]])
  b2 = jnp.array([[4.0, 3.5, 5.0, 4.0, 0.1], [1.0, 0.5, 3.0, 4.0, -0.6], [0.5, 0.2, 0.0, 3.0, 0.0]])
  for floor in (0.0, 0.01):
    f = jax.jit(functools.partial(jaxtal.probiou, floor=floor))
    jax.test_util.check_grads(f, (b1, b2), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


def test_probiou_rejects_other_boxes():
  with pytest.raises(ValueError, match=r"probiou: boxes must be xywhr with 5 numbers in the last axis, got shapes \(3, 4\)"):
    jaxtal.probiou(jnp.zeros((3, 4)), jnp.zeros((3, 5)))


finite32 = st.floats(-50.0, 50.0, width=32)
side32 = st.floats(0.5, 40.0, width=32)
angle32 = st.floats(-7.0, 7.0, width=32)
xywhr = st.tuples(finite32, finite32, side32, side32, angle32).map(lambda t: np.array(t, np.float32))


@functools.cache
def _probiou_jit():
  def f(a, b):
    return jaxtal.probiou(a, b), jax.grad(lambda x, y: jaxtal.probiou(x, y).sum(), argnums=(0, 1))(a, b)

  return jax.jit(f)


@SETTINGS
@given(st.lists(st.tuples(xywhr, xywhr), min_size=8, max_size=8))
def test_probiou_properties(pairs):
  """Symmetric, ~1 for identical boxes, unchanged by a half turn, in [0, 1]."""
  b1 = np.stack([p[0] for p in pairs])
  b2 = np.stack([p[1] for p in pairs])
  f = _probiou_jit()
  iou, _ = f(b1, b2)
  iou_swapped, _ = f(b2, b1)
  np.testing.assert_allclose(iou, iou_swapped, atol=1e-7, rtol=0)
  assert (np.asarray(iou) >= 0).all() and (np.asarray(iou) <= 1).all()
  same, _ = f(b1, b1)
  assert (np.abs(np.asarray(same) - 1) <= 5e-4).all(), same
  turned, _ = f(b1 + np.array([0, 0, 0, 0, PI], np.float32), b2)
  # Half a turn changes cos and sin by rounding only; float32 resolves ProbIoU to about 1e-4 in
  # the squared Hellinger distance for thin near-identical pairs (see test_parity_obb.py).
  assert np.max(np.abs(hellinger2(turned) - hellinger2(iou))) <= 1e-4
  assert np.max(np.abs(hellinger2(iou) - hellinger2(np_probiou(b1, b2)))) <= 1e-4


degenerate_value = st.sampled_from([0.0, -0.0, 1e-30, -3.0, 1e30, -1e30, float(2**20), 2.0**21, np.nan, np.inf, -np.inf])


@SETTINGS
@given(st.lists(st.tuples(xywhr, st.integers(0, 4), degenerate_value), min_size=8, max_size=8), st.lists(xywhr, min_size=8, max_size=8))
def test_probiou_degenerate_boxes_are_finite_with_finite_gradients(spoiled, others):
  b1 = np.stack([box for box, _, _ in spoiled])
  for i, (_, k, v) in enumerate(spoiled):
    b1[i, k] = v
  b2 = np.stack(others)
  f = _probiou_jit()
  for x, y in ((b1, b2), (b2, b1), (b1, b1)):
    iou, grads = f(x, y)
    iou = np.asarray(iou)
    assert np.isfinite(iou).all() and (iou >= 0).all() and (iou <= 1).all(), iou
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  # A box with a non-finite value or one beyond COORD_LIMIT overlaps nothing.
  bad = ~(np.abs(b1) <= jaxtal.COORD_LIMIT).all(-1)
  assert (np.asarray(f(b1, b2)[0])[bad] == 0).all()
  assert _probiou_jit()._cache_size() == 1


# ----------------------------------------------------------------------------- decode


def test_decode_rotated_boxes_hand_worked():
  anchors = jnp.array([[2.0, 3.0], [5.0, 5.0]])
  dist = jnp.array([[[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]])  # reg_max = 1: the distances themselves
  angle = jnp.array([[[0.0], [0.0]]])
  out = np.asarray(jaxtal.decode_rotated_boxes(dist, angle, anchors, reg_max=1))
  np.testing.assert_allclose(out[0], [[3.0, 4.0, 4.0, 6.0, 0.0], [5.0, 5.0, 2.0, 2.0, 0.0]])
  # Turned a quarter: the centre offset (1, 1) becomes (-1, 1); sides stay.
  out = np.asarray(jaxtal.decode_rotated_boxes(dist, angle + PI / 2, anchors, reg_max=1))
  np.testing.assert_allclose(out[0, 0], [1.0, 4.0, 4.0, 6.0, PI / 2], atol=1e-6)


def test_decode_rotated_boxes_matches_numpy_and_xywhr_to_ltrb_inverts_it():
  rng = np.random.default_rng(3)
  dist = rng.normal(0, 2, (2, 7, 4 * 16)).astype(np.float32)
  angle = rng.uniform(-1, 2.5, (2, 7, 1)).astype(np.float32)
  anchors = rng.uniform(0, 10, (7, 2)).astype(np.float32)
  got = np.asarray(jaxtal.decode_rotated_boxes(dist, angle, anchors, reg_max=16))
  d = np_dfl_expectation(dist, 16)
  off = np.stack([(d[..., 2] - d[..., 0]) / 2, (d[..., 3] - d[..., 1]) / 2], -1)
  c, s = np.cos(angle[..., 0]), np.sin(angle[..., 0])
  ctr = anchors + np.stack([off[..., 0] * c - off[..., 1] * s, off[..., 0] * s + off[..., 1] * c], -1)
  want = np.concatenate([ctr, d[..., :2] + d[..., 2:], angle], -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The loss's target distances are the inverse: distances of the decoded box are the decoded ones.
  np.testing.assert_allclose(np.asarray(xywhr_to_ltrb(jnp.asarray(got), anchors)), d, rtol=1e-4, atol=1e-4)


def test_decode_rotated_boxes_errors():
  with pytest.raises(ValueError, match=r"pred_dist last axis is 8, expected 4 \* reg_max = 64"):
    jaxtal.decode_rotated_boxes(jnp.zeros((1, 3, 8)), jnp.zeros((1, 3, 1)), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"pred_angle must be \(1, 3, 1\) \(one angle per anchor\), got \(1, 3\)"):
    jaxtal.decode_rotated_boxes(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3)), jnp.zeros((3, 2)), reg_max=1)
  with pytest.raises(ValueError, match=r"anchor_points must be \(A, 2\) with A = 3"):
    jaxtal.decode_rotated_boxes(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3, 1)), jnp.zeros((4, 2)), reg_max=1)


# ----------------------------------------------------------------------------- geometry


def test_rotated_geometry_values():
  g = jaxtal.rotated()
  assert g is jaxtal.rotated(0.0) and g.box_dim == 5 and g.name == "xywhr/probiou"
  assert jaxtal.rotated(2.0) is jaxtal.rotated(2) and jaxtal.rotated(2.0) is not g
  assert hash(g) == hash(jaxtal.rotated())
  with pytest.raises(ValueError, match=r"min_side must be a finite number >= 0, got -1.0"):
    jaxtal.rotated(-1)
  boxes = jnp.array([
      [10.0, 10.0, 4.0, 4.0, 0.3],
      [10.0, 10.0, 0.0, 4.0, 0.3],  # zero width
      [10.0, 10.0, 4.0, -1.0, 0.3],  # negative height
      [10.0, 10.0, 2.0, 1.99, 0.0],  # under 2 px
      [10.0, 10.0, 2.0, 2.0, 0.0],  # exactly 2 px
      [-3.0, 10.0, 4.0, 4.0, 0.0],  # x from -5 to -1: off the image
      [-3.0, 10.0, 4.0, 8.0, PI / 2],  # turned a quarter: x from -7 to 1, on the image
  ])
  np.testing.assert_array_equal(g.box_ok(boxes), [True, False, False, True, True, True, True])
  np.testing.assert_array_equal(jaxtal.rotated(2.0).box_ok(boxes), [True, False, False, False, True, True, True])
  np.testing.assert_array_equal(g.on_image(boxes, (32, 32)), [True, True, True, True, True, False, True])


@functools.partial(jax.jit, static_argnames=("min_box_side",))
def _candidate_pairs(boxes, anchors, *, min_box_side):
  g = jaxtal.rotated()
  gd = g.gt_data(boxes, jnp.ones(boxes.shape[0], bool), min_box_side)
  pd = g.pred_data(jnp.zeros((anchors.shape[0], 5)), anchors)
  return g.candidate(jax.tree.map(lambda x: x[:, None], gd), jax.tree.map(lambda x: x[None], pd), 1e-9)


def _candidates(boxes, anchors, min_box_side=0.0):
  return np.asarray(_candidate_pairs(np.asarray(boxes, np.float32), np.asarray(anchors, np.float32), min_box_side=min_box_side))


def test_rotated_candidate_includes_edges_and_widens_small_boxes():
  # Edges at x = 56, 72 and y = 56, 72; stride-16 anchors lie exactly on them.
  anchors = np.array([[56.0, 56.0], [72.0, 64.0], [64.0, 72.0], [55.9, 64.0], [64.0, 72.1], [64.0, 64.0]])
  np.testing.assert_array_equal(_candidates([[64.0, 64.0, 16.0, 16.0, 0.0]], anchors)[0], [1, 1, 1, 0, 0, 1])
  # The axis-aligned test is strict: the same square excludes its edges.
  aa = jaxtal.axis_aligned()
  gd = aa.gt_data(jnp.array([[56.0, 56.0, 72.0, 72.0]]), jnp.array([True]), 0.0)
  pd = aa.pred_data(jnp.zeros((6, 4)), jnp.asarray(anchors, jnp.float32))
  strict = np.asarray(aa.candidate(jax.tree.map(lambda x: x[:, None], gd), jax.tree.map(lambda x: x[None], pd), 1e-9))
  np.testing.assert_array_equal(strict[0], [0, 0, 0, 0, 0, 1])
  # A box turned 45 degrees: a diamond; its corners' neighbourhoods are outside.
  diamond = [[0.0, 0.0, 10.0, 10.0, PI / 4]]
  pts = np.array([[0.0, 7.0], [0.0, 7.1], [3.5, 3.5], [3.6, 3.6], [4.0, 0.0]])
  np.testing.assert_array_equal(_candidates(diamond, pts)[0], [1, 0, 1, 0, 1])
  np.testing.assert_array_equal(_candidates(diamond, pts)[0], np_rotated_inside(pts, np.array(diamond))[0])
  # A 2 x 1 box widened to 8 x 8 about its centre (and turned with it).
  small = [[10.0, 10.0, 2.0, 1.0, 0.5]]
  pts = np.array([[13.0, 10.0], [10.0, 13.0], [15.0, 10.0]])
  np.testing.assert_array_equal(_candidates(small, pts)[0], [0, 0, 0])
  np.testing.assert_array_equal(_candidates(small, pts, 8.0)[0], np_rotated_inside(pts, np.array([[10, 10, 8, 8, 0.5]]))[0])
  assert _candidates(small, pts, 8.0)[0].tolist() == [True, True, False]


# ----------------------------------------------------------------------------- rotated assigner


def random_assign_inputs(rng, b=B, m=M, nc=NC):
  scores = rng.uniform(0.0, 1.0, (b, A, nc)).astype(np.float32)
  pred = np.concatenate(
      [ANCHORS_PX[None] + rng.normal(0, 2.0, (b, A, 2)), rng.uniform(2, 14, (b, A, 2)), rng.uniform(-1, 2.5, (b, A, 1))], -1
  ).astype(np.float32)
  labels = rng.integers(0, nc, (b, m)).astype(np.int32)
  boxes = np.concatenate([rng.uniform(4, 28, (b, m, 2)), rng.uniform(3, 16, (b, m, 2)), rng.uniform(-3, 3, (b, m, 1))], -1)
  mask = rng.uniform(size=(b, m)) < 0.8
  return scores, pred, jaxtal.GroundTruth(labels, boxes.astype(np.float32), mask)


@functools.cache
def assign_jit(**config):
  return jax.jit(functools.partial(jaxtal.rotated_task_aligned_assign, topk=4, **config))


def _turn(boxes):
  """Every box turned a quarter about the image centre: (x, y) -> (IMAGE - y, x), angle + pi/2."""
  return np.concatenate([IMAGE - boxes[..., 1:2], boxes[..., 0:1], boxes[..., 2:4], boxes[..., 4:5] + np.float32(PI / 2)], -1)


QUARTER = np.array([np.flatnonzero((ANCHORS_PX == [IMAGE - p[1], p[0]]).all(1))[0] for p in ANCHORS_PX])  # anchor a -> QUARTER[a]


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 8.0]))
def test_quarter_turn_permutes_the_assignment(seed, min_box_side):
  """Turning every box and the image by 90 degrees moves each anchor's assignment to the turned anchor."""
  assert sorted(QUARTER.tolist()) == list(range(A))  # the anchor grid maps onto itself
  scores, pred, gt = random_assign_inputs(np.random.default_rng(seed))
  f = assign_jit(min_box_side=min_box_side)
  out = f(scores, pred, ANCHORS_PX, gt)
  scores_t, pred_t = np.empty_like(scores), np.empty_like(pred)
  scores_t[:, QUARTER], pred_t[:, QUARTER] = scores, _turn(pred)
  turned = f(scores_t, pred_t, ANCHORS_PX, gt._replace(boxes=_turn(gt.boxes)))
  s, s_t = np.asarray(out.scores), np.asarray(turned.scores)[:, QUARTER]
  np.testing.assert_allclose(s_t, s, rtol=1e-3, atol=1e-5)
  scored = s.sum(-1) > 1e-5
  assert scored.any()
  np.testing.assert_array_equal(np.asarray(turned.gt_index)[:, QUARTER][scored], np.asarray(out.gt_index)[scored])
  np.testing.assert_array_equal(np.asarray(turned.fg_mask)[:, QUARTER][scored], True)


def test_rotated_assign_candidates_match_numpy_and_padding_owns_nothing():
  scores, pred, gt = random_assign_inputs(np.random.default_rng(11))
  out = assign_jit(min_box_side=0.0)(scores, pred, ANCHORS_PX, gt)
  fg, idx = np.asarray(out.fg_mask), np.asarray(out.gt_index)
  for i in range(B):
    inside = np_rotated_inside(ANCHORS_PX.astype(np.float64), np.asarray(gt.boxes[i], np.float64))
    owned = fg[i]
    assert inside[idx[i, owned], np.flatnonzero(owned)].all()  # every positive lies in its GT
    assert gt.mask[i, idx[i, owned]].all()  # never a padding slot
    np.testing.assert_array_equal(np.asarray(out.positives_per_gt)[i], np.bincount(idx[i, owned], minlength=M))
    np.testing.assert_allclose(np.asarray(out.boxes)[i, owned], gt.boxes[i, idx[i, owned]])


@pytest.mark.slow
def test_rotated_assign_gt_chunk_matches_dense():
  case, _, _ = obb_cases.load_fixture("assign", "angles")
  x = case["inputs"]
  gt = jaxtal.GroundTruth(x["gt_labels"], x["gt_boxes"], x["gt_mask"])
  cfg = dict(case["config"])
  run = lambda chunk: jax.jit(functools.partial(jaxtal.rotated_task_aligned_assign, gt_chunk=chunk, **cfg))(  # noqa: E731
      x["pred_scores"], x["pred_boxes"], x["anchor_points"], gt
  )
  dense, chunked = run(None), run(3)
  for key in ("labels", "boxes", "fg_mask", "gt_index", "positives_per_gt"):
    np.testing.assert_array_equal(getattr(chunked, key), getattr(dense, key), err_msg=key)
  np.testing.assert_allclose(chunked.scores, dense.scores, rtol=1e-5, atol=1e-6)


def test_rotated_assign_validation():
  scores, pred, gt = random_assign_inputs(np.random.default_rng(0))
  with pytest.raises(ValueError, match=r"rotated_task_aligned_assign: pred_boxes must be \(b, A, 5\)"):
    jaxtal.rotated_task_aligned_assign(scores, pred[..., :4], ANCHORS_PX, gt)
  with pytest.raises(ValueError, match=r"gt.boxes must be \(b, M, 5\) = \(2, 5, 5\) xywhr pixels"):
    jaxtal.rotated_task_aligned_assign(scores, pred, ANCHORS_PX, gt._replace(boxes=gt.boxes[..., :4]))
  with pytest.raises(ValueError, match=r"rotated boxes always use ProbIoU as the overlap"):
    jaxtal.rotated_task_aligned_assign(scores, pred, ANCHORS_PX, gt, overlap="iou")
  with pytest.raises(TypeError, match=r"unknown configuration keyword\(s\) \['top_k'\]"):
    jaxtal.rotated_task_aligned_assign(scores, pred, ANCHORS_PX, gt, top_k=3)


# ----------------------------------------------------------------------------- loss


def test_obb_loss_config():
  cfg = jaxtal.OBBLossConfig(num_classes=3, strides=[8, 16], angle=2.0)
  assert isinstance(cfg, jaxtal.LossConfig) and cfg.angle == 2.0 and cfg.strides == (8, 16) and hash(cfg) == hash(dataclasses.replace(cfg))
  assert jaxtal.OBBLossConfig(num_classes=3, strides=(8,)).angle == 1.0
  with pytest.raises(ValueError, match=r"angle must be a finite number, got nan"):
    jaxtal.OBBLossConfig(num_classes=3, strides=(8,), angle=float("nan"))
  with pytest.raises(TypeError):
    jaxtal.OBBLossConfig(3, (8,))  # keyword-only
  feats, angles = head()
  with pytest.raises(TypeError, match=r"obb_loss: config must be a jaxtal.OBBLossConfig, got LossConfig"):
    jaxtal.obb_loss(jaxtal.Predictions(feats, angles=angles), BASE_GT, jaxtal.LossConfig(**KW))
  with pytest.raises(TypeError, match=r"obb_loss: unknown configuration keyword\(s\) \['angel'\]"):
    jaxtal.obb_loss(jaxtal.Predictions(feats, angles=angles), BASE_GT, angel=1.0, **KW)


def test_obb_loss_validation():
  feats, angles = head()
  with pytest.raises(TypeError, match=r"obb_loss: angles must be a list of per-level maps, one per level of feats \(2\)"):
    jaxtal.obb_loss(jaxtal.Predictions(feats, angles=angles[:1]), BASE_GT, **KW)
  with pytest.raises(ValueError, match=r"angles\[1\] must be \(2, 4, 4, 1\) \(NHWC: 1 per cell of feats\[1\]\)"):
    jaxtal.obb_loss(jaxtal.Predictions(feats, angles=[angles[0], angles[1][..., 0]]), BASE_GT, **KW)
  with pytest.raises(TypeError, match=r"angles\[0\] must be a float array, got dtype int32"):
    jaxtal.obb_loss(jaxtal.Predictions(feats, angles=[angles[0].astype(np.int32), angles[1]]), BASE_GT, **KW)
  with pytest.raises(ValueError, match=r"obb_loss: gt.boxes must be \(b, M, 5\)"):
    jaxtal.obb_loss(jaxtal.Predictions(feats, angles=angles), jaxtal.GroundTruth(BASE_GT.labels, BASE_GT.boxes[..., :4], BASE_GT.mask), **KW)
  with pytest.raises(ValueError, match=r"class_weights must have shape \(nc,\) = \(3,\)"):
    jaxtal.obb_loss(jaxtal.Predictions(feats, angles=angles), BASE_GT, class_weights=np.ones(4, np.float32), **KW)


@jax.jit
def _variants(feats, angles, gt, class_weights):
  """One compilation for several settings: (angle gain 2.5, class weights, angle gain 0) parts."""
  return (
      jaxtal.obb_loss(jaxtal.Predictions(feats, angles=angles), gt, angle=2.5, **KW)[1],
      jaxtal.obb_loss(jaxtal.Predictions(feats, angles=angles), gt, class_weights=class_weights, **KW)[1],
      jax.grad(lambda a: jaxtal.obb_loss(jaxtal.Predictions(feats, angles=a), gt, angle=0.0, **KW)[0])(angles),
  )


@pytest.mark.slow
def test_obb_loss_parts_gains_and_class_weights():
  feats, angles = head()
  total, parts, grads, angle_grads = run_loss(feats, angles, BASE_GT)
  assert_finite(total, parts, grads, angle_grads)
  assert min(parts) > 0
  np.testing.assert_allclose(total, sum(parts) * B, rtol=1e-6)
  assert isinstance(jaxtal.OBBLossParts(1, 2, 3, 4), tuple) and jaxtal.OBBLossParts._fields == ("box", "cls", "dfl", "angle")
  gained, weighted, box_only_angle_grads = _variants(feats, angles, BASE_GT, np.array([1.0, 2.0, 0.5], np.float32))
  np.testing.assert_allclose(float(gained.angle), 2.5 * parts.angle, rtol=1e-6)
  np.testing.assert_allclose([float(p) for p in gained[:3]], parts[:3], rtol=1e-6)
  # Class weights change the class term only.
  assert abs(float(weighted.cls) - parts.cls) > 1e-3 * parts.cls
  np.testing.assert_allclose([float(weighted.box), float(weighted.dfl), float(weighted.angle)], [parts.box, parts.dfl, parts.angle], rtol=1e-6)
  # The box term and the angle term both train the angle maps.
  box_only = [np.asarray(g) for g in box_only_angle_grads]
  assert max(np.abs(g).max() for g in box_only) > 0
  assert max(np.abs(g - w).max() for g, w in zip(box_only, angle_grads)) > 0


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_empty_batch_has_only_the_class_term():
  feats, angles = head()
  total, parts, grads, angle_grads = run_loss(feats, angles, gt_of([[], []]))
  assert parts.box == parts.dfl == parts.angle == 0.0 and parts.cls > 0
  assert all(not g.any() for g in angle_grads)


def test_loss_masks_rows_under_two_pixels_of_a_gt_built_directly():
  feats, angles = head()
  tiny = [(0, [20.0, 8.0, 1.5, 9.0, 0.2]), (1, [6.0, 6.0, 9.0, 1.99, 1.0])]
  with_tiny = gt_of([BASE_GT_ROWS[0] + tiny[:1], tiny[1:] + BASE_GT_ROWS[1]])
  # Slots move (the tiny row of image 1 comes first), which the loss does not see.
  a, b = run_loss(feats, angles, with_tiny), run_loss(feats, angles, BASE_GT)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  np.testing.assert_allclose(list(a[1]), list(b[1]), rtol=1e-6)
  # ... and exactly 2 px is kept: it changes the loss.
  kept = gt_of([BASE_GT_ROWS[0] + [(0, [20.0, 8.0, 2.0, 9.0, 0.2])], BASE_GT_ROWS[1]])
  assert abs(run_loss(feats, angles, kept)[0] - b[0]) > 1e-4


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_module_matches_function_and_nhwc_matches_nchw():
  feats, angles = head()
  want_total, want_parts, _, _ = run_loss(feats, angles, BASE_GT)
  module = jaxtal.OBBLoss(**KW)
  assert isinstance(module.config, jaxtal.OBBLossConfig)
  nchw = [f.transpose(0, 3, 1, 2) for f in feats], [a.transpose(0, 3, 1, 2) for a in angles]

  @nnx.jit
  def both(m, f, a, f_nchw, a_nchw, g):  # one compilation for the two spellings
    return m(jaxtal.Predictions(f, angles=a), g), jaxtal.obb_loss(jaxtal.Predictions(f_nchw, angles=a_nchw), g, layout="NCHW", **KW)

  for total, parts in both(module, feats, angles, *nchw, BASE_GT):
    np.testing.assert_allclose(float(total), want_total, rtol=1e-6)
    np.testing.assert_allclose([float(p) for p in parts], list(want_parts), rtol=1e-6)


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_end_to_end_loss_with_obb_loss():
  """YOLO26-style two branches: w * total(topk 10) + (1 - w) * total(topk 7, topk2 1), one2one parts."""
  (f1, a1), (f2, a2) = head(0), head(1)
  cfg = jaxtal.OBBLossConfig(**KW)  # topk 10
  w = 0.3

  @jax.jit
  def run(f1, a1, f2, a2, g):  # the combinator and, by hand, its two branches (one compilation)
    e2e = jaxtal.end_to_end_loss(jaxtal.obb_loss, jaxtal.Predictions(f1, angles=a1), jaxtal.Predictions(f2, angles=a2), g, weight=w, config=cfg)
    return e2e, jaxtal.obb_loss(jaxtal.Predictions(f1, angles=a1), g, config=cfg), jaxtal.obb_loss(jaxtal.Predictions(f2, angles=a2), g, config=cfg, topk=7, topk2=1)

  (total, parts), many, one = run(f1, a1, f2, a2, BASE_GT)
  assert isinstance(parts, jaxtal.OBBLossParts)
  assert float(many[0]) != float(one[0])
  np.testing.assert_allclose(float(total), w * float(many[0]) + (1 - w) * float(one[0]), rtol=1e-5)
  np.testing.assert_allclose([float(p) for p in parts], [float(p) for p in one[1]], rtol=1e-5)


@pytest.mark.slow
def test_axis_name_gives_the_global_loss_on_every_shard():
  """Under a mapped axis (vmap stands in for shard_map), each shard returns the global loss and
  the gradient of the global loss w.r.t. its own maps."""
  feats, angles = head()
  total, parts, grads, angle_grads = run_loss(feats, angles, BASE_GT)
  split = lambda x: np.asarray(x).reshape(2, -1, *np.shape(x)[1:])  # noqa: E731

  def local(f, a, g):
    fn = lambda f, a: jaxtal.obb_loss(jaxtal.Predictions(f, angles=a), g, axis_name="data", **KW)  # noqa: E731
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(f, a)

  (t, p), (g, ga) = jax.jit(jax.vmap(local, axis_name="data"))(
      [split(f) for f in feats], [split(a) for a in angles], jax.tree.map(split, BASE_GT)
  )
  np.testing.assert_allclose(np.asarray(t), total, rtol=1e-5)
  for got, want in zip(p, parts):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  for got, want in zip((*g, *ga), (*grads, *angle_grads)):
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def _swap_sides(feats):
  """Head maps with the l/r and t/b bins swapped (the same box described from the opposite side)."""
  out = []
  for f in feats:
    bins = f[..., : 4 * R].reshape(*f.shape[:-1], 4, R)[..., [2, 3, 0, 1], :]
    out.append(np.concatenate([bins.reshape(*f.shape[:-1], 4 * R), f[..., 4 * R :]], -1))
  return out


gt_row = st.tuples(
    st.integers(0, NC - 1),
    st.floats(4.0, 28.0, width=32), st.floats(4.0, 28.0, width=32),
    st.floats(2.5, 16.0, width=32), st.floats(2.5, 16.0, width=32),
    st.floats(-3.125, 3.125, width=32),
)


@SETTINGS
@given(st.lists(gt_row, min_size=1, max_size=M), st.lists(gt_row, min_size=0, max_size=M))
def test_half_turn_of_every_box_gives_the_same_loss(rows0, rows1):
  """A GT box and the same box at angle + pi give the same box, class and angle terms (and the
  same assignment). The DFL term measures distances along the target's own axes, so l/r and t/b
  swap (Ultralytics alike, see test_parity_obb.py); turning the predicted boxes the same way
  (angles + pi, l/r and t/b bins swapped) describes the same boxes, and the whole loss and its
  gradients (mapped back) are unchanged."""
  to_gt = lambda rows, turn: gt_of([[(r[0], [*r[1:5], r[5] + turn]) for r in rs] for rs in rows])  # noqa: E731
  gt, gt_turned = to_gt((rows0, rows1), 0.0), to_gt((rows0, rows1), PI)
  feats, angles = head(5)
  base = run_loss(feats, angles, gt)
  half = run_loss(feats, angles, gt_turned)
  for key in ("box", "cls", "angle"):
    np.testing.assert_allclose(getattr(half[1], key), getattr(base[1], key), rtol=2e-4, atol=1e-6, err_msg=key)
  both = run_loss(_swap_sides(feats), [a + np.float32(PI) for a in angles], gt_turned)
  np.testing.assert_allclose(both[0], base[0], rtol=2e-4)
  np.testing.assert_allclose(list(both[1]), list(base[1]), rtol=2e-4, atol=1e-6)
  for g, want in zip(_swap_sides(both[2]), base[2]):
    np.testing.assert_allclose(g, want, atol=2e-3 * np.abs(want).max())
  for g, want in zip(both[3], base[3]):
    np.testing.assert_allclose(g, want, atol=2e-3 * max(np.abs(want).max(), 1e-6))


_COMPILED: dict[str, int] = {}
DEGENERATE_KINDS = (
    "real", "real", "padding", "nan_side", "inf", "zero_side", "negative_side", "huge", "at_limit", "big_valid",
    "nan_angle", "inf_angle", "huge_angle", "class_high", "class_neg", "tiny",
)


@st.composite
def degenerate_gt(draw):
  labels = np.zeros((B, M), np.int32)
  boxes = np.zeros((B, M, 5), np.float32)
  mask = np.zeros((B, M), bool)
  for i in range(B):
    for j in range(M):
      kind = draw(st.sampled_from(DEGENERATE_KINDS))
      cls, *box = draw(gt_row)
      box = np.array(box, np.float32)
      if kind == "padding" and draw(st.booleans()):  # padding may hold anything
        cls, box = draw(st.integers(-5, 99)), np.array([np.nan, 1.0, -np.inf, 0.0, 7.0], np.float32)
      elif kind == "nan_side":
        box[draw(st.integers(0, 3))] = np.nan
      elif kind == "inf":
        box[draw(st.integers(0, 3))] = draw(st.sampled_from([np.inf, -np.inf]))
      elif kind == "zero_side":
        box[draw(st.integers(2, 3))] = 0.0
      elif kind == "negative_side":
        box[draw(st.integers(2, 3))] = -4.0
      elif kind == "huge":
        box[draw(st.integers(0, 3))] = draw(st.sampled_from([3e7, -1e30, 1e38]))
      elif kind == "at_limit":
        box[draw(st.integers(2, 3))] = jaxtal.COORD_LIMIT
      elif kind == "big_valid":
        box[2:4] = [5e5, 3.0]
      elif kind == "nan_angle":
        box[4] = np.nan
      elif kind == "inf_angle":
        box[4] = np.inf
      elif kind == "huge_angle":
        box[4] = draw(st.sampled_from([1e5, -7e5, 2.0**20]))
      elif kind == "class_high":
        cls = draw(st.integers(NC, NC + 50))
      elif kind == "class_neg":
        cls = draw(st.integers(-50, -1))
      elif kind == "tiny":
        box[draw(st.integers(2, 3))] = draw(st.sampled_from([1e-30, 0.5, 1.99]))
      labels[i, j], boxes[i, j], mask[i, j] = cls, box, kind != "padding"
  return jaxtal.GroundTruth(labels, boxes, mask)


@SETTINGS
@given(degenerate_gt(), st.sampled_from([1.0, 1e4, 1e30]))
def test_degenerate_inputs_give_finite_loss_and_gradients(gt, angle_scale):
  """Huge, zero, NaN sides and angles, out-of-range classes, padding holding anything, huge predicted
  angles: value and gradients finite, one compilation."""
  feats, angles = head(2)
  angles = [a * np.float32(angle_scale) for a in angles]
  assert_finite(*run_loss(feats, angles, gt))
  size = loss_step()._cache_size()  # other tests share the step: no example may add a compilation
  assert _COMPILED.setdefault("degenerate", size) == size


def test_degenerate_rows_own_nothing():
  """Rows that do not count (each for a reason named here) own nothing: the loss is the empty batch's."""
  gt = gt_of([
      [(0, [12.0, 14.0, np.nan, 8.0, 0.4]), (5, [12.0, 14.0, 14.0, 8.0, 0.4]), (1, [12.0, 14.0, 14.0, 1.5, 0.4])],
      [(1, [16.0, 16.0, 20.0, 6.0, np.inf]), (2, [16.0, 16.0, 3e6, 6.0, 0.0]), (0, [-20.0, -20.0, 8.0, 8.0, 0.0])],
  ])
  feats, angles = head()
  got, empty = run_loss(feats, angles, gt), run_loss(feats, angles, gt_of([[], []]))
  assert got[1].box == got[1].dfl == got[1].angle == 0.0
  np.testing.assert_array_equal(got[0], empty[0])
  for g, e in zip((*got[2], *got[3]), (*empty[2], *empty[3])):
    np.testing.assert_array_equal(g, e)
