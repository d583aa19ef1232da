"""jaxtal.module.DetectionLoss: the NNX module is detection_loss with a held config."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtal
from problems import LOSS_CFG, NC, R, STRIDES, loss_config, loss_jit, loss_problem


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_module_with_a_config_equals_the_function():
  feats, gt = loss_problem(seed=4)
  cfg = LOSS_CFG  # its jitted loss is shared with test_loss.py
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


def test_keywords_build_the_same_config():
  module = jaxtal.DetectionLoss(num_classes=NC, strides=STRIDES, reg_max=R)
  assert module.config == LOSS_CFG
  amended = jaxtal.DetectionLoss(LOSS_CFG, topk=5)
  assert amended.config == loss_config(topk=5) and LOSS_CFG.topk == 10


def test_the_class_gain_goes_through_the_config():
  """Flax's module constructor takes its class as ``cls``: the class gain cannot be a keyword here."""
  with pytest.raises(TypeError):
    jaxtal.DetectionLoss(num_classes=NC, strides=STRIDES, cls=1.0)
  assert jaxtal.DetectionLoss(loss_config(cls=1.0)).config.cls == 1.0


def test_unknown_keyword_and_wrong_config_kind():
  with pytest.raises(TypeError, match=r"DetectionLoss: unknown configuration keyword\(s\) \['top_k'\]"):
    jaxtal.DetectionLoss(LOSS_CFG, top_k=3)
  with pytest.raises(TypeError, match="DetectionLoss: config must be a jaxtal.LossConfig"):
    jaxtal.DetectionLoss(jaxtal.AssignerConfig())


def test_no_trainable_state():
  module = jaxtal.DetectionLoss(LOSS_CFG, class_weights=jnp.ones(NC))
  assert not jax.tree.leaves(nnx.state(module, nnx.Param))  # an optimiser finds nothing to update
  np.testing.assert_array_equal(module.class_weights[...], np.ones(NC))
  assert jaxtal.DetectionLoss(LOSS_CFG).class_weights is None


def test_the_module_raises_the_functions_errors():
  feats, gt = loss_problem()
  with pytest.raises(ValueError, match=r"detection_loss: topk must be a whole number in \[1, A = 20\]"):
    jaxtal.DetectionLoss(LOSS_CFG, topk=21)(feats, gt)
