"""Runs the pinned reference (Ultralytics 8.4.190, PyTorch) on NumPy inputs, for instance segmentation.

The segmentation counterpart of ``reference.py`` (whose import rules, version pin, criterion
builder, head outputs, observed run and ``stable_ties`` it reuses): ``v8SegmentationLoss`` as a
black box. We build its inputs, call it and read back NumPy arrays. Importing this module
requires ``torch`` and ``ultralytics`` (the ``parity`` extra).
"""

from __future__ import annotations

import numpy as np

from support import reference  # (sets the environment, restores NumPy's print options, pins the version)
from support.reference import REFERENCE_VERSION, VERSION  # noqa: F401

_print_options = np.get_printoptions()
import torch  # noqa: E402
from ultralytics.utils.loss import v8SegmentationLoss  # noqa: E402

np.set_printoptions(**_print_options)


def _leaf(x) -> torch.Tensor:
  return torch.tensor(np.asarray(x, np.float32), requires_grad=True)


def _grad(t: torch.Tensor) -> np.ndarray:
  return np.zeros(tuple(t.shape), np.float32) if t.grad is None else t.grad.numpy().copy()


def loss(feats_nchw, coefs_nchw, proto_nchw, label_rows, masks, *, overlap_mask, stable=False, box=7.5, cls=0.5,
         dfl=1.5, **settings):
  """Reference segmentation loss and its gradients w.r.t. the head maps, coefficient maps and prototypes.

  Args:
    feats_nchw: list of ``(b, 4R + nc, H, W)`` float32 head maps.
    coefs_nchw: list of ``(b, nm, H, W)`` float32 mask coefficients, one per level.
    proto_nchw: ``(b, nm, mh, mw)`` float32 prototypes.
    label_rows: ``(n, 6)`` YOLO rows ``[batch_idx, cls, cx, cy, w, h]`` (normalised), grouped by image.
    masks: with ``overlap_mask`` a ``(b, mh', mw')`` index map (value ``j + 1`` marks the image's
      ``j``-th row); otherwise ``(n, mh', mw')`` binary masks in the rows' order.
    overlap_mask: the model's ``overlap_mask`` setting (which of the two mask forms ``masks`` is).
    stable: run the reference under ``reference.stable_ties()`` (top-k ties to the lower index).
    box, cls, dfl: the gains (the mask term's gain is ``box``).
    settings: ``num_classes, strides, reg_max, topk, topk2, alpha, beta, min_box_side,
      class_weights`` (:func:`reference.criterion`).

  Returns:
    ``dict(total, box, seg, cls, dfl, grads=[per-level NCHW], coef_grads=[per-level NCHW],
    proto_grad, weights, fg_mask, gt_index)``: the last three are the assignment inside the loss
    (:func:`reference.run_observed`).
  """
  crit = reference.criterion(v8SegmentationLoss, box=box, cls=cls, dfl=dfl, overlap_mask=bool(overlap_mask), **settings)
  feats, preds = reference.head_outputs(feats_nchw, settings.get("reg_max", 16), settings["num_classes"])
  coefs, proto = [_leaf(c) for c in coefs_nchw], _leaf(proto_nchw)
  b, nm = proto.shape[:2]
  preds["mask_coefficient"] = torch.cat([c.reshape(b, nm, -1) for c in coefs], -1)
  preds["proto"] = proto
  rows = torch.as_tensor(np.asarray(label_rows, np.float32).reshape(-1, 6))
  batch = {"batch_idx": rows[:, 0], "cls": rows[:, 1:2], "bboxes": rows[:, 2:6]}
  batch["masks"] = torch.as_tensor(np.asarray(masks))
  total, weights, fg_mask, gt_index = reference.run_observed(crit, preds, batch, stable=stable)
  parts = total.numpy() / b  # box, seg, cls, dfl, semantic (0 without a semantic head)
  return dict(
      total=float(total.sum()),
      **{name: float(p) for name, p in zip(("box", "seg", "cls", "dfl"), parts)},
      grads=[_grad(f) for f in feats],
      coef_grads=[_grad(c) for c in coefs],
      proto_grad=_grad(proto),
      weights=weights,
      fg_mask=fg_mask,
      gt_index=gt_index,
  )
