"""Runs the pinned reference (Ultralytics 8.4.190, PyTorch) on NumPy inputs, for oriented boxes.

The OBB counterpart of ``reference.py`` (whose import rules, version pin, criterion builder and observed run it
reuses): ``probiou``, ``RotatedTaskAlignedAssigner`` and ``v8OBBLoss`` as black boxes. We build
their inputs, call their public entry points and read back NumPy arrays. Importing this module
requires ``torch`` and ``ultralytics`` (the ``parity`` extra).
"""

from __future__ import annotations

import numpy as np

from support import reference  # (sets the environment, restores NumPy's print options, pins the version)
from support.reference import REFERENCE_VERSION, VERSION  # noqa: F401

_print_options = np.get_printoptions()
import torch  # noqa: E402
from ultralytics.utils.loss import v8OBBLoss  # noqa: E402
from ultralytics.utils.metrics import probiou as _probiou  # noqa: E402
from ultralytics.utils.tal import RotatedTaskAlignedAssigner  # noqa: E402

np.set_printoptions(**_print_options)


def _t(x, dtype=torch.float32):
  return torch.as_tensor(np.array(x)).to(dtype)  # a writable copy


def probiou(box1, box2, *, eps=1e-7, floor=0.0, float64=False):
  """Reference ProbIoU of ``(n, 5)`` xywhr boxes, row by row: ``(n,)`` float32 (or evaluated in float64)."""
  dtype = torch.float64 if float64 else torch.float32
  out = _probiou(_t(np.reshape(box1, (-1, 5)), dtype), _t(np.reshape(box2, (-1, 5)), dtype), eps=eps, floor=floor)
  return out.numpy().reshape(-1).astype(np.float64 if float64 else np.float32)


def probiou_grad(box1, box2, *, eps=1e-7, floor=0.0):
  """Gradients of ``sum(probiou(box1, box2))`` w.r.t. both ``(n, 5)`` inputs (float32)."""
  b1 = _t(np.reshape(box1, (-1, 5))).requires_grad_(True)
  b2 = _t(np.reshape(box2, (-1, 5))).requires_grad_(True)
  _probiou(b1, b2, eps=eps, floor=floor).sum().backward()
  return b1.grad.numpy().copy(), b2.grad.numpy().copy()


def assign(
    pred_scores,
    pred_boxes,
    anchor_points,
    gt_labels,
    gt_boxes,
    gt_mask,
    *,
    topk=10,
    topk2=None,
    alpha=0.5,
    beta=6.0,
    eps=1e-9,
    min_box_side=0.0,
):
  """Reference rotated assignment; boxes are ``(..., 5)`` xywhr pixels. Returns a dict of NumPy arrays."""
  nc = pred_scores.shape[-1]
  assigner = RotatedTaskAlignedAssigner(topk=topk, num_classes=nc, alpha=alpha, beta=beta, eps=eps, topk2=topk2)
  assigner.stride_val = float(min_box_side)  # the side floor of its candidate test
  labels, boxes, scores, fg, gt_idx = assigner(
      _t(pred_scores), _t(pred_boxes), _t(anchor_points), _t(gt_labels)[..., None], _t(gt_boxes), _t(gt_mask)[..., None]
  )
  return dict(
      labels=labels.numpy().astype(np.int32),
      boxes=boxes.numpy().astype(np.float32),
      scores=scores.numpy().astype(np.float32),
      fg_mask=fg.numpy().astype(bool),
      gt_index=gt_idx.numpy().astype(np.int32),
  )


def loss(
    feats_nchw,
    angles_nchw,
    label_rows,
    *,
    num_classes,
    strides,
    reg_max=16,
    topk=10,
    topk2=None,
    alpha=0.5,
    beta=6.0,
    box=7.5,
    cls=0.5,
    dfl=1.5,
    angle=1.0,
    min_box_side=0.0,
    class_weights=None,
):
  """Reference OBB loss and its gradients w.r.t. every NCHW head map and angle map.

  Args:
    feats_nchw: list of ``(b, 4R + nc, H, W)`` float32 arrays.
    angles_nchw: list of ``(b, 1, H, W)`` float32 predicted angles (radians, after the head's activation).
    label_rows: ``(n, 7)`` rows ``[batch_idx, cls, cx, cy, w, h, angle]`` (box normalised), any order.

  Returns:
    ``dict(total, box, cls, dfl, angle, grads=[per-level NCHW], angle_grads=[per-level NCHW], weights,
    fg_mask, gt_index)``: the last three are the assignment inside the loss (target-score sum
    ``(b, A)``, foreground and owner GT slot), read from its assigner's output (:func:`reference.run_observed`).
  """
  crit = reference.criterion(
      v8OBBLoss, num_classes=num_classes, strides=strides, reg_max=reg_max, topk=topk, topk2=topk2, alpha=alpha,
      beta=beta, min_box_side=min_box_side, class_weights=class_weights, box=box, cls=cls, dfl=dfl, angle=angle,
  )
  feats, preds = reference.head_outputs(feats_nchw, reg_max, num_classes)
  angles = [torch.tensor(np.asarray(a, np.float32), requires_grad=True) for a in angles_nchw]
  b = feats[0].shape[0]
  preds["angle"] = torch.cat([a.reshape(b, 1, -1) for a in angles], -1)
  rows = np.asarray(label_rows, np.float32).reshape(-1, 7)
  # Its preprocessing expects rows grouped by image (as its data loader makes them): sort them,
  # stably, so each image keeps its row order (jaxtal's slot order).
  rows = torch.as_tensor(rows[np.argsort(rows[:, 0], kind="stable")])
  batch = {"batch_idx": rows[:, 0], "cls": rows[:, 1:2], "bboxes": rows[:, 2:7]}
  total, weights, fg_mask, gt_index = reference.run_observed(crit, preds, batch)
  parts = total.numpy() / b
  return dict(
      total=float(total.sum()),
      box=float(parts[0]),
      cls=float(parts[1]),
      dfl=float(parts[2]),
      angle=float(parts[3]),
      grads=[f.grad.numpy().copy() for f in feats],
      angle_grads=[a.grad.numpy().copy() for a in angles],
      weights=weights,
      fg_mask=fg_mask,
      gt_index=gt_index,
  )
