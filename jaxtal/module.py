"""Flax NNX loss modules: one small base that every task's module is.

A task module (``DetectionLoss``, ``OBBLoss``, ``PoseLoss``, ``SegmentLoss``) is this base with
its task's loss function as ``loss_fn``; the config class comes from that function
(``loss_fn.config_class``), and ``__call__`` takes the one calling convention of every task,
``(preds, gt)``, so a training loop holds any task's module the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtal.config import make_config
from jaxtal.labels import GroundTruth


class LossModuleMeta(type(nnx.Module)):
  """The metaclass of jaxtal's NNX loss modules: Flax's, with a clear error for ``cls=``.

  Flax's module constructor is its metaclass's ``__call__(cls, *args, **kwargs)``, so a keyword
  ``cls`` (the class gain, a config field) collides with the class itself before ``__init__``
  runs, as ``PytreeMeta.__call__() got multiple values for argument 'cls'``. This ``__call__``
  names its first argument otherwise, sees the keyword first, and says where the gain goes.
  """

  def __call__(klass, *args, **kwargs):
    if "cls" in kwargs:
      loss_fn = kwargs.get("loss_fn", getattr(klass, "loss_fn", None))  # EndToEndLoss takes it as a keyword
      config_class = getattr(loss_fn, "config_class", None)
      kind = "LossConfig" if config_class is None else config_class.__name__
      gain = kwargs["cls"]
      raise TypeError(
          f"{klass.__name__}: the class gain cls cannot be a keyword argument here (Flax's module constructor"
          f" reserves the name cls); put it in the config: {klass.__name__}(dataclasses.replace(config, cls={gain!r}))"
          f" or {klass.__name__}(jaxtal.{kind}(..., cls={gain!r}))"
      )
    return super().__call__(*args, **kwargs)


class TaskLossModule(nnx.Module, metaclass=LossModuleMeta):
  """A task loss as an NNX module: holds the task's config and optional class weights as a constant
  (not a trainable ``nnx.Param``: optimisers never touch it); ``__call__`` delegates to the task's
  loss function, so module and function give identical results.

  Args:
    config: the task's config (``loss_fn.config_class``), or None to build one from ``overrides``.
    class_weights: optional ``(nc,)`` weights of the class term.
    **overrides: config fields (they amend ``config`` when both are given). The class gain ``cls``
      cannot be a keyword here (Flax's constructor reserves the name, see :class:`LossModuleMeta`,
      which says so when it is given): put it in the config, ``dataclasses.replace(config, cls=1.0)``
      or ``LossConfig(..., cls=1.0)``.
  """

  loss_fn: Callable[..., tuple[jax.Array, Any]]

  def __init__(self, config=None, *, class_weights: jax.Array | None = None, **overrides):
    self.config = make_config(self.loss_fn.config_class, config, overrides, type(self).__name__)
    self.class_weights = None if class_weights is None else nnx.Variable(jnp.asarray(class_weights, jnp.float32))

  def __call__(self, preds, gt: GroundTruth) -> tuple[jax.Array, Any]:
    """``(total, parts)`` of the task loss for predictions ``preds`` (a :class:`~jaxtal.Predictions`) and ``gt``."""
    weights = None if self.class_weights is None else self.class_weights[...]
    return self.loss_fn(preds, gt, self.config, class_weights=weights)
