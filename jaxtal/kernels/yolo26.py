"""The YOLO26 steps' speed tricks, each beside its plain twin (the package's rules: :mod:`jaxtal.kernels`).

The pose RLE term's flow over its counted rows only, in chunks of :func:`flow_chunk` rows (``flow_rows``), and
the segmentation assignment's mask-IoU pixel counts over the ``MASK_TILE`` tiles each predicted box touches
(``pair_mask_counts``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtal import flow

# ------------------------------------------------------------------------------------------------
# The RLE term's flow over its counted rows only (YOLO26 pose).
# Why: the term has a row per entry-list slot and keypoint (b * E * K), of which only the valid
# entries' labelled keypoints count (about half at b = 16, M = 100); the plain form runs the flow's
# 24 (rows, 64) matmuls over all of them and autodiff keeps every hidden activation of every row.
# The kernel gathers the counted rows to the front and computes the value and its gradient over
# ceil(n / chunk) chunks of them, so the work follows the labelled keypoints and the memory
# one chunk. Bench row "YOLO26 pose loss fwd+bwd, plain flow_rows": saves 61% / 69% of the step at M = 20 / 100
# (2026-12-07, twelfth set).

# Rows per chunk. On XLA:CPU 2048 (1024-8192 within 10%; each chunk's activations stay in cache); an
# accelerator runs each op over many rows at once and pays per launch, so far fewer, larger chunks.
FLOW_CHUNK_CPU = 2048
FLOW_CHUNK_ACCELERATOR = 32768
FLOW_CHUNK: int | None = None  # an override of both (tests)


def flow_chunk() -> int:
  """Rows per chunk of :func:`flow_rows` on the default backend (read at trace time)."""
  if FLOW_CHUNK is not None:
    return FLOW_CHUNK
  return FLOW_CHUNK_CPU if jax.default_backend() == "cpu" else FLOW_CHUNK_ACCELERATOR


def plain_flow_rows(params, x, coef, keep) -> jax.Array:
  """``sum(where(keep, coef * flow_log_prob(params, x), 0))``, the flow run over every row (the others read 0).

  Shapes: ``params`` a :class:`~jaxtal.FlowParams`, ``x (R, 2)``, ``coef (R,)``, ``keep (R,)`` bool -> scalar.
  """
  log_p = flow.flow_log_prob(params, jnp.where(keep[:, None], x, 0.0))
  return jnp.sum(jnp.where(keep, coef * log_p, 0.0))


def _flow_chunks(params, x, coef, keep, grad: bool):
  """The kept rows in chunks: ``(value, (d params, d x (R, 2), log_p (R,)))``, the gradients None without ``grad``."""
  r = x.shape[0]
  chunk = max(1, min(flow_chunk(), r))
  size = -(-r // chunk) * chunk
  n = jnp.sum(keep, dtype=jnp.int32)
  idx = jnp.nonzero(keep, size=size, fill_value=r)[0]  # kept rows first, then r (past the end)
  live = jnp.arange(size) < n
  at = jnp.minimum(idx, r - 1)
  xs = jnp.where(live[:, None], x[at], 0.0)
  cs = jnp.where(live, coef[at], 0.0)

  def body(j, carry):
    value, d_params, d_x, log_p = carry
    xj, cj = (jax.lax.dynamic_slice_in_dim(a, j * chunk, chunk) for a in (xs, cs))
    if grad:
      out, vjp = jax.vjp(flow.flow_log_prob, params, xj)
      dp, dx = vjp(cj)
      d_params = jax.tree.map(jnp.add, d_params, dp)
      d_x = jax.lax.dynamic_update_slice_in_dim(d_x, dx, j * chunk, 0)
      log_p = jax.lax.dynamic_update_slice_in_dim(log_p, out, j * chunk, 0)
    else:
      out = flow.flow_log_prob(params, xj)
    return value + jnp.sum(cj * out), d_params, d_x, log_p

  zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(xs), jnp.zeros_like(cs)) if grad else (None, None, None)
  value, d_params, d_xs, log_ps = jax.lax.fori_loop(0, (n + chunk - 1) // chunk, body, (jnp.zeros((), cs.dtype),) + zeros)
  if not grad:
    return value, None
  d_x = jnp.zeros_like(x).at[idx].set(d_xs, mode="drop")  # rows past the kept ones carry index r: dropped
  log_p = jnp.zeros_like(coef).at[idx].set(log_ps, mode="drop")
  return value, (d_params, d_x, log_p)


@jax.custom_vjp
def flow_rows(params, x, coef, keep) -> jax.Array:
  """:func:`plain_flow_rows` over the kept rows only, value and gradient in one pass of chunks.

  The rows with ``keep`` go first (their order kept) and run in chunks of :func:`flow_chunk` rows, a
  loop of ``ceil(n / chunk)`` iterations for ``n`` kept rows (one compilation whatever ``n``):
  the flow's cost follows the kept rows, its memory one chunk. Differentiable once, w.r.t.
  ``params``, ``x`` and ``coef`` (``keep`` is a mask); rows without ``keep`` get zero gradients.
  """
  return _flow_chunks(params, x, coef, keep, grad=False)[0]


def _flow_rows_fwd(params, x, coef, keep):
  return _flow_chunks(params, x, coef, keep, grad=True)


def _flow_rows_bwd(residuals, g):
  d_params, d_x, log_p = residuals
  return jax.tree.map(lambda d: g * d, d_params), g * d_x, g * log_p, None


flow_rows.defvjp(_flow_rows_fwd, _flow_rows_bwd)


# ------------------------------------------------------------------------------------------------
# The mask-IoU assignment's pixel counts (YOLO26 segmentation, segment26.py), over tiles of the plane.
# Why: of each listed (GT, anchor) pair's predicted mask only the pixels inside its predicted box
# count, and the plain form decodes every pair over the whole plane. The kernel visits the plane's
# MASK_TILE x MASK_TILE tiles (a loop) and, in each, only the pairs whose box touches it
# (compacted; a loop of ceil(touching / MASK_TILE_CHUNK) chunks, one compilation for any boxes): the
# tile's prototypes are a static slice every pair shares (no gather per pair, which is what made
# windows gathered per pair's box slower than the whole plane), the pairs' coefficients a row gather.
# Both forms count the same per-pixel logits (each an nm-term dot product), so the counts are equal
# integers. Bench row "segment26 loss fwd+bwd, plain pair_mask_counts": saves 34% of the step (2026-12-07,
# twelfth set; 32 px tiles: 20 / 40 / 54 px were 1.7x / 1.3x / 1.3x slower).

MASK_TILE = 32  # pixels a side (16-54 measured: 32 best at 160 x 160 prototypes)
MASK_TILE_CHUNK = 256  # pairs per chunk of a tile


def _packed_counts(logits, gt, in_rows, in_cols) -> tuple[jax.Array, jax.Array]:
  """``(|pred & gt|, |pred|)`` int32 ``(K,)`` of logits ``(K, h, w)`` against ``gt (K, h, w)`` bool, with ``pred``
  the positive finite logits inside the box (``in_rows (K, h)`` times ``in_cols (K, w)``, bool).

  One integer pass: a pixel adds 1, plus ``base`` (a power of two above ``w``) where ``gt`` holds it,
  so each row's sum is ``pred + base * inter``; the rows' sums are then split and added up.
  """
  w = logits.shape[-1]
  shift = w.bit_length()  # base = 2^shift > w: a row's predicted count never reaches it
  weight = jnp.where(in_cols[:, None, :], jnp.where(gt, (1 << shift) + 1, 1), 0)
  row = jnp.sum(jnp.where((logits > 0) & (logits < jnp.inf), weight, 0), axis=-1)  # a non-finite logit is outside
  row = jnp.where(in_rows, row, 0)
  return jnp.sum(row >> shift, axis=-1), jnp.sum(row & ((1 << shift) - 1), axis=-1)


def _box_lines(box, rows, cols) -> tuple[jax.Array, jax.Array]:
  """``(in_rows (K, h), in_cols (K, w))``: pixel rows / columns (float indices) inside each box ``(K, 4)``
  (``x1 <= x < x2``; a NaN side holds none)."""
  x1, y1, x2, y2 = (box[:, i : i + 1] for i in range(4))
  return (rows >= y1) & (rows < y2), (cols >= x1) & (cols < x2)


def _decode(coef, proto) -> jax.Array:
  """``(K, h, w)`` mask logits of coefficients ``(K, nm)`` over prototypes ``(nm, h, w)``."""
  nm, h, w = proto.shape
  return jnp.dot(coef, proto.reshape(nm, -1), precision=jax.lax.Precision.HIGHEST).reshape(-1, h, w)


def _slot_masks(masks, owner) -> jax.Array:
  """``(K, h, w)`` bool: each pair's GT mask, from an index map ``(h, w)`` or per-slot masks ``(M, h, w)``."""
  return masks[None] == (owner + 1)[:, None, None] if masks.ndim == 2 else masks[owner]


def plain_pair_mask_counts(coef, box, owner, ok, proto, masks, chunk: int, early_exit: bool = True) -> tuple[jax.Array, jax.Array]:
  """One image's ``n`` (GT, anchor) pairs: ``(|pred & gt| (n,), |pred| (n,))`` int32 (0 where not ``ok``), with
  ``pred`` the pair's mask ``coef . proto > 0`` (a non-finite logit is outside) inside its box, ``gt`` its
  GT slot's mask; every pair decoded over the whole plane.

  Shapes: ``coef (n, nm)``; ``box (n, 4)`` xyxy in prototype pixels (a pixel of column ``x`` is in
  it when ``x1 <= x < x2``, rows alike); ``owner (n,)`` int32 GT slot; ``ok (n,)`` bool; ``proto (nm,
  h, w)``; ``masks`` an index map ``(h, w)`` int (pixel ``j + 1`` marks slot ``j``) or per-slot masks
  ``(M, h, w)`` bool. The ``ok`` pairs go first (a stable sort) and run ``chunk`` (static) at a time in a
  ``while_loop`` that stops after the last chunk holding one; without ``early_exit`` every chunk runs,
  in a ``lax.map`` (what ``checkify`` can transform).
  """
  n, nm = coef.shape
  _, h, w = proto.shape
  rows, cols = jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32)
  order = jnp.argsort(~ok, stable=True)
  pad = -(-n // chunk) * chunk - n
  sort = lambda x: jnp.pad(x[order], [(0, pad)] + [(0, 0)] * (x.ndim - 1))  # noqa: E731
  coef_s, box_s, owner_s = sort(coef), sort(jnp.where(ok[:, None], box, jnp.nan)), sort(owner)

  def counts(c, b, o):
    return _packed_counts(_decode(c, proto), _slot_masks(masks, o), *_box_lines(b, rows, cols))

  if early_exit:
    def body(carry):
      i, inter, pred = carry
      take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk)  # noqa: E731
      di, dp = counts(take(coef_s), take(box_s), take(owner_s))
      update = lambda out, v: jax.lax.dynamic_update_slice_in_dim(out, v, i * chunk, 0)  # noqa: E731
      return i + 1, update(inter, di), update(pred, dp)

    zeros = jnp.zeros((n + pad,), jnp.int32)
    count = jnp.sum(ok, dtype=jnp.int32)
    _, inter, pred = jax.lax.while_loop(lambda c: c[0] * chunk < count, body, (jnp.int32(0), zeros, zeros))
  else:
    chunks = lambda x: x.reshape((-1, chunk) + x.shape[1:])  # noqa: E731
    inter, pred = (x.reshape(-1) for x in jax.lax.map(lambda xs: counts(*xs), (chunks(coef_s), chunks(box_s), chunks(owner_s))))
  back = lambda x: jnp.zeros((n,), jnp.int32).at[order].set(x[:n])  # noqa: E731
  return back(inter), back(pred)


def pair_mask_counts(coef, box, owner, ok, proto, masks, chunk: int, early_exit: bool = True) -> tuple[jax.Array, jax.Array]:
  """:func:`plain_pair_mask_counts` over the plane's ``MASK_TILE`` tiles that each pair's box touches.

  Tiles (``min(MASK_TILE, side)`` pixels; the plane padded to whole tiles, the padding in no box) are a
  loop (one compilation for any number of tiles); in each, the ``ok`` pairs whose box touches it are listed (:func:`jnp.nonzero`, static
  size) and run ``MASK_TILE_CHUNK`` at a time in a loop of ``ceil(listed / chunk)`` iterations; each
  chunk's counts are added to its pairs. The same integers as the plain form. Without
  ``early_exit`` (``checkify``: no loop of traced length) this is the plain form; ``chunk`` is the
  plain form's.
  """
  if not early_exit:
    return plain_pair_mask_counts(coef, box, owner, ok, proto, masks, chunk, early_exit)
  n, _ = coef.shape
  _, h, w = proto.shape
  th, tw = min(MASK_TILE, h), min(MASK_TILE, w)
  gh, gw = -(-h // th), -(-w // tw)
  grow = ((0, gh * th - h), (0, gw * tw - w))
  proto = jnp.pad(proto, ((0, 0),) + grow)
  masks = jnp.pad(masks, grow if masks.ndim == 2 else ((0, 0),) + grow)
  x1, y1, x2, y2 = (box[:, i] for i in range(4))
  k = min(MASK_TILE_CHUNK, n)
  size = -(-n // k) * k
  totals = (jnp.zeros((n + 1,), jnp.int32), jnp.zeros((n + 1,), jnp.int32))  # slot n: the listing's filler

  def visit(t, totals):  # tile t: rows r0 + [0, th), columns c0 + [0, tw)
    r0, c0 = (t // gw) * th, (t % gw) * tw
    touch = ok & (y1 < r0 + th) & (y2 > r0) & (x1 < c0 + tw) & (x2 > c0)  # generous: the counts decide
    ids = jnp.nonzero(touch, size=size, fill_value=n)[0]
    line = lambda start, num, limit: jnp.where(start + jnp.arange(num) < limit, start + jnp.arange(num), jnp.inf).astype(jnp.float32)  # noqa: E731
    rows, cols = line(r0, th, h), line(c0, tw, w)  # pixels past the plane: in no box
    p_tile = jax.lax.dynamic_slice(proto, (0, r0, c0), (proto.shape[0], th, tw))
    m_tile = jax.lax.dynamic_slice(masks, (r0, c0) if masks.ndim == 2 else (0, r0, c0), masks.shape[:-2] + (th, tw))

    def body(j, totals):
      item = jax.lax.dynamic_slice_in_dim(ids, j * k, k)
      at = jnp.minimum(item, n - 1)
      di, dp = _packed_counts(_decode(coef[at], p_tile), _slot_masks(m_tile, owner[at]), *_box_lines(box[at], rows, cols))
      return totals[0].at[item].add(di), totals[1].at[item].add(dp)

    return jax.lax.fori_loop(0, (jnp.sum(touch, dtype=jnp.int32) + k - 1) // k, body, totals)

  totals = jax.lax.fori_loop(0, gh * gw, visit, totals)
  return totals[0][:n], totals[1][:n]
