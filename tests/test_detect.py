"""The detection task: detection_loss, detection_targets and loss_from_targets against the NumPy oracle, and
the DetectionLoss NNX module equal to the function.

``oracles.np_detection_loss`` decodes the head maps, assigns with the NumPy assigner ``np_assign``
and sums BCE + CIoU + DFL (or L1 for ``reg_max == 1``) in float64: no jaxtal code is called for
the expectation. The Ultralytics parity of the same loss is in test_parity_detect.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtal
from support.oracles import np_detection_loss
from support.problems import (
    LOSS_CFG,
    NC,
    R,
    STRIDES,
    crowded_loss_problem,
    loss_and_grad,
    loss_config,
    loss_from_targets_and_grad,
    loss_jit,
    loss_problem,
    targets_jit,
)


def oracle(feats, gt, cfg, **kw):
  fields = ("num_classes", "strides", "reg_max", "layout", "box", "cls", "dfl", "topk", "topk2", "alpha", "beta", "eps",
            "min_box_side", "overlap")
  return np_detection_loss(feats, gt, **{k: getattr(cfg, k) for k in fields}, **kw)


class TestDetectionLoss:

  def test_matches_numpy(self):
    feats, gt = loss_problem(seed=0)
    total, parts = loss_jit(feats, gt, config=LOSS_CFG)
    chex.assert_shape([total, *parts], [()] * 4)
    chex.assert_type([total, *parts], jnp.float32)
    expected_total, expected_parts, assignment = oracle(feats, gt, LOSS_CFG)
    assert assignment["fg_mask"].sum() >= 5 and expected_parts[0] > 0 and expected_parts[2] > 0
    np.testing.assert_allclose(parts, expected_parts, rtol=2e-5)
    np.testing.assert_allclose(total, expected_total, rtol=2e-5)

  @pytest.mark.slow
  def test_eager_equals_numpy(self):
    """The same without jit (op by op: ~15 s of compiles on CPU, hence slow)."""
    feats, gt = loss_problem(seed=0)
    total, parts = jaxtal.detection_loss(feats, gt, LOSS_CFG)
    expected_total, expected_parts, _ = oracle(feats, gt, LOSS_CFG)
    np.testing.assert_allclose(parts, expected_parts, rtol=2e-5)
    np.testing.assert_allclose(total, expected_total, rtol=2e-5)

  @pytest.mark.parametrize("kw", [
      dict(topk=5, box=2.0, cls=1.0, dfl=0.25),
      dict(topk=7, topk2=1, min_box_side=16.0),
      dict(overlap="iou"),
      dict(reg_max=1),
  ], ids=["gains_topk", "topk2_side", "iou", "reg_max_1"])
  def test_options_match_numpy(self, kw):
    feats, gt = crowded_loss_problem(seed=1) if "reg_max" not in kw else loss_problem(seed=1, reg_max=1)
    if "reg_max" in kw:  # direct ltrb regression: positive distances of a few cells
      feats = [f.at[..., :4].set(jnp.abs(f[..., :4]) * 1.5 + 0.5) for f in feats]
    cfg = loss_config(**kw)
    total, parts = loss_jit(feats, gt, config=cfg)
    expected_total, expected_parts, assignment = oracle(feats, gt, cfg)
    assert assignment["fg_mask"].sum() >= 3 and min(expected_parts) > 0
    np.testing.assert_allclose(parts, expected_parts, rtol=5e-5)
    np.testing.assert_allclose(total, expected_total, rtol=5e-5)

  @pytest.mark.slow  # > 4 s; CI runs it in the slow set
  def test_class_weights_match_numpy(self):
    feats, gt = loss_problem(seed=2)
    cw = jnp.array([0.5, 2.0, 0.25])
    total, parts = loss_jit(feats, gt, config=LOSS_CFG, class_weights=cw)
    expected_total, expected_parts, _ = oracle(feats, gt, LOSS_CFG, class_weights=np.asarray(cw))
    np.testing.assert_allclose(parts, expected_parts, rtol=2e-5)
    np.testing.assert_allclose(total, expected_total, rtol=2e-5)
    assert abs(float(loss_jit(feats, gt, config=LOSS_CFG)[1].cls) - float(parts.cls)) > 1e-3  # they matter

  @pytest.mark.slow  # > 4 s; CI runs it in the slow set
  def test_iou_assignment_changes_the_loss_but_the_box_term_stays_ciou(self):
    feats, gt = crowded_loss_problem(seed=1)
    ciou_cfg, iou_cfg = LOSS_CFG, loss_config(overlap="iou")
    _, iou_targets = targets_jit(feats, gt, config=iou_cfg)
    ciou_loss, iou_loss = loss_jit(feats, gt, config=ciou_cfg), loss_jit(feats, gt, config=iou_cfg)
    assert abs(float(ciou_loss[0]) - float(iou_loss[0])) > 1e-3
    # The same targets give the same loss whichever overlap the config names: the box term is CIoU.
    (a, _), ga = loss_from_targets_and_grad(feats, iou_targets, config=iou_cfg)
    (b, _), gb = loss_from_targets_and_grad(feats, iou_targets, config=ciou_cfg)
    np.testing.assert_array_equal(a, b)
    chex.assert_trees_all_equal(ga, gb)
    np.testing.assert_allclose(a, iou_loss[0], rtol=1e-6)
    # ... and that loss is the oracle's CIoU box loss on the IoU assignment.
    _, expected_parts, _ = oracle(feats, gt, iou_cfg)
    np.testing.assert_allclose(iou_loss[1], expected_parts, rtol=5e-5)

  def test_empty_batch_has_finite_loss(self):
    feats, gt = loss_problem(seed=1, empty=True)
    total, parts = loss_jit(feats, gt, config=LOSS_CFG)
    chex.assert_shape([total, *parts], [()] * 4)
    # No targets: box and DFL vanish, BCE against all-zero targets normalised by N = 1.
    logits = np.concatenate([np.asarray(f)[..., 4 * R :].reshape(2, -1, NC) for f in feats], 1).astype(np.float64)
    np.testing.assert_allclose(parts, [0.0, 0.5 * np.log1p(np.exp(logits)).sum(), 0.0], rtol=1e-5)
    np.testing.assert_allclose(total, 2 * sum(np.asarray(parts)), rtol=1e-6)

  def test_empty_batch_has_finite_gradients(self):
    feats, gt = loss_problem(seed=1, empty=True)
    _, grads = loss_and_grad(feats, gt, config=LOSS_CFG)
    chex.assert_shape(grads, [f.shape for f in feats])
    chex.assert_tree_all_finite(grads)
    # Only the class logits get a gradient: d(b * 0.5 * sum softplus(x) / 1)/dx = sigmoid(x) for b = 2.
    for g, f in zip(grads, feats):
      np.testing.assert_array_equal(g[..., : 4 * R], 0.0)
      np.testing.assert_allclose(g[..., 4 * R :], jax.nn.sigmoid(f[..., 4 * R :]), rtol=1e-5)

  def test_gradients_finite_with_degenerate_ground_truth(self):
    feats, gt = loss_problem(seed=2)
    _, grads = loss_and_grad(feats, gt, config=LOSS_CFG)
    chex.assert_tree_all_finite(grads)
    assert any(np.abs(np.asarray(g[..., : 4 * R])).max() > 0 for g in grads)  # boxes are being trained
    degenerate = gt._replace(boxes=gt.boxes.at[0, 1].set(jnp.array([10.0, 10.0, 10.0, 20.0])))  # zero width
    chex.assert_tree_all_finite(loss_and_grad(feats, degenerate, config=LOSS_CFG))
    inverted = gt._replace(boxes=gt.boxes.at[1, 0].set(jnp.array([20.0, 20.0, 10.0, 10.0])))
    chex.assert_tree_all_finite(loss_and_grad(feats, inverted, config=LOSS_CFG))

  def test_layouts_agree(self):
    nhwc, gt = loss_problem(seed=3)
    nchw, _ = loss_problem(seed=3, layout="NCHW")
    chex.assert_trees_all_close(loss_jit(nhwc, gt, config=LOSS_CFG),
                                loss_jit(nchw, gt, config=loss_config(layout="NCHW")), rtol=1e-6)

  def test_bad_arguments_raise(self):
    feats, gt = loss_problem(seed=0)
    with pytest.raises(ValueError, match="strides"):
      jaxtal.detection_loss(feats, gt, num_classes=NC, strides=(8, 8), reg_max=R)
    with pytest.raises(ValueError, match="strides"):
      jaxtal.detection_loss(feats, gt, num_classes=NC, strides=(8,), reg_max=R)
    with pytest.raises(ValueError, match="class_weights"):
      jaxtal.detection_loss(feats, gt, LOSS_CFG, class_weights=jnp.ones(2))
    with pytest.raises(ValueError, match="batch"):
      jaxtal.detection_loss(feats, jax.tree.map(lambda x: x[:1], gt), LOSS_CFG)
    with pytest.raises(ValueError, match="channels"):
      jaxtal.detection_loss(feats, gt, num_classes=NC + 1, strides=STRIDES, reg_max=R)


class TestTargetsSplit:
  """detection_targets + loss_from_targets is detection_loss in two halves."""

  def test_halves_equal_the_whole_and_the_targets_are_used(self):
    feats, gt = loss_problem(seed=5)
    _, other = loss_problem(seed=6)
    assert not np.array_equal(np.asarray(gt.boxes), np.asarray(other.boxes))
    head, targets = targets_jit(feats, gt, config=LOSS_CFG)
    _, other_targets = targets_jit(feats, other, config=LOSS_CFG)
    chex.assert_trees_all_close(head, jaxtal.decode_head(feats, LOSS_CFG), rtol=1e-6, atol=1e-6)
    whole = loss_and_grad(feats, gt, config=LOSS_CFG)
    chex.assert_trees_all_close(loss_from_targets_and_grad(feats, targets, config=LOSS_CFG), whole, rtol=1e-6, atol=1e-9)
    # gt plays no part once targets are given: other's targets give other's loss.
    chex.assert_trees_all_close(loss_from_targets_and_grad(feats, other_targets, config=LOSS_CFG),
                                loss_and_grad(feats, other, config=LOSS_CFG), rtol=1e-6, atol=1e-9)
    assert abs(float(loss_jit(feats, other, config=LOSS_CFG)[0]) - float(whole[0][0])) > 1e-3

  def test_targets_match_the_oracle_assignment(self):
    feats, gt = crowded_loss_problem(seed=3)
    _, t = targets_jit(feats, gt, config=LOSS_CFG)
    _, _, expected = oracle(feats, gt, LOSS_CFG)
    for name in ("fg_mask", "gt_index", "labels", "positives_per_gt"):
      np.testing.assert_array_equal(getattr(t, name), expected[name], err_msg=name)
    np.testing.assert_allclose(t.weights, expected["scores"].sum(-1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(t.boxes, expected["boxes"], rtol=1e-6)

  def test_loss_from_targets_validates_its_arguments(self):
    feats, gt = loss_problem(seed=5)
    _, targets = targets_jit(feats, gt, config=LOSS_CFG)
    with pytest.raises(TypeError, match="loss_from_targets: targets must be a jaxtal.Targets"):
      jaxtal.loss_from_targets(feats, tuple(targets), None, LOSS_CFG)
    with pytest.raises(ValueError, match=r"targets.labels must be \(b, A\) with b = 2"):
      jaxtal.loss_from_targets(feats, jax.tree.map(lambda x: x[:1], targets), None, LOSS_CFG)
    with pytest.raises(ValueError, match=r"targets.entries.valid must be \(b, E\)"):
      bad = targets._replace(entries=targets.entries._replace(valid=targets.entries.valid[:, :-1]))
      jaxtal.loss_from_targets(feats, bad, None, LOSS_CFG)
    with pytest.raises(ValueError, match=r"targets.weights must be \(b, A\)"):
      jaxtal.loss_from_targets(feats, targets._replace(weights=targets.weights[:, :-1]), None, LOSS_CFG)


# ----------------------------------------------------------------------------- the NNX module


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_module_with_a_config_equals_the_function():
  feats, gt = loss_problem(seed=4)
  cfg = LOSS_CFG  # its jitted loss is shared with the tests above
  cw = jnp.array([0.5, 2.0, 0.25])
  module = jaxtal.DetectionLoss(cfg, class_weights=cw)
  assert module.config is cfg
  total, parts = nnx.jit(lambda m, f, g: m(f, g))(module, feats, gt)
  chex.assert_shape([total, *parts], [()] * 4)
  want = loss_jit(feats, gt, config=cfg, class_weights=cw)
  chex.assert_trees_all_close((total, parts), want, rtol=1e-6)
  # The class weights do change the loss, so the module really passed them on.
  plain = loss_jit(feats, gt, config=cfg)
  assert abs(float(plain[1].cls) - float(parts.cls)) > 1e-4


def test_the_module_raises_the_functions_errors():
  feats, gt = loss_problem()
  with pytest.raises(ValueError, match=r"detection_loss: topk must be a whole number in \[1, A = 20\]"):
    jaxtal.DetectionLoss(LOSS_CFG, topk=21)(feats, gt)
