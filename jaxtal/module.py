"""Flax NNX wrapper around :func:`jaxtal.detection_loss`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtal.config import LossConfig, _make_config
from jaxtal.labels import GroundTruth
from jaxtal.loss import LossParts, detection_loss


class DetectionLoss(nnx.Module):
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

  def __init__(self, config: LossConfig | None = None, *, class_weights: jax.Array | None = None, **overrides):
    self.config = _make_config(LossConfig, config, overrides, "DetectionLoss")
    # Stored as a constant (not a trainable nnx.Param): optimisers never touch it.
    self.class_weights = None if class_weights is None else nnx.Variable(jnp.asarray(class_weights, jnp.float32))

  def __call__(self, feats: Sequence[jax.Array], gt: GroundTruth) -> tuple[jax.Array, LossParts]:
    """Returns ``(total, LossParts)`` for per-level head maps ``feats`` and ground truth ``gt``."""
    weights = None if self.class_weights is None else self.class_weights[...]
    return detection_loss(feats, gt, self.config, class_weights=weights)
