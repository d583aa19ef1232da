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


class TaskLossModule(nnx.Module):
  """A task loss as an NNX module: holds the task's config and optional class weights as a constant
  (not a trainable ``nnx.Param``: optimisers never touch it); ``__call__`` delegates to the task's
  loss function, so module and function give identical results.

  Args:
    config: the task's config (``loss_fn.config_class``), or None to build one from ``overrides``.
    class_weights: optional ``(nc,)`` weights of the class term.
    **overrides: config fields (they amend ``config`` when both are given). The class gain ``cls``
      cannot be a keyword here (Flax's constructor reserves the name): put it in the config.
  """

  loss_fn: Callable[..., tuple[jax.Array, Any]]

  def __init__(self, config=None, *, class_weights: jax.Array | None = None, **overrides):
    self.config = make_config(self.loss_fn.config_class, config, overrides, type(self).__name__)
    self.class_weights = None if class_weights is None else nnx.Variable(jnp.asarray(class_weights, jnp.float32))

  def __call__(self, preds, gt: GroundTruth) -> tuple[jax.Array, Any]:
    """``(total, parts)`` of the task loss for predictions ``preds`` (a :class:`~jaxtal.Predictions`) and ``gt``."""
    weights = None if self.class_weights is None else self.class_weights[...]
    return self.loss_fn(preds, gt, self.config, class_weights=weights)
