"""The segmentation mask term's speed tricks, each beside its plain twin (the package's rules: :mod:`jaxtal.kernels`).

The mask BCE over chunks of entries with its gradients formed in the forward scan (``mask_bce_sum``; its plain
twin is autodiff over :func:`plain_chunk_sum`'s checkpointed chunks), and the same term over fixed-size windows
tiling the GT boxes (``mask_windows``) with the box-window machinery (:class:`BoxWindows`, ``box_windows``,
``window_items``, ``window_at``, ``gather_windows``, ``scatter_add_windows``, ``entry_groups``) and the run-time
choice between windows and the whole plane (``windows_cheaper``, ``WINDOW_COST``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtal.targets import take_rows

# ------------------------------------------------------------------------------------------------
# A sum over chunks of the entry list, each chunk under jax.checkpoint (memory bounded whatever E).
# Not a trick: the plain form of the mask term below. (Ordering counted entries first and skipping
# empty chunks was measured at b = 16, M = 50: -10% of the segmentation step, so it was removed.)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """``(b, E, ...)`` -> ``(n, b, chunk, ...)``, padded at the end with zeros (weight 0: not counted)."""
  b, size = x.shape[:2]
  n = -(-size // chunk)
  x = jnp.pad(x, [(0, 0), (0, n * chunk - size)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)


def plain_chunk_sum(term, shared, xs, weight, chunk: int) -> jax.Array:
  """``sum over chunks of term(*shared, *xs_chunk, weight_chunk)``, each chunk under ``jax.checkpoint``.

  ``term`` maps one chunk to a scalar and must give 0 for entries of weight 0 (the padding of the
  last chunk). ``shared``: arrays every chunk reads whole (prototypes, masks); ``xs``: ``(b, E,
  ...)`` per-entry arrays; ``weight (b, E)``: 0 on entries that do not count; ``chunk``: static
  entries per chunk. The backward pass recomputes a chunk's intermediates instead of keeping
  them, so memory is that of a few chunks whatever ``E``. One call, no scan, when ``chunk >= E``.
  """
  if chunk >= weight.shape[1]:
    return term(*shared, *xs, weight)
  body = jax.checkpoint(term)

  def step(total, chunk_xs):
    return total + body(*shared, *chunk_xs), None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), tuple(_chunks(x, chunk) for x in (*xs, weight)))
  return total


# ------------------------------------------------------------------------------------------------
# The mask term's BCE over chunks of entries (segment.py), value and gradient in one pass.
# Why: the plain form is a scan over chunks of entries whose body is under jax.checkpoint (memory
# must not grow with E), so autodiff computes each chunk's (b, chunk, mh, mw) mask logits twice
# and its transcendental twice. The loss is a scalar sum, so the gradients w.r.t. the
# coefficients and the prototypes can be formed in the forward scan from one exp pass
# (d BCE / d logit = sigmoid - target) and only scaled by the cotangent afterwards: one einsum
# and one exp per pixel fewer, and no recomputation. Counted entries are moved first, so chunks
# that count nothing in any image are skipped.
# Bench row "segment loss fwd+bwd, plain mask_bce_sum" (b = 16, M = 50, 160 x 160 x 32 prototypes;
# benchmarks/README.md).


def _mask_chunk(proto, masks, coef, gt, box, weight, index_map: bool):
  """One chunk's mask logits ``(b, C, mh, mw)``, targets and per-pixel weights (0 outside the box).

  Shapes: ``proto (b, nm, mh, mw)``; ``masks`` an index map ``(b, mh, mw)`` int (pixel value
  ``j + 1`` marks GT slot ``j``) or per-slot masks ``(b, M, mh, mw)``; ``coef (b, C, nm)``,
  ``gt (b, C)`` int, ``box (b, C, 4)`` xyxy in mask pixels, ``weight (b, C)``. A pixel of column
  ``x`` (row ``y``) is in the box when ``x1 <= x < x2`` (``y1 <= y < y2``), its index compared.
  A per-slot mask pixel that is not a value in ``[0, 1]`` (NaN, inf, or out of range) is read as 0 and
  weighted 0 (double ``where``): it adds nothing, and an entry that does not count never multiplies its
  mask's NaN by a zero weight.
  """
  logits = jnp.einsum("bcn,bnhw->bchw", coef, proto)
  mh, mw = logits.shape[-2:]
  cols, rows = jnp.arange(mw, dtype=jnp.float32), jnp.arange(mh, dtype=jnp.float32)
  in_cols = (cols >= box[..., 0:1]) & (cols < box[..., 2:3])  # (b, C, mw): the crop is separable
  in_rows = (rows >= box[..., 1:2]) & (rows < box[..., 3:4])  # (b, C, mh)
  counted = in_rows[..., :, None] & in_cols[..., None, :]
  if index_map:
    target = (masks[:, None] == (gt + 1)[..., None, None]).astype(jnp.float32)
  else:
    target = take_rows(masks, gt).astype(jnp.float32)
    ok = (target >= 0.0) & (target <= 1.0)  # False for NaN too
    target, counted = jnp.where(ok, target, 0.0), counted & ok
  pixel_weight = jnp.where(counted, weight[..., None, None], 0.0)
  return logits, target, pixel_weight


def _mask_chunk_value(proto, masks, coef, gt, box, weight, *, index_map: bool):
  logits, target, pixel_weight = _mask_chunk(proto, masks, coef, gt, box, weight, index_map)
  return jnp.sum(pixel_weight * (jax.nn.softplus(logits) - logits * target))


def plain_mask_bce_sum(coef, proto, masks, gt, box, weight, chunk: int, index_map: bool) -> jax.Array:
  """``sum over entries e of weight_e * sum over the pixels in box_e of BCE-with-logits(coef_e . proto,
  target_e)``, by autodiff over :func:`plain_chunk_sum` (chunks under ``jax.checkpoint``).

  Shapes: ``coef (b, E, nm)``, ``gt (b, E)`` int, ``box (b, E, 4)``, ``weight (b, E)`` (0: not
  counted), ``proto`` and ``masks`` as :func:`_mask_chunk`; ``chunk`` static -> scalar.
  """
  term = functools.partial(_mask_chunk_value, index_map=index_map)
  return plain_chunk_sum(term, (proto, masks), (coef, gt, box), weight, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def mask_bce_sum(coef, proto, masks, gt, box, weight, chunk: int, index_map: bool) -> jax.Array:
  """:func:`plain_mask_bce_sum` with its gradients (w.r.t. ``coef`` and ``proto``; the targets, boxes
  and weights are constants) formed in the forward scan; the same value and gradients."""
  return _mask_bce_fwd(coef, proto, masks, gt, box, weight, chunk, index_map)[0]


def _mask_bce_fwd(coef, proto, masks, gt, box, weight, chunk, index_map):
  size = weight.shape[1]
  chunk = min(chunk, size)
  # Counted entries first in each image, so that the trailing chunks count nothing in any image and
  # are skipped (lax.cond on one scalar); the coefficient gradients are put back in entry order.
  order = jnp.argsort(weight == 0, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
  coef_o, gt_o, box_o, weight_o = (take(x) for x in (coef, gt, box, weight))

  def step(carry, xs):
    return jax.lax.cond(jnp.any(xs[-1] != 0), chunk_step, lambda carry, xs: (carry, jnp.zeros(xs[0].shape, jnp.float32)), carry, xs)

  def chunk_step(carry, xs):
    total, d_proto = carry
    c, g, bx, w = xs
    logits, target, pixel_weight = _mask_chunk(proto, masks, c, g, bx, w, index_map)
    e = jnp.exp(-jnp.abs(logits))  # one exp for the softplus and the sigmoid
    softplus = jnp.maximum(logits, 0.0) + jnp.log1p(e)
    sigmoid = jnp.where(logits >= 0, 1.0, e) / (1.0 + e)
    total = total + jnp.sum(pixel_weight * (softplus - logits * target))
    d_logits = pixel_weight * (sigmoid - target)
    d_proto = d_proto + jnp.einsum("bchw,bcn->bnhw", d_logits, c)
    return (total, d_proto), jnp.einsum("bchw,bnhw->bcn", d_logits, proto)

  init = (jnp.zeros((), jnp.float32), jnp.zeros_like(proto))
  (total, d_proto), d_coef = jax.lax.scan(step, init, tuple(_chunks(x, chunk) for x in (coef_o, gt_o, box_o, weight_o)))
  d_coef = jnp.moveaxis(d_coef, 0, 1).reshape((coef.shape[0], -1, coef.shape[-1]))[:, :size]  # (n, b, C, nm) -> (b, E, nm)
  d_coef = jnp.take_along_axis(d_coef, jnp.argsort(order, axis=1)[..., None], axis=1)  # back to entry order
  return total, (d_coef, d_proto)


def _mask_bce_bwd(chunk, index_map, residuals, ct):
  d_coef, d_proto = residuals
  return ct * d_coef, ct * d_proto, None, None, None, None


mask_bce_sum.defvjp(_mask_bce_fwd, _mask_bce_bwd)


# ------------------------------------------------------------------------------------------------
# Box windows: fixed-size pixel windows that tile each box, and the mask term over them.
# Why: the full-plane form computes every entry's mh x mw logits and BCE and then zeroes the pixels
# outside its GT box; in the benchmark's workload the boxes cover 6% of the plane on average (1.5%
# median), so about 94% of that work is multiplied by zero. Here each box is tiled by windows of one
# static size starting at its first pixel; the entries of one GT share their windows (one prototype
# gather and one gradient scatter per window for up to ``group`` entries, so the per-window work is
# a small matmul, not a gather per entry), and a loop whose trip count is the number of windows in
# use (not a static worst case) visits them a chunk at a time, per image (so that a batch-sharded jit
# keeps every gather on its device; one list over the batch did 20-40% less work on one CPU).
# Bench row "segment loss fwd+bwd, plain mask_windows" (benchmarks/README.md).


class BoxWindows(NamedTuple):
  """Fixed-size windows tiling a list of boxes (:func:`box_windows`); shapes ``(N, ...)`` per box.

  Attributes:
    first: ``(N, 2)`` int32 first counted pixel ``(row, col)`` of each box, clipped into the plane.
    tiles: ``(N, 2)`` int32 windows along rows and columns (0 for a box that counts no pixel).
    end: ``(N,)`` int32 one past the index of each box's last window in the list (inclusive
      cumulative sum of ``tiles[:, 0] * tiles[:, 1]``): box ``n`` owns windows ``[end[n - 1], end[n])``.
    count: ``()`` int32 windows in the list (``end[-1]``).
  """

  first: jax.Array
  tiles: jax.Array
  end: jax.Array
  count: jax.Array


def box_windows(boxes: jax.Array, plane_hw, tile) -> BoxWindows:
  """The windows of size ``tile = (th, tw)`` that tile each box's pixels on an ``(h, w)`` plane.

  ``boxes (N, 4)`` xyxy in pixels; a pixel of column ``x`` (row ``y``) is in the box when ``x1 <= x
  < x2`` (``y1 <= y < y2``), its index compared; a box with a NaN side counts no pixel. Box ``n``'s
  pixels are tiled row-major by ``tiles[n]`` windows whose nominal corners are ``first[n] + (i * th,
  j * tw)``; :func:`window_at` gives each window's box, nominal corner and clamped corner. ``tile``
  must fit in the plane (``th <= h``, ``tw <= w``). The list's length ``count`` is a traced value:
  a caller loops over ``ceil(count / chunk)`` chunks (one compilation for any boxes).
  """
  h, w = plane_hw
  th, tw = tile
  if not (1 <= th <= h and 1 <= tw <= w):
    raise ValueError(f"box_windows: tile {tuple(tile)} must fit in the plane {tuple(plane_hw)}")
  size = jnp.array([w, h], jnp.float32)

  def edge(v, empty):  # first counted index >= v, clipped into [0, size]; NaN counts no pixel
    return jnp.where(jnp.isnan(v), empty, jnp.clip(jnp.ceil(v), 0.0, size)).astype(jnp.int32)

  lo, hi = edge(boxes[..., :2], size), edge(boxes[..., 2:], 0.0)  # (N, 2) as (x, y)
  n = jnp.maximum(hi - lo, 0)[..., ::-1]  # (rows, cols)
  tiles = (n + jnp.array([th - 1, tw - 1], jnp.int32)) // jnp.array([th, tw], jnp.int32)
  end = jnp.cumsum(tiles[:, 0] * tiles[:, 1], dtype=jnp.int32)
  count = end[-1] if end.shape[0] else jnp.zeros((), jnp.int32)
  return BoxWindows(lo[..., ::-1], tiles, end, count)


def window_items(windows: BoxWindows, capacity: int) -> jax.Array:
  """``(capacity,)`` int32: the box of each window index below ``capacity`` (the last box past ``count``).

  One scatter and a cumulative maximum, for a caller that visits many chunks of the list (each chunk
  then reads its boxes instead of searching ``end``). ``capacity``: static, at least ``count`` (``N``
  boxes of at most ``ceil(h / th) * ceil(w / tw)`` windows each).
  """
  n = windows.end.shape[0]
  starts = windows.end - windows.tiles[:, 0] * windows.tiles[:, 1]
  ids = jnp.arange(n, dtype=jnp.int32)
  first = jnp.full((capacity,), 0, jnp.int32).at[jnp.where(windows.end > starts, starts, capacity)].max(ids, mode="drop")
  return jnp.minimum(jax.lax.cummax(first), n - 1)


def window_at(windows: BoxWindows, index: jax.Array, plane_hw, tile, items: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(box (P,), nominal corner (P, 2), corner (P, 2))`` of the windows ``index (P,)`` of the list.

  The window counts the pixels of its box in ``[nominal, nominal + tile)`` (the box's windows
  partition its pixels); ``corner`` is the nominal corner clamped so the window lies in the plane
  (a window at the plane's bottom or right edge starts earlier and its first rows or columns belong
  to the box's previous window). Indices at or past ``count`` give some box and an in-plane corner:
  mask them out with ``index < count``. ``items``: the list's :func:`window_items`, read instead of a
  binary search of ``end``.
  """
  h, w = plane_hw
  th, tw = tile
  if items is None:
    box = jnp.minimum(jnp.searchsorted(windows.end, index, side="right"), windows.end.shape[0] - 1)
  else:  # window_items of the list
    box = items[jnp.minimum(index, items.shape[0] - 1)]
  tiles = windows.tiles[box]
  local = index - (windows.end[box] - tiles[:, 0] * tiles[:, 1])
  per_row = jnp.maximum(tiles[:, 1], 1)
  nominal = windows.first[box] + jnp.stack([local // per_row * th, local % per_row * tw], axis=-1)
  corner = jnp.clip(nominal, 0, jnp.array([h - th, w - tw], jnp.int32))
  return box, nominal, corner


def _window_index(lead: jax.Array | None, corner: jax.Array) -> jax.Array:
  # (P, k) leading indices (none, image, or image and slot) and (P, 2) corners -> (P, k + 2) start indices.
  if lead is None:
    return corner.astype(jnp.int32)
  lead = lead[:, None] if lead.ndim == 1 else lead
  return jnp.concatenate([lead.astype(jnp.int32), corner.astype(jnp.int32)], axis=1)


def gather_windows(planes: jax.Array, lead: jax.Array, corner: jax.Array, tile) -> jax.Array:
  """``planes[lead[p], y:y + th, x:x + tw]`` for each window ``p``: ``(b, [M,] h, w, ...)`` -> ``(P, th, tw, ...)``.

  ``lead (P,)`` image indices, ``(P, k)`` indices of the ``k`` leading axes (image and GT slot of
  per-slot masks ``(b, M, h, w)``), or None for one plane ``(h, w, ...)`` (vmap it over images: the
  gathers stay batched, so a batch-sharded ``jit`` keeps each image's windows on its device);
  ``corner (P, 2)`` int32 ``(y, x)`` keeps the window in the plane
  (:func:`window_at`'s corner; an index out of range is clamped). One gather, no copy per window.
  """
  index = _window_index(lead, corner)
  k = index.shape[1] - 2
  trailing = tuple(range(k + 2, planes.ndim))
  dims = jax.lax.GatherDimensionNumbers(
      offset_dims=tuple(range(1, 3 + len(trailing))), collapsed_slice_dims=tuple(range(k)),
      start_index_map=tuple(range(k + 2)),
  )  # fmt: skip
  sizes = (1,) * k + tuple(tile) + tuple(planes.shape[d] for d in trailing)
  return jax.lax.gather(planes, index, dims, sizes, mode=jax.lax.GatherScatterMode.CLIP)


def scatter_add_windows(planes: jax.Array, lead: jax.Array, corner: jax.Array, values: jax.Array) -> jax.Array:
  """``planes`` with each window ``values[p] (th, tw, ...)`` added at ``(lead[p], corner[p])``
  (overlapping windows add up): the transpose of :func:`gather_windows`, same arguments."""
  index = _window_index(lead, corner)
  k = index.shape[1] - 2
  # The leading axes stay in each update as unit axes (none inserted): with them inserted, XLA:CPU copied
  # every update into a layout that differs only in where the unit axis lies.
  values = values.reshape(values.shape[:1] + (1,) * k + values.shape[1:])
  dims = jax.lax.ScatterDimensionNumbers(
      update_window_dims=tuple(range(1, values.ndim)), inserted_window_dims=(), scatter_dims_to_operand_dims=tuple(range(k + 2)),
  )  # fmt: skip
  return jax.lax.scatter_add(planes, index, values, dims, mode=jax.lax.GatherScatterMode.CLIP)


def entry_groups(gt, box, weight, group: int):
  """Counted entries of one image grouped by GT slot, at most ``group`` to a group.

  Shapes: ``gt (E,)``, ``box (E, 4)``, ``weight (E,)`` -> ``(table (E, group) int32, union boxes (E, 4))``.
  Row ``g`` of ``table`` lists group ``g``'s entries (``E``: an empty slot); groups are numbered from
  0 and rows past the last group are empty, with an empty union box. Every counted entry (weight not
  0) is in exactly one group; all entries of a group have the same ``gt``; a GT with more than
  ``group`` entries gets several groups.
  """
  e = gt.shape[0]
  counted = weight != 0
  order = jnp.argsort(jnp.where(counted, gt, jnp.iinfo(jnp.int32).max), stable=True)  # uncounted last
  key, counted = gt[order], counted[order]
  pos = jnp.arange(e, dtype=jnp.int32)
  new_run = (pos == 0) | (key != jnp.roll(key, 1))  # no concatenation with a constant: it keeps key's sharding
  rank = pos - jax.lax.cummax(jnp.where(new_run, pos, 0))
  gid = jnp.cumsum(counted & (rank % group == 0), dtype=jnp.int32) - 1
  row = jnp.where(counted, gid, e)  # e: dropped
  table = jnp.full((e, group), e, jnp.int32).at[row, rank % group].set(order, mode="drop")
  b = box[order]
  b = jnp.where(jnp.isnan(b).any(-1, keepdims=True), jnp.array([jnp.inf, jnp.inf, -jnp.inf, -jnp.inf]), b)
  empty = jnp.broadcast_to(jnp.array([jnp.inf, jnp.inf, -jnp.inf, -jnp.inf], jnp.float32), (e, 4))
  union = jnp.concatenate([
      empty[:, :2].at[row].min(b[:, :2], mode="drop"), empty[:, 2:].at[row].max(b[:, 2:], mode="drop")], axis=1)
  return table, union


def _windows_chunk(proto, masks, coef, gt, box, weight, box_win, items, table, index, plane_hw, tile, index_map):
  """One image's chunk of windows: the value, and the gradients of the unit cotangent w.r.t. the chunk's
  coefficient rows ``(P, K, nm)`` and windows ``(P, th, tw * nm)``, with where they go.

  ``proto (h, w * nm)``: NHWC rows; ``masks (h, w)`` or ``(M, h, w)``; ``coef (E + 1, nm)``, ``gt``,
  ``box``, ``weight`` with one empty entry last; ``table (E, K)`` the groups' entry ids; ``box_win``
  the groups' :class:`BoxWindows` and ``items`` its windows' groups (:func:`window_items`); ``index
  (P,)`` window indices.
  """
  th, tw = tile
  nm = coef.shape[-1]
  live = index < box_win.count
  item, nominal, corner = window_at(box_win, index, plane_hw, tile, items)
  ids = jnp.where(live[:, None], table[item], coef.shape[0] - 1)  # (P, K)
  c, bx, w = coef[ids], box[ids], weight[ids]
  # A window of the (h, w * nm) rows is th runs of tw * nm contiguous values: gathered and scattered as
  # they lie, and a (th * tw, nm) matrix to the matmuls.
  row_corner = corner * jnp.array([1, nm], jnp.int32)
  # (Reshaped in two steps, a split and a merge: under explicitly sharded types JAX rejects one reshape doing both.)
  win = gather_windows(proto, None, row_corner, (th, tw * nm)).reshape(-1, th, tw, nm).reshape(-1, th * tw, nm)
  batched = lambda x, y, contract: jax.lax.dot_general(x, y, (contract, ((0,), (0,))))  # noqa: E731
  logits = batched(win, c, ((2,), (2,))).reshape(-1, th, tw, c.shape[1])  # (P, th, tw, K)
  rows = (corner[:, 0:1] + jnp.arange(th, dtype=jnp.int32))[..., None]  # (P, th, 1)
  cols = (corner[:, 1:2] + jnp.arange(tw, dtype=jnp.int32))[..., None]
  own_rows = (rows >= nominal[:, 0:1, None]) & (rows < nominal[:, 0:1, None] + th)  # this window's share
  own_cols = (cols >= nominal[:, 1:2, None]) & (cols < nominal[:, 1:2, None] + tw)
  rows, cols = rows.astype(jnp.float32), cols.astype(jnp.float32)
  in_rows = own_rows & (rows >= bx[:, None, :, 1]) & (rows < bx[:, None, :, 3])  # (P, th, K)
  in_cols = own_cols & (cols >= bx[:, None, :, 0]) & (cols < bx[:, None, :, 2])  # (P, tw, K)
  slot = gt[ids[:, 0]]  # every entry of a group has its GT slot
  if index_map:
    target = (gather_windows(masks, None, corner, tile) == (slot + 1)[:, None, None]).astype(jnp.float32)
    ok = 1.0
  else:
    target = gather_windows(masks, slot, corner, tile).astype(jnp.float32)
    ok = (target >= 0.0) & (target <= 1.0)  # False for NaN too
    target, ok = jnp.where(ok, target, 0.0), ok.astype(jnp.float32)[..., None]
  target = target[..., None]
  # where(counted, weight, 0) as a product of row, column and mask factors (the weights are finite).
  row_weight = jnp.where(in_rows, w[:, None, :], 0.0)  # (P, th, K)
  pixel_weight = row_weight[:, :, None, :] * in_cols[:, None, :, :].astype(jnp.float32) * ok
  e = jnp.exp(-jnp.abs(logits))  # one exp for the softplus and the sigmoid
  softplus = jnp.maximum(logits, 0.0) + jnp.log1p(e)
  sigmoid = jnp.where(logits >= 0, 1.0, e) / (1.0 + e)
  value = jnp.sum(pixel_weight * (softplus - logits * target))
  d_logits = (pixel_weight * (sigmoid - target)).reshape(-1, th * tw, c.shape[1])
  # (P, K, nm) from d_logits transposed and materialised (the barrier keeps XLA from folding the transpose
  # back into the matmul, which XLA:CPU then runs outside its fast matmul library, 1.6x slower).
  d_coef = batched(jax.lax.optimization_barrier(jnp.swapaxes(d_logits, 1, 2)), win, ((2,), (1,)))
  d_win = batched(d_logits, c, ((2,), (1,)))  # (P, th * tw, nm)
  return value, ids, d_coef, row_corner, d_win.reshape(-1, th, tw, nm).reshape(-1, th, tw * nm)


# What a window's slot-pixel (one entry slot, one window pixel) costs against a full-plane entry-pixel on
# XLA:CPU (benchmark workload, 16 x 16 windows: 12.5 ns against 4.7 ns of CPU time, the per-window gather,
# scatter and index work included). The windows are used while they cost less (every box the whole plane:
# the windows took 1.7x the full plane's time).
WINDOW_COST = 2.5


def plain_mask_windows(coef, proto, masks, gt, box, weight, chunk: int, index_map: bool, tile=None, group=None, fallback=True) -> jax.Array:
  """The full-plane form, :func:`mask_bce_sum` (the other arguments unused): the twin of :func:`mask_windows`."""
  del tile, group, fallback
  return mask_bce_sum(coef, proto, masks, gt, box, weight, chunk, index_map)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def mask_windows(coef, proto, masks, gt, box, weight, chunk: int, index_map: bool, tile, group: int, fallback: bool = True) -> jax.Array:
  """:func:`plain_mask_bce_sum` computed over box windows, with its gradients formed in the same pass.

  Arguments as :func:`mask_bce_sum`, plus static ``tile = (th, tw)`` (window size in mask pixels,
  clipped to the plane), ``group`` (entries sharing one window: the entries of one GT slot, at most
  ``group`` at a time) and ``fallback``. The counted entries of each image are grouped by GT slot;
  each group's windows tile the union of its entries' boxes (:func:`box_windows`), so no pixel
  outside a box's windows is computed; a pixel is counted by one window only, under the same box and
  mask rules as :func:`_mask_chunk`. ``chunk`` is the full-plane form's entries per chunk: a step
  here holds about as many bytes (``chunk * mh * mw / (th * tw * (nm + 3 * group))`` windows of
  each image). The windows are listed and visited per image, all images in step.
  With ``fallback``, the batch is computed by :func:`mask_bce_sum` instead when its windows would
  cost more (``WINDOW_COST`` per slot-pixel; chosen at run time with ``lax.cond``, both forms in one
  compilation). The same value and gradients as :func:`mask_bce_sum` to float32 rounding.
  """
  return _mask_windows_fwd(coef, proto, masks, gt, box, weight, chunk, index_map, tile, group, fallback)[0]


def _mask_windows_fwd(coef, proto, masks, gt, box, weight, chunk, index_map, tile, group, fallback):
  h, w = proto.shape[2:]
  tile = (min(int(tile[0]), h), min(int(tile[1]), w))
  table, union = jax.vmap(functools.partial(entry_groups, group=int(group)))(gt, box, weight)
  win = jax.vmap(functools.partial(box_windows, plane_hw=(h, w), tile=tile))(union)
  args = (coef, proto, masks, gt, box, weight, table, win, chunk, index_map, tile)
  if not fallback:
    return _windows_sum(*args)
  return jax.lax.cond(
      windows_cheaper(win.count, weight, (h, w), tile, group, chunk),
      lambda: _windows_sum(*args), lambda: _mask_bce_fwd(coef, proto, masks, gt, box, weight, chunk, index_map),
  )  # fmt: skip


def windows_cheaper(count: jax.Array, weight: jax.Array, plane_hw, tile, group: int, chunk: int) -> jax.Array:
  """Whether windows of ``tile`` (``group`` entry slots each), ``count (b,)`` in each image, cost less
  than the full-plane form.

  Both forms run every image in step: the windows ``b * max(count)`` windows, the full-plane form
  (:func:`mask_bce_sum`) ``ceil(max counted entries of an image / chunk)`` chunks of ``chunk`` entries
  per image of ``weight (b, E)``; a window slot-pixel costs ``WINDOW_COST`` full-plane entry-pixels.
  A scalar bool (traced).
  """
  b, e = weight.shape
  chunk = min(chunk, e)
  counted = jnp.max(jnp.sum(weight != 0, axis=1))
  full = ((counted + chunk - 1) // chunk * chunk).astype(jnp.float32) * (plane_hw[0] * plane_hw[1])
  return jnp.max(count).astype(jnp.float32) * (tile[0] * tile[1] * group * WINDOW_COST) <= full


def _windows_sum(coef, proto, masks, gt, box, weight, table, win, chunk, index_map, tile):
  """The value and unit-cotangent gradients of :func:`mask_windows` over its windows: a loop over chunks,
  each taking the next windows of every image (vmapped per image, so every gather and scatter is within
  one image: a batch-sharded ``jit`` keeps each image's work on its device)."""
  b, e, nm = coef.shape
  h, w = proto.shape[2:]
  group = table.shape[-1]
  pad = lambda x: jnp.pad(x, [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731  (an empty entry: id e)
  coef_p, gt_p, box_p, weight_p = pad(coef), pad(gt), pad(box), pad(weight)
  items = jax.vmap(functools.partial(window_items, capacity=e * (-(-h // tile[0])) * (-(-w // tile[1]))))(win)
  step = max(1, chunk * h * w // (tile[0] * tile[1] * (nm + 3 * group)))  # windows per image per step
  proto_t = jnp.transpose(proto, (0, 2, 3, 1)).reshape(b, h, w * nm)  # NHWC rows
  chunk_fn = functools.partial(_windows_chunk, plane_hw=(h, w), tile=tile, index_map=index_map)
  images = jax.vmap(chunk_fn, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 0, None))
  add_rows = jax.vmap(lambda acc, ids, rows: acc.at[ids].add(rows))
  add_windows = jax.vmap(lambda acc, corner, values: scatter_add_windows(acc, None, corner, values))

  def body(i, carry):
    total, d_coef, d_proto = carry
    index = i * step + jnp.arange(step, dtype=jnp.int32)
    value, ids, dc, corner, d_win = images(proto_t, masks, coef_p, gt_p, box_p, weight_p, win, items, table, index)
    return total + jnp.sum(value), add_rows(d_coef, ids, dc), add_windows(d_proto, corner, d_win)

  init = (jnp.zeros((), jnp.float32), jnp.zeros_like(coef_p), jnp.zeros_like(proto_t))  # zeros_like: the inputs' sharding
  total, d_coef, d_proto = jax.lax.fori_loop(0, (jnp.max(win.count) + step - 1) // step, body, init)
  return total, (d_coef[:, :-1], jnp.transpose(d_proto.reshape(b, h, w, nm), (0, 3, 1, 2)))


def _mask_windows_bwd(chunk, index_map, tile, group, fallback, residuals, ct):
  d_coef, d_proto = residuals
  return ct * d_coef, ct * d_proto, None, None, None, None


mask_windows.defvjp(_mask_windows_fwd, _mask_windows_bwd)
