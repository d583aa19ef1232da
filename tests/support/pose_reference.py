"""Runs the pinned reference (Ultralytics 8.4.190, PyTorch) on NumPy inputs, for pose.

The pose counterpart of ``reference.py`` (whose import rules, version pin, stand-in model,
criterion builder, head outputs and ``stable_ties`` it reuses): ``v8PoseLoss`` as a black box. We build its
inputs, call it and read back NumPy arrays. Importing this module requires ``torch`` and
``ultralytics`` (the ``parity`` extra).
"""

from __future__ import annotations

import numpy as np

from support import reference  # (sets the environment, restores NumPy's print options, pins the version)
from support.reference import REFERENCE_VERSION, VERSION  # noqa: F401

_print_options = np.get_printoptions()
import torch  # noqa: E402
from ultralytics.utils.loss import v8PoseLoss  # noqa: E402

np.set_printoptions(**_print_options)


def loss(feats_nchw, kpts_nchw, label_rows, keypoints, *, kpt_shape, sigmas=None, stable=False, box=7.5, cls=0.5,
         dfl=1.5, pose=12.0, kobj=1.0, **settings):
  """Reference pose loss and its gradients w.r.t. every NCHW head map and keypoint map.

  Args:
    feats_nchw: list of ``(b, 4R + nc, H, W)`` float32 arrays.
    kpts_nchw: list of ``(b, K * D, H, W)`` float32 raw keypoint maps (channel ``k * D + d``).
    label_rows: ``(n, 6)`` rows ``[batch_idx, cls, cx, cy, w, h]`` (normalised), any order.
    keypoints: ``(n, K, Dg)`` keypoints of the rows, ``x, y`` normalised, ``Dg`` 2 or 3.
    kpt_shape: ``(K, D)`` of the head.
    sigmas: ``None`` (the reference's defaults) or ``K`` values set as the model's ``kpt_oks_sigmas``.
    stable: run the reference under ``reference.stable_ties()`` (top-k ties to the lower index).
    box, cls, dfl, pose, kobj: the gains.
    settings: ``num_classes, strides, reg_max, topk, topk2, alpha, beta, min_box_side,
      class_weights`` (:func:`reference.criterion`).

  Returns:
    ``dict(total, box, pose, kobj, cls, dfl, grads=[per-level NCHW], kpt_grads=[per-level NCHW],
    weights, fg_mask, gt_index)``: the last three are the assignment inside the loss
    (:func:`reference.run_observed`).
  """
  model_attrs = {} if sigmas is None else {"kpt_oks_sigmas": torch.as_tensor(np.asarray(sigmas, np.float32))}
  crit = reference.criterion(
      v8PoseLoss, head_attrs={"kpt_shape": [int(kpt_shape[0]), int(kpt_shape[1])]}, model_attrs=model_attrs,
      box=box, cls=cls, dfl=dfl, pose=pose, kobj=kobj, **settings,
  )  # kpt_shape a list, as a model's yaml gives it (the reference compares it with [17, 3])
  feats, preds = reference.head_outputs(feats_nchw, settings.get("reg_max", 16), settings["num_classes"])
  kpts = [torch.tensor(np.asarray(k, np.float32), requires_grad=True) for k in kpts_nchw]
  b = feats[0].shape[0]
  preds["kpts"] = torch.cat([k.reshape(b, k.shape[1], -1) for k in kpts], -1)
  rows = np.asarray(label_rows, np.float32).reshape(-1, 6)
  kp = np.asarray(keypoints, np.float32)
  kp = kp.reshape(rows.shape[0], int(kpt_shape[0]), kp.shape[-1])
  # Its preprocessing expects rows grouped by image (as its data loader makes them): sort them,
  # stably, so each image keeps its row order (jaxtal's slot order).
  order = np.argsort(rows[:, 0], kind="stable")
  rows, kp = torch.as_tensor(rows[order]), torch.as_tensor(kp[order])
  batch = {"batch_idx": rows[:, 0], "cls": rows[:, 1:2], "bboxes": rows[:, 2:6], "keypoints": kp}
  total, weights, fg_mask, gt_index = reference.run_observed(crit, preds, batch, stable=stable)
  parts = total.numpy() / b
  return dict(
      total=float(total.sum()),
      **{name: float(p) for name, p in zip(("box", "pose", "kobj", "cls", "dfl"), parts)},
      grads=[f.grad.numpy().copy() for f in feats],
      kpt_grads=[k.grad.numpy().copy() for k in kpts],
      weights=weights,
      fg_mask=fg_mask,
      gt_index=gt_index,
  )
