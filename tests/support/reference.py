"""Runs the pinned reference (Ultralytics 8.4.190, PyTorch) on NumPy inputs.

Used only by tests (live parity) and by ``make_fixtures.py``; the reference is a black
box here: we build its inputs, call its public classes and read back NumPy arrays.
Importing this module requires ``torch`` and ``ultralytics`` (the ``parity`` extra).
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import numpy as np

# Importing ultralytics changes NumPy's global print options (a float formatter, linewidth 320);
# restore them so tests that read formatted arrays behave the same in any order.
_print_options = np.get_printoptions()
import torch  # noqa: E402
import ultralytics  # noqa: E402
from ultralytics.nn.modules.block import RealNVP  # noqa: E402
from ultralytics.utils.loss import RLE_WEIGHT as _RLE_WEIGHT  # noqa: E402
from ultralytics.utils.loss import E2EDetectLoss, E2ELoss, v8DetectionLoss  # noqa: E402
from ultralytics.utils.tal import TaskAlignedAssigner  # noqa: E402

np.set_printoptions(**_print_options)
import ultralytics.utils.tal as _tal  # noqa: E402

REFERENCE_VERSION = "8.4.190"
VERSION = ultralytics.__version__


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
  """Reference assignment. Shapes as jaxtal's; returns a dict of NumPy arrays."""
  nc = pred_scores.shape[-1]
  assigner = TaskAlignedAssigner(topk=topk, num_classes=nc, alpha=alpha, beta=beta, eps=eps, topk2=topk2)
  assigner.stride_val = float(min_box_side)  # the side floor of its in-box test
  t = lambda x, dt=torch.float32: torch.as_tensor(np.array(x)).to(dt)  # a writable copy
  labels, boxes, scores, fg, gt_idx = assigner(
      t(pred_scores),
      t(pred_boxes),
      t(anchor_points),
      t(gt_labels)[..., None],
      t(gt_boxes),
      t(gt_mask)[..., None],
  )
  return dict(
      labels=labels.numpy().astype(np.int32),
      boxes=boxes.numpy().astype(np.float32),
      scores=scores.numpy().astype(np.float32),
      fg_mask=fg.numpy().astype(bool),
      gt_index=gt_idx.numpy().astype(np.int32),
  )


def _stable_topk(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002  (torch.topk's keyword)
  values, indices = torch.sort(x, dim=dim, descending=largest, stable=True)
  return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


class _StableTopkTorch:
  """The ``torch`` module as the reference's assigners see it inside :func:`stable_ties`."""

  topk = staticmethod(_stable_topk)

  def __getattr__(self, name):
    return getattr(torch, name)


@contextlib.contextmanager
def stable_ties():
  """Within the block, the reference's assigners break top-k ties towards the lower anchor index.

  ``torch.topk`` orders tied values in no documented way; jaxtal's ``lax.top_k`` puts the lower
  index first, which is one legal order of the same algorithm. Losses that count every
  foreground anchor (pose, segmentation) see the difference when an image has tied zero-metric
  candidates, so their parity is tested against both the native and this stable reference.
  Only the assigners' module sees the stable form (the rest of torch is untouched).
  """
  original = _tal.torch
  _tal.torch = _StableTopkTorch()
  try:
    yield
  finally:
    _tal.torch = original


class _Head(torch.nn.Module):
  def __init__(self, nc, reg_max, strides):
    super().__init__()
    self.nc, self.reg_max = nc, reg_max
    self.stride = torch.tensor(strides, dtype=torch.float32)


class Model(torch.nn.Module):
  """The attributes v8DetectionLoss reads from a model, and nothing else."""

  def __init__(self, nc, reg_max, strides, gains, class_weights):
    super().__init__()
    self.dummy = torch.nn.Parameter(torch.zeros(1))
    self.model = torch.nn.ModuleList([_Head(nc, reg_max, strides)])
    self.args = SimpleNamespace(**gains)
    if class_weights is not None:
      self.class_weights = torch.as_tensor(np.asarray(class_weights, np.float32))


def head_outputs(feats_nchw, reg_max: int, num_classes: int):
  """``(leaf tensors, preds)``: NCHW maps as leaf tensors and the dict a Detect head hands its loss
  in training (``boxes (b, 4R, A)``, ``scores (b, nc, A)``, ``feats``)."""
  feats = [torch.tensor(np.asarray(f, np.float32), requires_grad=True) for f in feats_nchw]
  b = feats[0].shape[0]
  preds = {
      "boxes": torch.cat([f[:, : 4 * reg_max].reshape(b, 4 * reg_max, -1) for f in feats], -1),
      "scores": torch.cat([f[:, 4 * reg_max :].reshape(b, num_classes, -1) for f in feats], -1),
      "feats": feats,
  }
  return feats, preds


def loss(
    feats_nchw,
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
    min_box_side=0.0,
    class_weights=None,
):
  """Reference loss and its gradient w.r.t. every NCHW head map.

  Args:
    feats_nchw: list of ``(b, 4R + nc, H, W)`` float32 arrays.
    label_rows: ``(n, 6)`` YOLO rows ``[batch_idx, cls, cx, cy, w, h]`` (normalised).

  Returns:
    ``dict(total, box, cls, dfl, grads=[per-level NCHW gradients])``.
  """
  model = Model(num_classes, reg_max, list(strides), dict(box=box, cls=cls, dfl=dfl), class_weights)
  crit = v8DetectionLoss(model, tal_topk=topk, tal_topk2=topk2)
  crit.assigner.alpha, crit.assigner.beta = alpha, beta
  crit.assigner.stride_val = float(min_box_side)
  feats, preds = head_outputs(feats_nchw, reg_max, num_classes)
  b = feats[0].shape[0]
  rows = torch.as_tensor(np.asarray(label_rows, np.float32).reshape(-1, 6))
  batch = {"batch_idx": rows[:, 0], "cls": rows[:, 1:2], "bboxes": rows[:, 2:6]}
  total, items = crit(preds, batch)
  total.sum().backward()
  parts = total.detach().numpy() / b
  return dict(
      total=float(total.detach().sum()),
      box=float(parts[0]),
      cls=float(parts[1]),
      dfl=float(parts[2]),
      grads=[f.grad.numpy().copy() for f in feats],
  )


def e2e_loss(feats_o2m, feats_o2o, label_rows, *, num_classes, strides, reg_max=16, epoch=0, epochs=10,
             yolov10=False, box=7.5, cls=0.5, dfl=1.5, min_box_side=0.0, class_weights=None):
  """Reference end-to-end loss (``E2ELoss``, or ``E2EDetectLoss`` with ``yolov10``) and its gradients.

  ``epoch`` is the 0-based index of the epoch being trained: the criterion is advanced as
  Ultralytics' trainer does (one ``update()`` after each finished epoch).

  Returns ``dict(total, box, cls, dfl, grads=[...], grads_o2o=[...])``: per-level NCHW gradients of
  the one-to-many and the one-to-one maps.
  """
  model = Model(num_classes, reg_max, list(strides), dict(box=box, cls=cls, dfl=dfl), class_weights)
  model.args.epochs = epochs
  crit = E2EDetectLoss(model) if yolov10 else E2ELoss(model)
  for c in (crit.one2many, crit.one2one):
    c.assigner.stride_val = float(min_box_side)
  if not yolov10:
    for _ in range(epoch):
      crit.update()
  branches = [head_outputs(maps, reg_max, num_classes) for maps in (feats_o2m, feats_o2o)]
  rows = torch.as_tensor(np.asarray(label_rows, np.float32).reshape(-1, 6))
  batch = {"batch_idx": rows[:, 0], "cls": rows[:, 1:2], "bboxes": rows[:, 2:6]}
  total, items = crit({"one2many": branches[0][1], "one2one": branches[1][1]}, batch)
  total.sum().backward()
  names = list(items)
  return dict(
      total=float(total.detach().sum()),
      box=float(items[names[0]]),
      cls=float(items[names[1]]),
      dfl=float(items[names[2]]),
      grads=[f.grad.numpy().copy() for f in branches[0][0]],
      grads_o2o=[f.grad.numpy().copy() for f in branches[1][0]],
  )


def criterion(loss_class, *, num_classes, strides, reg_max=16, topk=10, topk2=None, alpha=0.5, beta=6.0,
              min_box_side=0.0, class_weights=None, head_attrs=None, model_attrs=None, **gains):
  """A reference criterion (``v8DetectionLoss`` or a task subclass) on the stand-in :class:`Model`,
  with the assigner's settings applied; ``head_attrs`` / ``model_attrs`` are set on the head /
  model before the criterion reads them (e.g. ``kpt_shape``, ``kpt_oks_sigmas``); ``gains`` are
  the hyperparameters it reads (``box``, ``cls``, ``dfl``, and the task's)."""
  model = Model(num_classes, reg_max, list(strides), gains, class_weights)
  for name, value in (head_attrs or {}).items():
    setattr(model.model[-1], name, value)
  for name, value in (model_attrs or {}).items():
    setattr(model, name, value)
  crit = loss_class(model, tal_topk=topk, tal_topk2=topk2)
  crit.assigner.alpha, crit.assigner.beta = alpha, beta
  if min_box_side is not None:  # None: the reference's own default (strides[1])
    crit.assigner.stride_val = float(min_box_side)  # the side floor of its in-box test
  return crit


def run_observed(crit, preds, batch, *, stable=False):
  """Runs ``crit(preds, batch)`` and the backward pass of its total (optionally under :func:`stable_ties`).

  Returns ``(total, weights, fg_mask, gt_index)``: the loss tensor (detached) and the assignment
  inside the loss, read from its assigner's output through a forward hook: target-score sums
  ``(b, A)`` float32, foreground ``(b, A)`` bool and owner GT slot ``(b, A)`` int32.
  """
  seen = []
  hook = crit.assigner.register_forward_hook(lambda module, args, out: seen.append([o.detach().clone() for o in out]))
  try:
    with stable_ties() if stable else contextlib.nullcontext():
      total, _ = crit(preds, batch)
  finally:
    hook.remove()
  total.sum().backward()
  _, _, scores, fg, gt_idx = seen[-1]
  return (
      total.detach(),
      scores.sum(-1).numpy().astype(np.float32),
      fg.numpy().astype(bool),
      gt_idx.numpy().astype(np.int32),
  )


# The COCO-17 per-keypoint weights of the RLE term, as the reference's pose loss imports them.
RLE_WEIGHT = np.asarray(_RLE_WEIGHT, np.float32)


def flow_state_dict(seed: int = 0) -> dict:
  """A freshly initialised reference ``RealNVP``'s state dict (``torch.manual_seed(seed)``) as NumPy float32 arrays."""
  torch.manual_seed(seed)
  return {k: v.numpy().copy() for k, v in RealNVP().state_dict().items()}


def flow_log_prob(state_dict, x, cotangent=None):
  """Reference ``RealNVP.log_prob`` of ``x (N, 2)`` with the weights of ``state_dict`` (loaded strictly),
  and the gradients of ``sum(cotangent * log_prob)`` (``cotangent (N,)``, default ones).

  Returns ``dict(log_prob (N,), grad_x (N, 2), grads={state-dict key: gradient}, flow=the module)``.
  """
  flow = RealNVP()
  flow.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()})
  xt = torch.tensor(np.asarray(x, np.float32), requires_grad=True)
  log_prob = flow.log_prob(xt)
  w = torch.ones_like(log_prob) if cotangent is None else torch.as_tensor(np.asarray(cotangent, np.float32))
  (log_prob * w).sum().backward()
  return dict(
      log_prob=log_prob.detach().numpy().copy(),
      grad_x=xt.grad.numpy().copy(),
      grads={n: p.grad.numpy().copy() for n, p in flow.named_parameters()},
      flow=flow,
  )
