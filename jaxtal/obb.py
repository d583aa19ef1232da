"""Oriented bounding boxes (OBB): rotated task-aligned assignment and the YOLOv8 OBB loss.

The detection task (:mod:`jaxtal.detect`) with the rotated box form (:data:`ROTATED`: the
:func:`jaxtal.geometry.rotated` geometry for the assigner, ProbIoU for the box term) and one more
term; the class, box and DFL/L1 terms are :func:`jaxtal.terms.detection_parts`, written once::

    head maps + angle maps --decode--> xywhr boxes --assign_targets(rotated)--> Targets --terms--> (total, parts)

Boxes are ``xywhr``: centre, width and height in pixels (grid units inside the loss) and the
angle in radians. The terms, each divided by ``N = max(sum of target scores, 1)``, with ``w``
an anchor's target score:

* ``cls``: BCE over every anchor and class, as the detection loss;
* ``box``: ``sum(w * (1 - ProbIoU(pred, target)))``, boxes in grid units of each anchor's
  level, with a variance floor of 0.01 (box term only);
* ``dfl``: DFL on the target's distances measured along the target's own axes
  (:func:`jaxtal.head.xywhr_to_ltrb`), or the L1 loss on them when ``reg_max == 1``;
* ``angle``: ``sum(w * sin^2(2 (pred angle - target angle)) * exp(-ln^2(w_t / h_t) / 9))``:
  ``sin^2(2 d)`` has period ``pi / 2``, so no angle wrapping is needed; the factor is 1 for a
  square target and fades for elongated ones (``w_t``, ``h_t`` the target's sides).

Every foreground term reads the entry list (``targets.entries`` through
:func:`~jaxtal.take_rows`), never a boolean mask; ``total = (box + cls + dfl + angle) * b``.
Predictions are ``Predictions(feats, angles=...)``; :func:`obb_targets` returns the head with
``head.boxes`` the predicted ``(b, A, 5)`` xywhr boxes in grid units.

A GT box and the same box at ``angle + pi`` give the same assignment and the same box, class
and angle terms, but not the same DFL term: distances along the target's axes swap ``l/r`` and
``t/b`` (Ultralytics alike). Datasets that keep angles in one half turn (Ultralytics': ``[0,
pi/2)``) never meet it.

Everything matches Ultralytics 8.4.190 (``v8OBBLoss``, ``RotatedTaskAlignedAssigner``,
``probiou``) to float32 rounding except the deliberate differences listed, once for every task,
in docs/deviations.md (padding from ``gt.mask``, invalid rows, a clamped and finite ProbIoU).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import _validate
from jaxtal import task
from jaxtal import terms
from jaxtal.assigner import rotated_only
from jaxtal.boxes import ltrb_to_xywhr, probiou, xywhr_to_ltrb
from jaxtal.config import LossConfig
from jaxtal.geometry import rotated
from jaxtal.head import Head, Predictions
from jaxtal.labels import MIN_ROTATED_SIDE, GroundTruth
from jaxtal.module import TaskLossModule
from jaxtal.targets import Targets, take_rows

# The variance floor (grid units squared) of the box term's ProbIoU.
BOX_FLOOR = 0.01


@dataclasses.dataclass(frozen=True, kw_only=True)
class OBBLossConfig(LossConfig):
  """Settings of the OBB loss: :class:`~jaxtal.LossConfig` plus the angle term's gain.

  Attributes:
    angle: gain of the angle term (Ultralytics' ``angle`` hyperparameter).

  The assigner's ``overlap`` must stay at its default: rotated boxes always use ProbIoU.
  """

  angle: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "angle", _validate.finite_number("angle", self.angle))
    rotated_only(self.overlap, "OBBLossConfig")


class OBBLossParts(NamedTuple):
  """Gain-scaled OBB loss terms (scalars), in Ultralytics' order.

  Attributes:
    box: ``box_gain * (1 - ProbIoU) loss``.
    cls: ``cls_gain * BCE loss``.
    dfl: ``dfl_gain * DFL loss`` (the L1 distance loss when ``reg_max == 1``).
    angle: ``angle_gain * angle loss``.
  """

  box: jax.Array
  cls: jax.Array
  dfl: jax.Array
  angle: jax.Array


ROTATED = terms.BoxForm(
    name="xywhr",
    dim=5,
    # Grid units -> pixels: centre and sides scale with the stride, the angle does not.
    pixel_scale=lambda strides: jnp.concatenate([jnp.broadcast_to(strides, (strides.shape[0], 4)), jnp.ones_like(strides)], -1),
    stand_in=lambda anchors, strides: jnp.concatenate([anchors, jnp.ones_like(anchors), jnp.zeros_like(strides)], -1),
    to_ltrb=xywhr_to_ltrb,
    overlap=lambda pred, target: probiou(pred, target, floor=BOX_FLOOR),
    # GT rows with a side under 2 pixels own nothing in the loss (Ultralytics drops them).
    geometry=lambda cfg: rotated(MIN_ROTATED_SIDE),
)


def _prepare(preds: Predictions, head: Head, cfg: OBBLossConfig, batch: int, shapes, caller: str) -> tuple[Head, jax.Array]:
  """Validates the angle maps; the head's boxes become ``(b, A, 5)`` xywhr grid units, distances
  measured along the predicted box's own axes."""
  pred_angle = task.side_rows(preds.angles, shapes, batch, 1, cfg.layout, "angles", caller)  # (b, A, 1)
  return head._replace(boxes=ltrb_to_xywhr(head.ltrb, pred_angle, head.anchors)), pred_angle[..., 0]


def _parts(inputs: task.Inputs, targets: Targets, cfg: OBBLossConfig, class_weights) -> OBBLossParts:
  shared = terms.box_targets(inputs.head, targets, cfg, ROTATED)
  det = terms.detection_parts(inputs.head, targets, cfg, inputs.image_hw, class_weights, ROTATED, shared)
  rows = targets.entries.anchor
  at = take_rows(shared.target, rows)  # (b, E, 5) grid units
  # Aspect weight of the target (sides >= 2 px: the ratio is finite; the stand-in is square).
  aspect = jnp.exp(-jnp.log(at[..., 2] / at[..., 3]) ** 2 / 9)
  angle = jnp.sum(shared.w * jnp.sin(2 * (take_rows(inputs.side, rows) - at[..., 4])) ** 2 * aspect) / shared.n
  return OBBLossParts(det.box, det.cls, det.dfl, cfg.angle * angle)


OBB = task.Task(name="obb", config_class=OBBLossConfig, needs=("angles",), form=ROTATED, prepare=_prepare, check_gt=None, parts=_parts)


def obb_targets(preds: Predictions, gt: GroundTruth, config: OBBLossConfig | None = None, **overrides) -> tuple[Head, Targets]:
  """The OBB loss's first half: decoded predictions and the assignment it trains against.

  Takes the arguments of :func:`obb_loss` (without ``class_weights``).

  Returns:
    ``(Head, Targets)``: the decoded head, whose ``boxes`` are the predicted ``(b, A, 5)`` xywhr
    boxes in grid units of each anchor's level, and :class:`~jaxtal.Targets` with ``boxes (b,
    A, 5)`` in pixels.
  """
  return task.targets(OBB, preds, gt, config, overrides, "obb_targets")


def obb_loss_from_targets(
    preds: Predictions,
    targets: Targets,
    gt: GroundTruth | None = None,
    config: OBBLossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, OBBLossParts]:
  """The OBB loss against given targets (``boxes (b, A, 5)`` xywhr pixels), e.g. from :func:`obb_targets`.

  Arguments as :func:`obb_loss`, with the targets second; ``gt`` may be None (the OBB terms
  read only the targets). Targets are treated as constants.
  """
  return task.loss_from_targets(OBB, preds, targets, gt, config, class_weights, overrides, "obb_loss_from_targets")


def obb_loss(
    preds: Predictions,
    gt: GroundTruth,
    config: OBBLossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, OBBLossParts]:
  """YOLOv8 OBB loss of raw head maps and predicted angles against padded rotated ground truth.

  The assigner sees sigmoid scores and decoded rotated boxes in pixels under ``stop_gradient``
  (:func:`~jaxtal.rotated_task_aligned_assign`'s rule; GT rows with a side under 2 pixels or
  outside the input are masked too). With ``N = max(sum of target scores, 1)`` and ``w`` an
  anchor's target score: ``cls`` as :func:`~jaxtal.detection_loss`; ``box = sum over foreground
  of w * (1 - ProbIoU(pred, target)) / N`` in grid units with a variance floor of 0.01; ``dfl``
  on the target's distances along its own axes (L1 when ``reg_max == 1``); ``angle = sum over
  foreground of w * sin^2(2 (pred - target angle)) * exp(-ln^2(w_t / h_t) / 9) / N``.

  Args:
    preds: ``Predictions(feats, angles=...)``: ``feats`` the per-level raw head maps, ``(b, H, W,
      4R + nc)`` (NHWC) or ``(b, 4R + nc, H, W)`` (NCHW), box distances measured along the
      predicted box's own axes; ``angles`` the per-level predicted angles in radians, ``(b, H, W,
      1)`` (NHWC) or ``(b, 1, H, W)`` (NCHW): the head's output after its own activation
      (Ultralytics: ``(sigmoid(x) - 1/4) * pi``), as Ultralytics' loss receives it.
    gt: :class:`~jaxtal.GroundTruth` with ``(b, M, 5)`` xywhr boxes in input pixels
      (:func:`~jaxtal.pack_rotated_labels`).
    config: an :class:`~jaxtal.OBBLossConfig`; or its fields as keyword ``overrides``
      (``num_classes``, ``strides`` at least; ``angle=1.0`` is the angle gain).
    class_weights: optional ``(nc,)`` weights of the BCE per class.

  ``axis_name`` works as for :func:`~jaxtal.detection_loss`.

  Returns:
    ``(total, OBBLossParts(box, cls, dfl, angle))`` with gain-scaled parts and
    ``total = (box + cls + dfl + angle) * batch_size``, Ultralytics' ``v8OBBLoss`` convention.

  References:
    Llerena et al., 2021 (ProbIoU), https://arxiv.org/abs/2106.06072; Feng et al., 2021, "TOOD"
    (assignment), https://arxiv.org/abs/2108.07755; Li et al., 2020 (DFL),
    https://arxiv.org/abs/2006.04388.
  """
  return task.loss(OBB, preds, gt, config, class_weights, overrides, "obb_loss")


def checked_obb_loss(
    preds: Predictions, gt: GroundTruth, config: OBBLossConfig | None = None, *, class_weights=None, **overrides
) -> tuple[jax.Array, OBBLossParts]:
  """:func:`obb_loss` that raises (through ``checkify``) on invalid values: non-finite
  predictions, or a real GT row with a class outside ``[0, nc)``, a non-finite or out-of-range
  box, a negative side or no overlap with the input (:func:`~jaxtal.check_values`). Use under
  ``checkify.checkify``; identical to :func:`obb_loss` when no check fails."""
  return task.loss(OBB, preds, gt, config, class_weights, overrides, "checked_obb_loss", checked=True)


for _fn in (obb_loss, checked_obb_loss):
  _fn.config_class = OBBLossConfig  # read by TaskLossModule and EndToEndLoss


class OBBLoss(TaskLossModule):
  """The YOLOv8 OBB loss (:func:`obb_loss`) as an NNX module holding an :class:`OBBLossConfig`.

  Example::

    loss_fn = jaxtal.OBBLoss(num_classes=15, strides=(8, 16, 32))
    total, parts = loss_fn(jaxtal.Predictions(feats, angles=angles), gt)

  No trainable state; class weights are held as a constant. The class gain is the config's
  ``cls`` field: pass it in an ``OBBLossConfig`` (Flax's constructor reserves the keyword).
  """

  loss_fn = staticmethod(obb_loss)
