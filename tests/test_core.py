"""Unit tests of each module against independent NumPy expectations (optax style).

Every expectation here is written from the papers' formulas and the docstrings in NumPy (float64), never by
calling the function under test; the key functions run compiled and eager through ``chex.variants``. Shapes
are small so the file stays fast.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import jaxtal

KINDS = ("iou", "giou", "diou", "ciou")


# --------------------------------------------------------------------------------------------------
# Independent NumPy expectations
# --------------------------------------------------------------------------------------------------


def np_box_iou(box1, box2, kind, eps=1e-7):
  """IoU / GIoU / DIoU / CIoU from the papers, with eps on heights, the union and the enclosing diagonal."""
  b1, b2 = np.broadcast_arrays(np.asarray(box1, np.float64), np.asarray(box2, np.float64))
  x1, y1, x2, y2 = np.moveaxis(b1, -1, 0)
  u1, v1, u2, v2 = np.moveaxis(b2, -1, 0)
  w1, h1 = x2 - x1, y2 - y1 + eps
  w2, h2 = u2 - u1, v2 - v1 + eps
  inter = np.clip(np.minimum(x2, u2) - np.maximum(x1, u1), 0, None) * np.clip(
      np.minimum(y2, v2) - np.maximum(y1, v1), 0, None
  )
  union = w1 * h1 + w2 * h2 - inter + eps
  iou = inter / union
  if kind == "iou":
    return iou
  cw = np.maximum(x2, u2) - np.minimum(x1, u1)  # enclosing box
  ch = np.maximum(y2, v2) - np.minimum(y1, v1)
  if kind == "giou":  # Rezatofighi et al. 2019: IoU - |C \ (A u B)| / |C|
    c_area = cw * ch + eps
    return iou - (c_area - union) / c_area
  c2 = cw**2 + ch**2 + eps  # squared diagonal of the enclosing box
  rho2 = ((u1 + u2 - x1 - x2) ** 2 + (v1 + v2 - y1 - y2) ** 2) / 4  # squared centre distance
  if kind == "diou":  # Zheng et al. 2020, eq. (6)
    return iou - rho2 / c2
  v = 4 / math.pi**2 * (np.arctan(w2 / h2) - np.arctan(w1 / h1)) ** 2  # eq. (9)
  alpha = v / (1 - iou + v + eps)  # eq. (11)
  return iou - (rho2 / c2 + alpha * v)


def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_decode(pred_dist, anchors, reg_max):
  """Softmax over each side's bins, expectation sum_i p_i * i, then xyxy around the anchor."""
  d = np.asarray(pred_dist, np.float64)
  if reg_max > 1:
    p = np_softmax(d.reshape(*d.shape[:-1], 4, reg_max))
    d = (p * np.arange(reg_max)).sum(-1)
  a = np.asarray(anchors, np.float64)
  return np.concatenate([a - d[..., :2], a + d[..., 2:]], axis=-1)


def np_assign_one(scores, pred_boxes, anchors, labels, boxes, mask, *, topk=10, topk2=None, alpha=0.5, beta=6.0,
                  eps=1e-9, min_box_side=0.0):
  """Task-aligned assignment of one image, dense ``(M, A)``, from the TOOD paper and the jaxtal docstring."""
  m, a = len(labels), len(anchors)
  nc = scores.shape[-1]
  valid = mask & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (labels >= 0) & (labels < nc)
  # 1. in-box: anchor centre strictly inside the box (sides below min_box_side widened about the centre).
  ctr, wh = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
  wh = np.where(valid[:, None] & (wh < min_box_side), min_box_side, wh)
  lt, rb = ctr - wh / 2, ctr + wh / 2
  deltas = np.concatenate([anchors[None] - lt[:, None], rb[:, None] - anchors[None]], axis=-1)
  cand = (deltas.min(-1) > eps) & valid[:, None]
  # 2. align metric s^alpha * u^beta, u = CIoU clamped at 0.
  overlaps = np.where(cand, np.maximum(np_box_iou(boxes[:, None], pred_boxes[None], "ciou"), 0), 0)
  s = scores[:, np.clip(labels, 0, nc - 1)].T
  metric = np.where(cand, s**alpha * overlaps**beta, 0)
  # 3. top-k per GT (ties: lower anchor index), in-box only.
  pos = np.zeros((m, a), bool)
  for g in range(m):
    top = np.argsort(-metric[g], kind="stable")[:topk]
    pos[g, top] = cand[g, top]
  # 4. an anchor claimed by several GTs goes to the in-box GT of highest overlap.
  multi = pos.sum(0) > 1
  best = np.argmax(np.where(cand, overlaps, -1.0), axis=0)
  pos[:, multi] = np.arange(m)[:, None] == best[None, multi]
  if topk2 is not None:
    for g in range(m):
      mine = np.flatnonzero(pos[g])
      keep = mine[np.argsort(-metric[g, mine], kind="stable")[:topk2]]
      pos[g] = False
      pos[g, keep] = True
  num_multi = multi.sum()
  fg = pos.any(0)
  gt_index = np.where(fg, pos.argmax(0), 0)
  # 5. soft targets: metric normalised so each GT's best anchor scores its best overlap.
  norm = np.zeros(a)
  for g in range(m):
    if pos[g].any():
      norm[pos[g]] = metric[g, pos[g]] * overlaps[g, pos[g]].max() / (metric[g, pos[g]].max() + eps)
  return dict(
      labels=np.where(fg, labels[gt_index], 0),
      boxes=np.where(fg[:, None], boxes[gt_index], 0.0),
      scores=np.eye(nc)[labels[gt_index]] * norm[:, None],
      fg_mask=fg,
      gt_index=gt_index,
      num_multi=num_multi,  # diagnostics: how many anchors went through conflict resolution
      num_in_box=cand.sum(1).max(),
  )


def np_assign(pred_scores, pred_boxes, anchors, gt, **kw):
  out = [
      np_assign_one(*(np.asarray(x, np.float64) for x in (pred_scores[i], pred_boxes[i], anchors)),
                    np.asarray(gt.labels[i]), np.asarray(gt.boxes[i], np.float64), np.asarray(gt.mask[i]), **kw)
      for i in range(pred_scores.shape[0])
  ]
  return {k: np.stack([o[k] for o in out]) for k in out[0]}


def np_bce_with_logits(x, z):
  return np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))


# --------------------------------------------------------------------------------------------------
# Small problems
# --------------------------------------------------------------------------------------------------

FEATURE_SHAPES = ((4, 4), (2, 2))
STRIDES = (8, 16)  # a 32 x 32 input, A = 20 anchors
NC, R = 3, 4


# Compiled once per configuration and shared by the tests (eager runs are the variants' job).
assign_jit = jax.jit(
    jaxtal.task_aligned_assign, static_argnames=("topk", "topk2", "alpha", "beta", "eps", "min_box_side", "gt_chunk")
)
LOSS_KW = dict(num_classes=NC, strides=STRIDES, reg_max=R)
loss_jit = jax.jit(
    jaxtal.detection_loss, static_argnames=("num_classes", "strides", "reg_max", "layout", "topk", "box", "cls", "dfl")
)
loss_grad_jit = jax.jit(jax.grad(lambda feats, gt: jaxtal.detection_loss(feats, gt, **LOSS_KW)[0]))


def random_boxes(rng, shape, lo=0.0, hi=32.0, min_side=2.0, max_side=20.0):
  wh = rng.uniform(min_side, max_side, (*shape, 2))
  xy = rng.uniform(lo, hi, (*shape, 2))
  return np.concatenate([xy - wh / 2, xy + wh / 2], axis=-1).astype(np.float32)


def assign_problem(seed=0, b=3, m=4):
  """Predictions around the anchors and overlapping GTs; image 1 is mostly padding whose rows hold junk."""
  rng = np.random.default_rng(seed)
  anchors, strides = (np.asarray(x) for x in jaxtal.make_anchors(FEATURE_SHAPES, STRIDES))
  anchor_px = anchors * strides
  a = len(anchors)
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


def head_maps(seed=0, b=2, layout="NHWC", reg_max=R):
  rng = np.random.default_rng(seed)
  c = 4 * reg_max + NC
  maps = [rng.standard_normal((b, h, w, c)).astype(np.float32) for h, w in FEATURE_SHAPES]
  if layout == "NCHW":
    maps = [np.transpose(f, (0, 3, 1, 2)) for f in maps]
  return [jnp.asarray(f) for f in maps]


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


def assert_assignment_shapes(target, b, a, nc):
  chex.assert_shape(target.labels, (b, a))
  chex.assert_shape(target.boxes, (b, a, 4))
  chex.assert_shape(target.scores, (b, a, nc))
  chex.assert_shape(target.fg_mask, (b, a))
  chex.assert_shape(target.gt_index, (b, a))
  chex.assert_type([target.labels, target.boxes, target.scores, target.fg_mask, target.gt_index],
                   [jnp.int32, jnp.float32, jnp.float32, jnp.bool_, jnp.int32])


def assert_assignment_equal(got, expected, rtol=1e-5, atol=1e-7):
  np.testing.assert_array_equal(np.asarray(got.fg_mask), expected["fg_mask"])
  np.testing.assert_array_equal(np.asarray(got.gt_index), expected["gt_index"])
  np.testing.assert_array_equal(np.asarray(got.labels), expected["labels"])
  np.testing.assert_allclose(np.asarray(got.boxes), expected["boxes"], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got.scores), expected["scores"], rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------
# boxes.py
# --------------------------------------------------------------------------------------------------


class BoxIouTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*KINDS)
  def test_matches_numpy(self, kind):
    rng = np.random.default_rng(0)
    box1 = random_boxes(rng, (64,), hi=40)
    box2 = np.concatenate([random_boxes(rng, (48,), hi=40), box1[:16] + rng.uniform(-2, 2, (16, 4))]).astype(np.float32)
    got = self.variant(functools.partial(jaxtal.box_iou, kind=kind))(jnp.asarray(box1), jnp.asarray(box2))
    chex.assert_shape(got, (64,))
    np.testing.assert_allclose(got, np_box_iou(box1, box2, kind), rtol=1e-5, atol=2e-6)
    assert np.any(np.asarray(got) > 0.3) and np.any(np.asarray(got) <= 0)  # overlapping and disjoint pairs

  @parameterized.parameters(*KINDS)
  def test_broadcasts(self, kind):
    rng = np.random.default_rng(1)
    box1 = random_boxes(rng, (3, 1))
    box2 = random_boxes(rng, (1, 5))
    fn = jax.jit(functools.partial(jaxtal.box_iou, kind=kind))
    got = fn(jnp.asarray(box1), jnp.asarray(box2))
    chex.assert_shape(got, (3, 5))
    np.testing.assert_allclose(got, np_box_iou(box1, box2, kind), rtol=1e-5, atol=2e-6)
    one = fn(jnp.asarray(box1[0, 0]), jnp.asarray(box2[0]))  # (4,) against (5, 4)
    chex.assert_shape(one, (5,))
    np.testing.assert_allclose(one, np.asarray(got)[0], rtol=1e-6)

  @parameterized.parameters(*KINDS)
  def test_known_values(self, kind):
    unit = jnp.array([0.0, 0.0, 10.0, 10.0])
    same = jaxtal.box_iou(unit, unit, kind)
    np.testing.assert_allclose(same, 1.0, atol=1e-6)  # identical boxes: every kind gives 1
    far = jaxtal.box_iou(unit, jnp.array([20.0, 0.0, 30.0, 10.0]), kind)
    expected = {"iou": 0.0, "giou": -1 / 3, "diou": -(20**2) / (30**2 + 10**2), "ciou": -(20**2) / (30**2 + 10**2)}
    np.testing.assert_allclose(far, expected[kind], atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*KINDS)
  def test_degenerate_boxes_give_finite_values_and_gradients(self, kind):
    box1 = jnp.array([
        [5.0, 5.0, 5.0, 15.0],  # zero width
        [5.0, 5.0, 15.0, 5.0],  # zero height
        [3.0, 3.0, 3.0, 3.0],  # a point
        [4.0, 4.0, 12.0, 12.0],  # identical to its partner
        [12.0, 12.0, 4.0, 4.0],  # inverted
        [0.0, 0.0, 10.0, 10.0],
    ])
    box2 = jnp.array([
        [0.0, 0.0, 10.0, 10.0],
        [5.0, 5.0, 15.0, 5.0],
        [3.0, 3.0, 3.0, 3.0],
        [4.0, 4.0, 12.0, 12.0],
        [0.0, 0.0, 10.0, 10.0],
        [10.0, 2.0, 6.0, 8.0],  # inverted partner
    ])
    fn = functools.partial(jaxtal.box_iou, kind=kind)
    values = self.variant(fn)(box1, box2)
    chex.assert_shape(values, (6,))
    chex.assert_tree_all_finite(values)
    grads = self.variant(jax.grad(lambda a, b: jnp.sum(fn(a, b)), argnums=(0, 1)))(box1, box2)
    chex.assert_shape(grads, [(6, 4), (6, 4)])
    chex.assert_tree_all_finite(grads)
    np.testing.assert_allclose(np.asarray(values)[3], 1.0, atol=1e-6)

  def test_invalid_kind_raises(self):
    with self.assertRaisesRegex(ValueError, "kind"):
      jaxtal.box_iou(jnp.zeros(4), jnp.zeros(4), kind="eiou")

  def test_wrong_coordinate_count_raises(self):
    with self.assertRaisesRegex(ValueError, "4 coordinates"):
      jaxtal.box_iou(jnp.zeros((2, 5)), jnp.zeros((2, 4)))

  def test_xywh_round_trip(self):
    rng = np.random.default_rng(2)
    xywh = np.concatenate([rng.uniform(0, 50, (7, 2)), rng.uniform(1, 20, (7, 2))], -1).astype(np.float32)
    xyxy = jaxtal.xywh_to_xyxy(jnp.asarray(xywh))
    chex.assert_shape(xyxy, (7, 4))
    expected = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], -1)
    np.testing.assert_allclose(xyxy, expected, rtol=1e-6)
    back = jaxtal.xyxy_to_xywh(xyxy)
    chex.assert_shape(back, (7, 4))
    np.testing.assert_allclose(back, xywh, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# anchors.py
# --------------------------------------------------------------------------------------------------


class MakeAnchorsTest(chex.TestCase):

  def test_order_offsets_and_strides(self):
    points, strides = jaxtal.make_anchors([(2, 3), (1, 2)], [8, 16])
    chex.assert_shape([points, strides], [(8, 2), (8, 1)])
    chex.assert_type([points, strides], [jnp.float32, jnp.float32])
    # (x, y) cell centres, row-major (x fastest) within a level, levels in order.
    expected = [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5], [1.5, 0.5]]
    np.testing.assert_array_equal(points, expected)
    np.testing.assert_array_equal(strides[:, 0], [8, 8, 8, 8, 8, 8, 16, 16])

  def test_offset(self):
    points, _ = jaxtal.make_anchors([(2, 2)], [4], offset=0.0)
    np.testing.assert_array_equal(points, [[0, 0], [1, 0], [0, 1], [1, 1]])
    points, _ = jaxtal.make_anchors([(1, 2)], [4], offset=0.25)
    np.testing.assert_array_equal(points, [[0.25, 0.25], [1.25, 0.25]])

  def test_pixels_are_points_times_strides(self):
    points, strides = jaxtal.make_anchors([(80, 80), (40, 40), (20, 20)], [8, 16, 32])
    chex.assert_shape([points, strides], [(8400, 2), (8400, 1)])
    px = np.asarray(points * strides)
    np.testing.assert_array_equal(px[0], [4, 4])
    np.testing.assert_array_equal(px[6400], [8, 8])
    np.testing.assert_array_equal(px[-1], [624, 624])

  @parameterized.parameters(
      ([(2, 2), (1, 1)], [8], "strides"),
      ([(2, 2)], [8, 16], "strides"),
      ([], [], "empty"),
      ([(2, 2)], [0], "positive"),
      ([(2, 2)], [-8], "positive"),
      ([(2, 0)], [8], "positive"),
      ([(2, 2, 2)], [8], "pair"),
  )
  def test_bad_arguments_raise(self, shapes, strides, match):
    with self.assertRaisesRegex(ValueError, match):
      jaxtal.make_anchors(shapes, strides)


# --------------------------------------------------------------------------------------------------
# head.py
# --------------------------------------------------------------------------------------------------


class FlattenHeadTest(chex.TestCase):

  def test_nhwc_and_nchw_agree_with_numpy(self):
    nhwc = head_maps(seed=3)
    nchw = head_maps(seed=3, layout="NCHW")
    dist, logits = jaxtal.flatten_head(nhwc, NC, R)
    dist2, logits2 = jaxtal.flatten_head(nchw, NC, R, layout="NCHW")
    chex.assert_shape([dist, logits, dist2, logits2], [(2, 20, 16), (2, 20, 3)] * 2)
    flat = np.concatenate([np.asarray(f).reshape(2, -1, 4 * R + NC) for f in nhwc], axis=1)
    np.testing.assert_array_equal(dist, flat[..., : 4 * R])
    np.testing.assert_array_equal(logits, flat[..., 4 * R :])
    np.testing.assert_array_equal(dist2, dist)
    np.testing.assert_array_equal(logits2, logits)

  def test_anchor_order_matches_make_anchors(self):
    # Put each cell's own (x, y) in its first two channels: after flattening they must equal the anchors - 0.5.
    maps = []
    for h, w in FEATURE_SHAPES:
      f = np.zeros((1, h, w, 4 * R + NC), np.float32)
      f[0, :, :, 0], f[0, :, :, 1] = np.meshgrid(np.arange(w), np.arange(h))
      maps.append(jnp.asarray(f))
    dist, _ = jaxtal.flatten_head(maps, NC, R)
    anchors, _ = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
    np.testing.assert_array_equal(dist[0, :, :2], np.asarray(anchors) - 0.5)

  def test_wrong_channel_count_raises(self):
    maps = head_maps()
    maps[1] = maps[1][..., :-1]
    with self.assertRaisesRegex(ValueError, r"feats\[1\] has 18 channels"):
      jaxtal.flatten_head(maps, NC, R)
    with self.assertRaisesRegex(ValueError, "channels"):
      jaxtal.flatten_head(head_maps(), NC, R, layout="NCHW")  # NHWC maps read as NCHW

  def test_wrong_rank_raises(self):
    maps = head_maps()
    maps[0] = maps[0][0]
    with self.assertRaisesRegex(ValueError, "rank-4"):
      jaxtal.flatten_head(maps, NC, R)

  def test_batch_mismatch_raises(self):
    maps = head_maps()
    maps[1] = maps[1][:1]
    with self.assertRaisesRegex(ValueError, "batch size"):
      jaxtal.flatten_head(maps, NC, R)

  def test_bad_layout_and_containers_raise(self):
    with self.assertRaisesRegex(ValueError, "layout"):
      jaxtal.flatten_head(head_maps(), NC, R, layout="NCWH")
    with self.assertRaises(TypeError):
      jaxtal.flatten_head(head_maps()[0], NC, R)  # one array, not a list of levels
    with self.assertRaises(TypeError):
      jaxtal.flatten_head([m.astype(jnp.int32) for m in head_maps()], NC, R)


class DecodeBoxesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(4, 16)
  def test_matches_numpy_softmax_expectation(self, reg_max):
    rng = np.random.default_rng(reg_max)
    anchors, _ = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
    dist = (3 * rng.standard_normal((2, 20, 4 * reg_max))).astype(np.float32)
    got = self.variant(functools.partial(jaxtal.decode_boxes, reg_max=reg_max))(jnp.asarray(dist), anchors)
    chex.assert_shape(got, (2, 20, 4))
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, np_decode(dist, anchors, reg_max), rtol=1e-5, atol=1e-5)
    # Each side's distance lies in [0, R - 1].
    ltrb = np.concatenate([np.asarray(anchors) - np.asarray(got)[..., :2], np.asarray(got)[..., 2:] - np.asarray(anchors)], -1)
    assert ltrb.min() >= -1e-5 and ltrb.max() <= reg_max - 1 + 1e-5

  @chex.variants(with_jit=True, without_jit=True)
  def test_reg_max_one_is_a_passthrough(self):
    anchors = jnp.array([[0.5, 0.5], [1.5, 0.5], [0.5, 1.5]])
    ltrb = jnp.array([[[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]])
    got = self.variant(functools.partial(jaxtal.decode_boxes, reg_max=1))(ltrb, anchors)
    chex.assert_shape(got, (1, 3, 4))
    expected = [[[0.4, 0.3, 0.8, 0.9], [0.5, -1.5, 4.5, 4.5], [0.5, 1.5, 0.5, 1.5]]]
    np.testing.assert_allclose(got, expected, rtol=1e-6)

  def test_low_precision_input_decodes_in_float32(self):
    anchors, _ = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
    dist = jnp.asarray(np.random.default_rng(0).standard_normal((1, 20, 16)), jnp.bfloat16)
    got = jaxtal.decode_boxes(dist, anchors, reg_max=4)
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, np_decode(np.asarray(dist, np.float32), anchors, 4), rtol=1e-5, atol=1e-5)

  def test_bad_shapes_raise(self):
    anchors, _ = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
    with self.assertRaisesRegex(ValueError, "4 \\* reg_max"):
      jaxtal.decode_boxes(jnp.zeros((1, 20, 15)), anchors, reg_max=4)
    with self.assertRaisesRegex(ValueError, "anchor_points"):
      jaxtal.decode_boxes(jnp.zeros((1, 20, 16)), anchors[:19], reg_max=4)


# --------------------------------------------------------------------------------------------------
# labels.py
# --------------------------------------------------------------------------------------------------


def np_pack(rows, b, m, hw):
  """Expected packing: rows of each image in their input order, xywh * (W, H, W, H) -> xyxy."""
  labels, boxes, mask = np.zeros((b, m), np.int32), np.zeros((b, m, 4), np.float32), np.zeros((b, m), bool)
  slot = [0] * b
  h, w = hw
  for r in rows:
    i = int(r[0])
    cx, cy, bw, bh = r[2] * w, r[3] * h, r[4] * w, r[5] * h
    labels[i, slot[i]] = int(r[1])
    boxes[i, slot[i]] = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
    mask[i, slot[i]] = True
    slot[i] += 1
  return labels, boxes, mask


class PackLabelsTest(chex.TestCase):

  ROWS = np.array([
      [1, 2, 0.50, 0.50, 0.20, 0.40],
      [0, 0, 0.25, 0.75, 0.50, 0.10],
      [1, 1, 0.10, 0.20, 0.10, 0.10],
      [0, 4, 0.90, 0.10, 0.05, 0.15],
      [1, 0, 0.60, 0.60, 0.30, 0.30],
  ], np.float32)

  def test_ordering_within_images_and_padding(self):
    gt = jaxtal.pack_labels(self.ROWS, batch_size=3, max_boxes=4, image_size=(100, 200))
    chex.assert_shape([gt.labels, gt.boxes, gt.mask], [(3, 4), (3, 4, 4), (3, 4)])
    self.assertEqual((gt.labels.dtype, gt.boxes.dtype, gt.mask.dtype), (np.int32, np.float32, bool))
    labels, boxes, mask = np_pack(self.ROWS.astype(np.float64), 3, 4, (100, 200))
    np.testing.assert_array_equal(gt.labels, labels)
    np.testing.assert_allclose(gt.boxes, boxes, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(gt.mask, mask)
    np.testing.assert_array_equal(gt.labels[0, :2], [0, 4])  # image 0: rows 1, 3 in that order
    np.testing.assert_array_equal(gt.labels[1, :3], [2, 1, 0])  # image 1: rows 0, 2, 4
    np.testing.assert_array_equal(gt.mask[2], False)  # image 2 has no labels: all padding
    assert np.all(gt.boxes[~gt.mask] == 0) and np.all(gt.labels[~gt.mask] == 0)

  def test_no_labels(self):
    for rows in (np.zeros((0, 6), np.float32), np.zeros((0,)), []):
      gt = jaxtal.pack_labels(rows, batch_size=2, max_boxes=3, image_size=(64, 64))
      chex.assert_shape([gt.labels, gt.boxes, gt.mask], [(2, 3), (2, 3, 4), (2, 3)])
      np.testing.assert_array_equal(gt.mask, False)
      np.testing.assert_array_equal(gt.boxes, 0)

  def test_exactly_max_boxes_fits(self):
    gt = jaxtal.pack_labels(self.ROWS, batch_size=2, max_boxes=3, image_size=(100, 200))
    np.testing.assert_array_equal(gt.mask.sum(1), [2, 3])

  @parameterized.named_parameters(
      ("batch_index_too_large", 2, 0, 2.0, "row 2"),
      ("batch_index_negative", 1, 0, -1.0, "row 1"),
      ("batch_index_not_whole", 3, 0, 0.5, "row 3"),
      ("class_negative", 1, 1, -1.0, "row 1"),
      ("class_not_whole", 4, 1, 1.5, "row 4"),
      ("nan_centre", 2, 3, np.nan, "row 2"),
      ("inf_width", 0, 4, np.inf, "row 0"),
  )
  def test_bad_row_raises_naming_it(self, row, col, value, match):
    rows = self.ROWS.copy()
    rows[row, col] = value
    with self.assertRaisesRegex(ValueError, rf"\b{match}\b"):
      jaxtal.pack_labels(rows, batch_size=2, max_boxes=4, image_size=(100, 200))

  def test_too_many_rows_for_one_image_names_the_first_extra_row(self):
    # Image 1 owns rows 0, 2, 4: with max_boxes = 2 its third box, row 4, is the one that does not fit.
    with self.assertRaisesRegex(ValueError, r"\brow 4\b.*image 1"):
      jaxtal.pack_labels(self.ROWS, batch_size=2, max_boxes=2, image_size=(100, 200))

  @parameterized.parameters(
      (np.zeros((3, 5)), "shape"),
      (np.zeros((3, 6, 1)), "shape"),
      (np.zeros((6,)), "shape"),
  )
  def test_wrong_shape_raises(self, rows, match):
    with self.assertRaisesRegex(ValueError, match):
      jaxtal.pack_labels(rows, batch_size=2, max_boxes=2, image_size=(64, 64))

  def test_bad_sizes_raise(self):
    for kw, match in (
        (dict(batch_size=0, max_boxes=2, image_size=(64, 64)), "batch_size"),
        (dict(batch_size=2, max_boxes=0, image_size=(64, 64)), "max_boxes"),
        (dict(batch_size=2, max_boxes=2, image_size=(64,)), "image_size"),
        (dict(batch_size=2, max_boxes=2, image_size=(0, 64)), "image_size"),
    ):
      with self.assertRaisesRegex(ValueError, match):
        jaxtal.pack_labels(self.ROWS[:1], **kw)


# --------------------------------------------------------------------------------------------------
# assigner.py
# --------------------------------------------------------------------------------------------------


class TaskAlignedAssignTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    scores, boxes, anchors, gt = assign_problem(seed=0)
    target = self.variant(jaxtal.task_aligned_assign)(scores, boxes, anchors, gt)
    assert_assignment_shapes(target, 3, 20, NC)
    expected = np_assign(scores, boxes, anchors, gt)
    assert expected["fg_mask"].sum() >= 8  # a non-trivial assignment
    assert_assignment_equal(target, expected)

  @parameterized.parameters(
      dict(topk=3),
      dict(topk=3, topk2=1),
      dict(topk=10, min_box_side=16.0),
      dict(topk=4, alpha=1.0, beta=2.0),
  )
  def test_options_match_numpy(self, **kw):
    for seed in (0, 5):
      scores, boxes, anchors, gt = assign_problem(seed=seed)
      target = assign_jit(scores, boxes, anchors, gt, **kw)
      assert_assignment_shapes(target, 3, 20, NC)
      assert_assignment_equal(target, np_assign(scores, boxes, anchors, gt, **kw))

  def test_numpy_problem_exercises_every_step(self):
    # Conflicts, padding and top-k truncation must all occur, or test_matches_numpy proves less than it says.
    scores, boxes, anchors, gt = assign_problem(seed=0)
    expected = np_assign(scores, boxes, anchors, gt, topk=3)
    self.assertGreater(expected["num_multi"].sum(), 0)  # anchors claimed by several GTs
    self.assertGreater(expected["num_in_box"].max(), 3)  # a GT with more in-box anchors than topk
    self.assertFalse(np.asarray(gt.mask).all())

  def test_batch_equals_per_image(self):
    scores, boxes, anchors, gt = assign_problem(seed=1)
    batch = assign_jit(scores, boxes, anchors, gt)
    for i in range(3):
      one = assign_jit(scores[i : i + 1], boxes[i : i + 1], anchors, jax.tree.map(lambda x: x[i : i + 1], gt))
      assert_assignment_shapes(one, 1, 20, NC)
      chex.assert_trees_all_close(one, jax.tree.map(lambda x: x[i : i + 1], batch), rtol=1e-6, atol=1e-8)

  def test_jit_equals_eager(self):
    scores, boxes, anchors, gt = assign_problem(seed=2)
    eager = jaxtal.task_aligned_assign(scores, boxes, anchors, gt)
    jitted = assign_jit(scores, boxes, anchors, gt)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-8)
    assert np.asarray(jitted.fg_mask).sum() > 0

  @parameterized.parameters(dict(topk=3), dict(topk=6), dict(topk=6, gt_chunk=2))
  def test_scores_split_by_level_equal_one_block(self, topk, gt_chunk=None):
    # The loss hands the assigner one score block per level; each level gets its own top-k and the
    # lists are merged. Quantised scores (many exact ties, some 0) check that the merge keeps the
    # global order of ties (lower anchor index first); topk=6 exceeds level 1's 4 anchors.
    scores, boxes, anchors, gt = assign_problem(seed=6)
    scores = (jnp.round(scores * 4) / 4).at[0].set(0.0)  # image 0: every metric is 0, top-k is all ties
    split = FEATURE_SHAPES[0][0] * FEATURE_SHAPES[0][1]
    kw = dict(from_logits=False, topk=topk, topk2=None, alpha=0.5, beta=6.0, eps=1e-9, min_box_side=0.0, gt_chunk=gt_chunk)
    one = jaxtal.assigner.assign_targets((scores,), boxes, anchors, gt, **kw)
    levels = jaxtal.assigner.assign_targets((scores[:, :split], scores[:, split:]), boxes, anchors, gt, **kw)
    chex.assert_trees_all_close(levels, one, rtol=1e-6, atol=1e-8)
    expected = np_assign(scores, boxes, anchors, gt, topk=topk)
    np.testing.assert_array_equal(np.asarray(levels.fg_mask), expected["fg_mask"])
    np.testing.assert_array_equal(np.asarray(levels.gt_index), expected["gt_index"])
    assert np.asarray(levels.fg_mask).sum() > 0

  @parameterized.parameters(dict(topk=10), dict(topk=13), dict(topk=10, quantise=True))
  def test_many_anchors_match_numpy(self, topk, quantise=False):
    # A = 2100 anchors over three levels (sizes 1600, 400, 100: the last is not a whole number of
    # top-k tiles), so the two-stage top-k really prunes tiles; quantised scores add exact ties.
    scores, pred_boxes, anchor_px, gt, sizes = many_anchor_problem(np.random.default_rng(7), NC, 12)
    if quantise:
      scores = np.round(scores * 3) / 3
    target = assign_jit(jnp.asarray(scores), jnp.asarray(pred_boxes), jnp.asarray(anchor_px), gt, topk=topk)
    expected = np_assign(scores, pred_boxes, anchor_px, gt, topk=topk)
    assert expected["num_in_box"].max() > 16 * topk  # some GT has more in-box anchors than the kept tiles
    assert_assignment_equal(target, expected, rtol=1e-4, atol=1e-6)
    kw = dict(from_logits=False, topk=topk, topk2=None, alpha=0.5, beta=6.0, eps=1e-9, min_box_side=0.0, gt_chunk=5)
    levels = jaxtal.assigner.assign_targets(tuple(np.split(scores, sizes, axis=1)), pred_boxes, anchor_px, gt, **kw)
    np.testing.assert_array_equal(np.asarray(levels.fg_mask), expected["fg_mask"])
    np.testing.assert_array_equal(np.asarray(levels.gt_index), expected["gt_index"])

  @parameterized.parameters(dict(alpha=0.5), dict(alpha=1.0, beta=2.0), dict(alpha=0.3, topk=13))
  def test_fewer_gt_slots_than_classes_give_the_same_assignment(self, **kw):
    # With M < nc, score ** alpha is taken only at the (GT, anchor) pairs read; with M >= nc, over the
    # whole score map first. Padding slots change nothing, so padding M = 12 up to M = nc = 16
    # switches paths: the results must agree (scores to float32 rounding: M changes how XLA vectorises),
    # invalid scores (NaN, inf, < 0, > 1) included.
    # A = 2100 anchors, so the dense pass's tile maxima decide which anchors are kept.
    nc, m = 16, 12
    scores, pred_boxes, anchor_px, gt, _ = many_anchor_problem(np.random.default_rng(8), nc, m)
    scores, pred_boxes, anchor_px = jnp.asarray(scores), jnp.asarray(pred_boxes), jnp.asarray(anchor_px)
    padded = pad_gt_slots(gt, nc)
    target = assign_jit(scores, pred_boxes, anchor_px, gt, **kw)
    expected = np_assign(scores, pred_boxes, anchor_px, gt, **kw)
    assert expected["num_in_box"].max() > 16 * kw.get("topk", 10)
    assert_assignment_equal(target, expected, rtol=1e-4, atol=1e-6)
    bad = scores.at[0, :6, 0].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf, -0.5, 1.5, 2.0]))
    bad = bad.at[1, ::5].set(jnp.nan).at[1, 1::7].set(3.0)
    for s in (scores, bad):
      few_slots = assign_jit(s, pred_boxes, anchor_px, gt, **kw)
      chex.assert_trees_all_close(few_slots, assign_jit(s, pred_boxes, anchor_px, padded, **kw), rtol=1e-6, atol=1e-8)
      assert np.asarray(few_slots.fg_mask).sum() > 0

  def test_few_gt_slots_from_logits_give_the_same_targets(self):
    # From logits (the loss's path) the whole-map sqrt(sigmoid) pass is shared with the BCE gradient
    # from M >= nc / 2 on; below that the transform is taken per pair. Padding M = 6 up to 8 = nc / 2
    # switches paths; NaN and infinite logits included.
    nc, m = 16, 6
    scores, pred_boxes, anchor_px, gt, split = many_anchor_problem(np.random.default_rng(9), nc, m)
    logits = jnp.asarray(np.log(scores / (1 - scores)))
    logits = logits.at[0, :4, 0].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf, 90.0])).at[1, ::7].set(jnp.nan)
    kw = dict(from_logits=True, topk=10, topk2=None, alpha=0.5, beta=6.0, eps=1e-9, min_box_side=0.0, gt_chunk=None)
    run = jax.jit(functools.partial(jaxtal.assigner.assign_targets, tuple(jnp.split(logits, split, axis=1)), **kw))
    per_pair = run(jnp.asarray(pred_boxes), jnp.asarray(anchor_px), gt)
    shared = run(jnp.asarray(pred_boxes), jnp.asarray(anchor_px), pad_gt_slots(gt, nc // 2))
    for name in ("labels", "fg_mask", "gt_index"):
      np.testing.assert_array_equal(getattr(per_pair, name), getattr(shared, name), err_msg=name)
    np.testing.assert_allclose(per_pair.norm, shared.norm, rtol=1e-6, atol=1e-8)
    probs = np.asarray(jax.nn.sigmoid(logits))  # NaN logits score 0 in both paths, as in the reference
    expected = np_assign(np.where(np.isnan(probs), 0.0, probs), pred_boxes, anchor_px, gt)
    np.testing.assert_array_equal(per_pair.fg_mask, expected["fg_mask"])
    assert np.asarray(per_pair.fg_mask).sum() > 0

  @parameterized.parameters(dict(topk=3), dict(topk=6, gt_chunk=2), dict(topk=4, topk2=1), dict(topk=10))
  def test_entry_list_holds_each_foreground_anchor_once(self, topk, topk2=None, gt_chunk=None):
    # The loss reads DFL's target term only at the listed entries marked first: exactly the
    # foreground anchors, each once, even when several GTs list the same anchor.
    scores, boxes, anchors, gt = assign_problem(seed=5)
    m = gt.labels.shape[1]
    kw = dict(from_logits=False, topk=topk, topk2=topk2, alpha=0.5, beta=6.0, eps=1e-9, min_box_side=0.0, gt_chunk=gt_chunk)
    t = jax.jit(functools.partial(jaxtal.assigner.assign_targets, **kw))((scores,), boxes, anchors, gt)
    assert t.entry_anchor.shape == (scores.shape[0], m * topk)
    entry_anchor, first = np.asarray(t.entry_anchor), np.asarray(t.entry_first)
    for i in range(scores.shape[0]):
      counts = np.bincount(entry_anchor[i][first[i]], minlength=anchors.shape[0])
      np.testing.assert_array_equal(counts, np.asarray(t.fg_mask[i]).astype(int))
    repeated = [np.unique(a).size < a.size for a in entry_anchor]
    assert any(repeated) and np.asarray(t.fg_mask).sum() > 0

  @parameterized.parameters(1, 2, 3, 4)
  def test_gt_chunk_does_not_change_the_result(self, gt_chunk):
    scores, boxes, anchors, gt = assign_problem(seed=3)
    dense = assign_jit(scores, boxes, anchors, gt)
    chunked = assign_jit(scores, boxes, anchors, gt, gt_chunk=gt_chunk)
    assert_assignment_shapes(chunked, 3, 20, NC)
    chex.assert_trees_all_close(chunked, dense, rtol=1e-6, atol=1e-8)
    assert np.asarray(dense.fg_mask).sum() > 0

  def test_padding_and_invalid_rows_never_own_anchors(self):
    scores, boxes, anchors, gt = assign_problem(seed=4)
    target = assign_jit(scores, boxes, anchors, gt)
    fg, owner = np.asarray(target.fg_mask), np.asarray(target.gt_index)
    mask = np.asarray(gt.mask)
    assert fg.any()
    for i in range(3):
      assert mask[i, owner[i, fg[i]]].all()
    # Whatever padding rows hold, the result is that of all-zero padding.
    zeroed = gt._replace(boxes=jnp.where(gt.mask[..., None], gt.boxes, 0.0), labels=jnp.where(gt.mask, gt.labels, 0))
    chex.assert_trees_all_close(assign_jit(scores, boxes, anchors, zeroed), target)
    # Real rows with a zero-area box or a class outside [0, nc) are treated as padding too.
    bad = gt._replace(
        boxes=gt.boxes.at[0, 0].set(jnp.array([4.0, 4.0, 4.0, 30.0])), labels=gt.labels.at[2, 1].set(NC)
    )
    bad_target = assign_jit(scores, boxes, anchors, bad)
    bad_fg, bad_owner = np.asarray(bad_target.fg_mask), np.asarray(bad_target.gt_index)
    assert np.any(fg[0] & (owner[0] == 0)) and np.any(fg[2] & (owner[2] == 1))  # they owned anchors before
    assert not np.any(bad_fg[0] & (bad_owner[0] == 0))
    assert not np.any(bad_fg[2] & (bad_owner[2] == 1))

  def test_empty_ground_truth(self):
    scores, boxes, anchors, gt = assign_problem(seed=0)
    target = assign_jit(scores, boxes, anchors, gt._replace(mask=jnp.zeros_like(gt.mask)))
    assert_assignment_shapes(target, 3, 20, NC)
    for x in target:
      np.testing.assert_array_equal(x, 0)

  def test_no_gradient_flows(self):
    scores, boxes, anchors, gt = assign_problem(seed=0)
    grad = jax.jit(jax.grad(lambda s, b: jnp.sum(jaxtal.task_aligned_assign(s, b, anchors, gt).scores), argnums=(0, 1)))
    g = grad(scores, boxes)
    chex.assert_trees_all_close(g, jax.tree.map(jnp.zeros_like, g))

  def test_bad_arguments_raise(self):
    scores, boxes, anchors, gt = assign_problem(seed=0)
    with self.assertRaisesRegex(ValueError, "pred_boxes"):
      jaxtal.task_aligned_assign(scores, boxes[:, :-1], anchors, gt)
    with self.assertRaisesRegex(ValueError, "anchor_points"):
      jaxtal.task_aligned_assign(scores, boxes, anchors[:-1], gt)
    with self.assertRaisesRegex(ValueError, "topk"):
      jaxtal.task_aligned_assign(scores, boxes, anchors, gt, topk=21)
    with self.assertRaisesRegex(ValueError, "gt"):
      jaxtal.task_aligned_assign(scores, boxes, anchors, jax.tree.map(lambda x: x[:2], gt))
    with self.assertRaises(TypeError):
      jaxtal.task_aligned_assign(scores, boxes, anchors, tuple(gt))


# --------------------------------------------------------------------------------------------------
# loss.py and module.py
# --------------------------------------------------------------------------------------------------


def loss_problem(seed=0, b=2, empty=False, layout="NHWC"):
  rng = np.random.default_rng(100 + seed)
  feats = head_maps(seed=seed, b=b, layout=layout)
  boxes = random_boxes(rng, (b, 3), lo=8, hi=24, min_side=10, max_side=24)
  labels = rng.integers(0, NC, (b, 3)).astype(np.int32)
  mask = np.array([[True, True, False]] + [[True, False, False]] * (b - 1))
  if empty:
    mask[:] = False
  return feats, jaxtal.GroundTruth(jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(mask))


def np_detection_loss(feats, gt, box=7.5, cls=0.5, dfl=1.5):
  """BCE + CIoU + DFL of NHWC maps, given the assignment (tested above) of the decoded predictions."""
  b = feats[0].shape[0]
  flat = np.concatenate([np.asarray(f, np.float64).reshape(b, -1, 4 * R + NC) for f in feats], axis=1)
  dist, logits = flat[..., : 4 * R], flat[..., 4 * R :]
  anchors, strides = (np.asarray(x, np.float64) for x in jaxtal.make_anchors(FEATURE_SHAPES, STRIDES))
  pred = np_decode(dist, anchors, R)  # grid units
  target = assign_jit(
      jnp.asarray(1 / (1 + np.exp(-logits)), jnp.float32), jnp.asarray(pred * strides, jnp.float32),
      jnp.asarray(anchors * strides, jnp.float32), gt,
  )
  scores, fg = np.asarray(target.scores, np.float64), np.asarray(target.fg_mask)
  tboxes = np.asarray(target.boxes, np.float64) / strides
  weight = scores.sum(-1)
  n = max(weight.sum(), 1.0)
  loss_cls = np_bce_with_logits(logits, scores).sum() / n
  loss_box = np.sum(((1 - np_box_iou(pred, tboxes, "ciou")) * weight)[fg]) / n
  logp = np.log(np_softmax(dist.reshape(b, -1, 4, R)))
  ltrb = np.clip(np.concatenate([anchors - tboxes[..., :2], tboxes[..., 2:] - anchors], -1), 0, R - 1 - 0.01)
  left = np.floor(ltrb).astype(int)
  w_left = left + 1 - ltrb
  ce = -(np.take_along_axis(logp, left[..., None], -1)[..., 0] * w_left
         + np.take_along_axis(logp, left[..., None] + 1, -1)[..., 0] * (1 - w_left))
  loss_dfl = np.sum((ce.mean(-1) * weight)[fg]) / n
  parts = np.array([box * loss_box, cls * loss_cls, dfl * loss_dfl])
  return parts.sum() * b, parts, fg.sum()


class DetectionLossTest(chex.TestCase):

  KW = LOSS_KW

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    feats, gt = loss_problem(seed=0)
    total, parts = self.variant(functools.partial(jaxtal.detection_loss, **self.KW))(feats, gt)
    chex.assert_shape([total, *parts], [()] * 4)
    expected_total, expected_parts, num_fg = np_detection_loss(feats, gt)
    assert num_fg >= 5 and expected_parts[0] > 0 and expected_parts[2] > 0
    np.testing.assert_allclose(parts, expected_parts, rtol=2e-5)
    np.testing.assert_allclose(total, expected_total, rtol=2e-5)

  def test_empty_batch_has_finite_loss(self):
    feats, gt = loss_problem(seed=1, empty=True)
    total, parts = loss_jit(feats, gt, **self.KW)
    chex.assert_shape([total, *parts], [()] * 4)
    # No targets: box and DFL vanish, BCE against all-zero targets normalised by N = 1.
    logits = np.concatenate([np.asarray(f)[..., 4 * R :].reshape(2, -1, NC) for f in feats], 1).astype(np.float64)
    np.testing.assert_allclose(parts, [0.0, 0.5 * np.log1p(np.exp(logits)).sum(), 0.0], rtol=1e-5)
    np.testing.assert_allclose(total, 2 * sum(np.asarray(parts)), rtol=1e-6)

  def test_empty_batch_has_finite_gradients(self):
    feats, gt = loss_problem(seed=1, empty=True)
    grads = loss_grad_jit(feats, gt)
    chex.assert_shape(grads, [f.shape for f in feats])
    chex.assert_tree_all_finite(grads)
    # Only the class logits get a gradient: d(b * 0.5 * sum softplus(x) / 1)/dx = sigmoid(x) for b = 2.
    for g, f in zip(grads, feats):
      np.testing.assert_array_equal(g[..., : 4 * R], 0.0)
      np.testing.assert_allclose(g[..., 4 * R :], jax.nn.sigmoid(f[..., 4 * R :]), rtol=1e-5)

  def test_gradients_finite_with_degenerate_ground_truth(self):
    feats, gt = loss_problem(seed=2)
    grads = loss_grad_jit(feats, gt)
    chex.assert_tree_all_finite(grads)
    assert any(np.abs(np.asarray(g[..., : 4 * R])).max() > 0 for g in grads)  # boxes are being trained
    degenerate = gt._replace(boxes=gt.boxes.at[0, 1].set(jnp.array([10.0, 10.0, 10.0, 20.0])))  # zero width
    chex.assert_tree_all_finite(loss_grad_jit(feats, degenerate))
    inverted = gt._replace(boxes=gt.boxes.at[1, 0].set(jnp.array([20.0, 20.0, 10.0, 10.0])))
    chex.assert_tree_all_finite(loss_grad_jit(feats, inverted))

  def test_layouts_agree(self):
    nhwc, gt = loss_problem(seed=3)
    nchw, _ = loss_problem(seed=3, layout="NCHW")
    chex.assert_trees_all_close(loss_jit(nhwc, gt, **self.KW), loss_jit(nchw, gt, layout="NCHW", **self.KW), rtol=1e-6)

  def test_given_targets_replace_the_assignment(self):
    # The benchmark times the loss with the assignment taken out through this private entry
    # point; it must compute the same loss and gradients, and really use the targets it is given.
    feats, gt = loss_problem(seed=5)
    _, other = loss_problem(seed=6)
    assert not np.array_equal(np.asarray(gt.boxes), np.asarray(other.boxes))
    loss = functools.partial(jaxtal.loss._detection_loss, **self.KW)
    total, parts, targets = jax.jit(loss)(feats, gt)
    _, _, other_targets = jax.jit(loss)(feats, other)
    chex.assert_trees_all_close((total, parts), loss_jit(feats, gt, **self.KW), rtol=1e-6)

    def given(feats, gt, targets):
      return loss(feats, gt, targets=targets)[0]

    grad = jax.jit(jax.value_and_grad(given))
    chex.assert_trees_all_close(grad(feats, gt, targets), (total, loss_grad_jit(feats, gt)), rtol=1e-6, atol=1e-9)
    # gt's own rows are ignored once targets are given: other's targets give other's loss.
    chex.assert_trees_all_close(grad(feats, gt, other_targets), (loss_jit(feats, other, **self.KW)[0],
                                                                  loss_grad_jit(feats, other)), rtol=1e-6, atol=1e-9)
    assert abs(float(loss_jit(feats, other, **self.KW)[0]) - float(total)) > 1e-3

  def test_module_equals_function(self):
    feats, gt = loss_problem(seed=4)
    kw = dict(self.KW, topk=5, box=2.0, dfl=0.5, class_weights=jnp.array([1.0, 2.0, 0.5]))
    total, parts = jaxtal.DetectionLoss(**kw)(feats, gt)
    chex.assert_shape([total, *parts], [()] * 4)
    chex.assert_trees_all_close((total, parts), jaxtal.detection_loss(feats, gt, **kw), rtol=1e-6)
    # The class weights do change the loss, so the module really passed them on.
    plain = jaxtal.detection_loss(feats, gt, **dict(kw, class_weights=None))
    assert abs(float(plain[1].cls) - float(parts.cls)) > 1e-4

  def test_module_accepts_every_gain(self):
    # `cls` is a constructor keyword like `box` and `dfl` (the class-loss gain).
    feats, gt = loss_problem(seed=4)
    module = jaxtal.DetectionLoss(**self.KW, box=2.0, cls=1.0, dfl=0.5)
    chex.assert_trees_all_close(
        module(feats, gt), jaxtal.detection_loss(feats, gt, **self.KW, box=2.0, cls=1.0, dfl=0.5), rtol=1e-6
    )

  def test_bad_arguments_raise(self):
    feats, gt = loss_problem(seed=0)
    with self.assertRaisesRegex(ValueError, "strides"):
      jaxtal.detection_loss(feats, gt, num_classes=NC, strides=(8, 8), reg_max=R)
    with self.assertRaisesRegex(ValueError, "strides"):
      jaxtal.detection_loss(feats, gt, num_classes=NC, strides=(8,), reg_max=R)
    with self.assertRaisesRegex(ValueError, "class_weights"):
      jaxtal.detection_loss(feats, gt, class_weights=jnp.ones(2), **self.KW)
    with self.assertRaisesRegex(ValueError, "batch"):
      jaxtal.detection_loss(feats, jax.tree.map(lambda x: x[:1], gt), **self.KW)
    with self.assertRaisesRegex(ValueError, "channels"):
      jaxtal.detection_loss(feats, gt, num_classes=NC + 1, strides=STRIDES, reg_max=R)


if __name__ == "__main__":
  absltest.main()
