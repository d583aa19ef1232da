"""jaxtal.terms: the shared loss terms against NumPy, on hand-made heads and targets (no assigner involved)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal
from jaxtal import obb, terms
from jaxtal.head import Head

B, A, NC, R, E = 2, 6, 3, 4, 4
RNG = np.random.default_rng(0)
ANCHORS = np.array([[0.5, 0.5], [1.5, 0.5], [0.5, 1.5], [1.5, 1.5], [0.5, 0.5], [0.5, 0.5]], np.float32)  # two levels
STRIDES = np.array([[8.0]] * 4 + [[16.0]] * 2, np.float32)


def head(box_dim: int = 4) -> Head:
  logits = RNG.normal(size=(B, A, NC)).astype(np.float32)
  dist = RNG.normal(size=(B, A, 4, R)).astype(np.float32)
  p = np.exp(dist - dist.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ltrb = (p * np.arange(R)).sum(-1).astype(np.float32)
  lse = (np.log(np.exp(dist - dist.max(-1, keepdims=True)).sum(-1)) + dist.max(-1)).astype(np.float32)
  boxes = np.concatenate([ANCHORS - ltrb[..., :2], ANCHORS + ltrb[..., 2:]], -1)
  if box_dim == 5:
    boxes = np.concatenate([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2], RNG.uniform(-1, 1, (B, A, 1))], -1)
  split = lambda x: (jnp.asarray(x[:, :4]), jnp.asarray(x[:, 4:]))  # noqa: E731
  return Head(split(logits), split(dist), jnp.asarray(ltrb), jnp.asarray(lse), jnp.asarray(boxes, jnp.float32), jnp.asarray(ANCHORS), jnp.asarray(STRIDES))


def targets(box_dim: int = 4) -> jaxtal.Targets:
  """Anchors 0, 3 of image 0 and anchor 4 of image 1 are foreground; entries list each once (plus invalid ones)."""
  fg = np.zeros((B, A), bool)
  fg[0, [0, 3]] = True
  fg[1, 4] = True
  boxes = np.zeros((B, A, box_dim), np.float32)
  if box_dim == 4:
    boxes[0, 0], boxes[0, 3], boxes[1, 4] = [0, 0, 16, 12], [4, 6, 20, 18], [-4, -8, 20, 24]
  else:
    boxes[0, 0], boxes[0, 3], boxes[1, 4] = [6, 6, 12, 8, 0.3], [12, 12, 16, 10, -0.2], [8, 8, 24, 30, 1.0]
  labels = np.where(fg, RNG.integers(0, NC, (B, A)), 0).astype(np.int32)
  weights = np.where(fg, RNG.uniform(0.1, 0.9, (B, A)), 0).astype(np.float32)
  gt_index = np.where(fg, 1, 0).astype(np.int32)
  entries = jaxtal.ForegroundEntries(
      jnp.asarray([[3, 1, 0, 5], [4, 2, 2, 0]], jnp.int32),
      jnp.asarray([[1, 0, 1, 0], [1, 0, 0, 0]], jnp.int32),
      jnp.asarray([[True, False, True, False], [True, False, False, False]]),
  )
  return jaxtal.Targets(*map(jnp.asarray, (labels, boxes, weights, fg, gt_index, np.array([[0, 2], [0, 1]], np.int32))), entries)


def test_normaliser_and_foreground_count_floor_at_one():
  t = targets()
  np.testing.assert_allclose(terms.normaliser(t, None), max(float(np.sum(t.weights)), 1.0), rtol=1e-6)
  assert float(terms.foreground_count(t, None)) == 3.0
  empty = t._replace(weights=jnp.zeros_like(t.weights), entries=t.entries._replace(valid=jnp.zeros_like(t.entries.valid)))
  assert float(terms.normaliser(empty, None)) == 1.0 and float(terms.foreground_count(empty, None)) == 1.0


def test_entry_weights_read_each_valid_entrys_anchor_and_zero_the_rest():
  t = targets()
  w = np.asarray(terms.entry_weights(t))
  np.testing.assert_array_equal(w, [[t.weights[0, 3], 0, t.weights[0, 0], 0], [t.weights[1, 4], 0, 0, 0]])


def test_target_boxes_are_grid_units_with_a_finite_stand_in_on_background():
  h, t = head(), targets()
  got = np.asarray(terms.target_boxes(h, t))
  np.testing.assert_allclose(got[0, 3], np.array([4, 6, 20, 18]) / 8)
  np.testing.assert_allclose(got[1, 4], np.array([-4, -8, 20, 24]) / 16)
  np.testing.assert_allclose(got[0, 1], np.r_[ANCHORS[1] - 0.5, ANCHORS[1] + 0.5])  # background: a unit box
  rot = np.asarray(terms.target_boxes(head(5), targets(5), obb.ROTATED))
  np.testing.assert_allclose(rot[1, 4], [0.5, 0.5, 1.5, 30 / 16, 1.0])  # the angle is not scaled
  np.testing.assert_allclose(rot[0, 1], [*ANCHORS[1], 1, 1, 0])


def test_class_term_is_the_bce_over_every_anchor_and_class():
  h, t = head(), targets()
  cw = np.array([1.0, 2.0, 0.5], np.float32)
  x = np.concatenate([np.asarray(v) for v in h.logits], 1)
  z = np.eye(NC)[np.asarray(t.labels)] * np.asarray(t.weights)[..., None]
  bce = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
  np.testing.assert_allclose(terms.class_term(h, t, None), bce.sum(), rtol=1e-5)
  np.testing.assert_allclose(terms.class_term(h, t, cw), (bce * cw).sum(), rtol=1e-5)


@pytest.mark.parametrize("form", ["xyxy", "xywhr"])
def test_box_term_sums_weighted_one_minus_overlap_at_the_valid_entries(form):
  dim, box_form, overlap = (4, terms.AXIS_ALIGNED, lambda a, b: jaxtal.box_iou(a, b, "ciou")) if form == "xyxy" else (
      5, obb.ROTATED, lambda a, b: jaxtal.probiou(a, b, floor=obb.BOX_FLOOR))
  h, t = head(dim), targets(dim)
  tb = terms.target_boxes(h, t, box_form)
  w = terms.entry_weights(t)
  want = 0.0
  for i, a in ((0, 3), (0, 0), (1, 4)):
    want += float(t.weights[i, a]) * (1 - float(overlap(h.boxes[i, a], tb[i, a])))
  np.testing.assert_allclose(terms.box_term(h, t, tb, w, box_form), want, rtol=1e-5)


def test_dfl_term_is_the_two_bin_cross_entropy_at_the_valid_entries():
  h, t = head(), targets()
  tb = terms.target_boxes(h, t)
  ltrb = np.asarray(jaxtal.xyxy_to_ltrb(tb, h.anchors))
  dist = np.concatenate([np.asarray(d) for d in h.dist], 1)
  want = 0.0
  for i, a in ((0, 3), (0, 0), (1, 4)):
    target = np.clip(ltrb[i, a], 0, R - 1 - 0.01)
    lo = np.floor(target).astype(int)
    wr = target - lo
    logp = dist[i, a] - np.log(np.exp(dist[i, a]).sum(-1, keepdims=True))
    ce = -((1 - wr) * logp[np.arange(4), lo] + wr * logp[np.arange(4), lo + 1])
    want += float(t.weights[i, a]) * ce.mean()
  got = terms.dfl_term(h, t, jnp.asarray(ltrb), terms.entry_weights(t), R)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_l1_term_measures_distances_in_units_of_the_input():
  h, t = head(), targets()
  tb = terms.target_boxes(h, t)
  ltrb = np.asarray(jaxtal.xyxy_to_ltrb(tb, h.anchors))
  hw = (64.0, 96.0)
  scale = np.array([96, 64, 96, 64], np.float32)
  want = sum(float(t.weights[i, a]) * np.mean(np.abs(np.asarray(h.ltrb[i, a]) - ltrb[i, a]) * STRIDES[a] / scale)
             for i, a in ((0, 3), (0, 0), (1, 4)))
  np.testing.assert_allclose(terms.l1_term(h, t, jnp.asarray(ltrb), terms.entry_weights(t), hw), want, rtol=1e-5)


def test_detection_parts_scale_each_term_by_its_gain_and_the_normaliser():
  h, t = head(), targets()
  cfg = jaxtal.LossConfig(num_classes=NC, strides=(8, 16), reg_max=R, box=2.0, cls=3.0, dfl=5.0)
  parts = terms.detection_parts(h, t, cfg, (32.0, 32.0), None)
  n = float(terms.normaliser(t, None))
  tb = terms.target_boxes(h, t)
  w = terms.entry_weights(t)
  np.testing.assert_allclose(parts.cls, 3.0 * terms.class_term(h, t, None) / n, rtol=1e-6)
  np.testing.assert_allclose(parts.box, 2.0 * terms.box_term(h, t, tb, w) / n, rtol=1e-6)
  np.testing.assert_allclose(parts.dfl, 5.0 * terms.dfl_term(h, t, jaxtal.xyxy_to_ltrb(tb, h.anchors), w, R) / n, rtol=1e-6)


def test_finish_multiplies_the_sum_of_parts_by_the_batch_size():
  parts = jaxtal.LossParts(jnp.float32(1.5), jnp.float32(2.0), jnp.float32(0.25))
  total, same = terms.finish(parts, 4, None)
  assert float(total) == 15.0 and same == parts
  assert jax.tree.structure(same) == jax.tree.structure(parts)
