"""jaxtal.geometry: the Geometry interface and the axis-aligned geometry, against NumPy.

Also shows the assigner is written against the interface only: a geometry written here from
scratch (NamedTuples of our own, jaxtal.box_iou for the overlap) gives the built-in result.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal
from support.oracles import np_assign, np_box_iou
from support.problems import NC, assign_problem, random_boxes


def test_axis_aligned_is_cached_per_overlap():
  assert jaxtal.axis_aligned("ciou") is jaxtal.axis_aligned("ciou")
  assert jaxtal.axis_aligned("iou") is not jaxtal.axis_aligned("ciou")
  g = jaxtal.axis_aligned("iou")
  assert isinstance(g, jaxtal.Geometry) and g.name == "xyxy/iou" and g.box_dim == 4
  assert hash(g) == hash(jaxtal.axis_aligned("iou"))  # usable as a static argument


def test_axis_aligned_rejects_other_overlaps():
  with pytest.raises(ValueError, match=r"overlap must be one of \('ciou', 'iou'\) for axis-aligned boxes, got 'giou'"):
    jaxtal.axis_aligned("giou")


def test_box_ok_and_on_image_hand_worked():
  g = jaxtal.axis_aligned()
  boxes = jnp.array([
      [0.0, 0.0, 4.0, 4.0],
      [4.0, 0.0, 4.0, 4.0],  # zero width
      [0.0, 4.0, 4.0, 2.0],  # inverted y
      [np.nan, 0.0, 4.0, 4.0],
      [30.0, 10.0, 40.0, 20.0],  # partly outside a 32 x 32 image: overlaps it
      [32.0, 10.0, 40.0, 20.0],  # touches the right edge from outside: no overlap
      [-5.0, -5.0, 0.0, 3.0],  # touches the left edge from outside
      [-5.0, -5.0, 0.5, 0.5],
  ])
  np.testing.assert_array_equal(g.box_ok(boxes), [True, False, False, False, True, True, True, True])
  np.testing.assert_array_equal(g.on_image(boxes, (32.0, 32.0)), [True, True, True, False, True, False, False, True])
  np.testing.assert_array_equal(g.on_image(boxes[4:5], (32.0, 31.0)), [True])
  np.testing.assert_array_equal(g.on_image(boxes[4:5], (32.0, 30.0)), [False])  # (H, W): width 30 excludes x1 = 30


def test_candidate_is_strict_hand_worked():
  g = jaxtal.axis_aligned()
  gd = g.gt_data(jnp.array([[2.0, 2.0, 10.0, 10.0]]), jnp.array([True]), 0.0)
  anchors = jnp.array([[2.0, 6.0], [6.0, 6.0], [10.0, 6.0], [6.0, 9.999], [6.0, 10.0], [1.0, 1.0]])
  pd = g.pred_data(jnp.zeros((6, 4)), anchors)
  got = g.candidate(jax.tree.map(lambda x: x[:, None], gd), jax.tree.map(lambda x: x[None], pd), 1e-9)
  np.testing.assert_array_equal(got, [[False, True, False, True, False, False]])  # on an edge is outside
  # min_box_side widens about the centre: a 1 x 1 box at (6, 6) widened to 8 spans [2, 10].
  gd = g.gt_data(jnp.array([[5.5, 5.5, 6.5, 6.5]]), jnp.array([True]), 8.0)
  pd = g.pred_data(jnp.zeros((3, 4)), jnp.array([[2.1, 6.0], [1.9, 6.0], [9.9, 9.9]]))
  got = g.candidate(jax.tree.map(lambda x: x[:, None], gd), jax.tree.map(lambda x: x[None], pd), 1e-9)
  np.testing.assert_array_equal(got, [[True, False, True]])


@pytest.mark.parametrize("min_box_side", [0.0, 8.0])
def test_candidate_matches_numpy(min_box_side):
  rng = np.random.default_rng(1)
  gt_boxes = random_boxes(rng, (6,), lo=4, hi=28, min_side=1.0, max_side=14.0)
  valid = np.array([True, True, True, True, True, False])
  anchors = np.stack(np.meshgrid(np.arange(2.0, 32, 4), np.arange(2.0, 32, 4)), -1).reshape(-1, 2).astype(np.float32)
  pred = np.concatenate([anchors - 3, anchors + 3], -1)
  g = jaxtal.axis_aligned()
  gd = g.gt_data(jnp.asarray(gt_boxes), jnp.asarray(valid), min_box_side)
  pd = g.pred_data(jnp.asarray(pred), jnp.asarray(anchors))
  got = g.candidate(jax.tree.map(lambda x: x[:, None], gd), jax.tree.map(lambda x: x[None], pd), 1e-9)
  chex.assert_shape(got, (6, len(anchors)))
  b = gt_boxes.astype(np.float64)
  ctr, wh = (b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]
  wh = np.where(wh < min_box_side, min_box_side, wh)
  lt, rb = ctr - wh / 2, ctr + wh / 2
  want = ((anchors[None] > lt[:, None]) & (anchors[None] < rb[:, None])).all(-1)
  np.testing.assert_array_equal(np.asarray(got)[valid], want[valid])  # invalid rows: the assigner masks them
  assert want.any() and (want.sum(1) < len(anchors)).all()


@pytest.mark.parametrize("overlap", ["ciou", "iou"])
def test_overlap_matches_numpy_and_broadcasts(overlap):
  rng = np.random.default_rng(2)
  gt_boxes, pred = random_boxes(rng, (5,)), random_boxes(rng, (9,))
  anchors = (pred[:, :2] + pred[:, 2:]) / 2
  g = jaxtal.axis_aligned(overlap)
  gd = jax.tree.map(lambda x: x[:, None], g.gt_data(jnp.asarray(gt_boxes), jnp.ones(5, bool), 0.0))
  pd = jax.tree.map(lambda x: x[None], g.pred_data(jnp.asarray(pred), jnp.asarray(anchors)))
  got = g.overlap(gd, pd)
  chex.assert_shape(got, (5, 9))
  np.testing.assert_allclose(got, np_box_iou(gt_boxes[:, None], pred[None], overlap), rtol=1e-5, atol=2e-6)


class _Gt(NamedTuple):
  box: jax.Array


class _Pred(NamedTuple):
  box: jax.Array
  anchor: jax.Array


def _strictly_inside(g, p, eps):
  a = p.anchor
  return ((a[..., 0] - g.box[..., 0] > eps) & (a[..., 1] - g.box[..., 1] > eps)
          & (g.box[..., 2] - a[..., 0] > eps) & (g.box[..., 3] - a[..., 1] > eps))


HOMEMADE_IOU = jaxtal.Geometry(
    name="homemade/iou",
    box_dim=4,
    box_ok=lambda b: (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1]),
    on_image=lambda b, hw: jnp.ones(b.shape[:-1], bool),
    gt_data=lambda boxes, valid, side: _Gt(boxes),  # no widening: use with min_box_side = 0
    pred_data=lambda boxes, anchors: _Pred(boxes, anchors),
    candidate=_strictly_inside,
    overlap=lambda g, p: jaxtal.box_iou(g.box, p.box, "iou"),
)


@pytest.mark.parametrize("gt_chunk", [None, 2])
def test_a_geometry_written_from_scratch_drives_the_assigner(gt_chunk):
  scores, boxes, anchors, gt = assign_problem(seed=3)
  cfg = jaxtal.AssignerConfig(topk=4, gt_chunk=gt_chunk, min_box_side=0.0)  # the geometry below does not widen
  run = jax.jit(lambda s, b, a, g, geometry: jaxtal.assign_targets((s,), b, a, g, cfg, geometry=geometry, from_logits=False),
                static_argnames="geometry")
  homemade = run(scores, boxes, anchors, gt, geometry=HOMEMADE_IOU)
  builtin = run(scores, boxes, anchors, gt, geometry=jaxtal.axis_aligned("iou"))
  chex.assert_trees_all_close(homemade, builtin, rtol=1e-6, atol=1e-7)
  expected = np_assign(scores, boxes, anchors, gt, topk=4, overlap="iou", min_box_side=0.0)
  np.testing.assert_array_equal(homemade.fg_mask, expected["fg_mask"])
  np.testing.assert_array_equal(homemade.gt_index, expected["gt_index"])
  np.testing.assert_allclose(homemade.weights, expected["scores"].sum(-1), rtol=1e-5, atol=1e-7)
  assert np.asarray(homemade.fg_mask).sum() > 0
  assert NC == scores.shape[-1]


def test_axis_aligned_is_one_value_per_overlap():
  # Geometries are static values: every spelling of the same overlap must give the same object
  # (else a jit keyed on it would compile twice).
  assert jaxtal.axis_aligned() is jaxtal.axis_aligned("ciou") is jaxtal.axis_aligned(overlap="ciou")
  assert jaxtal.axis_aligned("iou") is not jaxtal.axis_aligned("ciou")
