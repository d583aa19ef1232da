"""YOLO26 segmentation: the mask-IoU geometry, the semantic term and its class map, the nearest resize,
``segment26_loss`` and ``segment_loss`` with semantic logits, degenerate and non-finite inputs,
validation, the NNX module and end-to-end use.

Expectations are computed here in NumPy (float64) from the definitions in ``jaxtal/segment26.py`` and
``jaxtal/segment.py``, or by PyTorch for the resize (the reference fixture), never by the code under
test; parity with Ultralytics is ``test_parity_segment26.py``. Shapes are fixed and small (a 32 x 32
input, A = 80 anchors, 16 x 16 prototypes, 8 x 8 semantic logits) so that a few compilations serve
every test.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtal
from jaxtal.segment import class_map, nearest_indices, resize_nearest, semantic_term
from support import segment26_cases, segment_cases
from support.oracles import np_bce_with_logits, np_box_iou, np_sigmoid

NC, R, NM = 3, 4, 4
SHAPES = ((8, 8), (4, 4))
STRIDES = (4, 8)
IMAGE = 32
A = sum(h * w for h, w in SHAPES)
B, M = 2, 4
PROTO_HW, SEM_HW, MASK_HW = (16, 16), (8, 8), (24, 20)
CFG = jaxtal.Segment26LossConfig(num_classes=NC, strides=STRIDES, reg_max=R)  # min_box_side: strides[1] = 8

# Label rows [image, class, cx, cy, w, h] (normalised): overlapping boxes, big enough that some GT has more
# candidates than its short list (3 * topk = 30 of A = 80).
ROWS = np.array(
    [
        [0, 0, 0.45, 0.5, 0.8, 0.85],
        [0, 1, 0.62, 0.62, 0.5, 0.5],
        [0, 2, 0.2, 0.8, 0.3, 0.35],
        [1, 1, 0.5, 0.4, 0.75, 0.6],
    ],
    np.float32,
)


def predictions(seed=0, b=B, semantic=True):
  """NHWC head maps (class logits raised, so there are positives), coefficients, prototypes, semantic logits."""
  rng = np.random.default_rng(seed)
  feats, coefs = [], []
  for h, w in SHAPES:
    f = rng.normal(0.0, 1.0, (b, h, w, 4 * R + NC)).astype(np.float32)
    f[..., 4 * R :] += 1.0
    feats.append(f)
    coefs.append(segment26_cases.quantised(rng.normal(0.0, 1.0, (b, h, w, NM))))
  proto = segment26_cases.quantised(rng.normal(0.0, 1.0, (b,) + PROTO_HW + (NM,)))
  sem = rng.normal(0.0, 2.0, (b,) + SEM_HW + (NC,)).astype(np.float32) if semantic else None
  return jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto, semantic=sem)


def ground_truth(rows=ROWS, mask_hw=MASK_HW, seed=0, per_slot=False) -> jaxtal.GroundTruth:
  """``pack_labels`` + ``pack_masks`` of ``rows`` with ellipse masks (``segment_cases.instance_masks``)."""
  inst = segment_cases.instance_masks(np.random.default_rng(seed), rows, IMAGE, mask_hw)
  gt = jaxtal.pack_labels(rows, B, M, IMAGE)
  if per_slot:
    return gt._replace(masks=segment_cases.slot_masks(inst, rows[:, 0], B, M, np.float32))
  return gt._replace(masks=jaxtal.pack_masks(inst, rows[:, 0], B, M))


@functools.partial(jax.jit, static_argnames=("config", "v8"))
def loss_and_grads(preds, gt, config=CFG, v8=False):
  """``(total, parts, d preds)`` of ``segment26_loss`` (or ``segment_loss``)."""
  return loss_grads_targets(preds, gt, config, v8)[:3]


@functools.partial(jax.jit, static_argnames=("config", "v8"))
def loss_grads_targets(preds, gt, config=CFG, v8=False):
  """``(total, parts, d preds, targets)``: also the assignment inside the loss (one compilation for both)."""
  fn, targets = (jaxtal.segment_loss, jaxtal.segment_targets) if v8 else (jaxtal.segment26_loss, jaxtal.segment26_targets)
  (total, parts), grads = jax.value_and_grad(lambda p: fn(p, gt, config), has_aux=True)(preds)
  return total, parts, grads, targets(preds, gt, config)[1]


@functools.partial(jax.jit, static_argnames=("index_map",))
def class_map_jit(gt, index_map):
  return class_map(gt, index_map, NC)


@jax.jit
def semantic_value_and_grad(logits, cmap, targets):
  return jax.value_and_grad(lambda x: semantic_term(x, cmap, targets, None))(logits)


def assert_finite(*trees):
  for x in jax.tree.leaves(trees):
    assert np.isfinite(np.asarray(x)).all()


# ----------------------------------------------------------------------------- nearest resize


@pytest.mark.parametrize(("n_in", "n_out", "want"), [
    (16, 8, [0, 2, 4, 6, 8, 10, 12, 14]),
    (8, 16, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]),
    (12, 8, [0, 1, 3, 4, 6, 7, 9, 10]),
    (10, 16, [0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 6, 7, 8, 8, 9]),
    (5, 5, [0, 1, 2, 3, 4]),
])
def test_nearest_indices(n_in, n_out, want):
  """``floor(i * n_in / n_out)``: written out by hand."""
  np.testing.assert_array_equal(nearest_indices(n_in, n_out), want)


@pytest.mark.parametrize(("src", "dst"), [((24, 20), (16, 16)), ((12, 10), (16, 16)), ((16, 16), (8, 8)), ((7, 13), (16, 3)), ((160, 160), (80, 80))])
def test_resize_nearest_matches_torch(src, dst, reference):
  """The reference's ``F.interpolate(mode="nearest")`` on an integer map, bit for bit (float32 index rounding included)."""
  import torch  # noqa: PLC0415  (the reference fixture skips when torch is missing)

  x = np.random.default_rng(0).integers(0, 1000, (2,) + src).astype(np.int32)
  want = torch.nn.functional.interpolate(torch.as_tensor(x, dtype=torch.float32)[None], dst, mode="nearest")[0].numpy()
  np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(x), dst)), want.astype(np.int32))


# ----------------------------------------------------------------------------- the class map


def np_class_map(gt, index_map: bool) -> np.ndarray:
  """The reference data pipeline's ``sem_masks`` rule (``segment26_cases.sem_masks``) on the real rows, -1 uncovered."""
  labels, real = np.asarray(gt.labels), np.asarray(gt.mask)
  masks = np.asarray(gt.masks)
  out = []
  for i in range(labels.shape[0]):
    rows = np.array([[0, labels[i, j], 0, 0, 0, 0] for j in range(M) if real[i, j]], np.float32).reshape(-1, 6)
    if index_map:
      m = masks[i : i + 1]
      covered = (m[0] > 0) & (m[0] <= len(rows))
    else:
      m = masks[i][real[i]]
      covered = (m > 0).any(0)
    sem = segment26_cases.sem_masks(rows, m, 1, index_map)[0]
    out.append(np.where(covered, sem, -1))
  return np.stack(out).astype(np.int32)


@pytest.mark.parametrize("per_slot", [False, True])
def test_class_map_matches_the_pipelines_rule(per_slot):
  gt = ground_truth(per_slot=per_slot)
  got = np.asarray(class_map_jit(gt, not per_slot))
  np.testing.assert_array_equal(got, np_class_map(gt, not per_slot))
  assert (got == -1).any() and len(np.unique(got)) >= 3


def test_class_map_smallest_instance_wins_and_ties_go_to_the_lower_slot():
  masks = np.zeros((B, M, 4, 4), np.float32)
  masks[0, 0, :, :] = 1  # big: class 0
  masks[0, 1, :2, :2] = 1  # small, on top of it: class 1
  masks[0, 2, 2:, 2:] = 1  # the same size as slot 3, which covers the same pixels: the lower slot (2) wins
  masks[0, 3, 2:, 2:] = 1
  masks[1, 0, 0, 0] = np.nan  # NaN, inf, out of range never cover
  masks[1, 0, 0, 1] = np.inf
  masks[1, 0, 0, 2] = 2.0
  masks[1, 1, 3, 3] = 1  # a padding slot: never covers
  gt = jaxtal.GroundTruth(
      np.array([[0, 1, 2, 1], [0, 2, 0, 0]], np.int32), np.zeros((B, M, 4), np.float32),
      np.array([[True] * 4, [True, False, False, False]]), masks=masks,
  )
  got = np.asarray(class_map_jit(gt, False))
  want0 = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])
  np.testing.assert_array_equal(got[0], want0)
  np.testing.assert_array_equal(got[1], -np.ones((4, 4)))


def test_class_map_of_an_index_map_ignores_padding_and_bad_classes():
  index = np.array([[[0, 1, 2, 3], [4, 5, 1, 1]], [[1, 2, 0, 0], [0, 0, 0, 0]]], np.int32)  # 5 > M
  gt = jaxtal.GroundTruth(
      np.array([[2, 7, 1, 0], [1, 0, 0, 0]], np.int32), np.zeros((B, M, 4), np.float32),
      np.array([[True, True, True, False], [True, False, False, False]]), masks=index,
  )
  want = np.array([[[-1, 2, -1, 1], [-1, -1, 2, 2]], [[1, -1, -1, -1], [-1, -1, -1, -1]]])  # class 7 >= nc, slot 3 padding
  np.testing.assert_array_equal(np.asarray(class_map_jit(gt, True)), want)


def test_a_given_class_map_is_used_as_is():
  cmap = np.array([[[0, 2, -1, 5]], [[1, -3, 2, 2]]], np.int32)
  gt = ground_truth()._replace(class_map=cmap)
  np.testing.assert_array_equal(np.asarray(class_map(gt, True, NC)), [[[0, 2, -1, -1]], [[1, -1, 2, 2]]])


# ----------------------------------------------------------------------------- the semantic term


def np_semantic(logits, cmap):
  """``0.5 * BCE mean + 0.5 * Dice`` (smooth 1) of NCHW logits against the one-hot class map resized nearest."""
  nc, h, w = logits.shape[1:]
  iy, ix = nearest_indices(cmap.shape[1], h), nearest_indices(cmap.shape[2], w)
  c = cmap[:, iy][:, :, ix]
  t = (c[:, None] == np.arange(nc)[None, :, None, None]).astype(np.float64)
  x = logits.astype(np.float64)
  p = np_sigmoid(x)
  dice = 1 - (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)
  return 0.5 * np_bce_with_logits(x, t).mean() + 0.5 * dice.mean()


def _targets_with(fg: bool) -> jaxtal.Targets:
  e = jaxtal.ForegroundEntries(jnp.zeros((B, 2), jnp.int32), jnp.zeros((B, 2), jnp.int32), jnp.array([[fg, False]] * B))
  z = jnp.zeros((B, A), jnp.int32)
  return jaxtal.Targets(z, jnp.zeros((B, A, 4)), jnp.zeros((B, A)), z.astype(bool), z, jnp.zeros((B, M), jnp.int32), e)


@pytest.mark.parametrize("cmap_hw", [(8, 8), (24, 20), (5, 7)])
def test_semantic_term_matches_numpy(cmap_hw):
  rng = np.random.default_rng(1)
  logits = rng.normal(0.0, 3.0, (B, NC) + SEM_HW).astype(np.float32)
  cmap = rng.integers(-1, NC, (B,) + cmap_hw).astype(np.int32)
  got, grad = semantic_value_and_grad(jnp.asarray(logits), jnp.asarray(cmap), _targets_with(True))
  np.testing.assert_allclose(got, np_semantic(logits, cmap), rtol=1e-6)
  assert np.abs(np.asarray(grad)).max() > 0


def test_semantic_term_is_zero_without_foreground():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(B, NC) + SEM_HW), jnp.float32)
  value, grad = semantic_value_and_grad(logits, jnp.zeros((B, 8, 8), jnp.int32), _targets_with(False))
  assert float(value) == 0.0 and not np.asarray(grad).any()


# ----------------------------------------------------------------------------- the mask-IoU geometry


def np_pair_iou(coef, box, proto, gt_mask):
  """Mask IoU of one pair: ``coef . proto > 0`` cropped to ``box`` (prototype pixels) against ``gt_mask``."""
  logits = np.einsum("n,nhw->hw", coef.astype(np.float64), proto.astype(np.float64))
  mh, mw = logits.shape
  rows, cols = np.arange(mh), np.arange(mw)
  pred = np.isfinite(logits) & (logits > 0)
  pred &= ((rows >= box[1]) & (rows < box[3]))[:, None] & ((cols >= box[0]) & (cols < box[2]))[None, :]
  inter = (pred & gt_mask).sum()
  return inter / max(gt_mask.sum() + pred.sum() - inter, 1)


def _refine_problem(seed=0, index_map=True):
  """One image: GT boxes, predicted boxes, coefficients, prototypes, GT masks at 16 x 16, a short list."""
  rng = np.random.default_rng(seed)
  gt_boxes = jaxtal.pack_labels(ROWS[:3], 1, M, IMAGE).boxes[0]
  valid = np.array([True, True, True, False])
  anchors = rng.uniform(0, IMAGE, (A, 2)).astype(np.float32)
  pred = np.concatenate([anchors - rng.uniform(2, 12, (A, 2)), anchors + rng.uniform(2, 12, (A, 2))], 1).astype(np.float32)
  coefs = segment26_cases.quantised(rng.normal(size=(A, NM)))
  proto = segment26_cases.quantised(rng.normal(size=(NM,) + PROTO_HW))
  inst = segment_cases.instance_masks(rng, ROWS[:3], IMAGE, PROTO_HW).astype(bool)
  masks = np.zeros(PROTO_HW, np.int32)
  for j in range(3):
    masks[inst[j]] = j + 1
  per_slot = masks[None] == np.arange(1, M + 1)[:, None, None]
  listed = np.stack([rng.choice(A, 30, replace=False) for _ in range(M)]).astype(np.int32)
  cand = rng.uniform(size=(M, 30)) < 0.7
  cand[3] = False
  image = jaxtal.MaskImage(jnp.asarray(proto), jnp.asarray(masks if index_map else per_slot), jnp.float32(PROTO_HW[0] / IMAGE))
  return gt_boxes, valid, anchors, pred, coefs, proto, per_slot, listed, cand, image


@pytest.mark.parametrize(("index_map", "chunk", "early_exit"), [(True, None, True), (False, 7, True), (True, 1, True), (False, 7, False)])
def test_refine_matches_numpy(index_map, chunk, early_exit):
  """The listed pairs' overlap is ``(max(CIoU, 0) + mask IoU) / 2`` (mask IoU 0 off candidates), whatever the chunk
  and loop form; afterwards an unlisted pair's overlap is half its box CIoU."""
  gt_boxes, valid, anchors, pred, coefs, proto, per_slot, listed, cand, image = _refine_problem(index_map=index_map)
  geo = jaxtal.mask_iou(iou_chunk=chunk, early_exit=early_exit)
  g = geo.gt_data(jnp.asarray(gt_boxes), jnp.asarray(valid), 0.0)
  p = geo.pred_data(jnp.asarray(pred), jnp.asarray(anchors), jnp.asarray(coefs))
  p_listed = jax.tree.map(lambda x: x[jnp.asarray(listed)], p)
  g2, overlap = jax.jit(geo.refine)(g, p_listed, jnp.asarray(listed), jnp.asarray(cand), image)
  scale = PROTO_HW[0] / IMAGE
  want = np.zeros((M, 30))
  for m in range(M):
    for j, a in enumerate(listed[m]):
      ciou = max(np_box_iou(np.asarray(gt_boxes[m], np.float64), pred[a].astype(np.float64), "ciou"), 0.0)
      miou = np_pair_iou(coefs[a], pred[a] * np.float32(scale), proto, per_slot[m]) if cand[m, j] else 0.0
      want[m, j] = (ciou + miou) / 2
  np.testing.assert_allclose(np.asarray(overlap), want, rtol=2e-6, atol=1e-7)
  assert (want[cand] > np.array([[max(np_box_iou(np.asarray(gt_boxes[m], np.float64), pred[a].astype(np.float64), "ciou"), 0) / 2
                                   for a in listed[m]] for m in range(M)])[cand] + 1e-3).sum() >= 5  # mask IoU > 0 somewhere
  half = geo.overlap(jax.tree.map(lambda x: x[:, None], g2), jax.tree.map(lambda x: x[None], p))
  full = geo.overlap(jax.tree.map(lambda x: x[:, None], g), jax.tree.map(lambda x: x[None], p))
  np.testing.assert_allclose(np.asarray(half), np.asarray(full) / 2, rtol=1e-7)


def test_refine_with_non_finite_coefficients_and_prototypes_counts_those_logits_as_outside():
  gt_boxes, valid, anchors, pred, coefs, proto, per_slot, listed, cand, image = _refine_problem(seed=3)
  coefs, proto = coefs.copy(), proto.copy()
  coefs[listed[0, :5]] = np.nan
  coefs[listed[1, :3], 0] = np.inf
  proto[:, 3, 4] = np.nan
  proto[1, 7, :] = -np.inf
  geo = jaxtal.mask_iou()
  g = geo.gt_data(jnp.asarray(gt_boxes), jnp.asarray(valid), 0.0)
  p = jax.tree.map(lambda x: x[jnp.asarray(listed)], geo.pred_data(jnp.asarray(pred), jnp.asarray(anchors), jnp.asarray(coefs)))
  _, overlap = jax.jit(geo.refine)(g, p, jnp.asarray(listed), jnp.asarray(cand), image._replace(proto=jnp.asarray(proto)))
  overlap = np.asarray(overlap)
  assert np.isfinite(overlap).all() and (overlap >= 0).all() and (overlap <= 1).all()
  for m, j in ((0, 0), (1, 0), (2, 4)):
    a = listed[m, j]
    ciou = max(np_box_iou(np.asarray(gt_boxes[m], np.float64), pred[a].astype(np.float64), "ciou"), 0.0)
    miou = np_pair_iou(coefs[a], pred[a] * np.float32(0.5), proto, per_slot[m]) if cand[m, j] else 0.0
    np.testing.assert_allclose(overlap[m, j], (ciou + miou) / 2, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("index_map", [True, False])
@pytest.mark.parametrize(("chunk", "early_exit", "plain"), [
    (None, True, ()), (7, True, ("pair_mask_counts",)), (3, False, ()), (1, True, ("pair_mask_counts",)), (None, True, ("pair_mask_counts",)),
])
def test_listed_mask_iou_matches_numpy(index_map, chunk, early_exit, plain, monkeypatch):
  """The refine's mask IoU of every listed pair equals a float64 NumPy count: boxes on each border, oversize,
  inverted, NaN and infinite; empty and full predicted masks; non-finite coefficients and prototype pixels;
  the tiles (7 x 7 on the 24 x 20 plane: partial tiles on both sides, several chunks of 5 pairs a tile) and the
  whole plane, every chunking and both loop forms; the IoUs are not trivial."""
  monkeypatch.setattr(jaxtal.kernels.yolo26, "MASK_TILE", 7)
  monkeypatch.setattr(jaxtal.kernels.yolo26, "MASK_TILE_CHUNK", 5)
  coef, box, cand, image = segment26_cases.counting_problem(1, index_map)
  listed_iou = lambda *a: jaxtal.segment26._listed_iou(*a, chunk, early_exit, plain)  # noqa: E731  (a fresh trace: MASK_TILE)
  got = np.asarray(jax.jit(listed_iou)(jnp.asarray(coef), jnp.asarray(box), jnp.asarray(cand), image))
  per_slot = np.asarray(image.masks) if not index_map else np.asarray(image.masks)[None] == np.arange(1, 6)[:, None, None]
  with np.errstate(invalid="ignore", over="ignore"):
    want = np.array([[np_pair_iou(coef[i, j], box[i, j], np.asarray(image.proto), per_slot[i]) if cand[i, j] else 0.0
                      for j in range(box.shape[1])] for i in range(box.shape[0])])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert (want[3, :3] > 0.3).all() and (want[2, :3] == 0).all() and (want > 0).sum() >= 15


def test_wide_prototype_planes_are_refused():
  """Packed row counts fit int32 up to 32767 pixels a row: a wider plane is a clear trace-time error."""
  assert jaxtal.segment26.MAX_PROTO_WIDTH == 32767
  preds = predictions(0)
  wide = jax.ShapeDtypeStruct((preds.proto.shape[0], 2, 32768, preds.proto.shape[-1]), jnp.float32)
  with pytest.raises(ValueError, match="at most 32767 pixels a row"):
    jax.eval_shape(lambda p: jaxtal.segment26_targets(preds._replace(proto=p), ground_truth(seed=0), CFG), wide)


def test_the_geometry_needs_its_extras():
  with pytest.raises(ValueError, match="mask coefficients as GeometryExtra.pred"):
    jaxtal.mask_iou().pred_data(jnp.zeros((A, 4)), jnp.zeros((A, 2)))
  with pytest.raises(ValueError, match="iou_chunk"):
    jaxtal.mask_iou(iou_chunk=0)
  assert jaxtal.mask_iou() is jaxtal.mask_iou("ciou", None) and jaxtal.mask_iou().shortlist == 3
  assert jaxtal.mask_iou(early_exit=False) is not jaxtal.mask_iou()


@pytest.mark.slow
def test_the_short_list_binds():
  """One GT over the whole input whose mask is its left half; every anchor a candidate, scores equal. Anchors
  0-39 predict a near-perfect box and an empty mask, anchors 40-79 the left half's box and a full mask (so
  their mask IoU is 1). Only 30 pairs (3 * topk) are refined, the best boxes (0-39): anchors 40-79 keep half
  their box CIoU and lose. Refining every pair (a short list of all A) gives the top-k to anchors 40-79."""
  anchors = np.concatenate([np.stack(np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5), -1).reshape(-1, 2) * s
                            for (h, w), s in zip(SHAPES, STRIDES)]).astype(np.float32)
  good_box = A // 2
  boxes = np.where(np.arange(A)[:, None] < good_box, [1.0, 1.0, 31.0, 31.0], [0.0, 0.0, 16.0, 32.0]).astype(np.float32)
  coefs = np.where(np.arange(A)[:, None] < good_box, -1.0, 1.0).astype(np.float32)
  masks = np.zeros((1,) + PROTO_HW, np.int32)
  masks[0, :, :8] = 1
  gt = jaxtal.GroundTruth(np.zeros((1, 1), np.int32), np.array([[[0.0, 0.0, 32.0, 32.0]]], np.float32), np.ones((1, 1), bool))
  extra = jaxtal.GeometryExtra(pred=coefs[None], image=jaxtal.MaskImage(np.ones((1, 1) + PROTO_HW, np.float32), masks, np.full((1,), 0.5, np.float32)))
  cfg = jaxtal.AssignerConfig(topk=10)

  def fg(shortlist):
    geometry = jaxtal.mask_iou()._replace(shortlist=shortlist)
    run = jax.jit(lambda s, b, gt, extra: jaxtal.assign_targets(
        (s,), b, anchors, gt, cfg, geometry=geometry, from_logits=True, image_hw=(IMAGE, IMAGE), extra=extra))
    return np.flatnonzero(np.asarray(run(np.zeros((1, A, 1), np.float32), boxes[None], gt, extra).fg_mask[0]))

  short, every = fg(3), fg(-(-A // cfg.topk))
  assert len(short) == len(every) == 10
  assert (short < good_box).all() and (every >= good_box).all()


# ----------------------------------------------------------------------------- the losses


V8 = jaxtal.SegmentLossConfig(**{f.name: getattr(CFG, f.name) for f in dataclasses.fields(jaxtal.SegmentLossConfig)})


@pytest.mark.slow
def test_segment26_loss_parts():
  """Five gain-scaled parts, all positive here, ``total = sum * b``, finite gradients reaching the semantic logits."""
  preds, gt = predictions(), ground_truth()
  total, parts, grads, _ = loss_grads_targets(preds, gt)
  assert isinstance(parts, jaxtal.Segment26LossParts) and parts._fields == ("box", "seg", "cls", "dfl", "sem")
  assert min(float(p) for p in parts) > 0
  np.testing.assert_allclose(total, sum(parts) * B, rtol=1e-6)
  assert_finite(total, parts, grads)
  assert np.abs(np.asarray(grads.semantic)).max() > 0 and np.abs(np.asarray(grads.proto)).max() > 0


def test_the_parts_each_loss_returns():
  """``segment26_loss`` always gives five parts; ``segment_loss`` its four, and five with semantic logits (traced only)."""
  preds, gt = predictions(), ground_truth()
  shape = lambda fn, p, cfg: jax.eval_shape(lambda p: fn(p, gt, cfg)[1], p)  # noqa: E731
  assert type(shape(jaxtal.segment26_loss, preds._replace(semantic=None), CFG)) is jaxtal.Segment26LossParts
  assert type(shape(jaxtal.segment_loss, preds._replace(semantic=None), V8)) is jaxtal.SegmentLossParts
  assert type(shape(jaxtal.segment_loss, preds, V8)) is jaxtal.SemanticSegmentLossParts
  assert jaxtal.Segment26LossParts is jaxtal.SemanticSegmentLossParts


@pytest.mark.slow
def test_without_semantic_logits_and_the_v8_loss_with_them():
  """Without semantic logits ``sem = 0`` and the other parts are unchanged; ``segment_loss`` with them adds the
  same ``sem`` (the term reads no assignment but whether some anchor is foreground) to its own four parts."""
  preds, gt = predictions(), ground_truth()
  _, parts, _ = loss_and_grads(preds, gt)
  _, plain, _ = loss_and_grads(preds._replace(semantic=None), gt)
  assert float(plain.sem) == 0.0
  np.testing.assert_allclose(tuple(plain[:4]), tuple(parts[:4]), rtol=1e-6)
  _, v8, grads = loss_and_grads(preds, gt, config=V8, v8=True)
  assert isinstance(v8, jaxtal.SemanticSegmentLossParts)
  np.testing.assert_allclose(v8.sem, parts.sem, rtol=1e-6)
  _, v8_plain, _ = loss_and_grads(preds._replace(semantic=None), gt, config=V8, v8=True)
  assert type(v8_plain) is jaxtal.SegmentLossParts
  np.testing.assert_allclose(tuple(v8_plain), tuple(v8[:4]), rtol=1e-6)
  assert np.abs(np.asarray(grads.semantic)).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("map_hw", [(8, 8), (24, 20)])
def test_a_given_class_map_gives_the_derived_maps_loss(map_hw):
  preds, gt = predictions(), ground_truth(per_slot=True)
  derived = class_map(gt, False, NC)
  _, parts, _ = loss_and_grads(preds, gt)
  _, given, _ = loss_and_grads(preds, gt._replace(class_map=derived))
  np.testing.assert_allclose(tuple(given), tuple(parts), rtol=1e-6)
  _, other, _ = loss_and_grads(preds, gt._replace(class_map=jnp.zeros((B,) + map_hw, jnp.int32)))
  assert abs(float(other.sem) - float(parts.sem)) > 1e-3
  np.testing.assert_allclose(tuple(other[:4]), tuple(parts[:4]), rtol=1e-6)


def test_an_empty_batch_and_empty_images():
  preds, gt = predictions(), ground_truth()
  empty = jaxtal.pack_labels(np.zeros((0, 6), np.float32), B, M, IMAGE)._replace(masks=np.zeros_like(gt.masks))
  total, parts, grads, _ = loss_grads_targets(preds, empty)
  assert float(parts.box) == float(parts.seg) == float(parts.dfl) == float(parts.sem) == 0.0 and float(parts.cls) > 0
  assert not np.asarray(grads.semantic).any() and not np.asarray(grads.proto).any()
  assert_finite(total, grads)
  t = loss_grads_targets(preds, ground_truth(ROWS[ROWS[:, 0] == 1]))[3]
  assert not np.asarray(t.fg_mask[0]).any() and np.asarray(t.fg_mask[1]).any()


def test_non_finite_coefficients_and_prototypes_give_finite_targets():
  """NaN / inf mask coefficients or prototype pixels (their logits count as outside the predicted mask) never
  reach the assignment."""
  preds, gt = predictions(), ground_truth()
  coefs = [np.asarray(c).copy() for c in preds.mask_coefs]
  coefs[0][0, 2:5, 3:6] = np.nan
  coefs[1][1, 1, 1, 0] = np.inf
  proto = np.asarray(preds.proto).copy()
  proto[0, 5, 5, :] = np.nan
  proto[1, 2, :, 1] = -np.inf
  t = loss_grads_targets(preds._replace(mask_coefs=coefs, proto=proto), gt)[3]
  assert_finite(t)
  assert np.asarray(t.fg_mask).any()


@pytest.mark.slow
def test_non_finite_gt_mask_pixels_give_finite_losses():
  """NaN / inf pixels of real slots' masks count as outside the GT mask (and contribute no seg term: the YOLOv8
  rule); NaN in a padding slot's mask reaches nothing."""
  preds, gt = predictions(), ground_truth(per_slot=True)
  masks = np.asarray(gt.masks).copy()
  masks[0, 0, 3, 3], masks[0, 1, 5, 5] = np.nan, np.inf
  masks[1, 3] = np.nan  # a padding slot
  total, parts, grads = loss_and_grads(preds, gt._replace(masks=masks))
  assert_finite(total, parts, grads)
  masks[1, 3] = 0.0
  _, parts2, _ = loss_and_grads(preds, gt._replace(masks=masks))
  np.testing.assert_allclose(tuple(parts2), tuple(parts), rtol=1e-6)


@pytest.mark.slow
def test_module_and_end_to_end():
  preds, gt = predictions(), ground_truth()
  total = loss_and_grads(preds, gt)[0]
  m_total, m_parts = nnx.jit(lambda m, p, g: m(p, g))(jaxtal.Segment26Loss(CFG), preds, gt)
  np.testing.assert_allclose(m_total, total, rtol=1e-6)
  assert type(m_parts) is jaxtal.Segment26LossParts
  one = jax.tree.map(jax.lax.stop_gradient, predictions(seed=1))
  e2e = jaxtal.EndToEndLoss(CFG, loss_fn=jaxtal.segment26_loss)
  e_total, e_parts = nnx.jit(lambda m, a, b, g: m(a, b, g, weight=0.8))(e2e, preds, one, gt)
  _, one_parts, _ = loss_and_grads(one, gt, config=dataclasses.replace(CFG, topk=7, topk2=1))
  np.testing.assert_allclose(e_total, 0.8 * total + 0.2 * sum(one_parts) * B, rtol=1e-5)
  np.testing.assert_allclose(tuple(e_parts), tuple(one_parts), rtol=1e-6)


def test_config_and_validation():
  assert jaxtal.Segment26LossConfig(num_classes=3, strides=(8,), iou_chunk=5.0).iou_chunk == 5
  assert issubclass(jaxtal.Segment26LossConfig, jaxtal.SegmentLossConfig)
  with pytest.raises(ValueError, match="iou_chunk"):
    jaxtal.Segment26LossConfig(num_classes=3, strides=(8,), iou_chunk=0)
  preds, gt = predictions(), ground_truth()
  with pytest.raises(ValueError, match=r"semantic must be \(b, h, w, nc\)"):
    jaxtal.segment26_loss(preds._replace(semantic=np.zeros((B, 8, 8, NC + 1), np.float32)), gt, CFG)
  with pytest.raises(ValueError, match="semantic must be"):
    jaxtal.segment_loss(preds._replace(semantic=np.zeros((B + 1, 8, 8, NC), np.float32)), gt, CFG)
  with pytest.raises(TypeError, match="semantic must be a float array"):
    jaxtal.segment26_loss(preds._replace(semantic=np.zeros((B, 8, 8, NC), np.int32)), gt, CFG)
  with pytest.raises(ValueError, match="gt.class_map must be an integer"):
    jaxtal.segment26_loss(preds, gt._replace(class_map=np.zeros((B, 8, 8), np.float32)), CFG)
  with pytest.raises(TypeError, match="does not read preds.keypoints"):
    jaxtal.segment26_loss(preds._replace(keypoints=preds.feats), gt, CFG)
  with pytest.raises(ValueError, match="gt.masks is None"):
    jaxtal.segment26_loss(preds, gt._replace(masks=None), CFG)


@pytest.mark.slow
def test_axis_name_gives_the_global_loss_on_every_shard():
  """Under a mapped axis (vmap stands in for shard_map), each shard of one image returns the global loss (the
  semantic term a mean over the global batch, gated on the global foreground) and the gradient of the global
  loss w.r.t. its own inputs."""
  preds, gt = predictions(seed=4), ground_truth(seed=4)
  total, parts, grads = loss_and_grads(preds, gt)
  split = lambda x: np.asarray(x).reshape(2, -1, *np.shape(x)[1:])  # noqa: E731
  cfg = dataclasses.replace(CFG, axis_name="data", iou_chunk=5)

  def local(p, g):
    return jax.value_and_grad(lambda p: jaxtal.segment26_loss(p, g, cfg), has_aux=True)(p)

  (t, p), g = jax.jit(jax.vmap(local, axis_name="data"))(jax.tree.map(split, preds), jax.tree.map(split, gt))
  np.testing.assert_allclose(np.asarray(t), total, rtol=1e-5)
  for got, want in zip(p, parts):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(grads)):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.slow
def test_checked_loss_equals_the_loss_and_names_bad_masks():
  from jax.experimental import checkify  # noqa: PLC0415

  preds, gt = predictions(), ground_truth(per_slot=True)
  checked = jax.jit(checkify.checkify(lambda p, g: jaxtal.checked_segment26_loss(p, g, CFG)))
  err, (total, parts) = checked(preds, gt)
  err.throw()
  want_total, want_parts, _ = loss_and_grads(preds, gt)
  np.testing.assert_allclose(total, want_total, rtol=1e-6)
  np.testing.assert_allclose(tuple(parts), tuple(want_parts), rtol=1e-6)
  masks = np.asarray(gt.masks).copy()
  masks[0, 0, 2, 2] = np.nan
  err, _ = checked(preds, gt._replace(masks=masks))
  with pytest.raises(checkify.JaxRuntimeError, match="gt.masks"):
    err.throw()
