"""Degenerate inputs, one test each: the loss stays finite (value and gradients) and the targets are what a
user would expect. Expectations are computed here from the inputs, never by the code under test.

The last tests are a property (hypothesis): ground truth whose coordinates are drawn from every kind of
float32 (ordinary, any finite magnitude up to 3.4e38 of either sign, NaN, +-inf, +-COORD_LIMIT and one ulp
beyond), with any class id and mask, run through one jitted ``value_and_grad`` of the loss: the loss and
its gradients are finite, and equal those of the same batch with every invalid row made padding.
"""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import jaxtal
from oracles import np_valid_rows

NC, R = 3, 4
SHAPES = ((8, 8), (4, 4))
STRIDES = (4, 8)
IMAGE = 32
A = sum(h * w for h, w in SHAPES)
B = 2
TOPK = 10
KW = dict(num_classes=NC, strides=STRIDES, reg_max=R, topk=TOPK)

ANCHORS, ANCHOR_STRIDES = (np.asarray(x) for x in jaxtal.make_anchors(SHAPES, STRIDES))
ANCHORS_PX = ANCHORS * ANCHOR_STRIDES


def head_maps(seed=0, scale=1.0, dtype=jnp.float32, b=B):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(0.0, scale, (b, h, w, 4 * R + NC)), dtype) for h, w in SHAPES]


def make_gt(rows_per_image, m):
  """rows_per_image: one list of (class, [x1, y1, x2, y2]) per image, padded to ``m``."""
  labels = np.zeros((len(rows_per_image), m), np.int32)
  boxes = np.zeros((len(rows_per_image), m, 4), np.float32)
  mask = np.zeros((len(rows_per_image), m), bool)
  for i, rows in enumerate(rows_per_image):
    for j, (c, box) in enumerate(rows):
      labels[i, j], boxes[i, j], mask[i, j] = c, box, True
  return jaxtal.GroundTruth(jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(mask))


@functools.cache
def loss_step(min_box_side=0.0):
  def loss(feats, gt):
    return jaxtal.detection_loss(feats, gt, min_box_side=min_box_side, **KW)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def loss_and_grads(feats, gt, min_box_side=0.0):
  (total, parts), grads = loss_step(min_box_side)(feats, gt)
  return float(total), [float(p) for p in parts], grads


def assert_finite(total, parts, grads):
  assert np.isfinite(total) and all(np.isfinite(p) and p >= 0 for p in parts), (total, parts)
  for g in grads:
    assert np.isfinite(np.asarray(g, np.float32)).all()


@functools.cache
def assign(min_box_side=0.0, topk=TOPK):
  return jax.jit(functools.partial(jaxtal.task_aligned_assign, topk=topk, min_box_side=min_box_side))


def preds_around_anchors(ltrb=4.0, b=B, seed=0):
  rng = np.random.default_rng(seed)
  scores = jnp.asarray(rng.uniform(0.1, 0.9, (b, A, NC)), jnp.float32)
  boxes = jnp.asarray(np.concatenate([ANCHORS_PX - ltrb, ANCHORS_PX + ltrb], -1)[None].repeat(b, 0), jnp.float32)
  return scores, boxes


def np_softplus(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_no_labels():
  """n = 0 rows: all background; cls is the BCE against zeros over N = 1; box and DFL are exactly 0."""
  feats = head_maps()
  gt = jaxtal.pack_labels(np.zeros((0, 6), np.float32), B, 3, (IMAGE, IMAGE))
  assert not np.asarray(gt.mask).any()
  total, parts, grads = loss_and_grads(feats, jax.tree.map(jnp.asarray, gt))
  assert_finite(total, parts, grads)
  logits = np.concatenate([np.asarray(f)[..., 4 * R :].reshape(B, -1, NC) for f in feats], 1)
  expected_cls = 0.5 * np_softplus(logits).sum()
  assert parts[0] == 0.0 and parts[2] == 0.0
  np.testing.assert_allclose(parts[1], expected_cls, rtol=1e-5)
  np.testing.assert_allclose(total, expected_cls * B, rtol=1e-5)
  for g in grads:  # no box term: the distribution logits get no gradient at all
    assert (np.asarray(g)[..., : 4 * R] == 0).all()
  out = assign()(*preds_around_anchors(), jnp.asarray(ANCHORS_PX), jax.tree.map(jnp.asarray, gt))
  assert not np.asarray(out.fg_mask).any() and not np.asarray(out.scores).any()


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_one_slot_per_image_equals_the_same_boxes_padded():
  """M = 1 works and gives what the same boxes give in a padded M = 3 batch."""
  rows = [[(1, [4.0, 6.0, 22.0, 20.0])], [(2, [10.0, 3.0, 30.0, 29.0])]]
  feats = head_maps(seed=1)
  one = loss_and_grads(feats, make_gt(rows, 1))
  four = loss_and_grads(feats, make_gt(rows, 3))
  assert_finite(*one)
  assert one[1][0] > 0  # both images have positives
  np.testing.assert_allclose(one[0], four[0], rtol=1e-6)
  for g1, g4 in zip(one[2], four[2]):
    np.testing.assert_allclose(g1, g4, rtol=1e-5, atol=1e-8)
  out = assign()(*preds_around_anchors(), jnp.asarray(ANCHORS_PX), make_gt(rows, 1))
  assert (np.asarray(out.gt_index) == 0).all() and np.asarray(out.fg_mask).sum(1).tolist() == [TOPK, TOPK]


@pytest.mark.parametrize("box", [[0.0, 0.0, 32.0, 32.0], [-50.0, -40.0, 90.0, 70.0]])
def test_gt_covering_the_whole_image(box):
  """Every anchor is inside: the GT owns exactly topk anchors, the loss is finite."""
  gt = make_gt([[(0, box)], [(2, box)]], 3)
  out = assign()(*preds_around_anchors(seed=3), jnp.asarray(ANCHORS_PX), gt)
  assert np.asarray(out.fg_mask).sum(1).tolist() == [TOPK, TOPK]
  assert np.asarray(out.scores).max() > 0
  total, parts, grads = loss_and_grads(head_maps(seed=2), gt)
  assert_finite(total, parts, grads)
  assert parts[0] > 0


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_zero_gt_slots_is_an_empty_batch():
  """M = 0 (no slots at all) gives the same loss and gradients as slots that are all padding."""
  feats = head_maps(seed=6)
  none = make_gt([[], []], 0)
  padding = make_gt([[], []], 2)
  total, parts, grads = loss_and_grads(feats, none)
  assert_finite(total, parts, grads)
  want = loss_and_grads(feats, padding)
  assert total == want[0] and parts == want[1]
  for g, w in zip(grads, want[2]):
    np.testing.assert_array_equal(g, w)
  scores, boxes = preds_around_anchors()
  target = assign(0.0)(scores, boxes, jnp.asarray(ANCHORS_PX), none)
  assert not np.asarray(target.fg_mask).any() and not np.asarray(target.scores).any()


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_gt_smaller_than_one_cell():
  """A box between anchor centres owns nothing with min_box_side = 0, and anchors once widened."""
  tiny = [13.2, 13.4, 13.9, 14.0]  # level-0 anchor centres are at 2, 6, 10, 14, ...: none strictly inside
  gt = make_gt([[(1, tiny)], []], 3)
  empty = make_gt([[], []], 3)
  scores, _ = preds_around_anchors()
  boxes = jnp.broadcast_to(jnp.array([11.0, 11.0, 16.0, 16.0]), (B, A, 4))  # predictions overlapping the box
  assert not np.asarray(assign(0.0)(scores, boxes, jnp.asarray(ANCHORS_PX), gt).fg_mask).any()
  widened = assign(8.0)(scores, boxes, jnp.asarray(ANCHORS_PX), gt)
  fg = np.asarray(widened.fg_mask[0])
  assert fg.any()
  centre = np.array([13.55, 13.7])
  assert (np.abs(ANCHORS_PX[fg] - centre) < 4.0).all()  # inside the 8 px square about the box centre
  feats = head_maps(seed=4)
  no_side = loss_and_grads(feats, gt)
  assert_finite(*no_side)
  np.testing.assert_array_equal(no_side[0], loss_and_grads(feats, empty)[0])
  assert_finite(*loss_and_grads(feats, gt, min_box_side=8.0))


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_many_identical_gts():
  """Identical GTs behave as one: every anchor goes to the first copy (ties go to the lower GT index)."""
  box = (1, [6.0, 5.0, 24.0, 27.0])
  single = make_gt([[box], [box]], 6)
  many = make_gt([[box] * 6, [box] * 3], 6)
  preds = preds_around_anchors(seed=5)
  a = assign()(*preds, jnp.asarray(ANCHORS_PX), single)
  b = assign()(*preds, jnp.asarray(ANCHORS_PX), many)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert (np.asarray(b.gt_index) == 0).all() and np.asarray(b.fg_mask).sum() == 2 * TOPK
  feats = head_maps(seed=6)
  one, lots = loss_and_grads(feats, single), loss_and_grads(feats, many)
  assert_finite(*lots)
  # Same targets (checked exactly above); M differs, so XLA compiles two programs whose float
  # reductions may round differently: equal to float32 rounding, not bit for bit.
  np.testing.assert_allclose(one[0], lots[0], rtol=1e-6)


def test_all_predictions_identical():
  """Equal metrics everywhere: each GT takes its topk in-box anchors of lowest index; the loss is finite.

  (The GTs overlap the common predicted box, so their metrics are positive: a GT whose CIoU with
  every prediction clamps to 0 takes the topk anchors of lowest index overall, as in the reference,
  and those are usually not inside it.)
  """
  gt = make_gt([[(0, [3.0, 3.0, 29.0, 20.0]), (2, [4.0, 12.0, 20.0, 28.0])], [(1, [0.0, 0.0, 32.0, 32.0])]], 3)
  scores = jnp.full((B, A, NC), 0.5, jnp.float32)
  boxes = jnp.broadcast_to(jnp.array([8.0, 8.0, 24.0, 24.0]), (B, A, 4))
  out = assign(0.0, 4)(scores, boxes, jnp.asarray(ANCHORS_PX), gt)
  fg, idx = np.asarray(out.fg_mask), np.asarray(out.gt_index)
  for i, j in [(0, 0), (0, 1), (1, 0)]:
    x1, y1, x2, y2 = np.asarray(gt.boxes[i, j])
    ax, ay = ANCHORS_PX[:, 0], ANCHORS_PX[:, 1]
    inside = np.flatnonzero((ax > x1) & (ax < x2) & (ay > y1) & (ay < y2))
    first = inside[:4]
    assert fg[i, first].all() and (idx[i, first] == j).all(), (i, j, first, np.flatnonzero(fg[i]))
  assert fg.sum() == 12
  zeros = [jnp.zeros_like(f) for f in head_maps()]
  assert_finite(*loss_and_grads(zeros, gt))


@pytest.mark.parametrize("pattern", ["+1e4", "-1e4", "random sign"])
def test_extreme_logits(pattern):
  """Logits of +-1e4 in every channel (class and box distribution): loss and gradients finite."""
  gt = make_gt([[(0, [3.0, 3.0, 29.0, 20.0]), (2, [1.0, 18.0, 15.0, 31.0])], [(1, [5.0, 6.0, 31.0, 32.0])]], 3)
  if pattern == "random sign":
    feats = [jnp.sign(f) * 1e4 for f in head_maps(seed=7)]
  else:
    feats = [jnp.full_like(f, float(pattern)) for f in head_maps()]
  total, parts, grads = loss_and_grads(feats, gt)
  assert_finite(total, parts, grads)
  if pattern == "+1e4":  # every class predicted with certainty: a huge but finite BCE
    assert parts[1] > 1e4


@pytest.mark.parametrize("layout", ["NHWC", pytest.param("NCHW", marks=pytest.mark.slow)])
def test_bf16_head_maps_give_a_float32_loss(layout):
  """bf16 maps: the loss is float32 and equals the loss of the same values in float32."""
  gt = make_gt([[(0, [3.0, 3.0, 29.0, 20.0])], [(1, [5.0, 6.0, 31.0, 32.0]), (2, [0.0, 1.0, 9.0, 12.0])]], 3)
  feats = head_maps(seed=8, scale=2.0, dtype=jnp.bfloat16)
  if layout == "NCHW":
    feats = [jnp.transpose(f, (0, 3, 1, 2)) for f in feats]
  loss = jax.jit(jax.value_and_grad(lambda f, g: jaxtal.detection_loss(f, g, layout=layout, **KW)[0]))
  value, grads = loss(feats, gt)
  assert value.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)
  value32, grads32 = loss([f.astype(jnp.float32) for f in feats], gt)
  np.testing.assert_allclose(value, value32, rtol=1e-6)
  for g, g32 in zip(grads, grads32):  # the gradients differ only by their final rounding to bf16
    expected = np.asarray(g32.astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), expected, rtol=1e-2, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Property: any float32 ground truth through one jitted loss


M_PROP = 5
F32_MAX = float(np.finfo(np.float32).max)
LIMIT = jaxtal.COORD_LIMIT
SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, LIMIT, -LIMIT, float(np.nextafter(np.float32(LIMIT), np.float32(np.inf))),
           -float(np.nextafter(np.float32(LIMIT), np.float32(np.inf))), 3e38, -3e38, F32_MAX, -F32_MAX, 1e-45, 1e20, -1e25]
COORDS = st.one_of(
    st.floats(-8.0, IMAGE + 8.0, width=32),  # ordinary boxes (about a third of the rows are then valid)
    st.floats(-F32_MAX, F32_MAX, width=32, allow_nan=False, allow_infinity=False),  # any finite magnitude
    st.sampled_from(SPECIAL),
)
LABELS = st.one_of(st.integers(0, NC - 1), st.sampled_from([-1, NC, NC + 7, np.iinfo(np.int32).max, np.iinfo(np.int32).min]))


@st.composite
def degenerate_batches(draw):
  """(feats, gt): a fixed shape (B, M_PROP) of ground truth with coordinates of every kind of float32."""
  n = B * M_PROP
  boxes = np.array(draw(st.lists(COORDS, min_size=4 * n, max_size=4 * n)), np.float32).reshape(B, M_PROP, 4)
  ordered = draw(st.lists(st.booleans(), min_size=n, max_size=n))  # sort half the rows into x1 <= x2, y1 <= y2
  flat = boxes.reshape(n, 4)
  for r, o in enumerate(ordered):
    if o:
      flat[r] = [np.fmin(flat[r, 0], flat[r, 2]), np.fmin(flat[r, 1], flat[r, 3]),
                 np.fmax(flat[r, 0], flat[r, 2]), np.fmax(flat[r, 1], flat[r, 3])]
  labels = np.array(draw(st.lists(LABELS, min_size=n, max_size=n)), np.int32).reshape(B, M_PROP)
  mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool).reshape(B, M_PROP)
  scale = draw(st.sampled_from([0.01, 1.0, 8.0, 1e4]))
  feats = head_maps(seed=draw(st.integers(0, 2**16)), scale=scale)
  return feats, jaxtal.GroundTruth(labels, boxes, mask)


@functools.cache
def property_loss_step():
  def loss(feats, gt):
    return jaxtal.detection_loss(feats, gt, num_classes=NC, strides=STRIDES, reg_max=R, topk=4, min_box_side=4.0)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def check_degenerate_batch(feats, gt):
  step = property_loss_step()
  (total, parts), grads = step(feats, jax.tree.map(jnp.asarray, gt))
  assert np.isfinite(float(total)) and all(np.isfinite(float(p)) and float(p) >= 0 for p in parts), (total, parts)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  # Invalid rows (the documented rule, in NumPy) are exactly padding.
  valid = np_valid_rows(gt.labels, gt.boxes, gt.mask, NC, image_hw=(IMAGE, IMAGE))
  clean = jaxtal.GroundTruth(np.where(valid, gt.labels, 0).astype(np.int32),
                             np.where(valid[..., None], gt.boxes, 0.0).astype(np.float32), valid)
  (clean_total, clean_parts), clean_grads = step(feats, jax.tree.map(jnp.asarray, clean))
  np.testing.assert_array_equal(total, clean_total)
  np.testing.assert_array_equal(np.asarray(parts), np.asarray(clean_parts))
  for g, c in zip(grads, clean_grads):
    np.testing.assert_array_equal(g, c)


PROPERTY = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=150, **PROPERTY)
@given(batch=degenerate_batches())
@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_any_float32_ground_truth_gives_a_finite_loss(batch):
  check_degenerate_batch(*batch)


@pytest.mark.slow
@settings(max_examples=3000, **PROPERTY)
@given(batch=degenerate_batches())
def test_any_float32_ground_truth_gives_a_finite_loss_3000(batch):
  check_degenerate_batch(*batch)

