"""Deterministic segmentation parity cases shared by the golden fixtures and the live parity tests.

The segmentation counterpart of ``cases.py`` (whose helpers it imports: seeding, label rows,
head maps, fixture files). NumPy only (plus jaxtal's host-side packers); never imports torch.

A case is ``dict(name, inputs, config)`` with ``inputs``: ``feats``, a list of NCHW ``(b, 4R + nc,
H, W)`` float32 head maps; ``coefs``, a list of ``(b, nm, H, W)`` float32 mask coefficients;
``proto (b, nm, 16, 16)`` float32 prototypes (a 64 px input, prototypes at stride 4);
``label_rows (n, 6)`` grouped by image; ``masks``: the reference's mask input, a ``(b, mh, mw)``
index map (``overlap_mask``) or ``(n, mh, mw)`` binary masks in row order, at the prototypes'
resolution or another one. ``config``: ``num_classes, strides, reg_max, topk, topk2,
min_box_side, class_weights`` (keyword arguments of both losses), ``overlap_mask`` (the
reference's; jaxtal reads the form of ``gt.masks``), ``slot_dtype`` (jaxtal's per-slot masks:
``"bool"`` or ``"float32"``) and ``max_boxes``.

Fixtures are ``tests/fixtures/segment_<case>.npz`` written with ``cases.save_npz``: keys as
``cases.to_arrays`` writes them, plus ``input.coef<i>`` and ``ref.coef_grad<i>``. Their
reference outputs come from the reference with stable top-k ties (``reference.stable_ties``),
the order jaxtal uses; ``ties`` is the case where the native reference's order changes the loss.
"""

from __future__ import annotations

import numpy as np

from support import cases
import jaxtal


SEGMENT_CASES = (
    "overlap", "per_instance", "upsampled", "downsampled", "empty_images", "empty_batch", "reg_max1", "ties"
)
# Cases whose foreground differs between the native reference and the stable-tie one.
NATIVE_TIES_DIFFER = ("ties",)

_IMAGE, _PROTO = 64, 16
# Per-level lists stored as numbered arrays: key -> (group, prefix).
_LISTS = {"coefs": ("input", "coef"), "coef_grads": ("ref", "coef_grad")}


def instance_masks(rng, rows: np.ndarray, image: int, mask_hw) -> np.ndarray:
  """``(n, mh, mw)`` uint8 masks of the rows: an ellipse about each box (reaching a little past
  it, so the crop matters) and a few stray pixels anywhere; every fifth mask is left empty."""
  mh, mw = mask_hw
  ys, xs = np.meshgrid(np.arange(mh) + 0.5, np.arange(mw) + 0.5, indexing="ij")
  out = np.zeros((len(rows), mh, mw), np.uint8)
  for r, row in enumerate(rows):
    if r % 5 == 4:
      continue
    cx, cy, w, h = row[2] * mw, row[3] * mh, row[4] * mw, row[5] * mh
    cx, cy = cx + rng.uniform(-0.15, 0.15) * w, cy + rng.uniform(-0.15, 0.15) * h
    rx, ry = max(rng.uniform(0.3, 0.62) * w, 0.6), max(rng.uniform(0.3, 0.62) * h, 0.6)
    out[r] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    out[r][rng.uniform(size=(mh, mw)) < 0.02] = 1
  return out


def slot_masks(instance: np.ndarray, batch_idx: np.ndarray, batch: int, max_boxes: int, dtype) -> np.ndarray:
  """``(b, M, mh, mw)`` per-slot masks of ``(n, mh, mw)`` instance masks: slot ``j`` of image ``i``
  is image ``i``'s ``j``-th row, as :func:`jaxtal.pack_labels` numbers them."""
  out = np.zeros((batch, max_boxes) + instance.shape[1:], dtype)
  seen = np.zeros(batch, int)
  for m, i in zip(instance, np.asarray(batch_idx).astype(int)):
    out[i, seen[i]] = m
    seen[i] += 1
  return out


def _tiny_boxes(maps, image: int, reg_max: int) -> None:
  """Image 0 predicts a near-zero box at every anchor (all mass on bin 0), in place: its GTs' overlaps are 0
  at nearly every candidate, so their top-k lists fill with tied zero-metric anchors."""
  for f in maps:
    f[0, : 4 * reg_max] = -8.0
    f[0, 0 : 4 * reg_max : reg_max] = 8.0


def loss_case(name: str) -> dict:
  """Builds the segmentation case ``name`` (one of :data:`SEGMENT_CASES`)."""
  if name not in SEGMENT_CASES:
    raise KeyError(f"unknown segmentation case {name!r}; expected one of {SEGMENT_CASES}")
  rng = cases.case_rng("segment_" + name, salt=3)
  strides = (8, 16, 32)
  cfg = dict(num_classes=3, strides=strides, reg_max=16, topk=10, topk2=None, min_box_side=0.0, class_weights=None,
             overlap_mask=True, slot_dtype="float32")
  batch, nm, mask_hw = 2, 4, (_PROTO, _PROTO)
  counts, sides, pairs = (4, 3), (10, 44), True
  if name in cases.SHARED_VARIANTS:
    batch, counts = cases.shared_variant(name, cfg, batch, counts)
  elif name == "overlap":
    cfg.update(min_box_side=float(strides[1]))
  elif name == "per_instance":
    cfg.update(overlap_mask=False)
    counts, nm = (3, 5), 6
  elif name == "upsampled":
    mask_hw = (32, 32)
  elif name == "downsampled":
    cfg.update(overlap_mask=False, slot_dtype="bool")
    mask_hw = (12, 10)
  elif name == "ties":
    counts, sides, pairs = (2, 3), (30, 56), False
  rows = cases.random_rows(rng, counts, cfg["num_classes"], _IMAGE, sides, clusters=True, pairs=pairs)
  cfg["max_boxes"] = int(max(max(counts), 1) + 2)  # M above the largest count: padding is exercised
  maps = cases.head_maps(
      rng, rows, batch, cfg["num_classes"], _IMAGE, strides, cfg["reg_max"], min_side=cfg["min_box_side"]
  )
  if name == "ties":
    _tiny_boxes(maps, _IMAGE, cfg["reg_max"])
  coefs = [rng.normal(0.0, 1.0, (batch, nm, h, w)).astype(np.float32) for h, w in cases.level_shapes(_IMAGE, strides)]
  proto = rng.normal(0.0, 1.0, (batch, nm, _PROTO, _PROTO)).astype(np.float32)
  inst = instance_masks(rng, rows, _IMAGE, mask_hw)
  masks = jaxtal.pack_masks(inst, rows[:, 0], batch, cfg["max_boxes"]) if cfg["overlap_mask"] else inst
  inputs = dict(feats=maps, coefs=coefs, proto=proto, label_rows=rows, masks=masks)
  return dict(name=name, inputs=inputs, config=cfg)


def split_config(config: dict) -> tuple[dict, dict, int]:
  """Case config -> (keyword arguments of :func:`jaxtal.segment_loss`, of ``segment_reference.loss``, ``max_boxes``)."""
  kwargs, m = cases.split_loss_config(config)
  ref_kwargs = {k: v for k, v in kwargs.items() if k != "slot_dtype"}
  return {k: v for k, v in ref_kwargs.items() if k != "overlap_mask"}, ref_kwargs, m


def ground_truth(case: dict) -> jaxtal.GroundTruth:
  """jaxtal's ground truth of a case: packed rows, and the index map or per-slot masks."""
  x, cfg = case["inputs"], case["config"]
  b = x["feats"][0].shape[0]
  m = cfg["max_boxes"]
  gt = jaxtal.pack_labels(x["label_rows"], b, m, _IMAGE)
  if cfg["overlap_mask"]:
    return gt._replace(masks=x["masks"])
  return gt._replace(masks=slot_masks(x["masks"], x["label_rows"][:, 0], b, m, np.dtype(cfg["slot_dtype"])))


def reference_loss(ref_module, case: dict, *, stable: bool) -> dict:
  """``segment_reference.loss`` on a case, with the native top-k order or stable ties."""
  _, kwargs, _ = split_config(case["config"])
  x = case["inputs"]
  return ref_module.loss(x["feats"], x["coefs"], x["proto"], x["label_rows"], x["masks"], stable=stable, **kwargs)


# ----------------------------------------------------------------------------- fixture files


def fixture_path(name: str) -> str:
  return cases.fixture_path("segment", name)


def to_arrays(case: dict, ref: dict, version: str) -> dict[str, np.ndarray]:
  """``cases.to_arrays`` with the per-level coefficient maps and their gradients as numbered keys."""
  groups = {"input": dict(case["inputs"]), "ref": dict(ref)}
  for key, (group, prefix) in _LISTS.items():
    for i, x in enumerate(groups[group].pop(key, ())):
      groups[group][f"{prefix}{i}"] = np.asarray(x, np.float32)
  return cases.to_arrays(dict(case, inputs=groups["input"]), groups["ref"], version)


def load_fixture(name: str) -> tuple[dict, dict, str]:
  """Reads ``tests/fixtures/segment_<name>.npz`` as ``(case, ref, version)``, ``case`` as :func:`loss_case` makes it."""
  case, ref, version = cases.load_fixture("segment", name)
  groups = {"input": case["inputs"], "ref": ref}
  for key, (group, prefix) in _LISTS.items():
    groups[group][key] = cases.numbered(groups[group], prefix)
  ref["seg"] = float(ref["seg"])
  case["config"]["strides"] = tuple(case["config"]["strides"])
  return case, ref, version
