"""Oriented bounding boxes (OBB): rotated task-aligned assignment and the YOLOv8 OBB loss.

The detection skeleton (:mod:`jaxtal.loss`) with the rotated geometry
(:func:`jaxtal.geometry.rotated`) and one more term::

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

A GT box and the same box at ``angle + pi`` give the same assignment and the same box, class
and angle terms, but not the same DFL term: distances along the target's axes swap ``l/r`` and
``t/b`` (Ultralytics alike). Datasets that keep angles in one half turn (Ultralytics': ``[0,
pi/2)``) never meet it.

Deliberate differences from Ultralytics 8.4.190 (``v8OBBLoss``, ``RotatedTaskAlignedAssigner``,
``probiou``); everything else matches to float32 rounding:

* padding comes from ``gt.mask``. Ultralytics infers it from ``sum(xywhr) > 0``, so it also
  drops a real box whose five numbers sum to 0 and keeps a padding row holding garbage;
* rows that do not count never own anchors: a non-finite box or angle, ``|value| >
  COORD_LIMIT``, a class outside ``[0, nc)``, a non-positive side, or, in the loss, a side under
  2 input pixels (Ultralytics' loss drops those rows too, before padding; its ``sum > 0`` test
  also drops NaN rows) or no overlap with the input. Ultralytics raises an IndexError for a
  class ``>= nc``;
* :func:`~jaxtal.probiou` is clamped to ``[0, 1]`` (the reference's is about ``-1e-7`` for
  far-apart boxes), is 0 for a box with a non-finite value or ``|value| > COORD_LIMIT``, stays
  finite where rounding makes the summed covariance singular or negative (the reference can give
  NaN there), and its gradient is finite for zero-width boxes (double ``where``);
* ``sqrt(det S1 det S2)`` is computed as ``sqrt(det S1) sqrt(det S2)`` (no overflow for large
  boxes; the same value to float32 rounding);
* label rows may come in any order (:func:`~jaxtal.pack_rotated_labels`); Ultralytics' loss
  expects them grouped by image, as its data loader makes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import _validate
from jaxtal.assigner import assign_targets
from jaxtal.boxes import probiou
from jaxtal.config import AssignerConfig, LossConfig, _make_config
from jaxtal.geometry import rotated
from jaxtal.head import Head, decode_head, ltrb_to_xywhr, xywhr_to_ltrb
from jaxtal.labels import _MIN_ROTATED_SIDE, GroundTruth
from jaxtal.loss import _check_head, _class_term, _dfl_term, _entry_weights, _finish, _l1_term, _normaliser, _side_rows
from jaxtal.module import _TaskLossModule
from jaxtal.targets import Assignment, Targets, take_rows, to_assignment

# The variance floor (grid units squared) of the box term's ProbIoU.
_BOX_FLOOR = 0.01


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


class OBBLossParts(NamedTuple):
  """Gain-scaled OBB loss terms (scalars).

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


def _rotated_only(cfg: AssignerConfig, caller: str) -> None:
  if cfg.overlap != "ciou":
    raise ValueError(
        f"{caller}: rotated boxes always use ProbIoU as the overlap; leave overlap at its default, got {cfg.overlap!r}"
    )


def _pixel_scale(head: Head) -> jax.Array:
  """``(A, 5)``: multiplies grid-unit xywhr boxes into pixels (the angle unchanged)."""
  return jnp.concatenate([jnp.broadcast_to(head.strides, (head.strides.shape[0], 4)), jnp.ones_like(head.strides)], -1)


def _obb_head(feats, angles, cfg: OBBLossConfig, caller: str):
  batch, hw, shapes = _check_head(feats, cfg, caller)
  pred_angle = _side_rows(angles, shapes, batch, 1, cfg.layout, "angles", caller)[..., 0]
  head = decode_head(feats, cfg)
  return batch, hw, head, pred_angle, ltrb_to_xywhr(head.ltrb, pred_angle[..., None], head.anchors)


def _obb_terms(head: Head, boxes: jax.Array, pred_angle: jax.Array, targets: Targets, cfg: OBBLossConfig, image_hw, class_weights):
  """The OBB terms of grid-unit ``boxes (b, A, 5)`` and ``pred_angle (b, A)`` against ``targets``."""
  n = _normaliser(targets, cfg.axis_name)
  w = _entry_weights(targets)
  rows = targets.entries.anchor
  # Targets in grid units; background anchors get a stand-in unit box about the anchor, so no
  # padding value reaches a term (their weight is 0 anyway).
  stand_in = jnp.concatenate([head.anchors, jnp.ones_like(head.anchors), jnp.zeros_like(head.strides)], axis=-1)
  target = jax.lax.stop_gradient(jnp.where(targets.fg_mask[..., None], targets.boxes / _pixel_scale(head), stand_in))
  target_ltrb = xywhr_to_ltrb(target, head.anchors)

  at = take_rows(target, rows)  # (b, E, 5)
  loss_box = jnp.sum(w * (1.0 - probiou(take_rows(boxes, rows), at, floor=_BOX_FLOOR))) / n
  loss_cls = _class_term(head, targets, class_weights, cfg.plain_kernels) / n
  if cfg.reg_max > 1:
    loss_dfl = _dfl_term(head, targets, target_ltrb, w, cfg.reg_max, cfg.plain_kernels) / n
  else:
    loss_dfl = _l1_term(head, targets, target_ltrb, w, image_hw) / n
  # Aspect weight of the target (sides >= 2 px: the ratio is finite; the stand-in is square).
  aspect = jnp.exp(-jnp.log(at[..., 2] / at[..., 3]) ** 2 / 9)
  loss_angle = jnp.sum(w * jnp.sin(2 * (take_rows(pred_angle, rows) - at[..., 4])) ** 2 * aspect) / n
  parts = OBBLossParts(cfg.box * loss_box, cfg.cls * loss_cls, cfg.dfl * loss_dfl, cfg.angle * loss_angle)
  return _finish(parts, head.ltrb.shape[0], cfg.axis_name)


def rotated_task_aligned_assign(
    pred_scores: jax.Array,
    pred_boxes: jax.Array,
    anchor_points: jax.Array,
    gt: GroundTruth,
    config: AssignerConfig | None = None,
    **overrides,
) -> Assignment:
  """The task-aligned assigner for rotated ``xywhr`` boxes (Ultralytics' ``RotatedTaskAlignedAssigner``).

  :func:`~jaxtal.assign_targets` with :func:`jaxtal.geometry.rotated`: an anchor is a candidate of
  a GT when its centre's projections on the box's two edges fall within them (edges included;
  sides below ``min_box_side`` widened to it first, Ultralytics uses ``strides[1]``), and the
  overlap is ProbIoU (no variance floor) clamped at 0. Configuration as for
  :func:`~jaxtal.task_aligned_assign` (``overlap`` must stay at its default).

  Args:
    pred_scores: ``(b, A, nc)`` predicted class probabilities.
    pred_boxes: ``(b, A, 5)`` predicted xywhr boxes, centre and sides in input pixels.
    anchor_points: ``(A, 2)`` anchor centres in input pixels.
    gt: a :class:`~jaxtal.GroundTruth` with ``(b, M, 5)`` xywhr boxes in pixels (e.g. from
      :func:`~jaxtal.pack_rotated_labels`). Rows that are padding, non-finite, beyond
      ``COORD_LIMIT``, with a non-positive side or a class outside ``[0, nc)`` never own anchors.
    config: an :class:`~jaxtal.AssignerConfig`.

  Returns:
    An :class:`~jaxtal.Assignment` with ``boxes (b, A, 5)``.
  """
  caller = "rotated_task_aligned_assign"
  cfg = _make_config(AssignerConfig, config, overrides, caller)
  _rotated_only(cfg, caller)
  _, a, nc = _validate.assigner_inputs(pred_scores, pred_boxes, anchor_points, gt, 5, caller)
  _validate.topk_in_range(cfg.topk, cfg.topk2, a, caller)
  targets = assign_targets((pred_scores,), pred_boxes, anchor_points, gt, cfg, geometry=rotated(), from_logits=False)
  return to_assignment(targets, nc)


def obb_targets(feats, angles, gt: GroundTruth, config: OBBLossConfig | None = None, **overrides) -> tuple[Head, jax.Array, Targets]:
  """The OBB loss's first half: decoded predictions and the assignment it trains against.

  Takes the arguments of :func:`obb_loss` (without ``class_weights``).

  Returns:
    ``(Head, boxes, Targets)``: the decoded head, the predicted ``(b, A, 5)`` xywhr boxes in
    grid units of each anchor's level, and :class:`~jaxtal.Targets` with ``boxes (b, A, 5)``
    in pixels.
  """
  caller = "obb_targets"
  cfg = _make_config(OBBLossConfig, config, overrides, caller)
  _rotated_only(cfg, caller)
  batch, hw, head, _, boxes = _obb_head(feats, angles, cfg, caller)
  _validate.ground_truth(gt, batch, caller, box_dim=5)
  return head, boxes, _assign_rotated(head, boxes, gt, cfg, hw)


def _assign_rotated(head: Head, boxes: jax.Array, gt: GroundTruth, cfg: OBBLossConfig, image_hw) -> Targets:
  return assign_targets(
      head.logits,
      boxes * _pixel_scale(head),
      head.anchors * head.strides,
      gt,
      cfg,
      geometry=rotated(_MIN_ROTATED_SIDE),
      from_logits=True,
      image_hw=image_hw,
  )


def obb_loss(
    feats: Sequence[jax.Array],
    angles: Sequence[jax.Array],
    gt: GroundTruth,
    config: OBBLossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, OBBLossParts]:
  """YOLOv8 OBB loss of raw head maps and predicted angles against padded rotated ground truth.

  The assigner sees sigmoid scores and decoded rotated boxes in pixels under ``stop_gradient``
  (:func:`rotated_task_aligned_assign`'s rule; GT rows with a side under 2 pixels or outside the
  input are masked too). With ``N = max(sum of target scores, 1)`` and ``w`` an anchor's target
  score: ``cls`` as :func:`~jaxtal.detection_loss`; ``box = sum over foreground of w * (1 -
  ProbIoU(pred, target)) / N`` in grid units with a variance floor of 0.01; ``dfl`` on the
  target's distances along its own axes (L1 when ``reg_max == 1``); ``angle = sum over
  foreground of w * sin^2(2 (pred - target angle)) * exp(-ln^2(w_t / h_t) / 9) / N``.

  Args:
    feats: per-level raw head maps, ``(b, H, W, 4R + nc)`` (NHWC) or ``(b, 4R + nc, H, W)``
      (NCHW), as for :func:`~jaxtal.detection_loss`; box distances are measured along the
      predicted box's own axes.
    angles: per-level predicted angles in radians, ``(b, H, W, 1)`` (NHWC) or ``(b, 1, H, W)``
      (NCHW): the head's output after its own activation (Ultralytics: ``(sigmoid(x) - 1/4) * pi``),
      as Ultralytics' loss receives it.
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
  caller = "obb_loss"
  cfg = _make_config(OBBLossConfig, config, overrides, caller)
  _rotated_only(cfg, caller)
  batch, hw, head, pred_angle, boxes = _obb_head(feats, angles, cfg, caller)
  _validate.ground_truth(gt, batch, caller, box_dim=5)
  _validate.class_weights(class_weights, cfg.num_classes, caller)
  targets = _assign_rotated(head, boxes, gt, cfg, hw)
  return _obb_terms(head, boxes, pred_angle, targets, cfg, hw, class_weights)


class OBBLoss(_TaskLossModule):
  """The YOLOv8 OBB loss (:func:`obb_loss`) as an NNX module holding an :class:`OBBLossConfig`.

  Example::

    loss_fn = jaxtal.OBBLoss(num_classes=15, strides=(8, 16, 32))
    total, parts = loss_fn(feats, angles, gt)

  No trainable state; class weights are held as a constant. The class gain is the config's
  ``cls`` field: pass it in an ``OBBLossConfig`` (Flax's constructor reserves the keyword).
  """

  config_class = OBBLossConfig

  def __init__(self, config: OBBLossConfig | None = None, *, class_weights: jax.Array | None = None, **overrides):
    super().__init__(config, class_weights=class_weights, **overrides)
    _rotated_only(self.config, "OBBLoss")

  def __call__(self, feats: Sequence[jax.Array], angles: Sequence[jax.Array], gt: GroundTruth) -> tuple[jax.Array, OBBLossParts]:
    """Returns ``(total, OBBLossParts)`` for head maps ``feats``, angle maps ``angles`` and ``gt``."""
    return self._run(obb_loss, feats, angles, gt)
