"""Deterministic pose parity cases shared by the golden fixtures and the live parity tests.

The pose counterpart of ``cases.py`` (whose helpers it imports: seeding, label rows, head maps,
fixture files). NumPy only (plus jaxtal's host-side helpers); never imports torch.

A loss case is ``dict(name, inputs, config)`` with ``inputs``: ``feats``, a list of NCHW
``(b, 4R + nc, H, W)`` float32 head maps, ``kpts``, a list of NCHW ``(b, K * D, H, W)`` float32
raw keypoint maps, ``label_rows (n, 6)`` ``[batch_idx, cls, cx, cy, w, h]`` and ``keypoints
(n, K, Dg)`` (``x, y`` normalised, ``Dg = 3`` with the visibility 0, 1 or 2, or ``Dg = 2``);
``config``: ``num_classes, strides, kpt_shape, sigmas, reg_max, topk, topk2, min_box_side,
class_weights`` (keyword arguments of both :func:`jaxtal.pose_loss` and
``pose_reference.loss``) and ``max_boxes``.

Keypoints lie inside the image (Ultralytics' data pipeline marks any other invisible and clips
it, as :func:`jaxtal.pack_labels` does), so both sides see the same labels.

Fixtures are ``tests/fixtures/pose_loss_<case>.npz`` written with ``cases.save_npz``: keys as
``cases.to_arrays`` writes them, plus ``input.kpt<i>`` and ``ref.kpt_grad<i>`` per level.
"""

from __future__ import annotations

import numpy as np

from support import cases
import jaxtal


# "ties" has tied zero-metric top-k candidates (see TIE_CASES); every other case has none.
POSE_LOSS_CASES = (
    "coco", "k5_d2", "k4_sigmas", "invisible", "outside_box", "empty_images", "empty_batch", "reg_max1",
    "class_weights", "one2one", "ties",
)
# Cases whose foreground depends on the order among tied zero-metric top-k candidates: jaxtal
# matches the reference under ``reference.stable_ties()``, and the native reference differs.
TIE_CASES = ("ties",)

_IMAGE, _STRIDES = 64, (8, 16, 32)
_SIGMAS4 = (0.05, 0.1, 0.2, 0.4)


def random_keypoints(rng, rows, k, dims, *, p_visible=0.8, outside=0.0, invisible_rows=()):
  """``(n, K, dims)`` normalised keypoints of ``rows``: inside each box (with probability
  ``outside``, moved out of it but kept inside the image); with ``dims == 3`` the visibility is
  2 or 1 with probability ``p_visible`` (0 otherwise; all 0 for the rows in ``invisible_rows``)."""
  n = rows.shape[0]
  ctr, wh = rows[:, None, 2:4].astype(np.float64), rows[:, None, 4:6].astype(np.float64)
  xy = ctr + (rng.uniform(-0.5, 0.5, (n, k, 2)) * wh)
  away = rng.uniform(size=(n, k)) < outside
  moved = ctr + np.sign(rng.uniform(-1, 1, (n, k, 2))) * wh * rng.uniform(0.6, 1.5, (n, k, 2))
  xy = np.clip(np.where(away[..., None], moved, xy), 0.01, 0.99)
  if dims == 2:
    return xy.astype(np.float32)
  vis = np.where(rng.uniform(size=(n, k)) < p_visible, rng.choice([1.0, 2.0], (n, k)), 0.0)
  vis[list(invisible_rows)] = 0.0
  return np.concatenate([xy, vis[..., None]], axis=-1).astype(np.float32)


def keypoint_maps(rng, rows, keypoints, batch, kpt_shape, *, min_side=0.0):
  """Per-level NCHW raw keypoint maps ``(b, K * D, H, W)``, float32.

  Noise everywhere; an anchor inside a GT box (sides widened to ``min_side``) follows the GT it
  is most central in (nine times in ten): its raw x, y decode to near that GT's keypoints
  (jittered by a fifth of the box size) and its visibility logits lean towards the GT's labels.
  """
  k, d = kpt_shape
  boxes = cases.rows_xyxy(rows, _IMAGE)
  ctr, half = (boxes[:, :2] + boxes[:, 2:]) / 2, np.maximum(boxes[:, 2:] - boxes[:, :2], min_side) / 2
  img_of = rows[:, 0].astype(int)
  kp_px = keypoints[..., :2].astype(np.float64) * _IMAGE
  labelled = keypoints[..., 2] != 0 if keypoints.shape[-1] == 3 else np.ones(keypoints.shape[:2], bool)
  maps = []
  for (h, w), s in zip(cases.level_shapes(_IMAGE, _STRIDES), _STRIDES):
    f = rng.normal(0.0, 0.6, (batch, h * w, k, d))
    if d == 3:
      f[..., 2] = rng.normal(0.0, 1.5, (batch, h * w, k))
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    anc = np.stack([xs, ys], -1).reshape(-1, 2) * s  # pixels
    for img in range(batch):
      idx = np.flatnonzero(img_of == img)
      if idx.size == 0:
        continue
      # Chebyshev distance to each GT centre in units of its half sides: < 1 inside the box.
      reach = (np.abs(anc[:, None, :] - ctr[None, idx]) / half[None, idx]).max(-1)
      own = idx[np.argmin(reach, axis=1)]
      hit = np.flatnonzero((reach.min(axis=1) < 1) & (rng.uniform(size=h * w) < 0.9))
      size = 2 * half[own[hit]] / s  # (n_hit, 2) grid units
      target = kp_px[own[hit]] / s + rng.normal(0, 0.2, (hit.size, k, 2)) * size[:, None, :]
      f[img, hit, :, :2] = (target - anc[hit, None, :] / s + 0.5) / 2
      if d == 3:
        f[img, hit, :, 2] = np.where(labelled[own[hit]], 2.0, -2.0) + rng.normal(0, 1.0, (hit.size, k))
    maps.append(np.ascontiguousarray(f.reshape(batch, h, w, k * d).transpose(0, 3, 1, 2)).astype(np.float32))
  return maps


def _without_class(maps, rows, reg_max, cls, keep):
  """Head maps where class ``cls``'s logit is -200 (score exactly 0 in float32) at every anchor
  except the ``keep`` anchors (flat indices over levels) of image 0: a GT of that class gets a
  positive align metric at those anchors only, and its other top-k slots are tied at 0."""
  out, lo = [], 0
  for f in maps:
    f = f.copy()
    b, _, h, w = f.shape
    flat = f[:, 4 * reg_max + cls].reshape(b, h * w)
    local = np.asarray([a - lo for a in keep if lo <= a < lo + h * w], int)
    saved = flat[0, local].copy()
    flat[:] = -200.0
    flat[0, local] = saved
    f[:, 4 * reg_max + cls] = flat.reshape(b, h, w)
    out.append(f)
    lo += h * w
  return out


def loss_case(name: str) -> dict:
  """Builds the pose loss case ``name`` (one of :data:`POSE_LOSS_CASES`)."""
  rng = cases.case_rng("pose_" + name, salt=3)
  cfg = dict(
      num_classes=1, strides=_STRIDES, kpt_shape=(4, 3), sigmas=None, reg_max=16, topk=10, topk2=None,
      min_box_side=0.0, class_weights=None,
  )
  batch, counts, side, dims = 2, (3, 4), (10, 40), 3
  options = {}
  if name in cases.SHARED_VARIANTS:
    batch, counts = cases.shared_variant(name, cfg, batch, counts)
  elif name == "coco":
    cfg.update(kpt_shape=(17, 3), reg_max=8)
  elif name == "k5_d2":
    cfg.update(kpt_shape=(5, 2), num_classes=2)
    dims = 2
  elif name == "k4_sigmas":
    cfg.update(sigmas=_SIGMAS4, num_classes=2, min_box_side=float(_STRIDES[1]))
  elif name == "invisible":
    options = dict(p_visible=0.4, invisible_rows=(1, 4))
  elif name == "outside_box":
    options = dict(outside=0.5)
  elif name == "class_weights":
    cfg.update(num_classes=3, class_weights=(0.5, 2.0, 0.25))
  elif name == "one2one":
    cfg.update(topk=7, topk2=1, min_box_side=float(_STRIDES[1]))
    side = (3, 30)
  elif name == "ties":
    cfg.update(num_classes=2)
    counts, side = (2, 2), (20, 40)
  else:
    raise KeyError(f"unknown pose loss case {name!r}; expected one of {POSE_LOSS_CASES}")
  rows = cases.random_rows(rng, counts, cfg["num_classes"], _IMAGE, side, clusters=True)
  if name == "ties":
    # Image 0's first GT, the only one of class 1, spans the lower rows of level 0, where the
    # native torch.topk takes its tied zero-metric candidates; the stable order takes the top rows.
    rows[0, 1:] = [1, 0.5, 0.8, 0.9, 0.3]
    rows[1:, 1] = 0
  k = cfg["kpt_shape"][0]
  keypoints = random_keypoints(rng, rows, k, dims, **options)
  cfg["max_boxes"] = int(max(max(counts), 1) + 2)  # M above the largest count: padding is exercised
  maps = cases.head_maps(
      rng, rows, batch, cfg["num_classes"], _IMAGE, _STRIDES, cfg["reg_max"], min_side=cfg["min_box_side"]
  )
  if name == "ties":
    ref_box = cases.rows_xyxy(rows[:1], _IMAGE)[0]
    anchors, _ = cases.anchors_px(_IMAGE, _STRIDES)
    inside = np.flatnonzero(((anchors > ref_box[:2]) & (anchors < ref_box[2:])).all(axis=1))
    maps = _without_class(maps, rows, cfg["reg_max"], 1, inside[::3][:3])
  kpts = keypoint_maps(rng, rows, keypoints, batch, cfg["kpt_shape"], min_side=cfg["min_box_side"])
  inputs = dict(feats=maps, kpts=kpts, label_rows=np.asarray(rows, np.float32).reshape(-1, 6), keypoints=keypoints)
  return dict(name=name, inputs=inputs, config=cfg)


def split_loss_config(config: dict) -> tuple[dict, int]:
  """Loss-case config -> (keyword arguments of the loss functions, ``max_boxes``)."""
  kwargs, m = cases.split_loss_config(config)
  kwargs["kpt_shape"] = tuple(kwargs["kpt_shape"])
  if kwargs["sigmas"] is not None:
    kwargs["sigmas"] = tuple(kwargs["sigmas"])
  return kwargs, m


def gt_of(case: dict) -> jaxtal.GroundTruth:
  """The case's labels packed by :func:`jaxtal.pack_labels` (keypoints included)."""
  _, m = split_loss_config(case["config"])
  x = case["inputs"]
  return jaxtal.pack_labels(x["label_rows"], x["feats"][0].shape[0], m, _IMAGE, keypoints=x["keypoints"])


# ----------------------------------------------------------------------------- fixture files


def to_arrays(case: dict, ref: dict, version: str) -> dict[str, np.ndarray]:
  """``cases.to_arrays`` with the per-level keypoint maps and their gradients as numbered keys."""
  inputs, ref = dict(case["inputs"]), dict(ref)
  for i, a in enumerate(inputs.pop("kpts", ())):
    inputs[f"kpt{i}"] = a
  for i, g in enumerate(ref.pop("kpt_grads", ())):
    ref[f"kpt_grad{i}"] = np.asarray(g, np.float32)
  return cases.to_arrays(dict(case, inputs=inputs), ref, version)


def load_fixture(name: str) -> tuple[dict, dict, str]:
  """Reads ``tests/fixtures/pose_loss_<name>.npz`` as ``(case, ref, version)``."""
  case, ref, version = cases.load_fixture("pose_loss", name)
  case["inputs"]["kpts"] = cases.numbered(case["inputs"], "kpt")
  ref["kpt_grads"] = cases.numbered(ref, "kpt_grad")
  for key in ("pose", "kobj"):
    ref[key] = float(ref[key])
  cfg = case["config"]
  cfg["kpt_shape"] = tuple(cfg["kpt_shape"])
  if cfg["sigmas"] is not None:
    cfg["sigmas"] = tuple(cfg["sigmas"])
  return case, ref, version


def fixture_path(name: str) -> str:
  return cases.fixture_path("pose_loss", name)
