"""Instance segmentation: ``segment_loss`` against a NumPy oracle, its gradients, degenerate inputs,
chunking and its memory bound, the prototype resize, validation, the NNX module and end-to-end use.

Expectations are computed here in NumPy (float64) from the inputs (the detection parts and the
assignment by ``oracles.np_detection_loss``), or by PyTorch for the resize, never by the code
under test; parity with Ultralytics is ``test_parity_segment.py``. Shapes are fixed and small (a
32 x 32 input, A = 80 anchors, 16 x 16 prototypes) so that a few compilations serve every test.
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
from support import segment_cases
from jaxtal.segment import chunk_size, entry_boxes, mask_sum, resize_prototypes
from support.oracles import np_bce_with_logits, np_detection_loss, np_sigmoid

NC, R, NM = 3, 4, 4
SHAPES = ((8, 8), (4, 4))
STRIDES = (4, 8)
IMAGE = 32
A = sum(h * w for h, w in SHAPES)
B, M = 2, 4
PROTO_HW = (16, 16)
MASK_HW = (24, 20)  # the GT masks' resolution: not the prototypes' (the resize path), not square
CFG = jaxtal.SegmentLossConfig(num_classes=NC, strides=STRIDES, reg_max=R)

# Label rows [image, class, cx, cy, w, h] (normalised): overlapping boxes, one partly outside the image.
ROWS = np.array(
    [
        [0, 0, 0.35, 0.45, 0.55, 0.65],
        [0, 1, 0.62, 0.62, 0.6, 0.6],
        [0, 2, 0.12, 0.85, 0.5, 0.56],
        [1, 1, 0.5, 0.38, 0.72, 0.5],
    ],
    np.float32,
)


# ----------------------------------------------------------------------------- problems


def predictions(seed=0, b=B, coef_scale=1.0, proto_scale=1.0):
  """NHWC head maps (class logits raised, so there are positives), coefficient maps and prototypes."""
  rng = np.random.default_rng(seed)
  feats, coefs = [], []
  for h, w in SHAPES:
    f = rng.normal(0.0, 1.0, (b, h, w, 4 * R + NC)).astype(np.float32)
    f[..., 4 * R :] += 1.0
    feats.append(f)
    coefs.append((coef_scale * rng.normal(0.0, 1.0, (b, h, w, NM))).astype(np.float32))
  proto = (proto_scale * rng.normal(0.0, 1.0, (b,) + PROTO_HW + (NM,))).astype(np.float32)
  return feats, coefs, proto


def ground_truth(rows=ROWS, mask_hw=MASK_HW, seed=0) -> jaxtal.GroundTruth:
  """``pack_labels`` + ``pack_masks`` of ``rows`` with ellipse masks (``segment_cases.instance_masks``)."""
  inst = segment_cases.instance_masks(np.random.default_rng(seed), rows, IMAGE, mask_hw)
  gt = jaxtal.pack_labels(rows, B, M, IMAGE)
  return gt._replace(masks=jaxtal.pack_masks(inst, rows[:, 0], B, M))


def slot_masks_of(index_map, dtype=bool):
  """Per-slot masks ``(b, M, mh, mw)`` decoded from an index map."""
  return (np.asarray(index_map)[:, None] == np.arange(1, M + 1)[None, :, None, None]).astype(dtype)


# ----------------------------------------------------------------------------- NumPy oracle


def np_resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """``(n_out, n_in)`` linear-interpolation weights: half-pixel centres, source clamped to the edge pixels."""
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(int), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  w = np.zeros((n_out, n_in))
  np.add.at(w, (np.arange(n_out), lo), 1 - frac)
  np.add.at(w, (np.arange(n_out), hi), frac)
  return w


def np_resize(x, hw) -> np.ndarray:
  """``(..., h, w) -> (..., H, W)`` bilinear resize, as PyTorch's ``align_corners=False`` without antialiasing."""
  wh, ww = np_resize_weights(x.shape[-2], hw[0]), np_resize_weights(x.shape[-1], hw[1])
  return np.einsum("Hh,...hw,Ww->...HW", wh, np.asarray(x, np.float64), ww)


def np_segment_loss(feats, coefs, proto, gt, config=CFG, with_targets=False):
  """YOLOv8's segmentation loss in float64 from its definition (``jaxtal/segment.py``'s docstring).

  NHWC inputs. Returns ``(total, [box, seg, cls, dfl], d total / d coefficient rows (b, A, nm),
  d total / d proto (b, mh, mw, nm), foreground count)``, and the assignment with ``with_targets``.
  """
  names = ("num_classes", "strides", "reg_max", "topk", "min_box_side", "box", "cls", "dfl")
  kw = {k: getattr(config, k) for k in names}
  _, (box, cls, dfl), t = np_detection_loss(feats, tuple(gt[:3]), **kw)
  b = len(feats[0])
  rows = np.concatenate([np.asarray(c, np.float64).reshape(b, -1, NM) for c in coefs], axis=1)
  masks = np.asarray(gt.masks)
  mh, mw = masks.shape[-2:]
  p = np_resize(np.asarray(proto, np.float64).transpose(0, 3, 1, 2), (mh, mw))  # (b, nm, mh, mw)
  fg, owner, tboxes = t["fg_mask"], t["gt_index"], np.asarray(t["boxes"], np.float64)
  count = max(fg.sum(), 1)
  h_img, w_img = SHAPES[0][0] * STRIDES[0], SHAPES[0][1] * STRIDES[0]
  seg, d_rows, d_p = 0.0, np.zeros_like(rows), np.zeros_like(p)
  scale = config.box * b / count  # d total / d (sum of per-anchor terms)
  for i, a in zip(*np.nonzero(fg)):
    x = np.einsum("n,nhw->hw", rows[i, a], p[i])
    z = masks[i] == owner[i, a] + 1 if masks.ndim == 3 else masks[i, owner[i, a]]
    nb = tboxes[i, a] / [w_img, h_img, w_img, h_img]
    area = (nb[2] - nb[0]) * (nb[3] - nb[1])
    # The crop's edges in float32, as the reference computes them: whether a pixel whose index equals
    # an edge (e.g. 6.4 px of a 32 px input at 20 mask pixels: 4.0) is inside is float32 rounding.
    f32 = np.float32
    x1, y1, x2, y2 = (tboxes[i, a].astype(f32) / np.array([w_img, h_img] * 2, f32)) * np.array([mw, mh] * 2, f32)
    cols, ys = np.arange(mw), np.arange(mh)
    crop = ((ys >= y1) & (ys < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :]
    seg += (np_bce_with_logits(x, z) * crop).mean() / area
    dx = (np_sigmoid(x) - z) * crop / (mh * mw * area) * scale
    d_rows[i, a] = np.einsum("hw,nhw->n", dx, p[i])
    d_p[i] += rows[i, a][:, None, None] * dx
  parts = np.array([box, config.box * seg / count, cls, dfl])
  d_proto = np.einsum("Hh,bnHW,Ww->bhwn", np_resize_weights(PROTO_HW[0], mh), d_p, np_resize_weights(PROTO_HW[1], mw))
  out = (parts.sum() * b, parts, d_rows, d_proto, fg.sum())
  return out + (t,) if with_targets else out


# ----------------------------------------------------------------------------- jitted entry points


@functools.partial(jax.jit, static_argnames="config")
def loss_and_grads(feats, coefs, proto, gt, config=CFG):
  """``(total, parts, (d feats, d coefs, d proto))`` of ``segment_loss``."""
  f = lambda f, c, p: jaxtal.segment_loss(jaxtal.Predictions(f, mask_coefs=c, proto=p), gt, config)  # noqa: E731
  (total, parts), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(feats, coefs, proto)
  return total, parts, grads


def coef_rows(coef_grads):
  return np.concatenate([np.asarray(g).reshape(B, -1, NM) for g in coef_grads], axis=1)


def assert_finite(total, parts, grads):
  for x in jax.tree.leaves((total, parts, grads)):
    assert np.isfinite(np.asarray(x)).all()


# ----------------------------------------------------------------------------- value and gradients


def test_matches_numpy():
  feats, coefs, proto = predictions(seed=0)
  gt = ground_truth()
  total, parts, (_, d_coefs, d_proto) = loss_and_grads(feats, coefs, proto, gt)
  want_total, want_parts, want_rows, want_proto, count = np_segment_loss(feats, coefs, proto, gt)
  assert count >= 10 and want_parts[1] > 0  # positives, and a mask term
  chex.assert_type(total, jnp.float32)
  np.testing.assert_allclose(np.asarray(parts), want_parts, rtol=1e-4)
  np.testing.assert_allclose(total, want_total, rtol=1e-4)
  for got, want in ((coef_rows(d_coefs), want_rows), (np.asarray(d_proto), want_proto)):
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-4 * np.abs(want).max())


class TestMaskTerm:
  """The mask term alone (what segment.py adds to the skeleton), chunked (a scan of 3-entry chunks, empty
  chunks skipped), compiled and eager: value and gradients against NumPy."""

  @staticmethod
  def _oracle_and_targets(feats, coefs, proto, gt):
    """The oracle's ``(seg part, d seg / d coefficient rows, d seg / d proto (NHWC))`` and its assignment as ``Targets``."""
    _, want_parts, want_rows, want_proto, count, t = np_segment_loss(feats, coefs, proto, gt, with_targets=True)
    fg, owner = np.asarray(t["fg_mask"]), np.asarray(t["gt_index"])
    entries = jaxtal.foreground_entries(fg, owner, M * CFG.topk)
    zeros = np.zeros(fg.shape, np.int32)
    boxes = np.asarray(t["boxes"], np.float32)
    targets = jaxtal.Targets(zeros, boxes, fg.astype(np.float32), fg, owner, zeros[:, :M], entries)
    # The oracle's gradients are of the total, b * sum of parts.
    return (want_parts[1], want_rows / B, want_proto / B), targets, count

  @staticmethod
  def _assert_matches(got, want):
    value, (d_rows, d_proto) = got
    np.testing.assert_allclose(value, want[0], rtol=1e-4)
    for g, w in ((d_rows, want[1]), (np.asarray(d_proto).transpose(0, 2, 3, 1), want[2])):
      np.testing.assert_allclose(g, w, rtol=1e-3, atol=2e-4 * np.abs(w).max())

  def test_chunked_matches_numpy(self, variant):
    feats, coefs, proto = predictions(seed=1)
    gt = ground_truth(seed=1)
    want, targets, count = self._oracle_and_targets(feats, coefs, proto, gt)

    def seg_part(rows, proto_nchw):  # box * (mask term) / count, as the loss's seg part
      p = resize_prototypes(proto_nchw, MASK_HW)
      return CFG.box * mask_sum(rows, p, jnp.asarray(gt.masks), targets, (IMAGE, IMAGE), 3, True) / count

    seg_and_grads = variant(jax.value_and_grad(seg_part, argnums=(0, 1)))
    self._assert_matches(seg_and_grads(coef_rows(coefs), proto.transpose(0, 3, 1, 2)), want)

  @pytest.mark.parametrize("mask_hw,index_map,window", [
      (MASK_HW, True, 4),  # prototypes upsampled
      ((8, 12), False, 5),  # downsampled, per-slot masks
      pytest.param((16, 16), False, 16, marks=pytest.mark.slow),  # the prototypes' resolution, one window the plane
  ])
  def test_windows_match_the_full_plane_and_numpy(self, mask_hw, index_map, window):
    """The mask term over box windows (``mask_window``) equals the full-plane forms and the oracle: masks
    at other resolutions than the prototypes, both mask forms, boxes crossing the image's border."""
    feats, coefs, proto = predictions(seed=2)
    gt = ground_truth(seed=2, mask_hw=mask_hw)
    if not index_map:
      gt = gt._replace(masks=slot_masks_of(gt.masks, np.float32))
    want, targets, count = self._oracle_and_targets(feats, coefs, proto, gt)

    @jax.jit
    def seg_parts(rows, proto_nchw):
      p = resize_prototypes(proto_nchw, mask_hw)

      def seg(rows, p, plain, window):
        return CFG.box * mask_sum(rows, p, jnp.asarray(gt.masks), targets, (IMAGE, IMAGE), 3, index_map, plain, window) / count

      grad = lambda *args: jax.value_and_grad(seg, argnums=(0, 1))(rows, p, *args)  # noqa: E731
      return grad((), window), grad(("mask_windows",), window), grad(("mask_bce_sum",), window)

    windows, *full_plane = seg_parts(coef_rows(coefs), proto.transpose(0, 3, 1, 2))
    for other in full_plane:
      chex.assert_trees_all_close(windows, other, rtol=1e-5, atol=1e-6)
    d_proto = jax.vjp(lambda p: resize_prototypes(p, mask_hw), proto.transpose(0, 3, 1, 2))[1](windows[1][1])[0]
    self._assert_matches((windows[0], (windows[1][0], d_proto)), want)


def test_no_foreground_gives_a_zero_mask_term():
  feats, coefs, proto = predictions(seed=2)
  gt = ground_truth()
  gt = gt._replace(mask=np.zeros_like(gt.mask))
  total, parts, (d_feats, d_coefs, d_proto) = loss_and_grads(feats, coefs, proto, gt)
  assert parts.seg == parts.box == parts.dfl == 0.0 and parts.cls > 0.0
  assert not np.asarray(d_proto).any() and not any(np.asarray(g).any() for g in d_coefs)
  np.testing.assert_allclose(total, parts.cls * B, rtol=1e-6)


def test_degenerate_rows_are_finite_and_own_nothing():
  """A zero-area box, a box mostly off the image, an empty mask: finite loss and gradients; the zero-area
  row adds nothing (the loss equals the same batch with it as padding)."""
  rows = ROWS.copy()
  rows[1, 4] = 0.0  # zero width: never owns an anchor (the reference would give NaN if it did)
  rows[2, 2:4] = [-0.05, 1.02]  # centre off the image, box still overlapping it
  gt = ground_truth(rows)
  masks = np.array(gt.masks)
  masks[masks == 3] = 0  # slot 2's mask is empty
  gt = gt._replace(masks=masks)
  feats, coefs, proto = predictions(seed=3)
  total, parts, grads = loss_and_grads(feats, coefs, proto, gt)
  assert_finite(total, parts, grads)
  assert parts.seg > 0
  padded = gt._replace(mask=np.array(gt.mask) & (np.arange(M) != 1)[None])
  total_padded, parts_padded, grads_padded = loss_and_grads(feats, coefs, proto, padded)
  chex.assert_trees_all_close((total, parts, grads), (total_padded, parts_padded, grads_padded), rtol=1e-6, atol=1e-7)
  _, want_parts, _, _, _ = np_segment_loss(feats, coefs, proto, gt)
  np.testing.assert_allclose(np.asarray(parts), want_parts, rtol=1e-4)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_huge_logits_are_finite(scale):
  feats, coefs, proto = predictions(seed=4, coef_scale=scale, proto_scale=100.0)
  total, parts, grads = loss_and_grads(feats, coefs, proto, ground_truth())
  assert_finite(total, parts, grads)
  assert parts.seg > 1e4


def test_entry_weight_of_a_tiny_box_is_zero_not_inf():
  """The per-entry weight ``1 / (mh mw area)``: 0 on invalid entries and for areas under 1e-20 of the image."""
  boxes = np.array([[[0, 0, 16, 8], [0, 0, 3e-9, 3e-9], [0, 0, 0, 5], [0, 0, 16, 8]]], np.float32)
  valid = jnp.array([[True, True, True, False]])
  entries = jaxtal.ForegroundEntries(jnp.arange(4)[None], jnp.zeros((1, 4), jnp.int32), valid)
  zeros = jnp.zeros((1, 4), jnp.int32)
  t = jaxtal.Targets(zeros, jnp.asarray(boxes), zeros.astype(jnp.float32), zeros > 0, zeros, zeros, entries)
  box, weight = entry_boxes(t, (32.0, 32.0), (16, 16))
  np.testing.assert_allclose(weight, [[1 / (256 * 0.125), 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(box[0, 0], [0, 0, 8, 4])


# ----------------------------------------------------------------------------- chunking and memory


@pytest.mark.slow
def test_chunked_matches_unchunked():
  feats, coefs, proto = predictions(seed=5)
  gt = ground_truth(seed=5)
  e = M * CFG.topk
  assert chunk_size(None, B, e, MASK_HW[0] * MASK_HW[1]) == e  # the default: one chunk here
  whole = loss_and_grads(feats, coefs, proto, gt)
  cfg = jaxtal.SegmentLossConfig(**{**_fields(CFG), "mask_chunk": 3})
  chunked = loss_and_grads(feats, coefs, proto, gt, config=cfg)
  chex.assert_trees_all_close(chunked, whole, rtol=2e-6, atol=1e-7)


@pytest.mark.slow
def test_chunked_without_skipping_matches_unchunked():
  """The plain chunked form (autodiff over checkpointed chunks) gives the same loss and gradients."""
  feats, coefs, proto = predictions(seed=5)
  gt = ground_truth(seed=5)
  whole = loss_and_grads(feats, coefs, proto, gt)
  cfg = jaxtal.SegmentLossConfig(**{**_fields(CFG), "mask_chunk": 7})
  cfg = dataclasses.replace(cfg, plain_kernels=("mask_bce_sum",))
  loss = lambda f, c, p: jaxtal.segment_loss(jaxtal.Predictions(f, mask_coefs=c, proto=p), gt, cfg)[0]  # noqa: E731
  plain = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(feats, coefs, proto)
  chex.assert_trees_all_close(plain, (whole[0], whole[2]), rtol=2e-6, atol=1e-7)


def _fields(cfg) -> dict:
  return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


@pytest.mark.slow
def test_memory_of_a_large_batch_stays_under_2_gb():
  """b = 16, M = 100, a 640 input (A = 8400), 160 x 160 prototypes, 32 channels, nc = 80: XLA's compiled
  memory analysis of the gradient (temp + arguments + outputs) stays under 2 GB (measured ~0.77 GB)."""
  b, m, nm, mh, nc, image = 16, 100, 32, 160, 80, 640
  strides = (8, 16, 32)
  cfg = jaxtal.SegmentLossConfig(num_classes=nc, strides=strides)
  spec = jax.ShapeDtypeStruct
  feats = [spec((b, image // s, image // s, 64 + nc), jnp.float32) for s in strides]
  coefs = [spec((b, image // s, image // s, nm), jnp.float32) for s in strides]
  gt = jaxtal.GroundTruth(spec((b, m), jnp.int32), spec((b, m, 4), jnp.float32), spec((b, m), bool),
                          masks=spec((b, mh, mh), jnp.int32))
  grad = jax.jit(jax.grad(lambda f, c, p, g: jaxtal.segment_loss(jaxtal.Predictions(f, mask_coefs=c, proto=p), g, cfg)[0], argnums=(0, 1, 2)))
  stats = grad.lower(feats, coefs, spec((b, mh, mh, nm), jnp.float32), gt).compile().memory_analysis()
  used = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
  print(f"temp {stats.temp_size_in_bytes / 2**20:.0f} MiB, arguments {stats.argument_size_in_bytes / 2**20:.0f} MiB,"
        f" outputs {stats.output_size_in_bytes / 2**20:.0f} MiB")
  assert used < 2 * 2**30
  # A single chunk would hold (16, 1000, 160, 160) float32 logits alone: 1.6 GB.
  assert 4 * b * m * cfg.topk * mh * mh > 1.5 * 2**30


# ----------------------------------------------------------------------------- prototype resize


@pytest.mark.parametrize(
    "src, dst", [((16, 16), (32, 32)), ((16, 16), (8, 8)), ((16, 12), (24, 20)), ((7, 9), (5, 31)), ((5, 5), (1, 1))]
)
def test_resize_matches_torch_and_numpy(src, dst, reference):
  """Both directions, non-integer ratios, edges: PyTorch's bilinear ``align_corners=False`` (the reference's)."""
  import torch  # noqa: PLC0415  (the reference's dependency)

  x = np.random.default_rng(sum(src + dst)).normal(size=(2, 3) + src).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.tensor(x), dst, mode="bilinear", align_corners=False).numpy()
  np.testing.assert_allclose(np.asarray(resize_prototypes(jnp.asarray(x), dst)), want, rtol=0, atol=5e-6)
  np.testing.assert_allclose(np_resize(x, dst), want, rtol=0, atol=5e-6)  # the oracle above


def test_resize_keeps_the_edges_and_the_same_size():
  x = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
  up = np.asarray(resize_prototypes(jnp.asarray(x), (6, 8)))
  np.testing.assert_array_equal(up[0, 0, 0, 0], x[0, 0, 0, 0])  # corners are clamped, not extrapolated
  np.testing.assert_array_equal(up[0, 0, -1, -1], x[0, 0, -1, -1])
  np.testing.assert_allclose(up, np_resize(x, (6, 8)), atol=1e-6)
  assert resize_prototypes(x, (3, 4)) is x


# ----------------------------------------------------------------------------- forms of the same loss


@pytest.mark.slow
def test_mask_forms_give_the_same_loss():
  """``pack_masks``'s index map, and the per-slot masks decoded from it (bool and 0/1 float), give one loss;
  NCHW inputs give the NHWC loss."""
  feats, coefs, proto = predictions(seed=6)
  gt = ground_truth(seed=6)
  nchw = lambda x: np.transpose(x, (0, 3, 1, 2))  # noqa: E731

  @jax.jit
  def forms(feats, coefs, proto, gts, nchw_maps):
    got = [jaxtal.segment_loss(jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto), g, CFG) for g in gts]
    f, c, p = nchw_maps
    return got + [jaxtal.segment_loss(jaxtal.Predictions(f, mask_coefs=c, proto=p), gts[0], CFG, layout="NCHW")]

  gts = [gt] + [gt._replace(masks=slot_masks_of(gt.masks, dtype)) for dtype in (bool, np.float32)]
  want, *others = forms(feats, coefs, proto, gts, ([nchw(f) for f in feats], [nchw(c) for c in coefs], nchw(proto)))
  for got in others:
    chex.assert_trees_all_close(got, want, rtol=1e-6)


@pytest.mark.slow
def test_axis_name_gives_the_global_loss_on_every_shard():
  """Under a mapped axis (vmap stands in for shard_map), each shard returns the global loss and the gradient
  of the global loss w.r.t. its own maps; chunked, so the skipped-chunk test runs batched too."""
  feats, coefs, proto = predictions(seed=10)
  gt = ground_truth(seed=10)
  total, parts, grads = loss_and_grads(feats, coefs, proto, gt)
  split = lambda x: np.asarray(x).reshape(2, -1, *np.shape(x)[1:])  # noqa: E731
  cfg = jaxtal.SegmentLossConfig(**{**_fields(CFG), "axis_name": "data", "mask_chunk": 3})

  def local(f, c, p, g):
    loss = lambda f, c, p: jaxtal.segment_loss(jaxtal.Predictions(f, mask_coefs=c, proto=p), g, cfg)  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(f, c, p)

  (t, p), g = jax.jit(jax.vmap(local, axis_name="data"))(
      [split(f) for f in feats], [split(c) for c in coefs], split(proto), jax.tree.map(split, gt)
  )
  np.testing.assert_allclose(np.asarray(t), total, rtol=1e-5)
  for got, want in zip(p, parts):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(grads)):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.slow
def test_module_matches_function():
  feats, coefs, proto = predictions(seed=7)
  gt = ground_truth(seed=7)
  weights = np.array([0.5, 1.0, 2.0], np.float32)
  module = jaxtal.SegmentLoss(CFG, class_weights=weights)
  assert isinstance(module, nnx.Module) and module.config == CFG
  want = jaxtal.segment_loss(jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto), gt, CFG, class_weights=weights)
  chex.assert_trees_all_close(module(jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto), gt), want)
  assert jaxtal.SegmentLoss(num_classes=NC, strides=STRIDES, reg_max=R, mask_chunk=5).config.mask_chunk == 5


@pytest.mark.slow
def test_end_to_end_loss_with_segment_loss():
  """``end_to_end_loss`` runs the segmentation loss on two heads sharing the prototypes."""
  feats, coefs, proto = predictions(seed=8)
  feats2, coefs2, _ = predictions(seed=9)
  gt = ground_truth(seed=8)
  w = 0.6
  total, parts = jaxtal.end_to_end_loss(
      jaxtal.segment_loss, jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto), jaxtal.Predictions(feats2, mask_coefs=coefs2, proto=proto), gt, weight=w, config=CFG
  )
  many, _ = jaxtal.segment_loss(jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto), gt, CFG)
  one, one_parts = jaxtal.segment_loss(jaxtal.Predictions(feats2, mask_coefs=coefs2, proto=proto), gt, CFG, topk=7, topk2=1)
  assert isinstance(parts, jaxtal.SegmentLossParts)
  chex.assert_trees_all_close((total, parts), (w * many + (1 - w) * one, one_parts), rtol=1e-6)


# ----------------------------------------------------------------------------- configuration and validation


def test_config():
  cfg = jaxtal.SegmentLossConfig(num_classes=NC, strides=[4, 8], mask_chunk=np.int64(16))
  assert cfg.mask_chunk == 16 and type(cfg.mask_chunk) is int and cfg.strides == (4.0, 8.0)
  assert hash(cfg) == hash(jaxtal.SegmentLossConfig(num_classes=NC, strides=(4, 8), mask_chunk=16))
  assert jaxtal.SegmentLossConfig(num_classes=NC, strides=STRIDES).mask_chunk is None
  for bad in (0, -3, 2.5, "8"):
    with pytest.raises((ValueError, TypeError), match="mask_chunk"):
      jaxtal.SegmentLossConfig(num_classes=NC, strides=STRIDES, mask_chunk=bad)


def test_validation():
  feats, coefs, proto = predictions()
  gt = ground_truth()
  run = functools.partial(jaxtal.segment_loss, config=CFG)
  cases = [
      ((feats, coefs, proto[0], gt), ValueError, r"segment_loss: proto must have rank 4"),
      ((feats, coefs, proto.astype(np.int32), gt), TypeError, r"segment_loss: proto must be a float array"),
      ((feats, coefs, proto[:1], gt), ValueError, r"segment_loss: proto has batch size 1 .* but feats have 2"),
      ((feats, coefs, proto[..., :3], gt), ValueError,
       r"segment_loss: mask_coefs\[0\] must be \(2, 8, 8, 3\) .*; nm = 3 is the number of prototypes in proto"
       r" \(2, 16, 16, 3\)"),
      ((feats, coefs[:1], proto, gt), TypeError, r"segment_loss: mask_coefs must be a list of per-level maps"),
      ((feats, coefs[0], proto, gt), TypeError, r"segment_loss: mask_coefs must be a list"),
      ((feats, coefs, proto, gt._replace(masks=None)), ValueError, r"segment_loss: gt.masks is None"),
      ((feats, coefs, proto, gt._replace(masks=np.zeros((B, 3, 8, 8), bool))), ValueError, r"segment_loss: gt.masks"),
      ((feats, coefs, proto, gt._replace(masks=np.zeros((B, 8, 8), np.float32))), ValueError, r"an integer index map"),
  ]
  for (f, c, p, g), error, match in cases:
    with pytest.raises(error, match=match):
      run(jaxtal.Predictions(f, mask_coefs=c, proto=p), g)
  with pytest.raises(TypeError, match=r"segment_loss: unknown configuration keyword\(s\) \['chunk'\]"):
    jaxtal.segment_loss(jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto), gt, CFG, chunk=4)
  with pytest.raises(ValueError, match=r"segment_loss: class_weights must have shape \(nc,\) = \(3,\)"):
    jaxtal.segment_loss(jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto), gt, CFG, class_weights=np.ones(4))


def test_a_nan_pixel_in_a_padding_slot_is_never_read():
  """The issue's minimal case: per-slot masks, slot 0 padding with one NaN pixel, slot 1 a real filled square."""
  rng = np.random.default_rng(0)
  preds = jaxtal.Predictions(
      [jnp.asarray(rng.normal(size=(1, 8, 8, 4 * 16 + 1)), jnp.float32)],
      mask_coefs=[jnp.asarray(rng.normal(size=(1, 8, 8, 1)), jnp.float32)],
      proto=jnp.asarray(rng.normal(size=(1, 16, 16, 1)), jnp.float32),
  )
  masks = np.zeros((1, 2, 16, 16), np.float32)
  masks[0, 1, 4:12, 4:12] = 1.0
  boxes = np.zeros((1, 2, 4), np.float32)
  boxes[0, 1] = [16, 16, 48, 48]
  gt = jaxtal.GroundTruth(jnp.zeros((1, 2), jnp.int32), jnp.asarray(boxes), jnp.asarray([[False, True]]), masks=jnp.asarray(masks))
  step = jax.jit(jax.value_and_grad(lambda p, g: jaxtal.segment_loss(p, g, num_classes=1, strides=(8,))[0]))
  total, grads = step(preds, gt)
  poisoned, poisoned_grads = step(preds, gt._replace(masks=gt.masks.at[0, 0, 0, 0].set(jnp.nan)))
  assert float(total) > 0 and np.isfinite(float(poisoned))
  np.testing.assert_array_equal(poisoned, total)
  jax.tree.map(np.testing.assert_array_equal, poisoned_grads, grads)
  # A non-finite pixel of a real slot is masked: finite, and that pixel adds nothing.
  inside = step(preds, gt._replace(masks=gt.masks.at[0, 1, 5, 5].set(jnp.inf)))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(inside))
