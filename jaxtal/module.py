"""Flax NNX wrapper around :func:`jaxtal.detection_loss`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtal.head import Layout
from jaxtal.labels import GroundTruth
from jaxtal.loss import LossParts, detection_loss


class _AcceptsClsKeyword(type(nnx.Module)):
  """Lets ``DetectionLoss(cls=...)`` through.

  Flax's module metaclass names its first parameter ``cls``, so a ``cls=`` keyword (the class
  loss gain, named as in Ultralytics) would collide with it; it travels as ``_cls`` instead.
  """

  def __call__(klass, /, *args, **kwargs):
    if "cls" in kwargs:
      kwargs["_cls"] = kwargs.pop("cls")
    return super().__call__(*args, **kwargs)


class DetectionLoss(nnx.Module, metaclass=_AcceptsClsKeyword):
  """YOLOv8 detection loss (BCE + CIoU + DFL with task-aligned assignment) as an NNX module.

  It holds configuration only (no trainable state); ``__call__`` delegates to
  :func:`jaxtal.detection_loss`, so the module and the function give identical results.
  Defaults are those of Ultralytics' detection loss.

  Example::

    loss_fn = jaxtal.DetectionLoss(num_classes=80, strides=(8, 16, 32))
    total, parts = loss_fn(feats, gt)
  """

  def __init__(
      self,
      *,
      num_classes: int,
      strides: Sequence[float],
      reg_max: int = 16,
      layout: Layout = "NHWC",
      topk: int = 10,
      topk2: int | None = None,
      alpha: float = 0.5,
      beta: float = 6.0,
      box: float = 7.5,
      cls: float = 0.5,
      dfl: float = 1.5,
      min_box_side: float = 0.0,
      class_weights: jax.Array | None = None,
      gt_chunk: int | None = None,
      axis_name: str | None = None,
      _cls: float | None = None,
  ):
    if _cls is not None:
      cls = _cls
    self.num_classes = int(num_classes)
    self.strides = tuple(float(s) if not float(s).is_integer() else int(s) for s in strides)
    self.reg_max = int(reg_max)
    self.layout = layout
    self.topk = int(topk)
    self.topk2 = None if topk2 is None else int(topk2)
    self.alpha = float(alpha)
    self.beta = float(beta)
    self.box = float(box)
    self.cls = float(cls)
    self.dfl = float(dfl)
    self.min_box_side = float(min_box_side)
    # Stored as a constant (not a trainable nnx.Param): optimisers never touch it.
    self.class_weights = None if class_weights is None else nnx.Variable(jnp.asarray(class_weights, jnp.float32))
    self.gt_chunk = gt_chunk
    self.axis_name = axis_name

  def __call__(self, feats: Sequence[jax.Array], gt: GroundTruth) -> tuple[jax.Array, LossParts]:
    """Returns ``(total, LossParts)`` for per-level head maps ``feats`` and ground truth ``gt``."""
    return detection_loss(
        feats,
        gt,
        num_classes=self.num_classes,
        strides=self.strides,
        reg_max=self.reg_max,
        layout=self.layout,
        topk=self.topk,
        topk2=self.topk2,
        alpha=self.alpha,
        beta=self.beta,
        box=self.box,
        cls=self.cls,
        dfl=self.dfl,
        min_box_side=self.min_box_side,
        class_weights=None if self.class_weights is None else self.class_weights[...],
        gt_chunk=self.gt_chunk,
        axis_name=self.axis_name,
    )
