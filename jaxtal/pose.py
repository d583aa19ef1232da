"""Pose (keypoints): the YOLOv8 pose loss and the keypoint decode.

The detection task (:mod:`jaxtal.detect`) with two more terms read at the foreground entry
list (predictions ``Predictions(feats, keypoints=...)``)::

    head maps --decode_head--> Head --assign (axis-aligned)--> Targets --box, cls, dfl--+
    keypoint maps --anchor rows--> take_rows at the entries --pose, kobj---------------+--> (total, parts)

The assignment is the detection assignment (keypoints do not take part in it), so ``box``,
``cls`` and ``dfl`` are exactly :func:`~jaxtal.detection_loss`'s parts. Keypoint maps hold
``K * D`` channels per cell, keypoint-major (channel ``k * D + d``); a keypoint decodes to
``x, y = 2 * raw + anchor - 0.5`` in grid units of its level, and with ``D = 3`` its third
channel is a visibility logit. With ``n_fg`` the number of foreground anchors (every one
counts, whatever its target score) and, for a foreground anchor, ``L`` its labelled keypoints:

* ``pose = sum over foreground of K / |L| * sum over k in L of (1 - exp(-d_k^2 / (8 sigma_k^2
  (area + 1e-9)))) / (n_fg K)``, with ``d_k`` the distance of predicted and GT keypoint and
  ``area`` the target box's area, both in grid units of the anchor's level (the OKS of COCO's
  keypoint evaluation, as Ultralytics writes it);
* ``kobj = sum over foreground and keypoints of BCE-with-logits(visibility logit, k in L) /
  (n_fg K)``; only when the head predicts ``D = 3``, else 0.

Both are 0 when no anchor is foreground; ``total = (box + pose + kobj + cls + dfl) * b``.
Every term reads the entry list (``targets.entries`` through :func:`~jaxtal.take_rows`): the
keypoints of ``E`` rows are decoded, never ``(b, A, K, D)``.

Masking inside ``jit`` (no NaN or inf reaches the loss or its gradient, whatever the input): a
GT keypoint counts as labelled when its visibility is non-zero (every keypoint of a ``D = 2``
GT), and as unlabelled when its coordinates or visibility are non-finite or a coordinate is
beyond ``COORD_LIMIT`` pixels; unlabelled keypoints are replaced by 0 before any arithmetic and
their location term is masked out (double ``where``). An anchor whose GT has no labelled
keypoint contributes 0 to ``pose`` (its ``kobj`` targets are all 0). A zero-area target box
keeps ``1e-9`` in the denominator (as the reference), and the denominator is floored at the
smallest normal float32, so a tiny ``sigma`` cannot make it 0: the term stays finite.

Everything matches Ultralytics 8.4.190 (``v8PoseLoss``, ``KeypointLoss``) to float32 rounding
except the deliberate differences listed, once for every task, in docs/deviations.md (the
assignment's top-k ties and conflict resolution reach ``pose`` and ``kobj``; NaN visibilities).

References:
  Lin et al., 2014, "Microsoft COCO" (keypoint OKS and its per-keypoint sigmas),
  https://cocodataset.org/#keypoints-eval; Maji et al., 2022, "YOLO-Pose",
  https://arxiv.org/abs/2204.06806.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtal import _validate
from jaxtal import task
from jaxtal import terms
from jaxtal.config import LossConfig
from jaxtal.head import Head, Predictions, keypoint_xy
from jaxtal.labels import COORD_LIMIT, GroundTruth
from jaxtal.module import TaskLossModule
from jaxtal.targets import Targets, take_rows

# COCO's per-keypoint OKS sigmas of the 17 person keypoints (nose, eyes, ears, shoulders,
# elbows, wrists, hips, knees, ankles), from the COCO keypoint evaluation.
COCO_SIGMAS = tuple(
    v / 10
    for v in (0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89)
)

# The per-keypoint weights of YOLO26's RLE keypoint term for the 17 COCO person keypoints (same
# order as COCO_SIGMAS): the limb ends, hardest to localise, weigh more (elbows and knees 1.2,
# wrists and ankles 1.5, the rest 1.0).
RLE_WEIGHTS_COCO17 = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5)

# The reference's guard of the box area in the OKS denominator (grid units squared).
_AREA_EPS = 1e-9
# The OKS denominator's floor: 8 sigma^2 (area + eps) never rounds to 0 (no 0 / 0).
_TINY = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoseLossConfig(LossConfig):
  """Settings of the pose loss: :class:`~jaxtal.LossConfig` plus the keypoint terms'.

  Attributes:
    kpt_shape: ``(K, D)``: ``K`` keypoints per object, each predicted as ``D = 3`` values
      ``(x, y, visibility logit)`` or ``D = 2`` ``(x, y)`` (no visibility term).
    sigmas: the ``K`` per-keypoint OKS sigmas (positive), or None: COCO's 17 sigmas when
      ``kpt_shape == (17, 3)``, else ``1 / K`` each (Ultralytics' defaults). Stored as the
      resolved tuple, so after changing ``kpt_shape`` of a config give ``sigmas`` again (or None).
    pose: gain of the keypoint location term (Ultralytics' ``pose`` hyperparameter).
    kobj: gain of the keypoint visibility term (``kobj``).
  """

  kpt_shape: tuple[int, int] = (17, 3)
  sigmas: tuple[float, ...] | None = None
  pose: float = 12.0
  kobj: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "kpt_shape", _validate.kpt_shape(self.kpt_shape))
    default = COCO_SIGMAS if self.kpt_shape == (17, 3) else (1.0 / self.kpt_shape[0],) * self.kpt_shape[0]
    object.__setattr__(self, "sigmas", _validate.sigmas(self.sigmas, self.kpt_shape, default))
    for name in ("pose", "kobj"):
      object.__setattr__(self, name, _validate.finite_number(name, getattr(self, name)))


class PoseLossParts(NamedTuple):
  """Gain-scaled pose loss terms (scalars), in Ultralytics' order.

  Attributes:
    box: ``box_gain * CIoU loss``.
    pose: ``pose_gain * keypoint location (OKS) loss``.
    kobj: ``kobj_gain * keypoint visibility BCE`` (0 when ``D == 2``).
    cls: ``cls_gain * BCE loss``.
    dfl: ``dfl_gain * DFL loss`` (the L1 distance loss when ``reg_max == 1``).
  """

  box: jax.Array
  pose: jax.Array
  kobj: jax.Array
  cls: jax.Array
  dfl: jax.Array


def _prepare(preds: Predictions, head: Head, cfg: PoseLossConfig, batch: int, shapes, caller: str) -> tuple[Head, jax.Array]:
  """The keypoint maps as ``(b, A, K * D)`` anchor rows, validated against the head's levels."""
  k, d = cfg.kpt_shape
  return head, task.side_rows(preds.keypoints, shapes, batch, k * d, cfg.layout, "keypoints", caller)


def _check_gt(gt: GroundTruth, cfg: PoseLossConfig, caller: str) -> None:
  _validate.gt_keypoints(gt, cfg.kpt_shape[0], caller)


class EntryKeypoints(NamedTuple):
  """The keypoints of the foreground entry list, read once for every keypoint term (pose, kobj, YOLO26's RLE).

  Attributes:
    pred: ``(b, E, K, D)`` raw keypoint predictions at the entries' anchors.
    xy: ``(b, E, K, 2)`` decoded predicted keypoints, grid units of the anchor's level.
    gt_xy: ``(b, E, K, 2)`` the entry's GT keypoints in the same grid units, 0 where not labelled.
    labelled: ``(b, E, K)`` bool: a valid entry and a labelled GT keypoint (the masking rules of
      :mod:`jaxtal.pose`).
    area: ``(b, E)`` the target box's area, grid units squared.
  """

  pred: jax.Array
  xy: jax.Array
  gt_xy: jax.Array
  labelled: jax.Array
  area: jax.Array


def entry_keypoints(
    head: Head, rows: jax.Array, gt_keypoints: jax.Array, targets: Targets, target: jax.Array, kpt_shape: tuple[int, int],
    decode=keypoint_xy,
) -> EntryKeypoints:
  """Reads anchor rows ``(b, A, K * D)`` of raw keypoints and the GT keypoints ``(b, M, K, Dg)`` (pixels)
  at the entry list; ``target (b, A, 4)`` the grid-unit target boxes (:func:`jaxtal.terms.box_targets`),
  for the OKS area; ``decode(raw_xy (..., K, 2), anchors (..., 2))`` the keypoint decode (YOLOv8's
  :func:`~jaxtal.head.keypoint_xy` by default)."""
  k, d = kpt_shape
  e = targets.entries
  b = rows.shape[0]
  pred = take_rows(rows, e.anchor).reshape(b, -1, k, d)  # (b, E, K, D)
  anchors = take_rows(jnp.broadcast_to(head.anchors, (b, *head.anchors.shape)), e.anchor)  # (b, E, 2)
  stride = take_rows(jnp.broadcast_to(head.strides, (b, *head.strides.shape)), e.anchor)  # (b, E, 1)
  box = take_rows(target, e.anchor)  # (b, E, 4) grid units
  area = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])  # (b, E)

  gt = jax.lax.stop_gradient(take_rows(jnp.asarray(gt_keypoints, jnp.float32), e.gt))  # (b, E, K, Dg) pixels
  gt_xy = gt[..., :2]
  ok = jnp.all(jnp.abs(gt_xy) <= COORD_LIMIT, axis=-1)  # False for NaN and inf too
  if gt.shape[-1] == 3:
    vis = gt[..., 2]
    ok = ok & jnp.isfinite(vis) & (vis != 0)
  labelled = ok & e.valid[..., None]  # (b, E, K)
  gt_xy = jnp.where(labelled[..., None], gt_xy, 0.0) / stride[..., None, :]
  return EntryKeypoints(pred, decode(pred[..., :2], anchors), gt_xy, labelled, area)


def keypoint_terms(kp: EntryKeypoints, targets: Targets, cfg: PoseLossConfig) -> tuple[jax.Array, jax.Array]:
  """``(pose, kobj)`` before gains: the OKS location term and the visibility BCE of the entries'
  keypoints (:func:`entry_keypoints`), means over ``n_fg * K``; ``kobj`` is 0 when ``D = 2``."""
  k, d = cfg.kpt_shape
  diff = kp.xy - kp.gt_xy
  d2 = jnp.sum(diff * diff, axis=-1)  # (b, E, K)
  sigmas = jnp.asarray(cfg.sigmas, jnp.float32)
  scale = jnp.maximum(8.0 * sigmas**2 * (kp.area[..., None] + _AREA_EPS), _TINY)
  oks_loss = jnp.where(kp.labelled, -jnp.expm1(-d2 / scale), 0.0)
  count = jnp.sum(kp.labelled, axis=-1, dtype=jnp.float32)
  per_anchor = jnp.sum(oks_loss, axis=-1) * k / jnp.maximum(count, 1.0)

  n = terms.foreground_count(targets, cfg.axis_name) * k
  pose = jnp.sum(per_anchor) / n
  if d < 3:
    return pose, jnp.zeros((), jnp.float32)
  logit = kp.pred[..., 2]
  target = kp.labelled.astype(jnp.float32)
  bce = -(target * jax.nn.log_sigmoid(logit) + (1.0 - target) * jax.nn.log_sigmoid(-logit))
  kobj = jnp.sum(jnp.where(targets.entries.valid[..., None], bce, 0.0)) / n
  return pose, kobj


def _parts(inputs: task.Inputs, targets: Targets, cfg: PoseLossConfig, class_weights) -> PoseLossParts:
  shared = terms.box_targets(inputs.head, targets, cfg)
  det = terms.detection_parts(inputs.head, targets, cfg, inputs.image_hw, class_weights, shared=shared)
  kp = entry_keypoints(inputs.head, inputs.side, inputs.gt.keypoints, targets, shared.target, cfg.kpt_shape)
  pose, kobj = keypoint_terms(kp, targets, cfg)
  return PoseLossParts(det.box, cfg.pose * pose, cfg.kobj * kobj, det.cls, det.dfl)


POSE = task.Task(
    name="pose", config_class=PoseLossConfig, needs=("keypoints",), form=terms.AXIS_ALIGNED, prepare=_prepare,
    check_gt=_check_gt, parts=_parts,
)


def pose_targets(preds: Predictions, gt: GroundTruth, config: PoseLossConfig | None = None, **overrides) -> tuple[Head, Targets]:
  """The pose loss's first half: decoded predictions and the assignment (the detection one:
  keypoints take no part in it). Arguments as :func:`pose_loss` (without ``class_weights``).

  Returns:
    ``(Head, Targets)``, as :func:`~jaxtal.detection_targets`.
  """
  return task.targets(POSE, preds, gt, config, overrides, "pose_targets")


def pose_loss_from_targets(
    preds: Predictions,
    targets: Targets,
    gt: GroundTruth,
    config: PoseLossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, PoseLossParts]:
  """The pose loss against given targets (e.g. from :func:`pose_targets`), treated as constants.

  Arguments as :func:`pose_loss`, with the targets second; ``gt`` is required (the keypoint
  terms read ``gt.keypoints`` at each entry's GT slot).
  """
  return task.loss_from_targets(POSE, preds, targets, gt, config, class_weights, overrides, "pose_loss_from_targets")


def pose_loss(
    preds: Predictions,
    gt: GroundTruth,
    config: PoseLossConfig | None = None,
    *,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, PoseLossParts]:
  """YOLOv8 pose loss of raw head maps and keypoint maps against padded ground truth with keypoints.

  The detection loss (:func:`~jaxtal.detection_loss`: same assignment, same ``box``, ``cls``,
  ``dfl``) plus, over the foreground anchors (``n_fg`` of them, each counted whatever its target
  score), the keypoint location term ``pose`` (mean over foreground anchors and keypoints of
  ``1 - exp(-d^2 / (8 sigma^2 (area + 1e-9)))`` on labelled keypoints, rescaled by ``K /
  |labelled|`` per anchor; ``d`` and ``area`` in grid units) and, when ``D = 3``, the visibility
  term ``kobj`` (BCE-with-logits of each visibility logit against "labelled", mean over
  ``n_fg * K``). See :mod:`jaxtal.pose` for the masking rules and the deliberate differences.

  Args:
    preds: ``Predictions(feats, keypoints=...)``: ``feats`` the per-level raw head maps, ``(b, H,
      W, 4R + nc)`` (NHWC) or ``(b, 4R + nc, H, W)`` (NCHW), as for :func:`~jaxtal.detection_loss`;
      ``keypoints`` the per-level raw keypoint maps, ``(b, H, W, K * D)`` (NHWC) or ``(b, K * D,
      H, W)`` (NCHW), channel ``k * D + d``: ``x, y`` decode to ``2 * raw + anchor - 0.5`` grid
      units, ``D = 3``'s third value is a visibility logit (:func:`~jaxtal.decode_keypoints` for
      inference).
    gt: :class:`~jaxtal.GroundTruth` with boxes in input pixels and ``keypoints (b, M, K, Dg)``
      in input pixels, ``Dg = 3`` (visibility non-zero = labelled) or 2 (all labelled), e.g.
      from :func:`~jaxtal.pack_labels` with ``keypoints=``.
    config: a :class:`~jaxtal.PoseLossConfig`; or its fields as keyword ``overrides``
      (``num_classes``, ``strides`` at least; ``kpt_shape=(17, 3)``, ``sigmas=None``,
      ``pose=12.0``, ``kobj=1.0``).
    class_weights: optional ``(nc,)`` weights of the BCE per class.

  ``axis_name`` works as for :func:`~jaxtal.detection_loss` (``n_fg`` is global too).

  Returns:
    ``(total, PoseLossParts(box, pose, kobj, cls, dfl))`` with gain-scaled parts and ``total =
    sum(parts) * batch_size``, Ultralytics' ``v8PoseLoss`` convention.

  References:
    Maji et al., 2022, "YOLO-Pose", https://arxiv.org/abs/2204.06806; COCO keypoint evaluation
    (OKS), https://cocodataset.org/#keypoints-eval; Feng et al., 2021, "TOOD" (assignment),
    https://arxiv.org/abs/2108.07755.
  """
  return task.loss(POSE, preds, gt, config, class_weights, overrides, "pose_loss")


def checked_pose_loss(
    preds: Predictions, gt: GroundTruth, config: PoseLossConfig | None = None, *, class_weights=None, **overrides
) -> tuple[jax.Array, PoseLossParts]:
  """:func:`pose_loss` that raises (through ``checkify``) on invalid values: the checks of
  :func:`~jaxtal.checked_detection_loss` plus, on real rows, a non-finite visibility or a labelled
  keypoint with a non-finite or out-of-range coordinate (:func:`~jaxtal.check_values`). Use under
  ``checkify.checkify``; identical to :func:`pose_loss` when no check fails."""
  return task.loss(POSE, preds, gt, config, class_weights, overrides, "checked_pose_loss", checked=True)


for _fn in (pose_loss, checked_pose_loss):
  _fn.config_class = PoseLossConfig  # read by TaskLossModule and EndToEndLoss


class PoseLoss(TaskLossModule):
  """The YOLOv8 pose loss (:func:`pose_loss`) as an NNX module holding a :class:`PoseLossConfig`.

  Example::

    loss_fn = jaxtal.PoseLoss(num_classes=1, strides=(8, 16, 32), kpt_shape=(17, 3))
    total, parts = loss_fn(jaxtal.Predictions(feats, keypoints=keypoints), gt)

  No trainable state; class weights are held as a constant. The class gain is the config's
  ``cls`` field: pass it in a ``PoseLossConfig`` (Flax's constructor reserves the keyword).
  """

  loss_fn = staticmethod(pose_loss)
