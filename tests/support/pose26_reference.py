"""Runs the pinned reference (Ultralytics 8.4.190, PyTorch) on NumPy inputs, for YOLO26 pose.

The YOLO26 counterpart of ``pose_reference.py``: ``PoseLoss26`` (alone and under ``E2ELoss``) and
``PoseTaskAlignedAssigner`` as black boxes. The stand-in model is ``reference.Model`` whose head
also carries ``kpt_shape`` and a ``flow_model`` (Ultralytics' ``RealNVP``, loaded with the case's
flow), as a ``Pose26`` head does; both branches of ``E2ELoss`` read that one flow. Importing this
module requires ``torch`` and ``ultralytics`` (the ``parity`` extra).
"""

from __future__ import annotations

import contextlib

import numpy as np

from support import pose26_cases
from support import reference  # (sets the environment, restores NumPy's print options, pins the version)
from support.reference import REFERENCE_VERSION, VERSION  # noqa: F401

_print_options = np.get_printoptions()
import torch  # noqa: E402
from ultralytics.nn.modules.block import RealNVP  # noqa: E402
from ultralytics.utils.loss import E2ELoss, PoseLoss26  # noqa: E402
from ultralytics.utils.tal import PoseTaskAlignedAssigner  # noqa: E402

np.set_printoptions(**_print_options)

PARTS = ("box", "pose", "kobj", "cls", "dfl", "rle")


def flow_model(arrays: dict[str, np.ndarray]) -> torch.nn.Module:
  """Ultralytics' ``RealNVP`` holding the case's flow (the stacked arrays of ``pose26_cases.flow_arrays``)."""
  flow = RealNVP()
  state = flow.state_dict()
  for key, value in pose26_cases.flow_to_torch_layout(arrays).items():
    assert state[key].shape == value.shape, key
    state[key] = torch.from_numpy(np.array(value))
  flow.load_state_dict(state)
  return flow


def _flow_grads(flow: torch.nn.Module) -> dict[str, np.ndarray]:
  grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy().copy() for k, p in flow.named_parameters()}
  return pose26_cases.flow_from_torch_layout(grads)


def _model(*, kpt_shape, flow, sigmas, num_classes, strides, reg_max, class_weights, gains):
  model = reference.Model(num_classes, reg_max, list(strides), gains, class_weights)
  head = model.model[-1]
  head.kpt_shape = [int(kpt_shape[0]), int(kpt_shape[1])]  # a list, as a model's yaml gives it
  head.flow_model = flow
  if sigmas is not None:
    model.kpt_oks_sigmas = torch.as_tensor(np.asarray(sigmas, np.float32))
  return model


def _set_assigner(crit, alpha, beta, min_box_side):
  crit.assigner.alpha, crit.assigner.beta = alpha, beta
  if min_box_side is not None:  # None: the reference's own default (strides[1])
    crit.assigner.stride_val = float(min_box_side)


def _branch_preds(feats_nchw, kpts_nchw, sigma_nchw, reg_max, num_classes):
  """Leaf tensors ``(feats, kpts, sigmas)`` and the training dict a ``Pose26`` head hands its loss."""
  feats, preds = reference.head_outputs(feats_nchw, reg_max, num_classes)
  kpts = [torch.tensor(np.asarray(k, np.float32), requires_grad=True) for k in kpts_nchw]
  sig = [torch.tensor(np.asarray(s, np.float32), requires_grad=True) for s in sigma_nchw]
  b = feats[0].shape[0]
  preds["kpts"] = torch.cat([k.reshape(b, k.shape[1], -1) for k in kpts], -1)
  preds["kpts_sigma"] = torch.cat([s.reshape(b, s.shape[1], -1) for s in sig], -1)
  return (feats, kpts, sig), preds


def _batch(label_rows, keypoints, kpt_shape):
  rows = np.asarray(label_rows, np.float32).reshape(-1, 6)
  kp = np.asarray(keypoints, np.float32)
  kp = kp.reshape(rows.shape[0], int(kpt_shape[0]), kp.shape[-1])
  # Rows grouped by image, as its data loader makes them (stable: each image keeps jaxtal's slot order).
  order = np.argsort(rows[:, 0], kind="stable")
  rows, kp = torch.as_tensor(rows[order]), torch.as_tensor(kp[order])
  return {"batch_idx": rows[:, 0], "cls": rows[:, 1:2], "bboxes": rows[:, 2:6], "keypoints": kp}


def _grads(leaves):
  return [t.grad.numpy().copy() if t.grad is not None else np.zeros(t.shape, np.float32) for t in leaves]


def loss(feats_nchw, kpts_nchw, sigma_nchw, label_rows, keypoints, flow, *, kpt_shape, sigmas=None, stable=False,
         num_classes, strides, reg_max=1, topk=10, topk2=None, alpha=0.5, beta=6.0, min_box_side=None,
         class_weights=None, box=7.5, cls=0.5, dfl=1.5, pose=12.0, kobj=1.0, rle=1.0):
  """Reference ``PoseLoss26`` and its gradients w.r.t. every NCHW map and the flow's parameters.

  Args:
    feats_nchw, kpts_nchw, sigma_nchw: per-level ``(b, 4R + nc, H, W)``, ``(b, K * D, H, W)`` and ``(b, 2K, H, W)``.
    label_rows, keypoints: ``(n, 6)`` rows and ``(n, K, Dg)`` normalised keypoints.
    flow: the flow's stacked arrays (``pose26_cases.flow_arrays``).
    stable: run under ``reference.stable_ties()``.
    min_box_side: its assigner's ``stride_val``; None leaves its default (``strides[1]``).

  Returns:
    ``dict(total, box, pose, kobj, cls, dfl, rle, grads, kpt_grads, sigma_grads, flow_grads, weights, fg_mask,
    gt_index)``.
  """
  fm = flow_model(flow)
  model = _model(kpt_shape=kpt_shape, flow=fm, sigmas=sigmas, num_classes=num_classes, strides=strides, reg_max=reg_max,
                 class_weights=class_weights, gains=dict(box=box, cls=cls, dfl=dfl, pose=pose, kobj=kobj, rle=rle))
  crit = PoseLoss26(model, tal_topk=topk, tal_topk2=topk2)
  _set_assigner(crit, alpha, beta, min_box_side)
  (feats, kpts, sig), preds = _branch_preds(feats_nchw, kpts_nchw, sigma_nchw, reg_max, num_classes)
  total, weights, fg_mask, gt_index = reference.run_observed(crit, preds, _batch(label_rows, keypoints, kpt_shape),
                                                             stable=stable)
  b = feats[0].shape[0]
  parts = total.numpy() / b
  assert parts.shape == (6,), "the reference computed no RLE term"
  return dict(
      total=float(total.sum()),
      **{name: float(p) for name, p in zip(PARTS, parts)},
      grads=_grads(feats), kpt_grads=_grads(kpts), sigma_grads=_grads(sig), flow_grads=_flow_grads(fm),
      weights=weights, fg_mask=fg_mask, gt_index=gt_index,
  )


def e2e_loss(many, one, label_rows, keypoints, flow, *, kpt_shape, epoch=0, epochs=10, sigmas=None, stable=False,
             num_classes, strides, reg_max=1, min_box_side=None, class_weights=None, box=7.5, cls=0.5, dfl=1.5,
             pose=12.0, kobj=1.0, rle=1.0):
  """Reference ``E2ELoss(model, PoseLoss26)`` at epoch ``epoch`` (0-based) and its gradients.

  ``many`` / ``one``: each branch's ``(feats, kpts, sigmas)`` per-level NCHW lists; both branches read
  the one ``flow``. Returns ``dict(total, box, pose, kobj, cls, dfl, rle`` (the one-to-one branch's parts,
  as it reports them), ``grads, kpt_grads, sigma_grads`` (one-to-many), ``grads_o2o, kpt_grads_o2o,
  sigma_grads_o2o, flow_grads)``.
  """
  fm = flow_model(flow)
  model = _model(kpt_shape=kpt_shape, flow=fm, sigmas=sigmas, num_classes=num_classes, strides=strides, reg_max=reg_max,
                 class_weights=class_weights, gains=dict(box=box, cls=cls, dfl=dfl, pose=pose, kobj=kobj, rle=rle))
  model.args.epochs = epochs
  crit = E2ELoss(model, PoseLoss26)
  for c in (crit.one2many, crit.one2one):
    _set_assigner(c, 0.5, 6.0, min_box_side)
  for _ in range(epoch):
    crit.update()
  leaves_many, preds_many = _branch_preds(*many, reg_max, num_classes)
  leaves_one, preds_one = _branch_preds(*one, reg_max, num_classes)
  with reference.stable_ties() if stable else contextlib.nullcontext():
    total, items = crit({"one2many": preds_many, "one2one": preds_one}, _batch(label_rows, keypoints, kpt_shape))
  total.sum().backward()
  values = list(items.values())
  assert len(values) == 6, "the reference computed no RLE term"
  return dict(
      total=float(total.detach().sum()),
      **{name: float(v) for name, v in zip(PARTS, values)},
      grads=_grads(leaves_many[0]), kpt_grads=_grads(leaves_many[1]), sigma_grads=_grads(leaves_many[2]),
      grads_o2o=_grads(leaves_one[0]), kpt_grads_o2o=_grads(leaves_one[1]), sigma_grads_o2o=_grads(leaves_one[2]),
      flow_grads=_flow_grads(fm),
  )


def assign(pred_scores, pred_boxes, anchor_points, anchor_strides, gt_labels, gt_boxes, gt_mask, pred_kpts, gt_kpts, *,
           sigmas, topk=10, topk2=None, alpha=0.5, beta=6.0, eps=1e-9, min_box_side=0.0):
  """Reference ``PoseTaskAlignedAssigner``: shapes as jaxtal's (``pred_kpts (b, A, K, 2)`` and ``gt_kpts (b, M,
  K, Dg)`` pixels, ``Dg = 2`` completed with visibility 1 as its loss does, ``anchor_strides (A,)``); returns a dict
  of NumPy arrays."""
  gt_kpts = np.asarray(gt_kpts, np.float32)
  if gt_kpts.shape[-1] == 2:
    gt_kpts = np.concatenate([gt_kpts, np.ones_like(gt_kpts[..., :1])], -1)
  nc = pred_scores.shape[-1]
  assigner = PoseTaskAlignedAssigner(torch.as_tensor(np.asarray(sigmas, np.float32)), topk=topk, num_classes=nc,
                                     alpha=alpha, beta=beta, eps=eps, topk2=topk2, stride=sorted(set(np.asarray(anchor_strides).tolist())))
  assigner.stride_val = float(min_box_side)
  t = lambda x, dt=torch.float32: torch.as_tensor(np.array(x)).to(dt)  # noqa: E731  (a writable copy)
  labels, boxes, scores, fg, gt_idx = assigner(
      t(pred_scores), t(pred_boxes), t(anchor_points), t(gt_labels)[..., None], t(gt_boxes), t(gt_mask)[..., None],
      t(anchor_strides), pd_kpts=t(pred_kpts), gt_kpts=t(gt_kpts),
  )
  return dict(
      labels=labels.numpy().astype(np.int32), boxes=boxes.numpy().astype(np.float32),
      scores=scores.numpy().astype(np.float32), fg_mask=fg.numpy().astype(bool), gt_index=gt_idx.numpy().astype(np.int32),
  )
