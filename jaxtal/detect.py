"""Detection: the YOLOv8 detection loss (BCE + CIoU + DFL with task-aligned assignment).

The task every other one extends: its :class:`~jaxtal.task.Task` value reads no side maps and
its parts are exactly :func:`jaxtal.terms.detection_parts`::

    head maps --decode_head--> Head --assign (axis-aligned, CIoU)--> Targets --class, box, DFL/L1--> (total, parts)

Entry points (the same for every task, :mod:`jaxtal.task`): :func:`detection_targets`,
:func:`detection_loss_from_targets`, :func:`detection_loss`, :func:`checked_detection_loss`,
:class:`DetectionLoss`. ``LossConfig``, ``LossParts`` and ``loss_from_targets`` are the same
objects under their first names.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxtal import task
from jaxtal import terms
from jaxtal.config import LossConfig
from jaxtal.head import Head, Predictions
from jaxtal.labels import GroundTruth
from jaxtal.module import TaskLossModule
from jaxtal.targets import Targets

DetectionLossConfig = LossConfig
DetectionLossParts = terms.LossParts


def _parts(inputs: task.Inputs, targets: Targets, cfg: LossConfig, class_weights) -> terms.LossParts:
  return terms.detection_parts(inputs.head, targets, cfg, inputs.image_hw, class_weights)


DETECTION = task.Task(
    name="detection",
    config_class=DetectionLossConfig,
    needs=(),
    form=terms.AXIS_ALIGNED,
    prepare=task.no_side,
    check_gt=None,
    parts=_parts,
)


def detection_targets(preds: Predictions | Sequence[jax.Array], gt: GroundTruth, config: LossConfig | None = None, **overrides) -> tuple[Head, Targets]:
  """The loss's first half: decoded predictions and the assignment it trains against.

  Takes the arguments of :func:`detection_loss` (without ``class_weights``). Use it to inspect
  what the loss sees (``targets.positives_per_gt`` shows which GTs got no anchor) or to build
  the targets once and feed :func:`detection_loss_from_targets`.

  Returns:
    ``(Head, Targets)``: see :class:`~jaxtal.Head` and :class:`~jaxtal.Targets`
    (``E = M * topk`` entries).
  """
  return task.targets(DETECTION, preds, gt, config, overrides, "detection_targets")


def detection_loss_from_targets(
    preds: Predictions | Sequence[jax.Array],
    targets: Targets,
    gt: GroundTruth | None = None,
    config: LossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, terms.LossParts]:
  """The detection loss of head maps against given targets (an assignment made by any assigner).

  ``targets`` may come from :func:`detection_targets`, or from your own assigner through
  :func:`~jaxtal.targets_from_assignment`. Foreground-only terms (CIoU, DFL / L1) read
  ``targets.entries``; the class term reads ``labels`` and ``weights`` at every anchor. With an
  entry list that breaks its contract (:mod:`jaxtal.targets`) the loss stays finite and its
  gradient exact, but an anchor listed twice counts twice and an unlisted one gets no box term;
  :func:`~jaxtal.checked_loss_from_targets` checks the contract.

  Args:
    preds: the predictions, as for :func:`detection_loss`.
    targets: :class:`~jaxtal.Targets` with ``labels (b, A)``, ``boxes (b, A, 4)`` xyxy pixels,
      ``weights (b, A)``, ``fg_mask (b, A)``, entries ``(b, E)``. Treated as constants.
    gt: the :class:`~jaxtal.GroundTruth` the targets were made from, or None: the detection
      terms read only the targets (checked for its batch size when given).
    config, class_weights, overrides: as for :func:`detection_loss`.

  Returns:
    ``(total, LossParts)``, as :func:`detection_loss`.
  """
  return task.loss_from_targets(DETECTION, preds, targets, gt, config, class_weights, overrides, "detection_loss_from_targets")


def detection_loss(
    preds: Predictions | Sequence[jax.Array],
    gt: GroundTruth,
    config: LossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, terms.LossParts]:
  """YOLOv8 detection loss of raw head maps against padded ground truth.

  The assigner sees sigmoid scores and decoded boxes in pixels under ``stop_gradient``. With
  ``N = max(sum of target scores, 1)`` and per-anchor weight ``w`` = its target score:

  * ``cls = sum over all anchors and classes of BCE-with-logits (times class_weights) / N``;
  * ``box = sum over foreground of (1 - CIoU(pred, target)) * w / N``, CIoU's aspect trade-off
    weight held out of the gradient;
  * ``dfl = sum over foreground of w * mean over 4 sides of the two-bin cross-entropy around the
    target distance (clamped to R - 1 - 0.01) / N``; with ``reg_max == 1`` an L1 loss on ltrb
    distances normalised by the input size replaces it (YOLO26's head).

  Foreground is a weight and a fixed-size entry list, never a boolean index: shapes are fixed
  and the loss and gradients are finite for empty images and degenerate boxes.

  Args:
    preds: a :class:`~jaxtal.Predictions` whose ``feats`` are the per-level raw head maps,
      ``(b, H, W, 4R + nc)`` (NHWC) or ``(b, 4R + nc, H, W)`` (NCHW), any float dtype (the loss
      is computed in float32); or that list of maps itself.
    gt: :class:`~jaxtal.GroundTruth` with boxes in input pixels.
    config: a :class:`~jaxtal.LossConfig`; or give its fields as keyword ``overrides``
      (``num_classes=80, strides=(8, 16, 32)`` at least), which also amend a given config.
    class_weights: optional ``(nc,)`` weights of the BCE per class (an array, not configuration).

  Under ``shard_map``/``pmap`` over the batch with ``axis_name`` set, the normaliser ``N`` and the
  batch size are reduced over it, every device returns the loss *value* of the global batch, and
  the gradient w.r.t. a device's own maps is the global loss's gradient for those maps. For
  replicated parameters: under ``jax.shard_map`` with its default ``check_vma=True`` their
  gradients come back already summed over devices; under ``pmap`` or ``check_vma=False``, ``psum``
  them.

  Returns:
    ``(total, LossParts(box, cls, dfl))`` with gain-scaled parts and
    ``total = (box + cls + dfl) * batch_size``, the convention of Ultralytics'
    ``v8DetectionLoss`` (its optimiser step expects a loss summed over images).

  References:
    Zheng et al., 2020 (CIoU), https://arxiv.org/abs/1911.08287; Li et al., 2020, "Generalized
    Focal Loss" (DFL), https://arxiv.org/abs/2006.04388; Feng et al., 2021, "TOOD" (assignment),
    https://arxiv.org/abs/2108.07755.
  """
  return task.loss(DETECTION, preds, gt, config, class_weights, overrides, "detection_loss")


def checked_detection_loss(
    preds: Predictions | Sequence[jax.Array], gt: GroundTruth, config: LossConfig | None = None, *, class_weights=None, **overrides
) -> tuple[jax.Array, terms.LossParts]:
  """:func:`detection_loss` that raises (through ``checkify``) on invalid values.

  Takes exactly the arguments of :func:`detection_loss`. Before computing the loss,
  :func:`~jaxtal.check_values` requires finite predictions, and for every real GT row a class in
  ``[0, num_classes)``, a finite, bounded, non-inverted box and some overlap with the image
  (whose size comes from the maps and ``strides``). Use under ``checkify.checkify``.

  Returns:
    ``(total, LossParts)``, identical to :func:`detection_loss` when no check fails.
  """
  return task.loss(DETECTION, preds, gt, config, class_weights, overrides, "checked_detection_loss", checked=True)


def checked_loss_from_targets(
    preds: Predictions | Sequence[jax.Array],
    targets: Targets,
    gt: GroundTruth | None = None,
    config: LossConfig | None = None,
    *,
    class_weights=None,
    **overrides,
) -> tuple[jax.Array, terms.LossParts]:
  """:func:`detection_loss_from_targets` that checks (through ``checkify``) the entry-list contract.

  Every foreground anchor must be listed exactly once as a valid entry, no background anchor may
  be, and each valid entry must name its anchor's GT (see :mod:`jaxtal.targets`); predictions must
  be finite. Use under ``checkify.checkify``.
  """
  return task.loss_from_targets(
      DETECTION, preds, targets, gt, config, class_weights, overrides, "checked_loss_from_targets", checked=True
  )


loss_from_targets = detection_loss_from_targets
for _fn in (detection_loss, checked_detection_loss):
  _fn.config_class = DetectionLossConfig  # read by TaskLossModule and EndToEndLoss


class DetectionLoss(TaskLossModule):
  """YOLOv8 detection loss (BCE + CIoU + DFL with task-aligned assignment) as an NNX module.

  It holds a :class:`~jaxtal.LossConfig` and optional class weights (no trainable state);
  ``__call__`` delegates to :func:`jaxtal.detection_loss`, so the module and the function give
  identical results.

  Example::

    loss_fn = jaxtal.DetectionLoss(jaxtal.LossConfig(num_classes=80, strides=(8, 16, 32), cls=0.5))
    loss_fn = jaxtal.DetectionLoss(num_classes=80, strides=(8, 16, 32))  # the same, by keywords
    total, parts = loss_fn(feats, gt)  # or loss_fn(jaxtal.Predictions(feats), gt)

  Keyword arguments build (or amend) the config; the class gain is the config's ``cls`` field,
  which Flax's module constructor cannot take as a keyword (its own first parameter is named
  ``cls``): pass it in a ``LossConfig``.
  """

  loss_fn = staticmethod(detection_loss)
