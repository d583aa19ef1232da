"""jaxtal.module: the NNX task-loss base (directly, and through its detection subclass ``DetectionLoss``): a
held, validated configuration of the loss function's config class, built from a config or keywords, and no
trainable state. That the module computes its task's loss is each task's test (test_detect.py, test_obb.py, ...)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtal
from jaxtal.module import LossModuleMeta, TaskLossModule
from support.problems import LOSS_CFG, NC, R, STRIDES, loss_config


def test_keywords_build_the_same_config():
  module = jaxtal.DetectionLoss(num_classes=NC, strides=STRIDES, reg_max=R)
  assert module.config == LOSS_CFG
  amended = jaxtal.DetectionLoss(LOSS_CFG, topk=5)
  assert amended.config == loss_config(topk=5) and LOSS_CFG.topk == 10


def test_the_class_gain_goes_through_the_config():
  """Flax's module constructor takes its class as ``cls``: the class gain cannot be a keyword here,
  and the error says where it goes (not Flax's "got multiple values for argument 'cls'")."""
  with pytest.raises(TypeError) as info:
    jaxtal.DetectionLoss(LOSS_CFG, cls=1.0)
  message = str(info.value)
  assert message == (
      "DetectionLoss: the class gain cls cannot be a keyword argument here (Flax's module constructor reserves the"
      " name cls); put it in the config: DetectionLoss(dataclasses.replace(config, cls=1.0)) or"
      " DetectionLoss(jaxtal.LossConfig(..., cls=1.0))"
  )
  assert "multiple values" not in message
  assert jaxtal.DetectionLoss(loss_config(cls=1.0)).config.cls == 1.0
  assert jaxtal.DetectionLoss(dataclasses.replace(LOSS_CFG, cls=1.0)).config.cls == 1.0


@pytest.mark.parametrize("module, kind, kwargs", [
    (jaxtal.OBBLoss, "OBBLossConfig", {}),
    (jaxtal.PoseLoss, "PoseLossConfig", {}),
    (jaxtal.SegmentLoss, "SegmentLossConfig", {}),
    (jaxtal.EndToEndLoss, "LossConfig", {}),
    (jaxtal.EndToEndLoss, "OBBLossConfig", {"loss_fn": jaxtal.obb_loss}),
])
def test_every_loss_module_names_its_config_class_for_the_class_gain(module, kind, kwargs):
  with pytest.raises(TypeError, match=re.escape(f"{module.__name__}: the class gain cls cannot be a keyword")) as info:
    module(num_classes=NC, strides=STRIDES, cls=2, **kwargs)
  assert f"{module.__name__}(jaxtal.{kind}(..., cls=2))" in str(info.value)


def test_the_metaclass_leaves_flax_graph_operations_alone():
  module = jaxtal.DetectionLoss(LOSS_CFG, topk=3, class_weights=jnp.ones(NC))
  assert type(module).__class__ is LossModuleMeta and type(jaxtal.EndToEndLoss(LOSS_CFG)).__class__ is LossModuleMeta
  graph, state = nnx.split(module)
  again = nnx.merge(graph, state)
  assert type(again) is jaxtal.DetectionLoss and again.config == module.config
  np.testing.assert_array_equal(again.class_weights[...], np.ones(NC))


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


def test_a_task_module_is_the_base_with_its_loss_function():
  """The config class comes from ``loss_fn.config_class``; ``__call__(preds, gt)`` forwards config and weights."""
  seen = {}

  def fake_loss(preds, gt, config, *, class_weights=None):
    seen.update(preds=preds, gt=gt, config=config, class_weights=class_weights)
    return jnp.float32(0.0), ()

  fake_loss.config_class = jaxtal.PoseLossConfig

  class MyLoss(TaskLossModule):
    loss_fn = staticmethod(fake_loss)

  module = MyLoss(num_classes=1, strides=(8,), kpt_shape=(5, 2), class_weights=jnp.full(1, 2.0))
  assert type(module.config) is jaxtal.PoseLossConfig and module.config.kpt_shape == (5, 2)
  module("preds", "gt")
  assert seen["preds"] == "preds" and seen["gt"] == "gt" and seen["config"] is module.config
  np.testing.assert_array_equal(seen["class_weights"], [2.0])
  for task in (jaxtal.DetectionLoss, jaxtal.OBBLoss, jaxtal.PoseLoss, jaxtal.SegmentLoss):
    assert issubclass(task, TaskLossModule) and task.loss_fn.config_class is getattr(jaxtal, task.__name__ + "Config")
