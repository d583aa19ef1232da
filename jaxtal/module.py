"""Flax NNX loss modules: one small base that holds a task's config and class weights, and
:class:`DetectionLoss`. Every task module (``OBBLoss``, ``PoseLoss``, ``SegmentLoss``) is this
base with its own config class and a ``__call__`` that names its prediction arguments."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtal.config import LossConfig, _make_config
from jaxtal.labels import GroundTruth
from jaxtal.loss import LossParts, detection_loss


class _TaskLossModule(nnx.Module):
  """A task loss as an NNX module: holds the task's config (``config_class``) and optional class
  weights as a constant (not a trainable ``nnx.Param``: optimisers never touch it); a subclass's
  ``__call__`` delegates to the task's loss function through :meth:`_run`, so module and
  function give identical results."""

  config_class: type = LossConfig

  def __init__(self, config: LossConfig | None = None, *, class_weights: jax.Array | None = None, **overrides):
    self.config = _make_config(self.config_class, config, overrides, type(self).__name__)
    self.class_weights = None if class_weights is None else nnx.Variable(jnp.asarray(class_weights, jnp.float32))

  def _run(self, loss_fn, *args):
    weights = None if self.class_weights is None else self.class_weights[...]
    return loss_fn(*args, self.config, class_weights=weights)


class DetectionLoss(_TaskLossModule):
  """YOLOv8 detection loss (BCE + CIoU + DFL with task-aligned assignment) as an NNX module.

  It holds a :class:`~jaxtal.LossConfig` and optional class weights (no trainable state);
  ``__call__`` delegates to :func:`jaxtal.detection_loss`, so the module and the function give
  identical results.

  Example::

    loss_fn = jaxtal.DetectionLoss(jaxtal.LossConfig(num_classes=80, strides=(8, 16, 32), cls=0.5))
    loss_fn = jaxtal.DetectionLoss(num_classes=80, strides=(8, 16, 32))  # the same, by keywords
    total, parts = loss_fn(feats, gt)

  Keyword arguments build (or amend) the config; the class gain is the config's ``cls`` field,
  which Flax's module constructor cannot take as a keyword (its own first parameter is named
  ``cls``): pass it in a ``LossConfig``.
  """

  def __call__(self, feats: Sequence[jax.Array], gt: GroundTruth) -> tuple[jax.Array, LossParts]:
    """Returns ``(total, LossParts)`` for per-level head maps ``feats`` and ground truth ``gt``."""
    return self._run(detection_loss, feats, gt)
