"""jaxtal.module: the NNX task-loss base, through its detection subclass ``DetectionLoss``: a held, validated
configuration built from a config or keywords, and no trainable state. That the module computes its task's
loss is each task's test (test_detect.py, test_obb.py, ...)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtal
from support.problems import LOSS_CFG, NC, R, STRIDES, loss_config


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
