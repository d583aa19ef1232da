"""Deterministic YOLO26 segmentation parity cases shared by the golden fixtures and the live parity tests.

The YOLO26 counterpart of ``segment_cases.py`` (whose mask builders and jaxtal ground truth it
reuses; ``cases.py``'s seeding, label rows, head maps and fixture files). NumPy only (plus jaxtal's
host-side packers); never imports torch.

A case is ``dict(name, inputs, config)`` with ``inputs``: ``feats`` (NCHW ``(b, 4R + nc, H, W)``
head maps per level), ``coefs`` (``(b, nm, H, W)`` per level), ``proto (b, nm, 16, 16)`` (a 64 px
input, prototypes at stride 4), ``semantic (b, nc, 8, 8)`` (logits at stride 8, as ``Proto26``
makes them; absent in ``no_semantic``), ``label_rows (n, 6)`` grouped by image, ``masks`` (the
reference's mask input: a ``(b, mh, mw)`` index map with ``overlap_mask``, else ``(n, mh, mw)``
binary masks in row order) and ``sem_masks (b, mh, mw)``, the class map the reference's data
pipeline hands its loss (built here by its documented rule, :func:`sem_masks`; jaxtal derives its
own from the masks). End-to-end cases add the one-to-one branch's ``feats_o2o``, ``coefs_o2o``,
``proto_o2o`` and ``semantic_o2o`` (the same prototype and semantic values: the model hands that
branch a detached copy). ``config``: ``num_classes, strides, reg_max, topk, topk2, min_box_side,
class_weights`` (``min_box_side`` None: both defaults, ``strides[1]``; jaxtal gets None, the reference
its value),
``overlap_mask``, ``slot_dtype``, ``max_boxes``, ``loss`` (``"segment26"``: ``SegmentLoss26``;
``"v8"``: ``v8SegmentationLoss`` with a semantic head; ``"e2e"``: ``E2ELoss(model,
SegmentLoss26)``) and, end-to-end, ``epoch, epochs``.

Coefficients and prototypes are multiples of 1/8 (small ones), so every predicted mask logit
``coefs . proto`` is a multiple of 1/64 that float32 holds exactly: the assignment's binarised
masks (``logit > 0``) are then the same bits in both frameworks, whatever order either sums in.

Fixtures are ``tests/fixtures/segment26_<case>.npz``, written from the reference with stable
top-k ties, its short list included (``segment26_reference.stable_ties``); ``ties`` is the case
where the native order changes the result.
"""

from __future__ import annotations

import numpy as np

import jaxtal
from support import cases, segment_cases

CASES = (
    "overlap", "per_instance", "upsampled", "downsampled", "empty_masks", "full_masks", "empty_images", "empty_batch",
    "reg_max1", "no_semantic", "ties", "v8_overlap", "v8_per_instance", "e2e", "e2e_per_instance",
)
# Cases whose result differs between the native reference and the stable-tie one.
NATIVE_TIES_DIFFER = ("ties",)

IMAGE, PROTO, SEMANTIC = 64, 16, 8
# Per-level lists and per-branch dicts stored as numbered / prefixed arrays: key -> (group, prefix).
LISTS = {
    "coefs": ("input", "coef"), "coefs_o2o": ("input", "coef_o2o"), "coef_grads": ("ref", "coef_grad"),
}
BRANCHES = ("o2m", "o2o")


def quantised(x: np.ndarray) -> np.ndarray:
  """``x`` rounded to a multiple of 1/8, float32 (products and their sums stay exact in float32)."""
  return (np.round(np.asarray(x, np.float64) * 8) / 8).astype(np.float32)


def sem_masks(rows: np.ndarray, masks: np.ndarray, batch: int, overlap_mask: bool) -> np.ndarray:
  """``(b, mh, mw)`` float32 class map as Ultralytics 8.4.190's data pipeline builds ``batch["sem_masks"]``
  (``Format``): with an index map, the class of the instance the map names; with instance masks, the
  class of the smallest covering instance (area: its pixel count; the first instance on ties); 0 where
  nothing covers the pixel (the loss reads presence from the masks)."""
  hw = masks.shape[-2:]
  out = np.zeros((batch,) + tuple(hw), np.float32)
  img = rows[:, 0].astype(int)
  for i in range(batch):
    mine = np.flatnonzero(img == i)
    cls = rows[mine, 1]
    if overlap_mask:
      idx = masks[i].astype(int)
      out[i] = np.where(idx > 0, cls[np.clip(idx - 1, 0, max(len(cls) - 1, 0))] if len(cls) else 0, 0)
    elif len(mine):
      inst = masks[mine].astype(bool)
      area = inst.sum(axis=(1, 2))
      key = np.where(inst, area[:, None, None], area.max() + 1)
      out[i] = cls[np.argmin(key, axis=0)] * inst.any(0)
  return out


def _tiny_boxes(maps, reg_max: int) -> None:
  """Image 0 predicts a near-zero box at every anchor (all mass on bin 0), in place: its GTs' box overlaps
  are 0 at nearly every candidate, so their short lists and top-k lists fill with tied zero-metric anchors."""
  for f in maps:
    f[0, : 4 * reg_max] = -8.0
    f[0, 0 : 4 * reg_max : reg_max] = 8.0


def _mask_predictions(rng, name: str, batch: int, nm: int, strides):
  """Per-level coefficients and prototypes, multiples of 1/8: random, or (``empty_masks`` / ``full_masks``)
  positive prototypes with coefficients of one sign, so that every mask logit is below / above 0."""
  shapes = cases.level_shapes(IMAGE, strides)
  if name in ("empty_masks", "full_masks"):
    sign = -1.0 if name == "empty_masks" else 1.0
    coefs = [quantised(sign * (np.abs(rng.normal(0.0, 1.0, (batch, nm, h, w))) + 0.25)) for h, w in shapes]
    proto = quantised(np.abs(rng.normal(0.0, 1.0, (batch, nm, PROTO, PROTO))) + 0.25)
    return coefs, proto
  coefs = [quantised(rng.normal(0.0, 1.0, (batch, nm, h, w))) for h, w in shapes]
  return coefs, quantised(rng.normal(0.0, 1.0, (batch, nm, PROTO, PROTO)))


def loss_case(name: str) -> dict:
  """Builds the case ``name`` (one of :data:`CASES`)."""
  if name not in CASES:
    raise KeyError(f"unknown YOLO26 segmentation case {name!r}; expected one of {CASES}")
  rng = cases.case_rng("segment26_" + name, salt=5)
  strides = (8, 16, 32)
  cfg = dict(num_classes=3, strides=strides, reg_max=16, topk=10, topk2=None, min_box_side=0.0, class_weights=None,
             overlap_mask=True, slot_dtype="float32", loss="segment26")
  batch, nm, mask_hw = 2, 4, (PROTO, PROTO)
  counts, sides, pairs = (4, 3), (10, 44), True
  semantic = True
  if name in cases.SHARED_VARIANTS:
    batch, counts = cases.shared_variant(name, cfg, batch, counts)
  elif name == "overlap":
    cfg.update(min_box_side=None)  # jaxtal's default: strides[1], as the reference
  elif name == "per_instance":
    cfg.update(overlap_mask=False)
    counts, nm = (3, 5), 6
  elif name == "upsampled":
    cfg.update(min_box_side=None)
    mask_hw = (32, 32)
  elif name == "downsampled":
    cfg.update(overlap_mask=False, slot_dtype="bool")
    mask_hw = (12, 10)
  elif name in ("empty_masks", "full_masks"):
    cfg.update(min_box_side=None)
  elif name == "no_semantic":
    semantic = False
  elif name == "ties":
    counts, sides, pairs = (2, 3), (30, 56), False
  elif name == "v8_overlap":
    cfg.update(loss="v8", min_box_side=None)
  elif name == "v8_per_instance":
    cfg.update(loss="v8", overlap_mask=False, slot_dtype="bool")
    mask_hw = (32, 32)
  elif name == "e2e":
    cfg.update(loss="e2e", min_box_side=None, epoch=3, epochs=10)
    sides = (24, 56)  # big enough that the one-to-one short lists (3 * 7 pairs) bind
  elif name == "e2e_per_instance":
    cfg.update(loss="e2e", overlap_mask=False, reg_max=1, epoch=0, epochs=10)
  rows = cases.random_rows(rng, counts, cfg["num_classes"], IMAGE, sides, clusters=True, pairs=pairs)
  cfg["max_boxes"] = int(max(max(counts), 1) + 2)  # M above the largest count: padding is exercised
  side = strides[1] if cfg["min_box_side"] is None else cfg["min_box_side"]

  def branch():
    maps = cases.head_maps(rng, rows, batch, cfg["num_classes"], IMAGE, strides, cfg["reg_max"], min_side=side)
    if name == "ties":
      _tiny_boxes(maps, cfg["reg_max"])
    coefs, proto = _mask_predictions(rng, name, batch, nm, strides)
    return maps, coefs, proto

  maps, coefs, proto = branch()
  inputs = dict(feats=maps, coefs=coefs, proto=proto)
  if semantic:
    inputs["semantic"] = rng.normal(0.0, 2.0, (batch, cfg["num_classes"], SEMANTIC, SEMANTIC)).astype(np.float32)
  if cfg["loss"] == "e2e":
    maps_o2o, coefs_o2o, _ = branch()
    inputs.update(feats_o2o=maps_o2o, coefs_o2o=coefs_o2o, proto_o2o=proto, semantic_o2o=inputs["semantic"])
  inst = segment_cases.instance_masks(rng, rows, IMAGE, mask_hw)
  masks = jaxtal.pack_masks(inst, rows[:, 0], batch, cfg["max_boxes"]) if cfg["overlap_mask"] else inst
  inputs.update(label_rows=rows, masks=masks, sem_masks=sem_masks(rows, masks if cfg["overlap_mask"] else inst, batch,
                                                                   cfg["overlap_mask"]))
  return dict(name=name, inputs=inputs, config=cfg)


def split_config(config: dict) -> tuple[dict, dict, int]:
  """Case config -> (keyword arguments of jaxtal's loss (``num_classes, strides, reg_max, topk, topk2,
  min_box_side``), of ``segment26_reference`` (``min_box_side`` None as ``strides[1]``), ``max_boxes``)."""
  kwargs = {k: v for k, v in config.items() if k not in ("max_boxes", "slot_dtype", "overlap_mask", "loss", "epoch",
                                                          "epochs", "class_weights")}
  kwargs["strides"] = tuple(kwargs["strides"])
  ref = dict(kwargs, overlap_mask=config["overlap_mask"])
  if ref["min_box_side"] is None:
    ref["min_box_side"] = float(kwargs["strides"][1])
  if config["loss"] == "e2e":
    ref = {k: v for k, v in ref.items() if k not in ("topk", "topk2")}
    ref.update(epoch=config["epoch"], epochs=config["epochs"])
    kwargs = {k: v for k, v in kwargs.items() if k not in ("topk", "topk2")}
  return kwargs, ref, int(config["max_boxes"])


def ground_truth(case: dict):
  """jaxtal's ground truth of a case: packed rows, and the index map or per-slot masks (``segment_cases.ground_truth``)."""
  return segment_cases.ground_truth(case)


def reference_loss(ref_module, case: dict, *, stable: bool) -> dict:
  """``segment26_reference.loss`` (or ``e2e_loss``) on a case, with the native top-k order or stable ties."""
  _, kwargs, _ = split_config(case["config"])
  x = case["inputs"]
  if case["config"]["loss"] == "e2e":
    branches = [(x["feats"], x["coefs"], x["proto"], x["semantic"]),
                (x["feats_o2o"], x["coefs_o2o"], x["proto_o2o"], x["semantic_o2o"])]
    return ref_module.e2e_loss(branches, x["label_rows"], x["masks"], x["sem_masks"], stable=stable, **kwargs)
  return ref_module.loss(x["feats"], x["coefs"], x["proto"], x.get("semantic"), x["label_rows"], x["masks"],
                         x["sem_masks"], v8=case["config"]["loss"] == "v8", stable=stable, **kwargs)


# ----------------------------------------------------------------------------- fixture files


def fixture_path(name: str) -> str:
  return cases.fixture_path("segment26", name)


def _flatten(d: dict, group: str) -> dict:
  """Per-level lists as numbered keys (``LISTS``), per-branch dicts as ``<branch>.<key>``."""
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):  # an end-to-end branch's gradients
      value = dict(value)
      for i, g in enumerate(value.pop("grads")):
        out[f"{key}.grad{i}"] = np.asarray(g, np.float32)
      for k, v in _flatten(value, group).items():
        out[f"{key}.{k}"] = v
    elif key in LISTS:
      for i, x in enumerate(value):
        out[f"{LISTS[key][1]}{i}"] = np.asarray(x, np.float32) if group == "ref" else np.asarray(x)
    else:
      out[key] = value
  return out


def to_arrays(case: dict, ref: dict, version: str) -> dict[str, np.ndarray]:
  """``cases.to_arrays`` with the coefficient maps and their gradients as numbered keys and each end-to-end
  branch's gradients under its prefix."""
  return cases.to_arrays(dict(case, inputs=_flatten(case["inputs"], "input")), _flatten(ref, "ref"), version)


def _unflatten(d: dict, group: str) -> None:
  for key, (g, prefix) in LISTS.items():
    if g == group:
      got = cases.numbered(d, prefix)
      if got:
        d[key] = got
  for branch in BRANCHES:
    keys = [k for k in d if k.startswith(branch + ".")]
    if keys:
      sub = {k[len(branch) + 1 :]: d.pop(k) for k in keys}
      sub["grads"] = cases.numbered(sub, "grad")
      _unflatten(sub, group)
      d[branch] = sub


def load_fixture(name: str) -> tuple[dict, dict, str]:
  """Reads ``tests/fixtures/segment26_<name>.npz`` as ``(case, ref, version)``, ``case`` as :func:`loss_case` makes it."""
  case, ref, version = cases.load_fixture("segment26", name)
  _unflatten(case["inputs"], "input")
  _unflatten(ref, "ref")
  for key in ("seg", "sem"):
    ref[key] = float(ref[key])
  return case, ref, version


def counting_problem(seed, index_map):
  """(The mask-IoU counts' tests, not a parity case.) One image's short lists on a 24 x 20 plane with unquantised float32 values (any dot product's rounding
  shows): boxes touching each border, larger than the plane, inverted, NaN and infinite sides; pairs whose
  predicted mask is empty (coefficients 0) or full (positive prototypes and coefficients); NaN and infinite
  coefficients and prototype pixels."""
  rng = np.random.default_rng(seed)
  m, size, nm, (h, w) = 5, 12, 8, (24, 20)
  coef = rng.normal(size=(m, size, nm)).astype(np.float32)
  proto = rng.normal(size=(nm, h, w)).astype(np.float32)
  corner = rng.uniform(-6.0, 26.0, (m, size, 2))
  box = np.concatenate([corner, corner + rng.uniform(0.5, 18.0, (m, size, 2))], -1).astype(np.float32)
  box[0, :6] = [[-9, -9, 99, 99], [0, 0, w, h], [w - 3.5, 2, w, 9], [2, h - 0.5, 9, h + 4], [-np.inf, 3, 5, np.inf], [7, 7, 3, 3]]
  box[1, :2] = [[np.nan, 0, 5, 5], [0, 0, w, np.nan]]
  coef[2, :3] = 0.0  # empty predicted masks
  full = np.abs(proto[:, :12]).sum(0) > 0  # rows 0-11 of the plane: positive prototypes
  proto[:, :12] = np.abs(proto[:, :12]) + 0.01
  coef[3, :4] = np.abs(coef[3, :4]) + 0.01  # full predicted masks on rows 0-11
  box[3, :4] = [[0, 0, w, 12], [3.2, 1.7, 15.1, 11.9], [-5, -5, 40, 12], [0, 0, 1, 1]]
  coef[4, 0] = np.nan
  coef[4, 1, 2] = np.inf
  proto[1, 20, 3] = np.nan
  proto[0, 15, :] = -np.inf
  cand = rng.uniform(size=(m, size)) < 0.8
  cand[:4, :6] = True
  cand[4, :2] = True
  index = rng.integers(0, m + 2, (h, w)).astype(np.int32)  # includes values past the slots
  index[:12, :10] = 4  # slot 3 covers part of the full masks' rows
  masks = index if index_map else index[None] == np.arange(1, m + 1)[:, None, None]
  del full
  return coef, box, cand, jaxtal.MaskImage(proto, masks, np.float32(1.0))
