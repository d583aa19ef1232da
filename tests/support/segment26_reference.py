"""Runs the pinned reference (Ultralytics 8.4.190, PyTorch) on NumPy inputs, for YOLO26 segmentation.

The YOLO26 counterpart of ``segment_reference.py`` (and, like it, of ``reference.py``, whose import
rules, version pin, criterion builder, head outputs, observed run and ``stable_ties`` it reuses):
``SegmentLoss26`` alone and under ``E2ELoss``, and ``v8SegmentationLoss`` with a semantic head (the
prototypes handed over as a ``(proto, semantic)`` tuple, as YOLO26's ``Proto26`` does in training),
as black boxes. We build their inputs, call them and read back NumPy arrays. Importing this module
requires ``torch`` and ``ultralytics`` (the ``parity`` extra).
"""

from __future__ import annotations

import contextlib

import numpy as np

from support import reference  # (sets the environment, restores NumPy's print options, pins the version)
from support.reference import REFERENCE_VERSION, VERSION  # noqa: F401

_print_options = np.get_printoptions()
import torch  # noqa: E402
from ultralytics.utils.loss import E2ELoss, SegmentLoss26, v8SegmentationLoss  # noqa: E402

np.set_printoptions(**_print_options)

PARTS = ("box", "seg", "cls", "dfl", "sem")


def _leaf(x) -> torch.Tensor:
  return torch.tensor(np.asarray(x, np.float32), requires_grad=True)


def _grad(t: torch.Tensor) -> np.ndarray:
  return np.zeros(tuple(t.shape), np.float32) if t.grad is None else t.grad.numpy().copy()


@contextlib.contextmanager
def stable_ties():
  """``reference.stable_ties`` and, in the same block, stable ``Tensor.topk``: the mask-aware assigner
  short-lists each GT's ``3 * topk`` pairs with the tensor method, which ``reference.stable_ties`` (a
  patch of the ``torch`` module its assigners see) does not reach. Ties then go to the lower anchor
  index there too, jaxtal's order."""
  original = torch.Tensor.topk

  def topk(self, k, dim=-1, largest=True, sorted=True):  # noqa: A002  (torch's keyword)
    values, indices = torch.sort(self, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))

  torch.Tensor.topk = topk
  try:
    with reference.stable_ties():
      yield
  finally:
    torch.Tensor.topk = original


def _branch(feats_nchw, coefs_nchw, proto_nchw, semantic_nchw, reg_max: int, num_classes: int):
  """Leaf tensors and the training dict of a Segment26 head: ``(leaves, preds)``, ``leaves`` =
  ``(feats, coefs, proto, semantic or None)``; ``preds["proto"]`` is ``(proto, semantic)`` with a semantic head."""
  feats, preds = reference.head_outputs(feats_nchw, reg_max, num_classes)
  coefs, proto = [_leaf(c) for c in coefs_nchw], _leaf(proto_nchw)
  semantic = None if semantic_nchw is None else _leaf(semantic_nchw)
  b, nm = proto.shape[:2]
  preds["mask_coefficient"] = torch.cat([c.reshape(b, nm, -1) for c in coefs], -1)
  preds["proto"] = proto if semantic is None else (proto, semantic)
  return (feats, coefs, proto, semantic), preds


def _batch(label_rows, masks, sem_masks) -> dict:
  rows = torch.as_tensor(np.asarray(label_rows, np.float32).reshape(-1, 6))
  batch = {"batch_idx": rows[:, 0], "cls": rows[:, 1:2], "bboxes": rows[:, 2:6], "masks": torch.as_tensor(np.asarray(masks))}
  if sem_masks is not None:
    batch["sem_masks"] = torch.as_tensor(np.asarray(sem_masks, np.float32))
  return batch


def _grads(leaves) -> dict:
  feats, coefs, proto, semantic = leaves
  out = dict(grads=[_grad(f) for f in feats], coef_grads=[_grad(c) for c in coefs], proto_grad=_grad(proto))
  if semantic is not None:
    out["sem_grad"] = _grad(semantic)
  return out


def loss(feats_nchw, coefs_nchw, proto_nchw, semantic_nchw, label_rows, masks, sem_masks, *, overlap_mask, v8=False,
         stable=False, box=7.5, cls=0.5, dfl=1.5, **settings):
  """Reference ``SegmentLoss26`` (or, with ``v8``, ``v8SegmentationLoss``) and its gradients.

  Args:
    feats_nchw: list of ``(b, 4R + nc, H, W)`` float32 head maps.
    coefs_nchw: list of ``(b, nm, H, W)`` float32 mask coefficients, one per level.
    proto_nchw: ``(b, nm, mh, mw)`` float32 prototypes.
    semantic_nchw: ``(b, nc, sh, sw)`` float32 semantic logits, or None (no semantic head).
    label_rows: ``(n, 6)`` YOLO rows ``[batch_idx, cls, cx, cy, w, h]`` (normalised), grouped by image.
    masks: with ``overlap_mask`` a ``(b, mh', mw')`` index map (value ``j + 1`` marks the image's
      ``j``-th row); otherwise ``(n, mh', mw')`` binary masks in the rows' order.
    sem_masks: ``(b, mh', mw')`` class map as the reference's data pipeline builds it (read only with
      a semantic head).
    overlap_mask: the model's ``overlap_mask`` setting (which of the two mask forms ``masks`` is).
    v8: run ``v8SegmentationLoss`` (the YOLOv8 loss, a semantic head as YOLOE-26 has) instead.
    stable: top-k ties to the lower anchor index, in the short list too (:func:`stable_ties`).
    box, cls, dfl: the gains (the mask and semantic terms' gain is ``box``).
    settings: ``num_classes, strides, reg_max, topk, topk2, alpha, beta, min_box_side,
      class_weights`` (:func:`reference.criterion`).

  Returns:
    ``dict(total, box, seg, cls, dfl, sem, grads=[per-level NCHW], coef_grads=[per-level NCHW],
    proto_grad, sem_grad (with a semantic head), weights, fg_mask, gt_index)``: the last three are
    the assignment inside the loss (:func:`reference.run_observed`).
  """
  loss_class = v8SegmentationLoss if v8 else SegmentLoss26
  crit = reference.criterion(loss_class, box=box, cls=cls, dfl=dfl, overlap_mask=bool(overlap_mask), **settings)
  leaves, preds = _branch(feats_nchw, coefs_nchw, proto_nchw, semantic_nchw, settings.get("reg_max", 16), settings["num_classes"])
  b = leaves[0][0].shape[0]
  batch = _batch(label_rows, masks, sem_masks)
  with stable_ties() if stable else contextlib.nullcontext():
    total, weights, fg_mask, gt_index = reference.run_observed(crit, preds, batch)
  parts = total.numpy() / b
  return dict(
      total=float(total.sum()),
      **{name: float(p) for name, p in zip(PARTS, parts)},
      **_grads(leaves),
      weights=weights,
      fg_mask=fg_mask,
      gt_index=gt_index,
  )


def e2e_loss(branches, label_rows, masks, sem_masks, *, overlap_mask, epoch=0, epochs=10, stable=False, box=7.5,
             cls=0.5, dfl=1.5, min_box_side=0.0, **settings):
  """Reference ``E2ELoss(model, SegmentLoss26)`` (one-to-many ``topk = 10``, one-to-one ``topk = 7, topk2 = 1``).

  ``branches``: two ``(feats, coefs, proto, semantic)`` tuples of NCHW arrays, the one-to-many branch
  first (separate leaves: the model hands the one-to-one branch detached features and prototypes).
  ``epoch`` as ``reference.e2e_loss``. Returns ``dict(total, box, seg, cls, dfl, sem, o2m=..., o2o=...)``:
  the one-to-one branch's parts (what the reference reports) and each branch's gradients as :func:`loss`
  names them.
  """
  model = reference.Model(
      settings["num_classes"], settings.get("reg_max", 16), list(settings["strides"]), dict(box=box, cls=cls, dfl=dfl),
      settings.get("class_weights"),
  )
  model.args.epochs, model.args.overlap_mask = epochs, bool(overlap_mask)
  crit = E2ELoss(model, SegmentLoss26)
  for c in (crit.one2many, crit.one2one):
    c.assigner.stride_val = float(min_box_side)
  for _ in range(epoch):
    crit.update()
  runs = [_branch(*br, settings.get("reg_max", 16), settings["num_classes"]) for br in branches]
  batch = _batch(label_rows, masks, sem_masks)
  with stable_ties() if stable else contextlib.nullcontext():
    total, items = crit({"one2many": runs[0][1], "one2one": runs[1][1]}, batch)
  total.sum().backward()
  return dict(
      total=float(total.detach().sum()),
      **{name: float(v) for name, v in zip(PARTS, items.values())},
      o2m=_grads(runs[0][0]),
      o2o=_grads(runs[1][0]),
  )
