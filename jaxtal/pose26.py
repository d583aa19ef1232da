"""YOLO26 pose: the pose loss with an OKS assignment and a residual log-likelihood (RLE) keypoint term.

What YOLO26 changes from the YOLOv8 pose loss (:mod:`jaxtal.pose`), predictions
``Predictions(feats, keypoints=..., keypoint_sigmas=...)``::

    head maps --decode_head--> Head --assign (OKS + level gate)--> Targets --box, cls, dfl/L1---------+
    keypoint maps --anchor rows--> take_rows at the entries --pose, kobj (v8's terms)-----------------+--> (total, parts)
    sigma maps ----anchor rows--> take_rows at the entries --rle (flow log-density of the residuals)--+

* **Decode**: a keypoint is ``x, y = raw + anchor`` in grid units of its level (v8: ``2 raw +
  anchor - 0.5``); with ``D = 3`` its third channel is a visibility logit.
* **Assignment** (:func:`jaxtal.geometry.keypoint_oks`, Ultralytics' ``PoseTaskAlignedAssigner``):
  the overlap of a (GT, anchor) pair is the OKS of the anchor's predicted keypoints (detached,
  pixels) against the GT's visible ones (visibility > 0), with the GT box's area times 0.53 as the
  object area; a GT with no visible keypoint keeps the box CIoU. Candidates also pass a pyramid-level
  gate: the anchor's stride ``s`` has ``lo s <= sqrt(box area) <= hi s`` (``level_range``, default
  ``(2, 12)``), the finest level open below and the coarsest above; a GT the gate leaves no candidate
  keeps its ungated ones. ``box``, ``cls`` and ``dfl`` are then the detection terms against these
  targets (their scores are OKS-based).
* **pose, kobj**: YOLOv8's keypoint terms (:func:`jaxtal.pose.keypoint_terms`) with the new decode.
* **rle**: per labelled keypoint (GT visibility != 0) of each foreground anchor, with ``sigma =
  max(sigmoid(sigma logits), tiny)`` (two per keypoint, channel ``k * 2 + c``) and the residual
  ``e = (pred_xy - gt_xy) / (sigma + 1e-9)`` in grid units: rows with a non-finite ``e`` are
  dropped, ``e`` is clipped to ``[-100, 100]``, and ``rle = max(0, sum over kept rows of w_k * sum_c
  (log sigma_c + log(2 sigma_c) + |e_c| - log p(e)) / n_kept)``, ``log p`` the flow's log-density
  (:func:`jaxtal.flow_log_prob`), ``w_k`` the RLE weights (COCO-17: :data:`jaxtal.pose.RLE_WEIGHTS_COCO17`;
  else ones). ``n_kept`` counts the kept rows of the whole batch (global under ``axis_name``), and
  so does the clamp at 0. 0 when no row is kept.

``total = (box + pose + kobj + cls + dfl + rle) * b``. The flow's parameters are an argument of the
loss (``flow=``), so ``jax.grad`` w.r.t. them is the flow's training signal; the NNX module
:class:`Pose26Loss` owns a trainable flow.

Masking (no NaN or inf reaches the loss or its gradient from the ground truth or the sigma logits):
GT keypoints as in :mod:`jaxtal.pose` (non-finite, beyond ``COORD_LIMIT`` or visibility 0: not
labelled; for the assignment also a negative visibility is not visible). A sigma logit of any value
is safe: ``+-inf`` saturate, a NaN makes its residual non-finite and drops the row (as Ultralytics
does), with a zero gradient (double ``where``). A non-finite predicted keypoint has OKS 0 with every
GT in the assignment and drops its RLE row; in the ``pose`` and ``kobj`` terms it is not masked (a
NaN prediction gives a NaN loss, jaxtal's rule for every prediction: docs/inputs.md).

Everything matches Ultralytics 8.4.190 (``PoseLoss26``, ``RLELoss``, ``PoseTaskAlignedAssigner``,
alone and under ``E2ELoss``) to float32 rounding, except the deliberate differences of
docs/deviations.md.

References:
  Li et al., 2021, "Human Pose Regression with Residual Log-likelihood Estimation",
  https://arxiv.org/abs/2107.11291; COCO keypoint evaluation (OKS),
  https://cocodataset.org/#keypoints-eval; Tian et al., 2019, "FCOS" (size ranges per level),
  https://arxiv.org/abs/1904.01355.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtal import _validate
from jaxtal import kernels
from jaxtal import task
from jaxtal import terms
from jaxtal.flow import FlowParams, RealNVP, validate_flow_params
from jaxtal.geometry import GeometryExtra, keypoint_oks
from jaxtal.head import Head, Predictions, keypoint_xy26
from jaxtal.labels import GroundTruth
from jaxtal.module import TaskLossModule
from jaxtal.pose import RLE_WEIGHTS_COCO17, EntryKeypoints, PoseLossConfig, entry_keypoints, keypoint_terms
from jaxtal.targets import Targets, take_rows

# The reference's guard of sigma in the residual's denominator.
_SIGMA_EPS = 1e-9
# Residuals are clipped to +-this before the flow reads them (the reference's numerical guard).
RESIDUAL_CLIP = 100.0
# Sigmas are floored at the smallest normal float32, so log(sigma) stays finite.
_TINY = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pose26LossConfig(PoseLossConfig):
  """Settings of the YOLO26 pose loss: :class:`~jaxtal.PoseLossConfig` plus the RLE term and the level gate.

  Attributes:
    rle: gain of the RLE term (Ultralytics' ``rle`` hyperparameter).
    rle_weights: the ``K`` non-negative per-keypoint weights of the RLE term, or None: the COCO-17
      weights (:data:`jaxtal.pose.RLE_WEIGHTS_COCO17`) when ``kpt_shape == (17, 3)``, else ones
      (Ultralytics' defaults). Stored resolved, like ``sigmas``: after changing ``kpt_shape`` give
      it again (or None).
    level_range: ``(lo, hi)``: the assigner's level gate, a GT size range per pyramid level in
      strides (Ultralytics' ``PoseTaskAlignedAssigner.level_range``); ``(0, inf)`` turns it off.
  """

  rle: float = 1.0
  rle_weights: tuple[float, ...] | None = None
  level_range: tuple[float, float] = (2.0, 12.0)

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "rle", _validate.finite_number("rle", self.rle))
    k = self.kpt_shape[0]
    default = RLE_WEIGHTS_COCO17 if self.kpt_shape == (17, 3) else (1.0,) * k
    object.__setattr__(self, "rle_weights", _validate.per_keypoint("rle_weights", self.rle_weights, self.kpt_shape, default, positive=False))
    object.__setattr__(self, "level_range", _validate.level_range(self.level_range))


class Pose26LossParts(NamedTuple):
  """Gain-scaled YOLO26 pose loss terms (scalars), in Ultralytics' order.

  Attributes:
    box: ``box_gain * CIoU loss``.
    pose: ``pose_gain * keypoint location (OKS) loss``.
    kobj: ``kobj_gain * keypoint visibility BCE`` (0 when ``D == 2``).
    cls: ``cls_gain * BCE loss``.
    dfl: ``dfl_gain * DFL loss`` (the L1 distance loss when ``reg_max == 1``, YOLO26's head).
    rle: ``rle_gain * RLE loss``.
  """

  box: jax.Array
  pose: jax.Array
  kobj: jax.Array
  cls: jax.Array
  dfl: jax.Array
  rle: jax.Array


def _geometry(cfg: Pose26LossConfig):
  return keypoint_oks(cfg.sigmas, level_range=cfg.level_range, eps=cfg.eps)


# Axis-aligned boxes whose assigner is the keypoint OKS geometry (the box terms are the detection ones).
KEYPOINT_OKS = terms.AXIS_ALIGNED._replace(name="xyxy/oks", geometry=_geometry)


class _Side(NamedTuple):
  keypoints: jax.Array  # (b, A, K * D) raw keypoints
  sigmas: jax.Array  # (b, A, 2K) sigma logits


def _prepare(preds: Predictions, head: Head, cfg: Pose26LossConfig, batch: int, shapes, caller: str) -> tuple[Head, _Side]:
  """The keypoint and sigma maps as anchor rows, validated against the head's levels."""
  k, d = cfg.kpt_shape
  keypoints = task.side_rows(preds.keypoints, shapes, batch, k * d, cfg.layout, "keypoints", caller)
  try:
    sigmas = task.side_rows(preds.keypoint_sigmas, shapes, batch, 2 * k, cfg.layout, "keypoint_sigmas", caller)
  except ValueError as e:  # say where 2K comes from
    raise ValueError(f"{e}; keypoint_sigmas hold two sigma logits per keypoint (2K = {2 * k}, K from kpt_shape)") from None
  return head, _Side(keypoints, sigmas)


def _check_gt(gt: GroundTruth, cfg: Pose26LossConfig, caller: str) -> None:
  _validate.gt_keypoints(gt, cfg.kpt_shape[0], caller)


def _assign_extra(inputs: task.Inputs, cfg: Pose26LossConfig) -> GeometryExtra:
  """The OKS geometry's data: GT keypoints ``(b, M, K, Dg)`` and the decoded predicted keypoints in
  pixels ``(b, A, K, 2)`` with each anchor's stride ``(b, A)``."""
  k, d = cfg.kpt_shape
  head, b = inputs.head, inputs.batch
  raw = inputs.side.keypoints.reshape(b, -1, k, d)[..., :2]
  xy = keypoint_xy26(raw, head.anchors) * head.strides[:, None, :]
  strides = jnp.broadcast_to(head.strides[:, 0], raw.shape[:2])
  return GeometryExtra(gt=jnp.asarray(inputs.gt.keypoints, jnp.float32), pred=(xy, strides))


def rle_term(
    kp: EntryKeypoints, sigma_rows: jax.Array, targets: Targets, flow: FlowParams, weights, axis_name: str | None, plain_kernels=()
) -> jax.Array:
  """The RLE term before its gain: ``max(0, sum of the kept rows' losses / n_kept)`` (see :mod:`jaxtal.pose26`).

  Args:
    kp: the entries' keypoints (:func:`jaxtal.pose.entry_keypoints` with :func:`keypoint_xy26`).
    sigma_rows: ``(b, A, 2K)`` sigma logits, channel ``k * 2 + c``.
    targets: the targets whose entry list ``kp`` was read at.
    flow: the flow's :class:`~jaxtal.FlowParams`.
    weights: the ``K`` per-keypoint weights.
    axis_name: the mapped batch axis, or None: the row count and the clamp are over the global batch.
    plain_kernels: the config's; ``"flow_rows"`` runs the flow over every row (:func:`jaxtal.kernels.plain_flow_rows`)
      instead of the kept ones only.

  Returns:
    A scalar: under ``axis_name`` this device's share (its rows' sum over the global count, 0 when
    the global sum is negative), so that the shares add up to the global term and each device's
    gradient is its own.
  """
  b, e, k, _ = kp.xy.shape
  logit = take_rows(sigma_rows, targets.entries.anchor).reshape(b, e, k, 2)
  # Which rows count, from a forward pass that may hold NaN (no gradient flows through a mask).
  raw_error = (kp.xy - kp.gt_xy) / (jnp.maximum(jax.nn.sigmoid(logit), _TINY) + _SIGMA_EPS)
  keep = jax.lax.stop_gradient(kp.labelled & jnp.all(jnp.isfinite(raw_error), axis=-1))  # (b, E, K)
  # The kept rows' inputs; the others read harmless stand-ins (double where: their gradient is 0, not NaN).
  logit = jnp.where(keep[..., None], logit, 0.0)
  xy = jnp.where(keep[..., None], kp.xy, kp.gt_xy)
  sigma = jnp.maximum(jax.nn.sigmoid(logit), _TINY)
  error = jnp.clip((xy - kp.gt_xy) / (sigma + _SIGMA_EPS), -RESIDUAL_CLIP, RESIDUAL_CLIP)
  per_coord = jnp.log(sigma) + jnp.log(2.0 * sigma) + jnp.abs(error)
  weight = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), keep.shape)
  # sum over kept rows of w * (per-coordinate terms - 2 log phi): the flow's share over the kept rows only.
  log_phi_sum = kernels.select("flow_rows", plain_kernels)(flow, error.reshape(-1, 2), -2.0 * weight.reshape(-1), keep.reshape(-1))
  local = jnp.sum(jnp.where(keep, weight * jnp.sum(per_coord, axis=-1), 0.0)) + log_phi_sum
  count = jnp.sum(keep, dtype=jnp.float32)
  total = local
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
    total = jax.lax.psum(jax.lax.stop_gradient(local), axis_name)
  return jnp.where(total > 0, local / jnp.maximum(count, 1.0), 0.0)


def _parts(flow: FlowParams, inputs: task.Inputs, targets: Targets, cfg: Pose26LossConfig, class_weights) -> Pose26LossParts:
  shared = terms.box_targets(inputs.head, targets, cfg)
  det = terms.detection_parts(inputs.head, targets, cfg, inputs.image_hw, class_weights, shared=shared)
  kp = entry_keypoints(inputs.head, inputs.side.keypoints, inputs.gt.keypoints, targets, shared.target, cfg.kpt_shape,
                       decode=keypoint_xy26)
  pose, kobj = keypoint_terms(kp, targets, cfg)
  rle = rle_term(kp, inputs.side.sigmas, targets, flow, cfg.rle_weights, cfg.axis_name, cfg.plain_kernels)
  return Pose26LossParts(det.box, cfg.pose * pose, cfg.kobj * kobj, det.cls, det.dfl, cfg.rle * rle)


def _needs_flow(*args):
  raise TypeError("the pose26 loss needs the flow's parameters: call it as pose26_loss(..., flow=FlowParams)")


POSE26 = task.Task(
    name="pose26", config_class=Pose26LossConfig, needs=("keypoints", "keypoint_sigmas"), form=KEYPOINT_OKS,
    prepare=_prepare, check_gt=_check_gt, parts=_needs_flow, assign_extra=_assign_extra,
)


def _with_flow(flow, caller: str) -> task.Task:
  """:data:`POSE26` whose terms read ``flow`` (validated at trace time)."""
  if flow is None:
    raise TypeError(
        f"{caller}: flow is None; the RLE term needs the flow's parameters: flow=jaxtal.init_flow_params(key),"
        " jaxtal.flow_params_from_torch(state_dict) or a RealNVP module's .params()"
    )
  validate_flow_params(flow, caller)
  return POSE26._replace(parts=functools.partial(_parts, flow))


def pose26_targets(preds: Predictions, gt: GroundTruth, config: Pose26LossConfig | None = None, **overrides) -> tuple[Head, Targets]:
  """The YOLO26 pose loss's first half: decoded predictions and the OKS assignment (no flow needed).
  Arguments as :func:`pose26_loss` (without ``flow`` and ``class_weights``).

  Returns:
    ``(Head, Targets)``, as :func:`~jaxtal.detection_targets`.
  """
  return task.targets(POSE26, preds, gt, config, overrides, "pose26_targets")


def pose26_loss_from_targets(
    preds: Predictions,
    targets: Targets,
    gt: GroundTruth,
    config: Pose26LossConfig | None = None,
    *,
    flow: FlowParams,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, Pose26LossParts]:
  """The YOLO26 pose loss against given targets (e.g. from :func:`pose26_targets`), treated as constants.

  Arguments as :func:`pose26_loss`, with the targets second; ``gt`` is required (the keypoint terms
  read ``gt.keypoints`` at each entry's GT slot).
  """
  caller = "pose26_loss_from_targets"
  return task.loss_from_targets(_with_flow(flow, caller), preds, targets, gt, config, class_weights, overrides, caller)


def pose26_loss(
    preds: Predictions,
    gt: GroundTruth,
    config: Pose26LossConfig | None = None,
    *,
    flow: FlowParams,
    class_weights: jax.Array | None = None,
    **overrides,
) -> tuple[jax.Array, Pose26LossParts]:
  """YOLO26 pose loss (Ultralytics' ``PoseLoss26``) of raw head, keypoint and sigma maps against ground truth.

  The detection terms against the OKS assignment (:func:`jaxtal.geometry.keypoint_oks`: keypoint
  OKS as the overlap, a pyramid-level gate on the candidates), YOLOv8's ``pose`` and ``kobj``
  keypoint terms with YOLO26's decode (``raw + anchor``), and the RLE term: the weighted mean over
  the batch's labelled keypoints of foreground anchors of ``log sigma + log 2 sigma + |e| - log
  p(e)`` per coordinate, ``e`` the residual in units of the predicted sigma and ``log p`` the
  flow's log-density, clamped at 0. See :mod:`jaxtal.pose26` for every rule.

  Args:
    preds: ``Predictions(feats, keypoints=..., keypoint_sigmas=...)``: ``feats`` the per-level raw
      head maps ``(b, H, W, 4R + nc)`` (NHWC) or ``(b, 4R + nc, H, W)`` (NCHW); ``keypoints`` the
      per-level raw keypoints ``(b, H, W, K * D)``, channel ``k * D + d`` (``x, y`` decode to
      ``raw + anchor`` grid units, ``D = 3``'s third value a visibility logit); ``keypoint_sigmas``
      the per-level sigma logits ``(b, H, W, 2K)``, channel ``k * 2 + c`` (Ultralytics'
      ``kpts_sigma``); NCHW likewise.
    gt: :class:`~jaxtal.GroundTruth` with boxes in input pixels and ``keypoints (b, M, K, Dg)``
      in pixels (``Dg = 3``: visibility; 2: all labelled), e.g. from :func:`~jaxtal.pack_labels`.
    config: a :class:`~jaxtal.Pose26LossConfig`; or its fields as keyword ``overrides``
      (``num_classes``, ``strides`` at least; YOLO26 heads have ``reg_max=1``).
    flow: the RLE flow's :class:`~jaxtal.FlowParams` (:func:`~jaxtal.init_flow_params`,
      :func:`~jaxtal.flow_params_from_torch`, or :meth:`RealNVP.params`); the loss is
      differentiable w.r.t. it. A flow of another size raises at trace time.
    class_weights: optional ``(nc,)`` weights of the BCE per class.

  ``axis_name`` works as for :func:`~jaxtal.detection_loss` (``n_fg`` and the RLE row count are global).

  Returns:
    ``(total, Pose26LossParts(box, pose, kobj, cls, dfl, rle))`` with gain-scaled parts and
    ``total = sum(parts) * batch_size``.

  References:
    Li et al., 2021, "RLE", https://arxiv.org/abs/2107.11291; COCO keypoint evaluation (OKS),
    https://cocodataset.org/#keypoints-eval; Feng et al., 2021, "TOOD" (assignment),
    https://arxiv.org/abs/2108.07755.
  """
  return task.loss(_with_flow(flow, "pose26_loss"), preds, gt, config, class_weights, overrides, "pose26_loss")


def checked_pose26_loss(
    preds: Predictions, gt: GroundTruth, config: Pose26LossConfig | None = None, *, flow: FlowParams, class_weights=None,
    **overrides,
) -> tuple[jax.Array, Pose26LossParts]:
  """:func:`pose26_loss` that raises (through ``checkify``) on invalid values: the checks of
  :func:`~jaxtal.checked_pose_loss` (finite predictions, the sigma maps included). Use under
  ``checkify.checkify``; identical to :func:`pose26_loss` when no check fails."""
  caller = "checked_pose26_loss"
  return task.loss(_with_flow(flow, caller), preds, gt, config, class_weights, overrides, caller, checked=True)


for _fn in (pose26_loss, checked_pose26_loss):
  _fn.config_class = Pose26LossConfig  # read by TaskLossModule and EndToEndLoss


class Pose26Loss(TaskLossModule):
  """The YOLO26 pose loss (:func:`pose26_loss`) as an NNX module that also owns the RLE flow.

  Example::

    loss_fn = jaxtal.Pose26Loss(num_classes=1, strides=(8, 16, 32), reg_max=1, rngs=nnx.Rngs(0))
    total, parts = loss_fn(jaxtal.Predictions(feats, keypoints=kpts, keypoint_sigmas=sigmas), gt)

  The flow (``self.flow``, a :class:`~jaxtal.RealNVP` of ``nnx.Param`` s) trains with the model:
  ``nnx.grad`` of a loss through this module reaches it. A call with an explicit ``flow=`` uses
  that instead (e.g. the one-to-one branch of :func:`~jaxtal.end_to_end_loss` sharing a flow).

  Args:
    config: a :class:`Pose26LossConfig`, or None to build one from ``overrides``.
    rngs: ``nnx.Rngs`` to initialise a fresh flow (:func:`~jaxtal.init_flow_params`), or
    flow: the :class:`~jaxtal.FlowParams` to start from (e.g. :func:`~jaxtal.flow_params_from_torch`
      of a YOLO26 checkpoint's ``flow_model``); exactly one of the two.
    class_weights: optional ``(nc,)`` class weights (a constant).
    **overrides: config fields (the class gain ``cls`` goes in the config).
  """

  loss_fn = staticmethod(pose26_loss)

  def __init__(self, config=None, *, rngs: nnx.Rngs | None = None, flow: FlowParams | None = None, class_weights=None, **overrides):
    if (rngs is None) == (flow is None):
      raise TypeError("Pose26Loss: pass exactly one of rngs= (a fresh flow) or flow= (FlowParams to start from)")
    super().__init__(config, class_weights=class_weights, **overrides)
    self.flow = RealNVP(rngs) if flow is None else RealNVP(params=flow)

  def __call__(self, preds, gt: GroundTruth, *, flow: FlowParams | None = None) -> tuple[jax.Array, Pose26LossParts]:
    """``(total, parts)`` of :func:`pose26_loss` with this module's flow (or ``flow``, when given)."""
    weights = None if self.class_weights is None else self.class_weights[...]
    return pose26_loss(preds, gt, self.config, flow=self.flow.params() if flow is None else flow, class_weights=weights)
