"""jaxtal.targets: the foreground entry-list contract, positives per GT, and building Targets from a
dense Assignment made elsewhere (the round trip through loss_from_targets equals detection_loss).

The contract (module docstring of jaxtal/targets.py): every foreground anchor is listed exactly once
as a valid entry, no background anchor is, and a valid entry names its anchor's GT. It is checked
here in NumPy (``problems.np_entries_keep_contract``) as well as with ``entries_cover_foreground``.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxtal
from jaxtal import kernels
from support.oracles import np_assign, np_sigmoid
from support.problems import (
    IMAGE,
    NC,
    crowded_loss_problem,
    loss_and_grad,
    loss_config,
    loss_from_targets_and_grad,
    broken,
    np_entries_keep_contract,
    targets_jit,
)


def test_foreground_entries_hand_worked():
  fg = jnp.array([[False, True, False, True, True], [False] * 5, [True] * 5])
  gi = jnp.array([[0, 2, 0, 1, 2], [0] * 5, [3, 3, 0, 1, 2]])
  e = jaxtal.foreground_entries(fg, gi, 4)
  chex.assert_type([e.anchor, e.gt, e.valid], [jnp.int32, jnp.int32, jnp.bool_])
  np.testing.assert_array_equal(e.anchor[0][e.valid[0]], [1, 3, 4])  # in anchor order
  np.testing.assert_array_equal(e.gt[0][e.valid[0]], [2, 1, 2])
  np.testing.assert_array_equal(e.valid, [[True, True, True, False], [False] * 4, [True] * 4])
  targets = jaxtal.Targets(jnp.zeros((3, 5), jnp.int32), jnp.zeros((3, 5, 4)), jnp.zeros((3, 5)), fg, gi,
                           jnp.zeros((3, 4), jnp.int32), e)
  # Image 2 has 5 foreground anchors but only 4 rows: its last anchor is not listed, which breaks the contract.
  np.testing.assert_array_equal(jaxtal.entries_cover_foreground(targets), [True, True, False])
  np.testing.assert_array_equal(np_entries_keep_contract(fg, gi, e), [True, True, False])


def test_take_rows():
  x = jnp.arange(2 * 5 * 3).reshape(2, 5, 3)
  rows = jnp.array([[4, 0, 4], [1, 1, 2]])
  np.testing.assert_array_equal(jaxtal.take_rows(x, rows), np.stack([np.asarray(x)[i][np.asarray(rows)[i]] for i in range(2)]))


def test_targets_from_assignment_and_to_assignment():
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(0, NC, (2, 6)), jnp.int32)
  fg = jnp.asarray(rng.uniform(size=(2, 6)) < 0.5)
  weights = jnp.where(fg, jnp.asarray(rng.uniform(0.1, 1.0, (2, 6)), jnp.float32), 0.0)
  scores = jax.nn.one_hot(labels, NC) * weights[..., None]
  gi = jnp.where(fg, jnp.asarray(rng.integers(0, 3, (2, 6))), 0).astype(jnp.int32)
  boxes = jnp.asarray(rng.uniform(0, 30, (2, 6, 4)), jnp.float32)
  counts = jnp.asarray([np.bincount(np.asarray(gi)[i][np.asarray(fg)[i]], minlength=3) for i in range(2)], jnp.int32)
  dense = jaxtal.Assignment(labels, boxes, scores, fg, gi, counts)
  t = jaxtal.targets_from_assignment(dense, 6)
  np.testing.assert_allclose(t.weights, weights, rtol=1e-6)
  for name in ("labels", "boxes", "fg_mask", "gt_index", "positives_per_gt"):
    np.testing.assert_array_equal(getattr(t, name), getattr(dense, name))
  np.testing.assert_array_equal(jaxtal.entries_cover_foreground(t), True)
  chex.assert_trees_all_close(jaxtal.to_assignment(t, NC), dense, rtol=1e-6)


CONTRACT_CONFIGS = [
    dict(topk=3),
    dict(topk=10),
    dict(topk=6, gt_chunk=1),
    dict(topk=4, topk2=1),
    dict(topk=7, topk2=2, min_box_side=16.0),
    dict(topk=5, overlap="iou"),
]


@pytest.mark.parametrize("kw", CONTRACT_CONFIGS, ids=[str(k) for k in CONTRACT_CONFIGS])
def test_detection_targets_keep_the_entry_contract(kw):
  """Overlapping GTs list the same anchors (duplicates across GTs); every configuration keeps the contract."""
  feats, gt = crowded_loss_problem(seed=0)
  cfg = loss_config(**kw)
  _, t = targets_jit(feats, gt, config=cfg)
  b, m = gt.labels.shape
  chex.assert_shape([t.entries.anchor, t.entries.gt, t.entries.valid], [(b, m * cfg.topk)] * 3)
  anchors = np.asarray(t.entries.anchor)
  assert any(np.unique(a).size < a.size for a in anchors), "no anchor listed by two GTs: the case is too easy"
  np.testing.assert_array_equal(np_entries_keep_contract(t.fg_mask, t.gt_index, t.entries), True)
  np.testing.assert_array_equal(jaxtal.entries_cover_foreground(t), True)
  assert np.asarray(t.fg_mask).sum() > 0
  # positives_per_gt: (b, M) int32, 0 on padding, one count per foreground anchor.
  counts = np.asarray(t.positives_per_gt)
  chex.assert_shape(t.positives_per_gt, (b, m))
  chex.assert_type(t.positives_per_gt, jnp.int32)
  np.testing.assert_array_equal(counts[~np.asarray(gt.mask)], 0)
  np.testing.assert_array_equal(counts.sum(1), np.asarray(t.fg_mask).sum(1))


def _oracle_targets(feats, gt, cfg):
  """np_assign on the predictions decoded in NumPy, as the loss's assigner sees them."""
  head = jaxtal.decode_head(feats, cfg)  # decoding is tested against NumPy in test_head.py
  logits = np.concatenate([np.asarray(x, np.float64) for x in head.logits], 1)
  strides = np.asarray(head.strides, np.float64)
  kw = {k: getattr(cfg, k) for k in ("topk", "topk2", "alpha", "beta", "eps", "min_box_side", "overlap")}
  if kw["min_box_side"] is None:  # Ultralytics 8.4.190's side floor: the second stride
    kw["min_box_side"] = float(cfg.strides[1])
  return np_assign(np_sigmoid(logits), np.asarray(head.boxes, np.float64) * strides,
                   np.asarray(head.anchors, np.float64) * strides, gt, image_hw=(IMAGE, IMAGE), **kw)


@pytest.mark.parametrize("kw", [dict(topk=10), dict(topk=4, topk2=1), dict(topk=5, overlap="iou")])
def test_positives_per_gt_equal_the_oracle(kw):
  feats, gt = crowded_loss_problem(seed=0)
  cfg = loss_config(**kw)
  _, t = targets_jit(feats, gt, config=cfg)
  expected = _oracle_targets(feats, gt, cfg)
  np.testing.assert_array_equal(t.fg_mask, expected["fg_mask"])
  np.testing.assert_array_equal(t.positives_per_gt, expected["positives_per_gt"])
  np.testing.assert_allclose(t.weights, expected["scores"].sum(-1), rtol=1e-4, atol=1e-6)


@functools.partial(jax.jit, static_argnames="config")
def _dense_assignment(feats, gt, config):
  """A dense Assignment of the decoded head made by the public assigner (not the loss's own path)."""
  head = jaxtal.decode_head(feats, config)
  scores = jax.nn.sigmoid(jnp.concatenate(head.logits, axis=1))
  return jaxtal.task_aligned_assign(scores, head.boxes * head.strides, head.anchors * head.strides, gt, config)


@pytest.mark.slow
def test_round_trip_through_a_dense_assignment_equals_detection_loss():
  feats, gt = crowded_loss_problem(seed=2)
  cfg = loss_config()
  dense = _dense_assignment(feats, gt, cfg)
  targets = jaxtal.targets_from_assignment(dense, gt.labels.shape[1] * cfg.topk)
  np.testing.assert_array_equal(jaxtal.entries_cover_foreground(targets), True)
  (total, parts), grads = loss_from_targets_and_grad(feats, targets, config=cfg)
  (want_total, want_parts), want_grads = loss_and_grad(feats, gt, config=cfg)
  assert float(parts.box) > 0
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(parts), np.asarray(want_parts), rtol=1e-5)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * float(np.abs(w).max()))


# --------------------------------------------------------------------------------------------------
# Broken entry lists: detected, and the loss stays consistent (value and gradient) anyway


@pytest.fixture(scope="module")
def crowded_targets():
  feats, gt = crowded_loss_problem(seed=0)
  _, t = targets_jit(feats, gt, config=loss_config())
  return feats, t


@pytest.mark.parametrize("how", ["duplicate", "missing", "background", "wrong_gt"])
def test_a_broken_entry_list_is_detected(crowded_targets, how):
  _, t = crowded_targets
  bad = broken(t, how, image=1)
  np.testing.assert_array_equal(jaxtal.entries_cover_foreground(bad), [True, False])
  np.testing.assert_array_equal(np_entries_keep_contract(bad.fg_mask, bad.gt_index, bad.entries), [True, False])


def test_a_duplicated_entry_counts_twice_with_a_consistent_gradient(crowded_targets):
  """loss_from_targets with an anchor listed twice: its box terms count twice in the value, and the
  gradient is still the value's gradient (check_grads; the same as autodiff through every plain twin)."""
  feats, t = crowded_targets
  cfg = loss_config()
  bad = broken(t, "duplicate", image=0)
  (total, _), grads = loss_from_targets_and_grad(feats, bad, config=cfg)
  (good_total, _), _ = loss_from_targets_and_grad(feats, t, config=cfg)
  assert float(total) > float(good_total)  # the repeated anchor's CIoU and DFL terms are added again

  def loss(feats, cfg=cfg):
    return jaxtal.loss_from_targets(feats, bad, None, cfg)[0]

  check_grads(jax.jit(loss), (feats,), order=1, modes=("rev",), eps=1e-2, atol=5e-2, rtol=5e-3)
  plain_cfg = dataclasses.replace(cfg, plain_kernels=kernels.KERNELS)
  plain = jax.jit(jax.grad(functools.partial(loss, cfg=plain_cfg)))(feats)  # autodiff everywhere
  for g, p in zip(grads, plain):
    np.testing.assert_allclose(g, p, rtol=1e-4, atol=1e-6 * float(np.abs(p).max()))
