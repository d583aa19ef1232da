"""Tests of jaxtal/end_to_end.py: the one-to-many weight schedule and the end-to-end combinators.

Expectations come from the schedule's formula written out by hand, from the task loss called
directly on each branch, and (in test_parity_end_to_end.py) from Ultralytics' E2ELoss.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal

NC, STRIDES, B = 3, (8, 16), 2
SHAPES = ((8, 8), (4, 4))
ROWS = np.array([[0, 1, 0.5, 0.5, 0.4, 0.3], [0, 2, 0.3, 0.6, 0.2, 0.5], [1, 0, 0.6, 0.4, 0.5, 0.6]], np.float32)


def maps(seed, reg_max=16):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((B, h, w, 4 * reg_max + NC)), jnp.float32) for h, w in SHAPES]


GT = jaxtal.pack_labels(ROWS, B, 4, 64)
CFG = jaxtal.LossConfig(num_classes=NC, strides=STRIDES)


@pytest.mark.parametrize(
    "epoch, epochs, expected",
    [
        (0, 10, 0.8),  # the first epoch trains at `start`
        (9, 10, 0.1),  # the last at `end`
        (3, 10, (1 - 3 / 9) * 0.7 + 0.1),
        (12, 10, 0.1),  # past the end: clamped
        (0, 1, 0.8),  # a one-epoch run: epochs - 1 floored at 1
    ],
)
def test_one2many_weight_by_hand(epoch, epochs, expected):
  got = jaxtal.one2many_weight(epoch, epochs)
  assert isinstance(got, float)
  assert got == pytest.approx(expected, abs=1e-12)
  traced = jax.jit(jaxtal.one2many_weight)(epoch, epochs)  # a traced epoch: one program for every epoch
  np.testing.assert_allclose(float(traced), expected, rtol=1e-6)


def test_one2many_weight_custom_ends():
  assert jaxtal.one2many_weight(0, 5, start=1.0, end=0.0) == 1.0
  assert jaxtal.one2many_weight(2, 5, start=1.0, end=0.0) == pytest.approx(0.5)


@pytest.mark.slow
def test_end_to_end_total_mixes_the_branches_and_reports_one2one_parts():
  many, one = maps(0), maps(1)
  w = 0.3
  total, parts = jaxtal.end_to_end_loss(jaxtal.detection_loss, many, one, GT, weight=w, config=CFG)
  t_many, _ = jaxtal.detection_loss(many, GT, CFG)
  t_one, p_one = jaxtal.detection_loss(one, GT, CFG, topk=7, topk2=1)
  np.testing.assert_allclose(float(total), w * float(t_many) + 0.7 * float(t_one), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(parts), np.asarray(p_one), rtol=1e-6)
  # The parts are unweighted one-to-one parts: sum(parts) * b is not the total.
  assert not np.isclose(float(sum(parts)) * B, float(total))


@pytest.mark.slow
def test_weight_above_one_gives_the_one2one_branch_no_negative_weight():
  many, one = maps(0), maps(1)
  total, _ = jaxtal.end_to_end_loss(jaxtal.detection_loss, many, one, GT, weight=1.5, config=CFG)
  t_many, _ = jaxtal.detection_loss(many, GT, CFG)
  np.testing.assert_allclose(float(total), 1.5 * float(t_many), rtol=1e-6)


@pytest.mark.slow
def test_one2one_branch_uses_its_own_topk():
  # With topk2=1 every GT owns at most one anchor on the one-to-one branch.
  one = maps(1)
  _, targets = jaxtal.detection_targets(one, GT, CFG, topk=7, topk2=1)
  assert np.asarray(targets.positives_per_gt).max() == 1
  # And end_to_end_loss's one-to-one part is that branch's loss, not the topk=10 one.
  _, parts = jaxtal.end_to_end_loss(jaxtal.detection_loss, maps(0), one, GT, weight=0.5, config=CFG)
  _, p10 = jaxtal.detection_loss(one, GT, CFG)
  assert not np.allclose(np.asarray(parts), np.asarray(p10))


@pytest.mark.slow
def test_yolov10_sum_form():
  many, one = maps(0), maps(1)
  total, parts = jaxtal.end_to_end_sum_loss(jaxtal.detection_loss, many, one, GT, config=CFG)
  t_many, p_many = jaxtal.detection_loss(many, GT, CFG)
  t_one, p_one = jaxtal.detection_loss(one, GT, CFG, topk=1, topk2=None)
  np.testing.assert_allclose(float(total), float(t_many) + float(t_one), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(parts), np.asarray(p_many) + np.asarray(p_one), rtol=1e-6)


@pytest.mark.slow
def test_gradients_reach_both_branches_and_only_through_the_weighted_totals():
  many, one = maps(0), maps(1)
  w = 0.25

  def e2e(a, b):
    return jaxtal.end_to_end_loss(jaxtal.detection_loss, a, b, GT, weight=w, config=CFG)[0]

  ga, gb = jax.grad(e2e, argnums=(0, 1))(many, one)
  want_a = jax.grad(lambda a: jaxtal.detection_loss(a, GT, CFG)[0])(many)
  want_b = jax.grad(lambda b: jaxtal.detection_loss(b, GT, CFG, topk=7, topk2=1)[0])(one)
  for got, want in zip(ga, want_a):
    np.testing.assert_allclose(got, w * want, rtol=1e-5, atol=1e-7)
  for got, want in zip(gb, want_b):
    np.testing.assert_allclose(got, (1 - w) * want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_module_equals_function_and_compiles_once_over_epochs():
  many, one = maps(0), maps(1)
  module = jaxtal.EndToEndLoss(CFG)
  traces = []

  @jax.jit
  def step(a, b, gt, epoch):
    traces.append(1)
    return module(a, b, gt, weight=jaxtal.one2many_weight(epoch, 20))

  @jax.jit  # the function, jitted too (eager, three epochs took ~25 s)
  def want_fn(a, b, gt, epoch):
    return jaxtal.end_to_end_loss(jaxtal.detection_loss, a, b, gt, weight=jaxtal.one2many_weight(epoch, 20), config=CFG)

  for epoch in (0, 7, 19):
    got = step(many, one, GT, epoch)
    want = want_fn(many, one, GT, epoch)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  assert len(traces) == 1


@pytest.mark.slow
def test_module_keeps_class_weights_and_overrides():
  cw = jnp.asarray([1.0, 2.0, 0.5])
  module = jaxtal.EndToEndLoss(CFG, class_weights=cw, reg_max=16, one2one_topk=5, one2one_topk2=None)
  got = module(maps(0), maps(1), GT, weight=0.5)
  want = jaxtal.end_to_end_loss(
      jaxtal.detection_loss, maps(0), maps(1), GT, weight=0.5, one2one_topk=5, one2one_topk2=None, config=CFG,
      class_weights=cw)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)


@pytest.mark.slow
def test_reg_max1_yolo26_head():
  cfg = jaxtal.LossConfig(num_classes=NC, strides=STRIDES, reg_max=1)
  total, parts = jaxtal.end_to_end_loss(
      jaxtal.detection_loss, maps(0, 1), maps(1, 1), GT, weight=jaxtal.one2many_weight(0, 10), config=cfg
  )
  assert np.isfinite(float(total)) and all(np.isfinite(np.asarray(p)) for p in parts)


@pytest.mark.slow
def test_empty_batch_is_finite():
  empty = jaxtal.pack_labels(np.zeros((0, 6), np.float32), B, 4, 64)
  f = functools.partial(jaxtal.end_to_end_loss, jaxtal.detection_loss, weight=0.8, config=CFG)
  (total, parts), grads = jax.value_and_grad(lambda a: f(a, maps(1), empty), has_aux=True)(maps(0))
  assert np.isfinite(float(total)) and float(parts.box) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.slow
def test_works_with_the_obb_task_loss():
  # Every task loss jaxtal has plugs in: the oriented-box loss takes (feats, angles).
  rows = np.array([[0, 1, 0.5, 0.5, 0.4, 0.3, 0.3], [1, 0, 0.4, 0.6, 0.3, 0.2, -0.7]], np.float32)
  gt = jaxtal.pack_rotated_labels(rows, B, 4, 64)
  cfg = jaxtal.OBBLossConfig(num_classes=NC, strides=STRIDES)
  rng = np.random.default_rng(3)
  angles = [jnp.asarray(rng.uniform(-0.7, 0.7, (B, h, w, 1)), jnp.float32) for h, w in SHAPES]
  total, parts = jaxtal.end_to_end_loss(
      jaxtal.obb_loss, jaxtal.Predictions(maps(0), angles=angles), jaxtal.Predictions(maps(1), angles=angles), gt, weight=0.6, config=cfg
  )
  t_many, _ = jaxtal.obb_loss(jaxtal.Predictions(maps(0), angles=angles), gt, cfg)
  t_one, p_one = jaxtal.obb_loss(jaxtal.Predictions(maps(1), angles=angles), gt, cfg, topk=7, topk2=1)
  np.testing.assert_allclose(float(total), 0.6 * float(t_many) + 0.4 * float(t_one), rtol=1e-5)
  assert parts._fields == ("box", "cls", "dfl", "angle")
  np.testing.assert_allclose(np.asarray(parts), np.asarray(p_one), rtol=1e-6)


def test_bad_arguments_are_named():
  with pytest.raises(TypeError, match="not a tuple of arguments"):  # the old (feats,) branch form
    jaxtal.end_to_end_loss(jaxtal.detection_loss, (maps(0),), maps(1), GT, weight=0.5, config=CFG)
  with pytest.raises(TypeError, match="loss_fn must be"):
    jaxtal.end_to_end_loss(None, maps(0), maps(1), GT, weight=0.5, config=CFG)
