"""Independent NumPy expectations (float64) shared by the unit tests.

Written from the papers' formulas and jaxtal's docstrings, never by calling the code under test:
the box overlaps (IoU, GIoU, DIoU, CIoU), the DFL decode, the task-aligned assignment (dense
``(M, A)`` per image, every intermediate step returned), YOLO label packing and the detection
loss (BCE + CIoU + DFL, or L1 for ``reg_max == 1``). The only jaxtal names used here are
:class:`jaxtal.GroundTruth` (a container) and :data:`jaxtal.COORD_LIMIT` (a documented constant).
"""

from __future__ import annotations

import math

import numpy as np

from jaxtal import COORD_LIMIT


def np_box_iou(box1, box2, kind, eps=1e-7):
  """IoU / GIoU / DIoU / CIoU from the papers, with eps on heights, the union and the enclosing diagonal."""
  b1, b2 = np.broadcast_arrays(np.asarray(box1, np.float64), np.asarray(box2, np.float64))
  x1, y1, x2, y2 = np.moveaxis(b1, -1, 0)
  u1, v1, u2, v2 = np.moveaxis(b2, -1, 0)
  w1, h1 = x2 - x1, y2 - y1 + eps
  w2, h2 = u2 - u1, v2 - v1 + eps
  inter = np.clip(np.minimum(x2, u2) - np.maximum(x1, u1), 0, None) * np.clip(
      np.minimum(y2, v2) - np.maximum(y1, v1), 0, None
  )
  union = w1 * h1 + w2 * h2 - inter + eps
  iou = inter / union
  if kind == "iou":
    return iou
  cw = np.maximum(x2, u2) - np.minimum(x1, u1)  # enclosing box
  ch = np.maximum(y2, v2) - np.minimum(y1, v1)
  if kind == "giou":  # Rezatofighi et al. 2019: IoU - |C \ (A u B)| / |C|
    c_area = cw * ch + eps
    return iou - (c_area - union) / c_area
  c2 = cw**2 + ch**2 + eps  # squared diagonal of the enclosing box
  rho2 = ((u1 + u2 - x1 - x2) ** 2 + (v1 + v2 - y1 - y2) ** 2) / 4  # squared centre distance
  if kind == "diou":  # Zheng et al. 2020, eq. (6)
    return iou - rho2 / c2
  v = 4 / math.pi**2 * (np.arctan(w2 / h2) - np.arctan(w1 / h1)) ** 2  # eq. (9)
  alpha = v / (1 - iou + v + eps)  # eq. (11)
  return iou - (rho2 / c2 + alpha * v)


def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_logsumexp(x, axis=-1):
  top = x.max(axis=axis, keepdims=True)
  return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True)))[..., 0]


def np_sigmoid(x):
  x = np.asarray(x, np.float64)
  return np.exp(-np.logaddexp(0.0, -x))


def np_dfl_expectation(pred_dist, reg_max):
  """``(..., 4R)`` bin logits -> ``(..., 4)`` expected distances (softmax, then ``sum_i p_i * i``)."""
  d = np.asarray(pred_dist, np.float64)
  if reg_max == 1:
    return d
  p = np_softmax(d.reshape(*d.shape[:-1], 4, reg_max))
  return (p * np.arange(reg_max)).sum(-1)


def np_decode(pred_dist, anchors, reg_max):
  """Softmax over each side's bins, expectation sum_i p_i * i, then xyxy around the anchor."""
  d = np_dfl_expectation(pred_dist, reg_max)
  a = np.asarray(anchors, np.float64)
  return np.concatenate([a - d[..., :2], a + d[..., 2:]], axis=-1)


def np_anchors(shapes, strides, offset=0.5):
  """``(A, 2)`` anchor centres in grid units (x fastest, levels in order) and ``(A, 1)`` strides."""
  pts, st = [], []
  for (h, w), s in zip(shapes, strides):
    ys, xs = np.meshgrid(np.arange(h) + offset, np.arange(w) + offset, indexing="ij")
    pts.append(np.stack([xs, ys], -1).reshape(-1, 2))
    st.append(np.full((h * w, 1), float(s)))
  return np.concatenate(pts).astype(np.float64), np.concatenate(st)


def np_valid_rows(labels, boxes, mask, nc, image_hw=None):
  """``(..., M)`` rows that may own anchors, as documented in ``jaxtal.labels.valid_rows``: real,
  class in ``[0, nc)``, every coordinate finite with ``|x| <= COORD_LIMIT``, positive area and (in
  the loss, where the image size is known) some overlap with the image."""
  b = np.asarray(boxes, np.float64)
  labels = np.asarray(labels)
  with np.errstate(invalid="ignore"):
    bounded = (np.abs(b) <= COORD_LIMIT).all(-1)  # False for NaN and inf
    positive = (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1])
    ok = np.asarray(mask).astype(bool) & bounded & positive & (labels >= 0) & (labels < nc)
    if image_hw is not None:
      h, w = image_hw
      ok &= (b[..., 0] < w) & (b[..., 2] > 0) & (b[..., 1] < h) & (b[..., 3] > 0)
  return ok


def np_assign_one(scores, pred_boxes, anchors, labels, boxes, mask, *, topk=10, topk2=None, alpha=0.5, beta=6.0,
                  eps=1e-9, min_box_side=16.0, overlap="ciou", image_hw=None, gate=None, shortlist=None,
                  pair_overlap=None):
  """Task-aligned assignment of one image, dense ``(M, A)``, from the TOOD paper and the jaxtal docstring.

  ``overlap`` is ``"ciou"`` (Ultralytics) or ``"iou"``: the overlap of the align metric and of
  conflict resolution; or ``pair_overlap``, a given ``(M, A)`` overlap (e.g. keypoint OKS).
  ``min_box_side`` defaults to jaxtal's (16: ``strides[1]`` of the test problems' ``(8, 16)`` and a
  bare assigner config's). ``gate``: an ``(M, A)`` bool further candidate condition, applied to a GT
  only where it leaves it a candidate. ``shortlist``: ``(f, listed_fn, unlisted_fn)``: each GT's
  ``min(f * topk, A)`` best candidates by ``s^alpha u^beta + eps`` get overlap ``listed_fn(u)``,
  the others ``unlisted_fn(u)`` (both ``(M, A)`` -> ``(M, A)``). Returns the final targets, the
  per-GT positive counts and every intermediate step (``valid``, ``in_box``, ``overlaps``,
  ``metric``, ``topk_mask``, ``pos``).
  """
  m, a = len(labels), len(anchors)
  nc = scores.shape[-1]
  valid = np_valid_rows(labels, boxes, mask, nc, image_hw)
  boxes = np.where(valid[:, None], boxes, 0.0)
  # 1. in-box: anchor centre strictly inside the box (sides below min_box_side widened about the centre).
  ctr, wh = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
  wh = np.where(valid[:, None] & (wh < min_box_side), min_box_side, wh)
  lt, rb = ctr - wh / 2, ctr + wh / 2
  deltas = np.concatenate([anchors[None] - lt[:, None], rb[:, None] - anchors[None]], axis=-1)
  cand = (deltas.min(-1) > eps) & valid[:, None]
  if gate is not None:
    gated = cand & gate
    cand = np.where(gated.any(1, keepdims=True), gated, cand)
  # 2. align metric s^alpha * u^beta, u = CIoU (or IoU, or the given overlap) clamped at 0.
  u = np_box_iou(boxes[:, None], pred_boxes[None], overlap) if pair_overlap is None else np.asarray(pair_overlap, np.float64)
  overlaps = np.where(cand & np.isfinite(u), np.maximum(u, 0), 0)
  s = np.where(np.isfinite(scores), np.clip(scores, 0, 1), 0)[:, np.clip(labels, 0, nc - 1)].T
  if shortlist is not None:
    factor, listed_fn, unlisted_fn = shortlist
    rank = np.where(cand, s**alpha * overlaps**beta + eps, 0)
    listed = np.zeros((m, a), bool)
    for g in range(m):
      listed[g, np.argsort(-rank[g], kind="stable")[: min(factor * topk, a)]] = True
    u = np.where(listed, listed_fn(overlaps), unlisted_fn(overlaps))
    overlaps = np.where(cand & np.isfinite(u), np.maximum(u, 0), 0)
  metric = np.where(cand, s**alpha * overlaps**beta, 0)
  # 3. top-k per GT (ties: lower anchor index), in-box only.
  pos = np.zeros((m, a), bool)
  for g in range(m):
    top = np.argsort(-metric[g], kind="stable")[:topk]
    pos[g, top] = cand[g, top]
  topk_mask = pos.copy()
  # 4. an anchor claimed by several GTs goes to the in-box GT of highest overlap (ties: lower GT index).
  multi = pos.sum(0) > 1
  best = np.argmax(np.where(cand, overlaps, -1.0), axis=0)
  pos[:, multi] = np.arange(m)[:, None] == best[None, multi]
  if topk2 is not None and topk2 != topk:
    for g in range(m):
      mine = np.flatnonzero(pos[g])
      keep = mine[np.argsort(-metric[g, mine], kind="stable")[:topk2]]
      pos[g] = False
      pos[g, keep] = True
  fg = pos.any(0)
  gt_index = np.where(fg, pos.argmax(0), 0)
  # 5. soft targets: metric normalised so each GT's best anchor scores its best overlap.
  norm = np.zeros(a)
  for g in range(m):
    if pos[g].any():
      norm[pos[g]] = metric[g, pos[g]] * overlaps[g, pos[g]].max() / (metric[g, pos[g]].max() + eps)
  out_labels = np.where(fg, labels[gt_index], 0)
  return dict(
      labels=out_labels,
      boxes=np.where(fg[:, None], boxes[gt_index], 0.0),
      scores=np.eye(nc)[out_labels] * norm[:, None],
      fg_mask=fg,
      gt_index=gt_index,
      positives_per_gt=pos.sum(1),
      valid=valid,
      in_box=cand,
      overlaps=overlaps,
      metric=metric,
      topk_mask=topk_mask,
      pos=pos,
      num_multi=multi.sum(),  # diagnostics: how many anchors went through conflict resolution
      num_in_box=cand.sum(1).max(),
  )


def np_assign(pred_scores, pred_boxes, anchors, gt, **kw):
  """:func:`np_assign_one` over a batch; ``gt`` is any ``(labels, boxes, mask)`` triple."""
  labels, boxes, mask = (np.asarray(x) for x in gt[:3])
  out = [
      np_assign_one(*(np.asarray(x, np.float64) for x in (pred_scores[i], pred_boxes[i], anchors)),
                    labels[i], boxes[i].astype(np.float64), mask[i], **kw)
      for i in range(np.shape(pred_scores)[0])
  ]
  return {k: np.stack([o[k] for o in out]) for k in out[0]}


def np_bce_with_logits(x, z):
  return np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))


def np_two_bin_target(num_bins, target):
  """``(..., R)``: mass ``left + 1 - t`` on bin ``floor(t)`` and ``t - left`` on the next (GFL's DFL target)."""
  t = np.asarray(target, np.float64)[..., None]
  left = np.floor(t)
  bins = np.arange(num_bins)
  return (bins == left) * (left + 1 - t) + (bins == left + 1) * (t - left)


def np_pack(rows, b, m, hw):
  """Expected packing: rows of each image in their input order, xywh * (W, H, W, H) -> xyxy."""
  labels, boxes, mask = np.zeros((b, m), np.int32), np.zeros((b, m, 4), np.float32), np.zeros((b, m), bool)
  slot = [0] * b
  h, w = hw
  for r in rows:
    i = int(r[0])
    cx, cy, bw, bh = r[2] * w, r[3] * h, r[4] * w, r[5] * h
    labels[i, slot[i]] = int(r[1])
    boxes[i, slot[i]] = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
    mask[i, slot[i]] = True
    slot[i] += 1
  return labels, boxes, mask


def np_flat_head(feats, num_classes, reg_max, layout="NHWC"):
  """Per-level maps -> ``(b, A, 4R)`` bin logits and ``(b, A, nc)`` class logits, float64."""
  rows = []
  for f in feats:
    f = np.asarray(f, np.float64)
    if layout == "NCHW":
      f = f.transpose(0, 2, 3, 1)
    rows.append(f.reshape(f.shape[0], -1, f.shape[-1]))
  flat = np.concatenate(rows, axis=1)
  assert flat.shape[-1] == 4 * reg_max + num_classes
  return flat[..., : 4 * reg_max], flat[..., 4 * reg_max :]


def np_detection_loss(feats, gt, *, num_classes, strides, reg_max=16, layout="NHWC", box=7.5, cls=0.5, dfl=1.5,
                      class_weights=None, targets=None, **assign_kw):
  """BCE + CIoU + DFL (or L1 when ``reg_max == 1``) of head maps, as Ultralytics' ``v8DetectionLoss``.

  The assignment is :func:`np_assign` of the decoded predictions (sigmoid scores, pixel boxes;
  GT rows with no overlap with the image are invalid), unless ``targets`` gives one: a dict with
  ``scores (b, A, nc)``, ``boxes (b, A, 4)`` pixels and ``fg_mask (b, A)``. The box term is
  CIoU whatever ``overlap`` the assigner used. Returns ``(total, parts [box, cls, dfl], assignment)``.
  """
  if assign_kw.get("min_box_side", None) is None:  # Ultralytics 8.4.190's side floor: the second stride
    assign_kw["min_box_side"] = float(strides[1] if len(strides) > 1 else strides[0])
  dist, logits = np_flat_head(feats, num_classes, reg_max, layout)
  b = dist.shape[0]
  first = np.asarray(feats[0]).shape
  h0, w0 = (first[1], first[2]) if layout == "NHWC" else (first[2], first[3])
  shapes = []
  for f in feats:
    s = np.asarray(f).shape
    shapes.append((s[1], s[2]) if layout == "NHWC" else (s[2], s[3]))
  anchors, stride_col = np_anchors(shapes, strides)
  image_hw = (h0 * strides[0], w0 * strides[0])
  ltrb_pred = np_dfl_expectation(dist, reg_max)
  pred = np.concatenate([anchors - ltrb_pred[..., :2], anchors + ltrb_pred[..., 2:]], -1)  # grid units
  if targets is None:
    targets = np_assign(np_sigmoid(logits), pred * stride_col, anchors * stride_col, gt, image_hw=image_hw, **assign_kw)
  scores, fg = np.asarray(targets["scores"], np.float64), np.asarray(targets["fg_mask"], bool)
  tboxes = np.asarray(targets["boxes"], np.float64) / stride_col
  weight = scores.sum(-1)
  n = max(weight.sum(), 1.0)
  cw = np.ones(num_classes) if class_weights is None else np.asarray(class_weights, np.float64)
  loss_cls = (np_bce_with_logits(logits, scores) * cw).sum() / n
  loss_box = np.sum(((1 - np_box_iou(pred, tboxes, "ciou")) * weight)[fg]) / n
  target_ltrb = np.concatenate([anchors - tboxes[..., :2], tboxes[..., 2:] - anchors], -1)
  if reg_max > 1:
    logp = np.log(np_softmax(dist.reshape(b, -1, 4, reg_max)))
    t = np.clip(target_ltrb, 0, reg_max - 1 - 0.01)
    ce = -(np_two_bin_target(reg_max, t) * logp).sum(-1)
    loss_dfl = np.sum((ce.mean(-1) * weight)[fg]) / n
  else:
    h, w = image_hw
    scale = stride_col / np.array([w, h, w, h])
    l1 = np.abs(ltrb_pred * scale - target_ltrb * scale).mean(-1)
    loss_dfl = np.sum((l1 * weight)[fg]) / n
  parts = np.array([box * loss_box, cls * loss_cls, dfl * loss_dfl])
  return parts.sum() * b, parts, targets


def np_flow_log_prob(params, x: np.ndarray) -> np.ndarray:
  """An independent float64 forward of the flow, written from the equations in jaxtal.flow's docstring (params: a jaxtal.FlowParams)."""
  p = {k: np.asarray(v, np.float64) for k, v in params._asdict().items()}
  silu = lambda a: a * 0.5 * (1 + np.tanh(a / 2))  # a * sigmoid(a), without overflow  # noqa: E731
  net = lambda pre, i, a: silu(silu(a @ p[pre + "w1"][i] + p[pre + "b1"][i]) @ p[pre + "w2"][i] + p[pre + "b2"][i]) @ p[pre + "w3"][i] + p[pre + "b3"][i]  # noqa: E731
  z, log_det = np.asarray(x, np.float64), np.zeros(len(x))
  for i in range(5, -1, -1):
    keep = 1 if i % 2 == 0 else 0  # the coordinate layer i keeps; the other one is updated
    upd = 1 - keep
    kept = np.zeros_like(z)
    kept[:, keep] = z[:, keep]
    s = np.tanh(net("s_", i, kept))[:, upd]
    t = net("t_", i, kept)[:, upd]
    z = z.copy()
    z[:, upd] = (z[:, upd] - t) * np.exp(-s)
    log_det -= s
  return -0.5 * (z**2).sum(-1) - math.log(2 * math.pi) + log_det


def np_pose_terms(kpt_maps, gt_keypoints, targets, *, strides, kpt_shape, sigmas, layout="NHWC"):
  """``(pose, kobj)`` before gains, from the YOLO-Pose / COCO OKS formulas in float64.

  ``targets``: a dict with ``fg_mask (b, A)``, ``gt_index (b, A)`` and ``boxes (b, A, 4)`` pixels.
  A GT keypoint is labelled when its visibility is non-zero (``D = 2``: always) and its values
  finite with ``|x| <= COORD_LIMIT``; per foreground anchor the OKS loss of its labelled keypoints
  is scaled by ``K / labelled``; both terms are divided by ``n_fg * K``.
  """
  k, d = kpt_shape
  rows = []
  for m in kpt_maps:
    m = np.asarray(m, np.float64)
    m = m.transpose(0, 2, 3, 1) if layout == "NCHW" else m
    rows.append(m.reshape(m.shape[0], -1, k, d))
  raw = np.concatenate(rows, 1)
  shapes = [(m.shape[1], m.shape[2]) if layout == "NHWC" else (m.shape[2], m.shape[3]) for m in kpt_maps]
  anchors, stride = np_anchors(shapes, strides)
  fg, gi = np.asarray(targets["fg_mask"], bool), np.asarray(targets["gt_index"])
  gtk = np.asarray(gt_keypoints, np.float64)
  pose = kobj = 0.0
  for i, a in zip(*np.nonzero(fg)):
    g = gtk[i, gi[i, a]]
    with np.errstate(invalid="ignore"):
      lab = np.isfinite(g).all(-1) & (np.abs(g[:, :2]) <= COORD_LIMIT).all(-1)
    if g.shape[-1] == 3:
      lab &= g[:, 2] != 0
    box = np.asarray(targets["boxes"][i, a], np.float64) / stride[a]
    area = (box[2] - box[0]) * (box[3] - box[1])
    pred_xy = 2 * raw[i, a, :, :2] + anchors[a] - 0.5
    gt_xy = np.where(lab[:, None], g[:, :2], 0.0) / stride[a]
    e = ((pred_xy - gt_xy) ** 2).sum(-1) / (8 * np.asarray(sigmas) ** 2 * (area + 1e-9))
    if lab.any():
      pose += k / lab.sum() * np.sum(np.where(lab, 1 - np.exp(-e), 0.0))
    if d == 3:
      kobj += np_bce_with_logits(raw[i, a, :, 2], lab.astype(np.float64)).sum()
  n = max(fg.sum(), 1) * k
  return pose / n, kobj / n
