"""Deterministic parity cases shared by the golden fixtures and the live parity tests.

NumPy only (plus jaxtal's host-side helpers); never imports torch. Every builder is
seeded, so calling it twice gives the same arrays.

An assignment case is ``dict(name, inputs, config)`` with ``inputs``:
``pred_scores (b, A, nc)`` probabilities, ``pred_boxes (b, A, 4)`` xyxy pixels,
``anchor_points (A, 2)`` pixels, ``gt_labels (b, M)``, ``gt_boxes (b, M, 4)``,
``gt_mask (b, M)`` (from :func:`jaxtal.pack_labels`) and the ``label_rows (n, 6)`` they
came from; ``config``: ``topk, topk2, alpha, beta, min_box_side``.

A loss case is ``dict(name, inputs, config)`` with ``inputs``: ``feats``, a list of
NCHW ``(b, 4R + nc, H, W)`` float32 head maps, and ``label_rows (n, 6)`` sorted by image;
``config``: ``num_classes, strides, reg_max, topk, topk2, min_box_side, class_weights``
(keyword arguments of both :func:`jaxtal.detection_loss` and ``reference.loss``) and
``max_boxes`` (the ``M`` jaxtal packs the rows into).

Fixtures are ``.npz`` files written by :func:`save_npz` (byte-for-byte reproducible) with
keys ``input.<name>``, ``ref.<name>``, ``config`` (JSON) and ``reference_version``.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

import jaxtal

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")  # tests/fixtures

ASSIGN_CASES = (
    "seed",
    "nc80_small",
    "empty_images",
    "all_empty",
    "tiny_boxes_side0",
    "tiny_boxes_side_stride1",
    "topk2",
    "noise",
    "near_gt",
)
LOSS_CASES = ("seed", "nc80", "reg_max1", "class_weights", "one2one", "empty_batch")
# End-to-end (YOLO26 E2ELoss; "v10_*": YOLOv10's E2EDetectLoss) at the first, a middle and the last epoch.
E2E_CASES = ("first_epoch", "middle_epoch", "last_epoch", "reg_max1", "empty_images", "empty_batch", "v10", "v10_reg_max1")

# The seed walkthrough's seven label rows: [batch_idx, cls, cx, cy, w, h], normalised.
SEED_ROWS = np.array(
    [
        [0, 1.0, 0.612, 0.334, 0.666, 0.378],
        [0, 0.0, 0.553, 0.054, 0.426, 0.109],
        [1, 1.0, 0.457, 0.324, 0.747, 0.359],
        [2, 2.0, 0.875, 0.484, 0.25, 0.315],
        [2, 1.0, 0.45, 0.36, 0.72, 0.411],
        [2, 0.0, 0.27, 0.064, 0.46, 0.12],
        [3, 2.0, 0.348, 0.521, 0.151, 0.237],
    ],
    dtype=np.float32,
)
SEED_IMAGE = 640
SEED_STRIDES = (80, 160, 320)  # maps 8x8, 4x4, 2x2: A = 84, as in the walkthrough


# ----------------------------------------------------------------------------- helpers


def case_rng(name: str, salt: int = 0) -> np.random.Generator:
  """A generator seeded from the case name (stable across runs and platforms)."""
  return np.random.default_rng([salt] + [ord(c) for c in name])


def level_shapes(image: int, strides) -> list[tuple[int, int]]:
  return [(image // s, image // s) for s in strides]


def anchors_px(image: int, strides) -> tuple[np.ndarray, np.ndarray]:
  """``(A, 2)`` anchor centres in pixels and ``(A,)`` strides, level by level, row-major."""
  pts, st = [], []
  for (h, w), s in zip(level_shapes(image, strides), strides):
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5, indexing="ij")
    pts.append(np.stack([xs, ys], -1).reshape(-1, 2) * np.float32(s))
    st.append(np.full((h * w,), s, np.float32))
  return np.concatenate(pts), np.concatenate(st)


def rows_xyxy(rows: np.ndarray, image: int) -> np.ndarray:
  """``(n, 4)`` xyxy pixel boxes of YOLO rows (float64, for building predictions only)."""
  cxcy, wh = rows[:, 2:4].astype(np.float64) * image, rows[:, 4:6].astype(np.float64) * image
  return np.concatenate([cxcy - wh / 2, cxcy + wh / 2], axis=1)


def random_rows(rng, counts, num_classes, image, side_px, *, clusters=False, pairs=False) -> np.ndarray:
  """YOLO rows sorted by image: ``counts[i]`` boxes in image ``i``, sides in ``side_px`` pixels.

  With ``clusters`` the boxes of an image gather around two centres, so they overlap; with
  ``pairs`` every second box is a slightly shifted and resized copy of the one before it
  (two GTs that want the same anchors).
  """
  rows = []
  for img, n in enumerate(counts):
    centres = rng.uniform(0.3, 0.7, (2, 2)) * image
    for j in range(n):
      w, h = rng.uniform(*side_px, 2)
      if pairs and j % 2 == 1:
        w, h = np.array([pw, ph]) * rng.uniform(0.85, 1.15, 2)
        cx, cy = np.array([pcx, pcy]) + rng.normal(0, 0.08, 2) * np.array([pw, ph])
      elif clusters:
        cx, cy = centres[j % 2] + rng.normal(0, 0.12 * image, 2)
      else:
        cx, cy = rng.uniform(0.1, 0.9, 2) * image
      cx = np.clip(cx, w / 2 + 1, image - w / 2 - 1)
      cy = np.clip(cy, h / 2 + 1, image - h / 2 - 1)
      pcx, pcy, pw, ph = cx, cy, w, h
      rows.append([img, rng.integers(num_classes), cx / image, cy / image, w / image, h / image])
  return np.asarray(rows, np.float32).reshape(-1, 6)


def _logit(p):
  p = np.clip(p, 1e-6, 1 - 1e-6)
  return np.log(p) - np.log1p(-p)


def write_near_target(f, img, hit, ltrb, classes, reg_max: int, rng) -> None:
  """Writes head-map rows ``f[img, hit]`` that predict noisy versions of the target distances ``ltrb
  (n, 4)`` (bin logits around them, or the distances when ``reg_max == 1``) and score ``classes``
  high. Shared by the detection and oriented-box case builders; the random draws are in a fixed
  order, so the fixtures' inputs stay as built."""
  bins = np.arange(reg_max, dtype=np.float64)
  ltrb = ltrb * rng.uniform(0.75, 1.3, ltrb.shape) + rng.normal(0, 0.15, ltrb.shape)
  if reg_max > 1:
    d = np.clip(ltrb, 0.0, reg_max - 1.0)
    sigma = rng.uniform(0.4, 1.2, (hit.size, 4, 1))
    logits = -((bins - d[..., None]) ** 2) / (2 * sigma**2) + rng.normal(0, 0.3, (hit.size, 4, reg_max))
    f[img, hit, : 4 * reg_max] = logits.reshape(hit.size, 4 * reg_max)
  else:
    f[img, hit, :4] = ltrb
  f[img, hit, 4 * reg_max + classes] += rng.normal(4.5, 1.5, hit.size)


def head_maps(
    rng, rows, batch, num_classes, image, strides, reg_max, *, realistic=True, min_side=0.0
) -> list[np.ndarray]:
  """Per-level NCHW ``(b, 4R + nc, H, W)`` float32 head maps.

  ``realistic=False``: standard normal noise (the seed walkthrough's ``torch.randn``).
  ``realistic=True``: noise everywhere, and at anchors inside a GT box the box logits peak
  near that box's (jittered) ltrb distances and the GT class logit is raised, so decoded
  boxes are near the GT sizes and the assigner finds positives with varied metrics.
  ``min_side`` (pixels) widens small boxes for choosing those anchors, as the assigner's
  ``min_box_side`` does.
  """
  boxes = rows_xyxy(rows, image)
  ctr, half = (boxes[:, :2] + boxes[:, 2:]) / 2, np.maximum(boxes[:, 2:] - boxes[:, :2], min_side) / 2
  grown = np.concatenate([ctr - half, ctr + half], axis=1)
  img_of = rows[:, 0].astype(int)
  cls_of = rows[:, 1].astype(int)
  maps = []
  for (h, w), s in zip(level_shapes(image, strides), strides):
    c = 4 * reg_max + num_classes
    if not realistic:
      maps.append(rng.standard_normal((batch, c, h, w)).astype(np.float32))
      continue
    f = np.empty((batch, h * w, c), np.float64)
    if reg_max > 1:
      f[..., : 4 * reg_max] = rng.normal(0.0, 1.0, (batch, h * w, 4 * reg_max))
    else:
      f[..., :4] = rng.uniform(0.3, 3.0, (batch, h * w, 4))
    f[..., 4 * reg_max :] = rng.normal(-4.0, 1.5, (batch, h * w, num_classes))
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    anc = np.stack([xs, ys], -1).reshape(-1, 2)  # grid units
    for img in range(batch):
      idx = np.flatnonzero(img_of == img)
      if idx.size == 0:
        continue
      g, gg = boxes[idx] / s, grown[idx] / s  # grid units
      inside = (anc[:, None, 0] > gg[None, :, 0]) & (anc[:, None, 0] < gg[None, :, 2])
      inside &= (anc[:, None, 1] > gg[None, :, 1]) & (anc[:, None, 1] < gg[None, :, 3])
      # Each anchor inside some GT follows a random one of them (overlaps: either may win).
      pick = np.argmax(inside * rng.uniform(0.1, 1.0, inside.shape), axis=1)
      hit = np.flatnonzero(inside.any(axis=1) & (rng.uniform(size=h * w) < 0.85))
      if hit.size == 0:
        continue
      gb = g[pick[hit]]
      a = anc[hit]
      ltrb = np.concatenate([a - gb[:, :2], gb[:, 2:] - a], axis=1)
      write_near_target(f, img, hit, ltrb, cls_of[idx][pick[hit]], reg_max, rng)
    maps.append(np.ascontiguousarray(f.reshape(batch, h, w, c).transpose(0, 3, 1, 2)).astype(np.float32))
  return maps


def decode_head(maps, num_classes, image, strides, reg_max=16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Assigner inputs from NCHW head maps, decoded as jaxtal decoded them when the assignment fixtures were
  written: eager ``jax.nn.softmax`` over each side's bins, the elementwise expectation ``sum_i p_i * i``
  in float32, ``anchor -/+ distance``, times the stride. Pinned here (not ``jaxtal.decode_boxes``) so that
  the stored inputs do not move by float32 rounding whenever the library's decode kernel changes, and
  the fixtures stay reproducible byte for byte.

  Returns ``pred_scores (b, A, nc)`` sigmoid probabilities, ``pred_boxes (b, A, 4)`` and
  ``anchor_points (A, 2)``, both in pixels, all float32 NumPy.
  """
  import jax  # noqa: PLC0415  (kept local: the rest of this module is NumPy)
  import jax.numpy as jnp  # noqa: PLC0415

  b, c = maps[0].shape[0], 4 * reg_max + num_classes
  flat = np.concatenate([np.asarray(m, np.float32).transpose(0, 2, 3, 1).reshape(b, -1, c) for m in maps], axis=1)
  dist, logits = jnp.asarray(flat[..., : 4 * reg_max]), jnp.asarray(flat[..., 4 * reg_max :])
  points, anchor_strides = anchors_px(image, strides)
  grid, anchor_strides = jnp.asarray(points / anchor_strides[:, None]), jnp.asarray(anchor_strides[:, None])
  probs = jax.nn.softmax(dist.reshape(*dist.shape[:-1], 4, reg_max), axis=-1)
  ltrb = jnp.sum(probs * jnp.arange(reg_max, dtype=jnp.float32), axis=-1)
  boxes = jnp.concatenate([grid - ltrb[..., :2], grid + ltrb[..., 2:]], axis=-1) * anchor_strides
  return (
      np.asarray(jax.nn.sigmoid(logits), np.float32),
      np.asarray(boxes, np.float32),
      np.asarray(points, np.float32),
  )


def _near_gt_predictions(rng, rows, batch, num_classes, image, strides, *, jitter=0.12):
  """Predictions built around the GT boxes (no head): high GT-class scores, jittered boxes.

  Anchors inside one or more GTs predict a jittered copy of a random one of them with a
  high score on its class; a third of the others predict a jittered copy of a random GT
  of their image (overlap with the in-box GTs is then low or zero); the rest predict
  random boxes. Gives many non-zero metrics, several GTs competing for an anchor, and more
  positive candidates than ``topk``.
  """
  anchors, _ = anchors_px(image, strides)
  a = anchors.shape[0]
  boxes = rows_xyxy(rows, image)
  img_of = rows[:, 0].astype(int)
  cls_of = rows[:, 1].astype(int)
  scores = rng.uniform(0.0, 0.15, (batch, a, num_classes))
  pred = _random_boxes(rng, (batch, a), image).astype(np.float64)
  for img in range(batch):
    idx = np.flatnonzero(img_of == img)
    if idx.size == 0:
      continue
    g = boxes[idx]
    inside = (anchors[:, None, 0] > g[None, :, 0]) & (anchors[:, None, 0] < g[None, :, 2])
    inside &= (anchors[:, None, 1] > g[None, :, 1]) & (anchors[:, None, 1] < g[None, :, 3])
    pick = np.where(inside.any(1), np.argmax(inside * rng.uniform(0.1, 1.0, inside.shape), 1), rng.integers(idx.size, size=a))
    follow = inside.any(1) | (rng.uniform(size=a) < 0.33)
    gb = g[pick]
    size = np.concatenate([gb[:, 2:] - gb[:, :2]] * 2, axis=1)
    jittered = gb + rng.normal(0, jitter, gb.shape) * size
    jittered[:, 2:] = np.maximum(jittered[:, 2:], jittered[:, :2] + 0.5)
    pred[img] = np.where(follow[:, None], jittered, pred[img])
    # Every GT an anchor lies in gets a fair score on its class, the followed one a high one.
    for j in range(idx.size):
      inj = np.flatnonzero(inside[:, j])
      scores[img, inj, cls_of[idx[j]]] = rng.uniform(0.2, 0.9, inj.size)
    hot = np.flatnonzero(follow)
    scores[img, hot, cls_of[idx][pick[hot]]] = rng.uniform(0.3, 0.97, hot.size)
  return scores.astype(np.float32), pred.astype(np.float32), anchors


def _random_boxes(rng, lead, image) -> np.ndarray:
  """Random xyxy boxes (``lead + (4,)``) anywhere in (and a little beyond) the image."""
  ctr = rng.uniform(-0.05, 1.05, lead + (2,)) * image
  wh = rng.uniform(0.02, 0.6, lead + (2,)) * image
  return np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=-1).astype(np.float32)


def make_assign_case(name, rows, batch, max_boxes, image, scores, boxes, anchors, *, pack=jaxtal.pack_labels, width=6, **config) -> dict:
  """An assignment case; ``pack`` / ``width``: the packer and label-row width (OBB: 7 columns)."""
  gt = pack(rows, batch, max_boxes, (image, image))
  cfg = dict(topk=10, topk2=None, alpha=0.5, beta=6.0, min_box_side=0.0)
  cfg.update(config)
  return dict(
      name=name,
      inputs=dict(
          pred_scores=np.array(scores, np.float32),
          pred_boxes=np.array(boxes, np.float32),
          anchor_points=np.array(anchors, np.float32),
          gt_labels=np.array(gt.labels),
          gt_boxes=np.array(gt.boxes),
          gt_mask=np.array(gt.mask),
          label_rows=np.array(rows, np.float32).reshape(-1, width),
      ),
      config=cfg,
  )


# ----------------------------------------------------------------------------- assignment cases


def _tiny_rows(rng, image, strides) -> np.ndarray:
  """Boxes of 1.5-6 px (under one cell of every level): half centred near a level-0 anchor, half anywhere."""
  rows = []
  s0 = strides[0]
  for img, n in enumerate((5, 4)):
    for j in range(n):
      w, h = rng.uniform(1.5, 6.0, 2)
      if j % 2 == 0:
        cx, cy = (rng.integers(1, image // s0 - 1, 2) + 0.5) * s0 + rng.uniform(-0.4, 0.4, 2) * np.array([w, h])
      else:
        cx, cy = rng.uniform(8, image - 8, 2)
      rows.append([img, rng.integers(3), cx / image, cy / image, w / image, h / image])
  return np.asarray(rows, np.float32)


def assign_case(name: str) -> dict:
  """Builds the assignment case ``name`` (one of :data:`ASSIGN_CASES`)."""
  rng = case_rng(name)
  if name == "seed":
    nc, image, strides = 3, SEED_IMAGE, SEED_STRIDES
    maps = head_maps(rng, SEED_ROWS, 4, nc, image, strides, 16, realistic=False)
    return make_assign_case(name, SEED_ROWS, 4, 3, image, *decode_head(maps, nc, image, strides))
  if name == "nc80_small":
    nc, image, strides = 80, 96, (8, 16, 32)
    rows = random_rows(rng, (4, 1, 7), nc, image, (10, 60))
    maps = head_maps(rng, rows, 3, nc, image, strides, 16)
    return make_assign_case(name, rows, 3, 9, image, *decode_head(maps, nc, image, strides))
  if name == "empty_images":
    nc, image, strides = 3, 128, (8, 16, 32)
    rows = random_rows(rng, (3, 0, 2, 0), nc, image, (16, 80))
    maps = head_maps(rng, rows, 4, nc, image, strides, 16)
    return make_assign_case(name, rows, 4, 4, image, *decode_head(maps, nc, image, strides))
  if name == "all_empty":
    nc, image, strides = 3, 128, (8, 16, 32)
    rows = np.zeros((0, 6), np.float32)
    maps = head_maps(rng, rows, 2, nc, image, strides, 16, realistic=False)
    return make_assign_case(name, rows, 2, 3, image, *decode_head(maps, nc, image, strides))
  if name in ("tiny_boxes_side0", "tiny_boxes_side_stride1"):
    nc, image, strides = 3, 128, (8, 16, 32)
    rng = case_rng("tiny_boxes")  # both cases share inputs and differ only in min_box_side
    rows = _tiny_rows(rng, image, strides)
    preds = _near_gt_predictions(rng, rows, 2, nc, image, strides, jitter=0.25)
    side = 0.0 if name == "tiny_boxes_side0" else float(strides[1])
    return make_assign_case(name, rows, 2, 6, image, *preds, min_box_side=side)
  if name == "topk2":
    nc, image, strides = 5, 128, (8, 16, 32)
    rows = random_rows(rng, (5, 3), nc, image, (20, 70), clusters=True, pairs=True)
    preds = _near_gt_predictions(rng, rows, 2, nc, image, strides)
    return make_assign_case(name, rows, 2, 6, image, *preds, topk=7, topk2=1, min_box_side=float(strides[1]))
  if name == "noise":
    nc, image, strides = 4, 128, (8, 16, 32)
    rows = random_rows(rng, (5, 3), nc, image, (10, 90))
    anchors, _ = anchors_px(image, strides)
    scores = rng.uniform(0.0, 1.0, (2, anchors.shape[0], nc))
    boxes = _random_boxes(rng, (2, anchors.shape[0]), image)
    return make_assign_case(name, rows, 2, 6, image, scores, boxes, anchors)
  if name == "near_gt":
    nc, image, strides = 4, 128, (8, 16, 32)
    rows = random_rows(rng, (6, 4), nc, image, (24, 72), clusters=True, pairs=True)
    preds = _near_gt_predictions(rng, rows, 2, nc, image, strides)
    return make_assign_case(name, rows, 2, 8, image, *preds)
  raise KeyError(f"unknown assignment case {name!r}; expected one of {ASSIGN_CASES}")


# ----------------------------------------------------------------------------- loss cases


SHARED_VARIANTS = ("empty_images", "empty_batch", "reg_max1")


def shared_variant(name: str, cfg: dict, batch: int, counts: tuple) -> tuple[int, tuple]:
  """The loss-case variants the pose and segmentation cases share (one of :data:`SHARED_VARIANTS`): ``empty_images``
  (3 images, only the middle one labelled), ``empty_batch`` (no labels) and ``reg_max1`` (set in ``cfg``, in place).
  Returns the case's ``(batch, counts)``."""
  if name == "empty_images":
    return 3, (0, 3, 0)
  if name == "empty_batch":
    return batch, (0, 0)
  if name == "reg_max1":
    cfg.update(reg_max=1)
    return batch, counts
  raise KeyError(f"{name!r} is not one of the shared variants {SHARED_VARIANTS}")


def loss_case(name: str) -> dict:
  """Builds the loss case ``name`` (one of :data:`LOSS_CASES`)."""
  rng = case_rng(name, salt=1)
  cfg = dict(num_classes=3, strides=(8, 16, 32), reg_max=16, topk=10, topk2=None, min_box_side=0.0, class_weights=None)
  image, batch = 64, 2
  realistic = True
  if name == "seed":
    cfg.update(strides=SEED_STRIDES)
    image, batch, rows, realistic = SEED_IMAGE, 4, SEED_ROWS, False
  elif name == "nc80":
    cfg.update(num_classes=80)
    rows = random_rows(rng, (3, 5), 80, image, (10, 40))
  elif name == "reg_max1":
    cfg.update(reg_max=1)
    rows = random_rows(rng, (3, 4), 3, image, (10, 40), clusters=True)
  elif name == "class_weights":
    cfg.update(num_classes=4, class_weights=(0.5, 1.0, 2.0, 0.25))
    rows = random_rows(rng, (4, 2), 4, image, (10, 40), clusters=True)
  elif name == "one2one":
    cfg.update(topk=7, topk2=1, min_box_side=float(cfg["strides"][1]))
    # Small boxes too: several contain no anchor centre unless widened to min_box_side.
    rows = random_rows(rng, (4, 3), 3, image, (3, 30), clusters=True)
  elif name == "empty_batch":
    rows = np.zeros((0, 6), np.float32)
  else:
    raise KeyError(f"unknown loss case {name!r}; expected one of {LOSS_CASES}")
  counts = np.bincount(rows[:, 0].astype(int), minlength=batch)
  cfg["max_boxes"] = int(max(counts.max(initial=0), 1) + 2)  # M above the largest count: padding is exercised
  maps = head_maps(
      rng, rows, batch, cfg["num_classes"], image, cfg["strides"], cfg["reg_max"], realistic=realistic,
      min_side=cfg["min_box_side"],
  )
  return dict(name=name, inputs=dict(feats=maps, label_rows=np.asarray(rows, np.float32).reshape(-1, 6)), config=cfg)


def e2e_case(name: str) -> dict:
  """Builds the end-to-end case ``name`` (one of :data:`E2E_CASES`): two branches' maps, one set of labels.

  ``config``: ``num_classes, strides, reg_max, min_box_side, epoch, epochs, yolov10, max_boxes``.
  """
  if name not in E2E_CASES:
    raise KeyError(f"unknown end-to-end case {name!r}; expected one of {E2E_CASES}")
  rng = case_rng(name, salt=2)
  cfg = dict(num_classes=3, strides=(8, 16, 32), reg_max=16, min_box_side=0.0, epoch=0, epochs=20, yolov10=False)
  image, batch = 64, 2
  rows = random_rows(rng, (3, 4), 3, image, (6, 40), clusters=True)
  if name == "middle_epoch":
    cfg.update(epoch=9, min_box_side=16.0)
  elif name == "last_epoch":
    cfg.update(epoch=19)
  elif name == "reg_max1":
    cfg.update(reg_max=1, epoch=5)
  elif name == "empty_images":
    rows = rows[rows[:, 0] == 1]
    batch = 3  # images 0 and 2 have no objects
  elif name == "empty_batch":
    rows = np.zeros((0, 6), np.float32)
  elif name == "v10":
    cfg.update(yolov10=True)
  elif name == "v10_reg_max1":
    cfg.update(yolov10=True, reg_max=1)
  counts = np.bincount(rows[:, 0].astype(int), minlength=batch)
  cfg["max_boxes"] = int(max(counts.max(initial=0), 1) + 2)
  maps = [
      head_maps(rng, rows, batch, cfg["num_classes"], image, cfg["strides"], cfg["reg_max"], min_side=cfg["min_box_side"])
      for _ in range(2)
  ]
  inputs = dict(feats=maps[0], feats_o2o=maps[1], label_rows=np.asarray(rows, np.float32).reshape(-1, 6))
  return dict(name=name, inputs=inputs, config=cfg)


def split_loss_config(config: dict) -> tuple[dict, int]:
  """Loss-case config -> (keyword arguments of the loss functions, ``max_boxes``)."""
  kwargs = {k: v for k, v in config.items() if k != "max_boxes"}
  kwargs["strides"] = tuple(kwargs["strides"])
  return kwargs, int(config["max_boxes"])


# ----------------------------------------------------------------------------- fixture files


def fixture_path(kind: str, name: str) -> str:
  """``tests/fixtures/<kind>_<name>.npz`` with ``kind`` ``"assign"``, ``"loss"`` or ``"e2e"``."""
  return os.path.join(FIXTURES_DIR, f"{kind}_{name}.npz")


def to_arrays(case: dict, ref: dict, version: str) -> dict[str, np.ndarray]:
  """Flattens a case and its reference outputs into named arrays for :func:`save_npz`."""
  out = {"config": np.asarray(json.dumps(case["config"], sort_keys=True)), "reference_version": np.asarray(version)}
  for group, values in (("input", case["inputs"]), ("ref", ref)):
    for k, v in values.items():
      if k in _LEVEL_LISTS:  # per-level lists: one array per level, <prefix><level>
        for i, f in enumerate(v):
          out[f"{group}.{_LEVEL_LISTS[k]}{i}"] = np.asarray(f, np.float32) if group == "ref" else np.asarray(f)
      else:
        out[f"{group}.{k}"] = np.asarray(v)
  return out


# Per-level list names -> the prefix of their arrays in a fixture file.
_LEVEL_LISTS = {"feats": "feat", "grads": "grad", "feats_o2o": "feat_o2o", "grads_o2o": "grad_o2o"}


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes an ``.npz`` whose bytes depend only on ``arrays`` (fixed zip timestamps, sorted keys)."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for key in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
      info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      zf.writestr(info, buf.getvalue())


def numbered(d: dict, prefix: str) -> list:
  """Pops ``<prefix>0, <prefix>1, ...`` from ``d`` and returns them in order (a per-level list stored as numbered keys)."""
  keys = sorted((k for k in d if k.startswith(prefix) and k[len(prefix) :].isdigit()), key=lambda k: int(k[len(prefix) :]))
  return [d.pop(k) for k in keys]


def load_fixture(kind: str, name: str) -> tuple[dict, dict, str]:
  """Reads a fixture back as ``(case, ref, reference_version)``; ``case`` as the builders return it."""
  with np.load(fixture_path(kind, name), allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  config = json.loads(str(arrays.pop("config")))
  version = str(arrays.pop("reference_version"))
  inputs, ref = {}, {}
  for k, v in arrays.items():
    group, key = k.split(".", 1)
    (inputs if group == "input" else ref)[key] = v
  for out, prefix in _LEVEL_LISTS.items():
    d = inputs if out.startswith("feat") else ref
    levels = sorted((k for k in d if k.startswith(prefix) and k[len(prefix) :].isdigit()), key=lambda k: int(k[len(prefix) :]))
    if levels:
      d[out] = [d.pop(k) for k in levels]
  for k in ("total", "box", "cls", "dfl"):
    if k in ref:
      ref[k] = float(ref[k])
  if config.get("strides") is not None:
    config["strides"] = tuple(config["strides"])
  if config.get("class_weights") is not None:
    config["class_weights"] = tuple(config["class_weights"])
  return dict(name=name, inputs=inputs, config=config), ref, version


def assert_case_equal(stored: dict, built: dict, where: str = "") -> None:
  """A case read back from a fixture equals the one its builder makes now (config, input names
  and every input array, per-level lists level by level): a stale fixture would test something else."""
  assert stored["config"] == built["config"], f"{where}config"
  assert set(stored["inputs"]) == set(built["inputs"]), f"{where}input names"
  for key, value in built["inputs"].items():
    have = stored["inputs"][key]
    have, value = (have, value) if isinstance(value, list) else ([have], [value])
    assert len(have) == len(value), f"{where}{key}: {len(have)} levels stored, {len(value)} built"
    for a, b in zip(have, value):
      np.testing.assert_array_equal(a, b, err_msg=f"{where}{key}")
