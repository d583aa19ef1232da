"""Deterministic OBB parity cases shared by the golden fixtures and the live parity tests.

The oriented-box counterpart of ``cases.py`` (whose helpers it imports: seeding, anchors,
fixture files). NumPy only (plus jaxtal's host-side helpers); never imports torch.

An assignment case is ``dict(name, inputs, config)`` with ``inputs``: ``pred_scores (b, A, nc)``
probabilities, ``pred_boxes (b, A, 5)`` xywhr pixels, ``anchor_points (A, 2)`` pixels,
``gt_labels (b, M)``, ``gt_boxes (b, M, 5)``, ``gt_mask (b, M)`` (from
:func:`jaxtal.pack_rotated_labels`) and the ``label_rows (n, 7)`` they came from; ``config``:
``topk, topk2, alpha, beta, min_box_side``.

A loss case is ``dict(name, inputs, config)`` with ``inputs``: ``feats``, a list of NCHW
``(b, 4R + nc, H, W)`` float32 head maps, ``angles``, a list of ``(b, 1, H, W)`` float32
predicted angles (radians, in the head's range ``[-pi/4, 3pi/4]``), and ``label_rows (n, 7)``
``[batch_idx, cls, cx, cy, w, h, angle]``; ``config``: ``num_classes, strides, reg_max, topk,
topk2, min_box_side, class_weights`` (keyword arguments of both :func:`jaxtal.obb_loss` and
``obb_reference.loss``) and ``max_boxes``.

Fixtures are ``tests/fixtures/obb_{assign,loss}_<case>.npz`` written with ``cases.save_npz``:
keys as ``cases.to_arrays`` writes them, plus ``input.angle<i>`` and ``ref.angle_grad<i>``.
"""

from __future__ import annotations

import numpy as np

from support import cases
import jaxtal

OBB_ASSIGN_CASES = ("angles", "squares_thin", "tiny_side0", "tiny_side_stride1", "empty_images", "all_empty", "topk2", "noise")
OBB_LOSS_CASES = ("angles", "squares_thin", "tiny", "empty_images", "empty_batch", "reg_max1", "one2one", "class_weights", "nc15")

# GT angles the cases draw from: near 0, +-pi/4 and pi/2 (exact and nudged), and any angle.
_PI = np.pi
SPECIAL_ANGLES = (0.0, 1e-3, -1e-3, _PI / 4, -_PI / 4, _PI / 4 + 1e-3, _PI / 2, _PI / 2 - 1e-3)


# ----------------------------------------------------------------------------- helpers


def _angle(rng) -> float:
  if rng.uniform() < 0.7:
    return float(SPECIAL_ANGLES[rng.integers(len(SPECIAL_ANGLES))])
  return float(rng.uniform(-_PI / 4, 3 * _PI / 4))


def _extent(w, h, r):
  """Half extents of the axis-aligned bounding box of a rotated box."""
  c, s = abs(np.cos(r)), abs(np.sin(r))
  return (w * c + h * s) / 2, (w * s + h * c) / 2


def _sides(rng, kind: str, side_px) -> tuple[float, float]:
  lo, hi = side_px
  if kind == "square":
    s = rng.uniform(lo, hi)
    return s, s
  if kind == "thin":
    long = rng.uniform(max(lo, hi / 2), hi)
    return tuple(rng.permutation([long, long / rng.uniform(6, 12)]))
  return tuple(rng.uniform(lo, hi, 2))


def _rows(rng, counts, num_classes, image, side_px, *, kinds=("mixed",), clusters=False, every_angle=False) -> np.ndarray:
  """OBB rows sorted by image: ``counts[i]`` boxes in image ``i``, shapes drawn from ``kinds``;
  with ``every_angle`` the first boxes take each of :data:`SPECIAL_ANGLES` in turn."""
  rows = []
  for img, n in enumerate(counts):
    centre = rng.uniform(0.35, 0.65, 2) * image
    for j in range(n):
      w, h = _sides(rng, kinds[j % len(kinds)], side_px)
      r = _angle(rng)
      if every_angle and len(rows) < len(SPECIAL_ANGLES):
        r = SPECIAL_ANGLES[len(rows)]
      ex, ey = _extent(w, h, r)
      cx, cy = centre + rng.normal(0, 0.12 * image, 2) if clusters else rng.uniform(0.1, 0.9, 2) * image
      cx, cy = np.clip(cx, ex + 1, image - ex - 1), np.clip(cy, ey + 1, image - ey - 1)
      rows.append([img, rng.integers(num_classes), cx / image, cy / image, w / image, h / image, r])
  return np.asarray(rows, np.float32).reshape(-1, 7)


def _rows_px(rows: np.ndarray, image: int) -> np.ndarray:
  """``(n, 5)`` xywhr pixel boxes of rows (float64, for building predictions only)."""
  return np.concatenate([rows[:, 2:6].astype(np.float64) * image, rows[:, 6:7].astype(np.float64)], axis=1)


def _inside(points: np.ndarray, boxes: np.ndarray, min_side: float = 0.0) -> np.ndarray:
  """``(P, G)``: point inside the rotated box (sides widened to ``min_side``); approximate, for building inputs."""
  d = points[:, None, :] - boxes[None, :, :2]
  c, s = np.cos(boxes[:, 4]), np.sin(boxes[:, 4])
  u, v = d[..., 0] * c + d[..., 1] * s, d[..., 1] * c - d[..., 0] * s
  w, h = np.maximum(boxes[:, 2], min_side), np.maximum(boxes[:, 3], min_side)
  return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)


def _random_rboxes(rng, lead, image) -> np.ndarray:
  ctr = rng.uniform(-0.05, 1.05, lead + (2,)) * image
  wh = rng.uniform(0.02, 0.6, lead + (2,)) * image
  return np.concatenate([ctr, wh, rng.uniform(-_PI / 4, 3 * _PI / 4, lead + (1,))], axis=-1).astype(np.float32)


def _near_gt_predictions(rng, rows, batch, num_classes, image, strides, *, jitter=0.12, min_side=0.0):
  """Predictions built around the GT boxes: anchors inside a GT (or a third of the others)
  predict a jittered copy of one (centre, sides and angle), with a high score on its class."""
  anchors, _ = cases.anchors_px(image, strides)
  a = anchors.shape[0]
  boxes = _rows_px(rows, image)
  img_of, cls_of = rows[:, 0].astype(int), rows[:, 1].astype(int)
  scores = rng.uniform(0.0, 0.15, (batch, a, num_classes))
  pred = _random_rboxes(rng, (batch, a), image).astype(np.float64)
  for img in range(batch):
    idx = np.flatnonzero(img_of == img)
    if idx.size == 0:
      continue
    g = boxes[idx]
    inside = _inside(anchors, g, min_side)
    pick = np.where(inside.any(1), np.argmax(inside * rng.uniform(0.1, 1.0, inside.shape), 1), rng.integers(idx.size, size=a))
    follow = inside.any(1) | (rng.uniform(size=a) < 0.33)
    gb = g[pick].copy()
    size = np.maximum(gb[:, 2:4], 1.0)
    gb[:, :2] += rng.normal(0, jitter, (a, 2)) * size
    gb[:, 2:4] *= rng.uniform(1 - 2 * jitter, 1 + 2 * jitter, (a, 2))
    gb[:, 4] += rng.normal(0, jitter, a)
    pred[img] = np.where(follow[:, None], gb, pred[img])
    for j in range(idx.size):
      inj = np.flatnonzero(inside[:, j])
      scores[img, inj, cls_of[idx[j]]] = rng.uniform(0.2, 0.9, inj.size)
    hot = np.flatnonzero(follow)
    scores[img, hot, cls_of[idx][pick[hot]]] = rng.uniform(0.3, 0.97, hot.size)
  return scores.astype(np.float32), pred.astype(np.float32), anchors


def _assign(name, rows, batch, max_boxes, image, scores, boxes, anchors, **config) -> dict:
  return cases.make_assign_case(name, rows, batch, max_boxes, image, scores, boxes, anchors, pack=jaxtal.pack_rotated_labels, width=7, **config)


def _tiny_rows(rng, image, strides) -> np.ndarray:
  """Boxes of 0.5-6 px (some under the 2 px floor, one exactly 2 px): half centred near a
  level-0 anchor, half anywhere."""
  rows, s0 = [], strides[0]
  for img, n in enumerate((6, 5)):
    for j in range(n):
      w, h = rng.uniform(0.5, 6.0, 2)
      if img == 0 and j == 1:
        w = 2.0  # exactly the floor: kept
      if j % 2 == 0:
        cx, cy = (rng.integers(1, image // s0 - 1, 2) + 0.5) * s0 + rng.uniform(-0.4, 0.4, 2) * np.array([w, h])
      else:
        cx, cy = rng.uniform(8, image - 8, 2)
      rows.append([img, rng.integers(3), cx / image, cy / image, w / image, h / image, _angle(rng)])
  return np.asarray(rows, np.float32)


# ----------------------------------------------------------------------------- assignment cases


def assign_case(name: str) -> dict:
  """Builds the OBB assignment case ``name`` (one of :data:`OBB_ASSIGN_CASES`)."""
  rng = cases.case_rng("obb_" + name)
  nc, image, strides = 4, 128, (8, 16, 32)
  if name == "angles":
    rows = _rows(rng, (6, 4), nc, image, (12, 60), clusters=True, every_angle=True)
    return _assign(name, rows, 2, 8, image, *_near_gt_predictions(rng, rows, 2, nc, image, strides))
  if name == "squares_thin":
    rows = _rows(rng, (6, 5), nc, image, (10, 90), kinds=("square", "thin"), clusters=True)
    preds = _near_gt_predictions(rng, rows, 2, nc, image, strides, min_side=strides[1])
    return _assign(name, rows, 2, 7, image, *preds, min_box_side=float(strides[1]))
  if name in ("tiny_side0", "tiny_side_stride1"):
    rng = cases.case_rng("obb_tiny")  # both cases share inputs and differ only in min_box_side
    rows = _tiny_rows(rng, image, strides)
    side = 0.0 if name == "tiny_side0" else float(strides[1])
    preds = _near_gt_predictions(rng, rows, 2, 3, image, strides, jitter=0.25, min_side=float(strides[1]))
    return _assign(name, rows, 2, 7, image, *preds, min_box_side=side)
  if name == "empty_images":
    rows = _rows(rng, (3, 0, 2, 0), nc, image, (16, 80))
    return _assign(name, rows, 4, 4, image, *_near_gt_predictions(rng, rows, 4, nc, image, strides))
  if name == "all_empty":
    rows = np.zeros((0, 7), np.float32)
    anchors, _ = cases.anchors_px(image, strides)
    scores = rng.uniform(0, 1, (2, anchors.shape[0], nc))
    return _assign(name, rows, 2, 3, image, scores, _random_rboxes(rng, (2, anchors.shape[0]), image), anchors)
  if name == "topk2":
    rows = _rows(rng, (5, 3), nc, image, (20, 70), clusters=True)
    preds = _near_gt_predictions(rng, rows, 2, nc, image, strides, min_side=strides[1])
    return _assign(name, rows, 2, 6, image, *preds, topk=7, topk2=1, min_box_side=float(strides[1]))
  if name == "noise":
    rows = _rows(rng, (5, 3), nc, image, (10, 90))
    anchors, _ = cases.anchors_px(image, strides)
    scores = rng.uniform(0.0, 1.0, (2, anchors.shape[0], nc))
    return _assign(name, rows, 2, 6, image, scores, _random_rboxes(rng, (2, anchors.shape[0]), image), anchors)
  raise KeyError(f"unknown OBB assignment case {name!r}; expected one of {OBB_ASSIGN_CASES}")


# ----------------------------------------------------------------------------- loss cases


def head_maps(rng, rows, batch, num_classes, image, strides, reg_max, *, min_side=0.0):
  """Per-level NCHW head maps ``(b, 4R + nc, H, W)`` and angle maps ``(b, 1, H, W)``, float32.

  Noise everywhere (angles uniform in the head's range ``[-pi/4, 3pi/4]``); at anchors inside a
  GT box (sides widened to ``min_side``) the box logits peak near that box's (jittered) distances
  along its own axes, the GT class logit is raised and the angle is the GT's, jittered.
  """
  boxes = _rows_px(rows, image)
  img_of, cls_of = rows[:, 0].astype(int), rows[:, 1].astype(int)
  maps, angles = [], []
  for (h, w), s in zip(cases.level_shapes(image, strides), strides):
    c = 4 * reg_max + num_classes
    f = np.empty((batch, h * w, c), np.float64)
    if reg_max > 1:
      f[..., : 4 * reg_max] = rng.normal(0.0, 1.0, (batch, h * w, 4 * reg_max))
    else:
      f[..., :4] = rng.uniform(0.3, 3.0, (batch, h * w, 4))
    f[..., 4 * reg_max :] = rng.normal(-4.0, 1.5, (batch, h * w, num_classes))
    ang = rng.uniform(-_PI / 4, 3 * _PI / 4, (batch, h * w))
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    anc = np.stack([xs, ys], -1).reshape(-1, 2)  # grid units
    for img in range(batch):
      idx = np.flatnonzero(img_of == img)
      if idx.size == 0:
        continue
      g = boxes[idx] / np.array([s, s, s, s, 1.0])
      inside = _inside(anc, g, min_side / s)
      pick = np.argmax(inside * rng.uniform(0.1, 1.0, inside.shape), axis=1)
      hit = np.flatnonzero(inside.any(axis=1) & (rng.uniform(size=h * w) < 0.85))
      if hit.size == 0:
        continue
      gb, a = g[pick[hit]], anc[hit]
      d = gb[:, :2] - a
      cos, sin = np.cos(gb[:, 4]), np.sin(gb[:, 4])
      u, v = d[:, 0] * cos + d[:, 1] * sin, d[:, 1] * cos - d[:, 0] * sin
      half = gb[:, 2:4] / 2
      ltrb = np.stack([half[:, 0] - u, half[:, 1] - v, half[:, 0] + u, half[:, 1] + v], axis=1)
      cases.write_near_target(f, img, hit, ltrb, cls_of[idx][pick[hit]], reg_max, rng)
      ang[img, hit] = np.clip(gb[:, 4] + rng.normal(0, 0.15, hit.size), -_PI / 4, 3 * _PI / 4)
    maps.append(np.ascontiguousarray(f.reshape(batch, h, w, c).transpose(0, 3, 1, 2)).astype(np.float32))
    angles.append(ang.reshape(batch, 1, h, w).astype(np.float32))
  return maps, angles


def loss_case(name: str) -> dict:
  """Builds the OBB loss case ``name`` (one of :data:`OBB_LOSS_CASES`)."""
  rng = cases.case_rng("obb_" + name, salt=1)
  strides = (8, 16, 32)
  cfg = dict(num_classes=3, strides=strides, reg_max=16, topk=10, topk2=None, min_box_side=0.0, class_weights=None)
  image, batch = 64, 2
  if name == "angles":
    cfg.update(min_box_side=float(strides[1]))
    rows = _rows(rng, (5, 4), 3, image, (8, 40), clusters=True, every_angle=True)
    rows = rows[rng.permutation(len(rows))]  # any row order
  elif name == "squares_thin":
    cfg.update(min_box_side=float(strides[1]))
    rows = _rows(rng, (4, 4), 3, image, (8, 48), kinds=("square", "thin"), clusters=True)
  elif name == "tiny":
    cfg.update(min_box_side=float(strides[1]))
    rows = _tiny_rows(rng, image, strides)
  elif name == "empty_images":
    batch = 3
    rows = _rows(rng, (0, 3, 0), 3, image, (10, 40))
  elif name == "empty_batch":
    rows = np.zeros((0, 7), np.float32)
  elif name == "reg_max1":
    cfg.update(reg_max=1)
    rows = _rows(rng, (3, 4), 3, image, (10, 40), clusters=True)
  elif name == "one2one":
    cfg.update(topk=7, topk2=1, min_box_side=float(strides[1]))
    rows = _rows(rng, (4, 3), 3, image, (3, 30), clusters=True)
  elif name == "class_weights":
    cfg.update(num_classes=4, class_weights=(0.5, 1.0, 2.0, 0.25))
    rows = _rows(rng, (4, 2), 4, image, (10, 40), clusters=True)
  elif name == "nc15":
    cfg.update(num_classes=15, min_box_side=float(strides[1]))
    rows = _rows(rng, (5, 3), 15, image, (6, 40), kinds=("mixed", "thin", "square"))
  else:
    raise KeyError(f"unknown OBB loss case {name!r}; expected one of {OBB_LOSS_CASES}")
  counts = np.bincount(rows[:, 0].astype(int), minlength=batch)
  cfg["max_boxes"] = int(max(counts.max(initial=0), 1) + 2)  # M above the largest count: padding is exercised
  maps, angles = head_maps(rng, rows, batch, cfg["num_classes"], image, strides, cfg["reg_max"], min_side=cfg["min_box_side"])
  return dict(name=name, inputs=dict(feats=maps, angles=angles, label_rows=np.asarray(rows, np.float32).reshape(-1, 7)), config=cfg)


# ----------------------------------------------------------------------------- probiou pairs


PROBIOU_KINDS = ("near", "identical", "unrelated", "thin", "small", "turned")
# Pairs where float32 cannot resolve ProbIoU finely: a thin box against a near copy (or itself,
# or itself turned by a half turn) has near-singular covariances, so det S1 = a b - c^2 cancels
# and any float32 evaluation (the reference's included) is off by up to ~1e-4 in the squared
# Hellinger distance h^2; near identical boxes ProbIoU = 1 - h moves by that over 2h (up to
# ~5e-3), and whether the clamp of the Bhattacharyya distance at eps holds (gradient 0) or not
# is decided by rounding.
ILL_CONDITIONED = ("identical", "thin", "turned")


def probiou_case(seed: int = 0, n: int = 240) -> dict:
  """``n`` pairs of xywhr boxes, a sixth of each kind: near copies, identical, unrelated, long
  thin boxes turned a little, small boxes (1-3 px), and copies turned by a half turn or more."""
  rng = np.random.default_rng([seed, 97])
  k = n // 6
  base = np.c_[rng.uniform(0, 100, (n, 2)), rng.uniform(1, 60, (n, 2)), rng.uniform(-_PI / 4, 3 * _PI / 4, n)]
  other = base.copy()
  near = slice(0, k)
  other[near, :2] += rng.normal(0, 4, (k, 2))
  other[near, 2:4] *= rng.uniform(0.7, 1.3, (k, 2))
  other[near, 4] += rng.normal(0, 0.3, k)
  unrelated = slice(2 * k, 3 * k)
  other[unrelated] = np.c_[rng.uniform(0, 100, (k, 2)), rng.uniform(1, 60, (k, 2)), rng.uniform(-3, 3, k)]
  thin = slice(3 * k, 4 * k)
  base[thin, 3] = base[thin, 2] / rng.uniform(8, 20, k)
  other[thin] = base[thin] + np.c_[rng.normal(0, 1, (k, 2)), np.zeros((k, 2)), rng.normal(0, 0.1, k)]
  small = slice(4 * k, 5 * k)
  base[small, 2:4] = rng.uniform(1, 3, (k, 2))
  other[small] = base[small] + np.c_[rng.normal(0, 1, (k, 2)), rng.uniform(-0.5, 0.5, (k, 2)), rng.normal(0, 0.5, k)]
  turned = slice(5 * k, n)
  other[turned, 4] += rng.choice([-_PI, _PI, 2 * _PI], n - 5 * k)
  kind = np.repeat(np.arange(6, dtype=np.int32), [k] * 5 + [n - 5 * k])  # index into PROBIOU_KINDS
  return dict(name="pairs", inputs=dict(box1=base.astype(np.float32), box2=other.astype(np.float32), kind=kind), config={})


def reference_probiou(ref_module, case: dict) -> dict:
  """The reference's values (floor 0 and 0.01; float32, and float64 for the accuracy check) and
  gradients (floor 0) on a :func:`probiou_case`."""
  x = case["inputs"]
  d1, d2 = ref_module.probiou_grad(x["box1"], x["box2"])
  return dict(
      iou=ref_module.probiou(x["box1"], x["box2"]),
      iou_floor=ref_module.probiou(x["box1"], x["box2"], floor=0.01),
      iou64=ref_module.probiou(x["box1"], x["box2"], float64=True),
      iou64_floor=ref_module.probiou(x["box1"], x["box2"], floor=0.01, float64=True),
      d_box1=d1,
      d_box2=d2,
  )


# ----------------------------------------------------------------------------- fixture files


def to_arrays(case: dict, ref: dict, version: str) -> dict[str, np.ndarray]:
  """``cases.to_arrays`` with the per-level angle maps and their gradients as numbered keys."""
  inputs = dict(case["inputs"])
  ref = dict(ref)
  for i, a in enumerate(inputs.pop("angles", ())):
    inputs[f"angle{i}"] = a
  for i, g in enumerate(ref.pop("angle_grads", ())):
    ref[f"angle_grad{i}"] = np.asarray(g, np.float32)
  return cases.to_arrays(dict(case, inputs=inputs), ref, version)


def load_fixture(kind: str, name: str) -> tuple[dict, dict, str]:
  """Reads ``tests/fixtures/obb_<kind>_<name>.npz`` (``kind``: ``"assign"`` or ``"loss"``) as ``(case, ref, version)``."""
  case, ref, version = cases.load_fixture(f"obb_{kind}", name)
  angles, angle_grads = cases.numbered(case["inputs"], "angle"), cases.numbered(ref, "angle_grad")
  if angles:
    case["inputs"]["angles"] = angles
  if angle_grads:
    ref["angle_grads"] = angle_grads
  if "angle" in ref:
    ref["angle"] = float(ref["angle"])
  return case, ref, version


def fixture_path(kind: str, name: str) -> str:
  return cases.fixture_path(f"obb_{kind}", name)


def split_loss_config(config: dict) -> tuple[dict, int]:
  """Loss-case config -> (keyword arguments of the loss functions, ``max_boxes``)."""
  return cases.split_loss_config(config)
