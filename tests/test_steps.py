"""jaxtal.steps.assign_steps: every intermediate step against the NumPy oracle, and its final
assignment against the fast assigner (``task_aligned_assign``)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal
from support.oracles import np_assign
from support.problems import A, NC, assert_assignment_equal, assign, assign_problem, many_anchor_problem


@functools.partial(jax.jit, static_argnames="config")
def steps_jit(scores, boxes, anchors, gt, config):
  return jaxtal.assign_steps(scores, boxes, anchors, gt, config)


CONFIGS = [
    dict(),
    dict(topk=3),
    dict(topk=3, topk2=1),
    dict(topk=10, min_box_side=16.0),
    dict(topk=4, alpha=1.0, beta=2.0, overlap="iou"),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(k) for k in CONFIGS])
def test_every_step_matches_numpy(kw):
  for seed in (0, 5):
    scores, boxes, anchors, gt = assign_problem(seed=seed)
    steps = steps_jit(scores, boxes, anchors, gt, jaxtal.AssignerConfig(**kw))
    b, m = gt.labels.shape
    chex.assert_shape([steps.in_box, steps.overlaps, steps.align_metric, steps.topk_mask, steps.pos_mask],
                      [(b, m, A)] * 5)
    expected = np_assign(scores, boxes, anchors, gt, **kw)
    np.testing.assert_array_equal(steps.valid_gt, expected["valid"])
    np.testing.assert_array_equal(steps.in_box, expected["in_box"])
    np.testing.assert_allclose(steps.overlaps, expected["overlaps"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(steps.align_metric, expected["metric"], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(steps.topk_mask, expected["topk_mask"])
    np.testing.assert_array_equal(steps.pos_mask, expected["pos"])
    assert_assignment_equal(steps.assignment, expected)


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(k) for k in CONFIGS])
def test_final_assignment_equals_the_fast_path(kw):
  for seed in (1, 6):
    scores, boxes, anchors, gt = assign_problem(seed=seed)
    cfg = jaxtal.AssignerConfig(**kw)
    chex.assert_trees_all_close(steps_jit(scores, boxes, anchors, gt, cfg).assignment,
                                assign(scores, boxes, anchors, gt, cfg), rtol=1e-6, atol=1e-8)


def test_many_anchors_equal_the_fast_path():
  scores, pred_boxes, anchor_px, gt, _ = many_anchor_problem(np.random.default_rng(7), NC, 12)
  args = (jnp.asarray(scores), jnp.asarray(pred_boxes), jnp.asarray(anchor_px), gt)
  cfg = jaxtal.AssignerConfig(topk=13)
  steps = steps_jit(*args, cfg)
  fast = assign(*args, cfg)
  for name in ("fg_mask", "gt_index", "labels", "positives_per_gt"):
    np.testing.assert_array_equal(getattr(steps.assignment, name), getattr(fast, name), err_msg=name)
  np.testing.assert_allclose(steps.assignment.scores, fast.scores, rtol=1e-5, atol=1e-7)
  # topk_mask really truncates: some GT has more candidates than topk.
  assert int(steps.in_box.sum(-1).max()) > 13 >= int(steps.topk_mask.sum(-1).max())


def test_zero_slots_and_empty_ground_truth():
  scores, boxes, anchors, gt = assign_problem(seed=0)
  empty = steps_jit(scores, boxes, anchors, gt._replace(mask=jnp.zeros_like(gt.mask)), jaxtal.AssignerConfig())
  for leaf in jax.tree.leaves(empty):
    np.testing.assert_array_equal(leaf, 0)
  none = steps_jit(scores, boxes, anchors, jax.tree.map(lambda x: x[:, :0], gt), jaxtal.AssignerConfig())
  assert not np.asarray(none.assignment.fg_mask).any()


def test_validates_like_the_fast_path():
  scores, boxes, anchors, gt = assign_problem(seed=0)
  with pytest.raises(ValueError, match=r"assign_steps: topk must be a whole number in \[1, A = 20\].*got 21"):
    jaxtal.assign_steps(scores, boxes, anchors, gt, topk=21)
  with pytest.raises(TypeError, match=r"assign_steps: unknown configuration keyword\(s\) \['top_k'\]"):
    jaxtal.assign_steps(scores, boxes, anchors, gt, top_k=3)
  with pytest.raises(ValueError, match="pred_boxes"):
    jaxtal.assign_steps(scores, boxes[..., :3], anchors, gt)
