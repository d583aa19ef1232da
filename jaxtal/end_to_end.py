"""End-to-end (NMS-free) training: one task loss on a one-to-many and a one-to-one branch.

YOLO26 (and YOLOv10 before it) trains two heads on the same features: a one-to-many branch
with the usual assignment (``topk = 10``: many positives per object, rich gradients) and a
one-to-one branch whose assignment keeps one positive per object (``topk = 7, topk2 = 1`` in
YOLO26, ``topk = 1`` in YOLOv10), so its predictions need no NMS. :func:`end_to_end_loss` is a
combinator over any jaxtal task loss, as ``optax.chain`` is over transformations: it runs the
loss twice with the two assigner settings and mixes the totals. Every task takes its
predictions the same way (one :class:`~jaxtal.Predictions` per branch, :mod:`jaxtal.task`), so
the combinator needs to know nothing about the task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtal.config import LossConfig, make_config
from jaxtal.detect import detection_loss
from jaxtal.labels import GroundTruth
from jaxtal.module import LossModuleMeta


def one2many_weight(epoch, epochs, *, start: float = 0.8, end: float = 0.1):
  """The one-to-many branch's weight during epoch ``epoch`` of ``epochs`` (YOLO26's schedule).

  ``w = max(1 - epoch / max(epochs - 1, 1), 0) * (start - end) + end``, decaying linearly from
  ``start`` in the first epoch to ``end`` in the last; the one-to-one weight is ``max(1 - w, 0)``.

  Pass the **0-based index of the epoch being trained** (the first epoch is 0). This matches
  Ultralytics' trainer, which starts at ``start`` and advances the schedule after each finished
  epoch, and restores the same weight when a run is resumed at that epoch.

  Args:
    epoch: 0-based index of the current epoch; a Python number or a traced scalar (a training
      step then compiles once for every epoch).
    epochs: total number of epochs.
    start, end: the weight in the first and the last epoch.

  Returns:
    A Python float for Python numbers, else a float32 JAX scalar.
  """
  if all(isinstance(x, (int, float)) for x in (epoch, epochs)):
    return max(1 - epoch / max(epochs - 1, 1), 0) * (start - end) + end
  epoch = jnp.asarray(epoch, jnp.float32)
  span = jnp.maximum(jnp.asarray(epochs, jnp.float32) - 1, 1.0)
  return jnp.maximum(1 - epoch / span, 0.0) * (start - end) + end


def _branches(loss_fn, one2many, one2one, gt, one2one_config: dict, config: dict):
  if not callable(loss_fn):
    raise TypeError(f"end_to_end_loss: loss_fn must be a jaxtal task loss such as jaxtal.detection_loss, got {loss_fn!r}")
  many = loss_fn(one2many, gt, **config)
  one = loss_fn(one2one, gt, **{**config, **one2one_config})
  return many, one


def end_to_end_loss(
    loss_fn: Callable[..., tuple[jax.Array, Any]],
    one2many,
    one2one,
    gt: GroundTruth,
    *,
    weight,
    one2one_topk: int = 7,
    one2one_topk2: int | None = 1,
    **config,
) -> tuple[jax.Array, Any]:
  """YOLO26's end-to-end loss: ``weight * total_o2m + max(1 - weight, 0) * total_o2o``.

  Args:
    loss_fn: a jaxtal task loss, e.g. :func:`~jaxtal.detection_loss` or :func:`~jaxtal.obb_loss`,
      called as ``loss_fn(predictions, gt, **config)`` and returning ``(total, parts)``.
    one2many: the one-to-many branch's predictions, as the task loss takes them (a
      :class:`~jaxtal.Predictions`; for ``detection_loss`` also a list of head maps).
    one2one: the same for the one-to-one branch. Ultralytics' model feeds that head detached
      features; do the same in your model (``jax.lax.stop_gradient`` on its input), not here.
    gt: the :class:`~jaxtal.GroundTruth`, shared by both branches.
    weight: the one-to-many weight, e.g. :func:`one2many_weight` (a traced scalar is fine).
    one2one_topk, one2one_topk2: the one-to-one branch's ``topk`` / ``topk2`` (YOLO26: 7 and 1).
    **config: the task loss's configuration (``config=LossConfig(...)`` and/or its fields), and its
      other keyword arguments (``class_weights``; ``flow`` for :func:`~jaxtal.pose26_loss`, shared by
      both branches as in Ultralytics), used as given by the one-to-many branch (Ultralytics: ``topk=10``).

  Returns:
    ``(total, parts)``: ``parts`` are the one-to-one branch's (gain-scaled, unweighted), as
    Ultralytics reports them, so ``sum(parts) * b != total`` in general.
  """
  many, one = _branches(loss_fn, one2many, one2one, gt, dict(topk=one2one_topk, topk2=one2one_topk2), config)
  return weight * many[0] + jnp.maximum(1 - weight, 0.0) * one[0], one[1]


def end_to_end_sum_loss(
    loss_fn: Callable[..., tuple[jax.Array, Any]],
    one2many,
    one2one,
    gt: GroundTruth,
    *,
    one2one_topk: int = 1,
    **config,
) -> tuple[jax.Array, Any]:
  """The original YOLOv10 recipe: the plain sum of both branches (one-to-one ``topk = 1``, no ``topk2``).

  Arguments as :func:`end_to_end_loss`, without a weight. Returns ``(total_o2m + total_o2o,
  parts_o2m + parts_o2o)`` (parts summed field by field), as Ultralytics' ``E2EDetectLoss``
  (which 8.4.190 keeps for old YOLOv10 checkpoints; it trains ``yolov10n.yaml`` with the
  weighted form, :func:`end_to_end_loss`).
  """
  many, one = _branches(loss_fn, one2many, one2one, gt, dict(topk=one2one_topk, topk2=None), config)
  return many[0] + one[0], jax.tree.map(lambda a, b: a + b, many[1], one[1])


class EndToEndLoss(nnx.Module, metaclass=LossModuleMeta):
  """:func:`end_to_end_loss` as an NNX module holding the task loss and its configuration.

  Example::

    loss_fn = jaxtal.EndToEndLoss(jaxtal.LossConfig(num_classes=80, strides=(8, 16, 32), reg_max=1))
    w = jaxtal.one2many_weight(epoch, epochs)
    total, parts = loss_fn(feats_o2m, feats_o2o, gt, weight=w)

    obb = jaxtal.EndToEndLoss(loss_fn=jaxtal.obb_loss, num_classes=15, strides=(8, 16, 32), reg_max=1)
    total, parts = obb(jaxtal.Predictions(f1, angles=a1), jaxtal.Predictions(f2, angles=a2), gt, weight=w)

  Args:
    config: the task loss's configuration, of its config class (``loss_fn.config_class``: a
      :class:`~jaxtal.LossConfig` for ``detection_loss``, an :class:`~jaxtal.OBBLossConfig` for
      ``obb_loss``, ...), or None to build one from ``overrides``.
    loss_fn: the task loss (default :func:`~jaxtal.detection_loss`).
    one2one_topk, one2one_topk2: the one-to-one branch's assigner settings.
    class_weights: optional ``(nc,)`` class weights (a constant, not a parameter).
    **overrides: fields amending ``config`` (the class gain ``cls`` goes in the config: Flax reserves the
      keyword, see :class:`~jaxtal.module.LossModuleMeta`).
  """

  def __init__(
      self,
      config: LossConfig | None = None,
      *,
      loss_fn: Callable[..., tuple[jax.Array, Any]] = detection_loss,
      one2one_topk: int = 7,
      one2one_topk2: int | None = 1,
      class_weights: jax.Array | None = None,
      **overrides,
  ):
    # The task's own config class (LossConfig, OBBLossConfig, ...), so its fields can be given or overridden too.
    config_class = getattr(loss_fn, "config_class", None)
    if config_class is None:
      if config is None:
        raise TypeError(
            "EndToEndLoss: loss_fn has no config_class (it is not a jaxtal task loss); pass its config as config="
        )
      config_class = type(config)
    self.config = make_config(config_class, config, overrides, "EndToEndLoss")
    self.loss_fn = loss_fn
    self.one2one_topk = int(one2one_topk)
    self.one2one_topk2 = None if one2one_topk2 is None else int(one2one_topk2)
    self.class_weights = None if class_weights is None else nnx.Variable(jnp.asarray(class_weights, jnp.float32))

  def __call__(self, one2many, one2one, gt: GroundTruth, *, weight, **task_args) -> tuple[jax.Array, Any]:
    """``(total, parts)`` of :func:`end_to_end_loss` for the two branches' predictions; ``task_args`` go to
    both branches' task loss (e.g. ``flow=`` of :func:`~jaxtal.pose26_loss`, the flow both branches share)."""
    extra = {} if self.class_weights is None else {"class_weights": self.class_weights[...]}
    return end_to_end_loss(
        self.loss_fn, one2many, one2one, gt, weight=weight,
        one2one_topk=self.one2one_topk, one2one_topk2=self.one2one_topk2, config=self.config, **extra, **task_args,
    )
