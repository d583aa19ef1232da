"""jaxtal.windows and the assigner's windowed pass: the dense pass's targets, from a few anchors per GT.

The windowed pass is a speed path, so every assigner test runs both passes on one input
(``AssignerConfig(windows=True)`` against ``windows=False``) and asks for the same discrete targets
and entry list bit for bit, weights to float32 rounding, and the NumPy oracle's
(``support.oracles.np_assign``, dense and float64) assignment. The problems are crowded: a 256 px
input (strides 8/16/32, A = 1344 anchors, window capacities 32 and 64), hundreds of GTs per image
from 2 px to larger than any window, padding and invalid rows, boxes on and over the border, an
image with no GT, quantised scores (ties), identical predictions (every metric of a GT ties) and
GTs whose candidates all score 0 at the top-left corner, where the dense top-k's zero-score
fillers (the lowest anchor indices) are candidates. The pieces of :mod:`jaxtal.windows` are tested
against NumPy first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal
from jaxtal import kernels, windows
from support.oracles import np_assign
from support.problems import np_entries_keep_contract

SIZE = 256
STRIDES = (8, 16, 32)
SHAPES = tuple((SIZE // s, SIZE // s) for s in STRIDES)
GRID = tuple((h, w, float(s)) for (h, w), s in zip(SHAPES, STRIDES))
NC = 4


def anchor_px() -> np.ndarray:
  anchors, strides = jaxtal.make_anchors(SHAPES, STRIDES)
  return np.asarray(anchors * strides)


def crowded_problem(seed: int = 0, b: int = 3, m: int = 300, rotated: bool = False):
  """Scores ``(b, A, NC)``, predicted boxes, anchors and a GroundTruth of ``m`` slots per image.

  Image 0: many small boxes, a few larger than any window, boxes over the border, padding and
  invalid rows, and two GTs at the top-left corner whose class scores 0 everywhere. Image 1: the
  same kind of boxes, every prediction the same box (every metric of a GT ties). Image 2: no GT.
  """
  rng = np.random.default_rng(seed)
  ap = anchor_px()
  a = len(ap)
  half = rng.uniform(2.0, 24.0, (b, a, 4))
  pred = np.concatenate([ap - half[..., :2], ap + half[..., 2:]], -1)
  pred[1] = [100.0, 100.0, 140.0, 130.0]  # image 1: one predicted box everywhere
  scores = np.round(rng.uniform(0.0, 1.0, (b, a, NC)) * 4) / 4  # quantised: ties, and zeros
  scores[..., 3] = 0.0  # class 3 scores 0 everywhere: its GTs' candidates all have metric 0
  wh = np.exp(rng.uniform(np.log(2.0), np.log(48.0), (b, m, 2)))
  wh[:, :6] = rng.uniform(80.0, 200.0, (b, 6, 2))  # larger than any window: the dense bucket
  xy = rng.uniform(-10.0, SIZE + 10.0, (b, m, 2))  # some over the border
  boxes = np.concatenate([xy - wh / 2, xy + wh / 2], -1)
  labels = rng.integers(0, 3, (b, m))
  boxes[0, 10] = [0.0, 0.0, 20.0, 14.0]  # top-left corner, class 3: zero-metric candidates at anchors 0, 1, ...
  boxes[0, 11] = [-4.0, -4.0, 9.0, 30.0]
  labels[0, 10:12] = 3
  boxes[0, 12] = [0.0, 0.0, SIZE, SIZE]  # the whole image
  mask = rng.uniform(size=(b, m)) > 0.08
  boxes[0, 20] = [np.nan, 4.0, 20.0, 20.0]  # invalid rows: they never own anchors
  boxes[0, 21] = [30.0, 30.0, 30.0, 50.0]
  labels[0, 22] = NC + 1
  boxes[0, 23] = [1e9, 1e9, 1e9 + 5, 1e9 + 5]
  mask[2:] = False  # image 2: no GT
  boxes = boxes.astype(np.float32)
  if rotated:
    ctr, side = (boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]
    boxes = np.concatenate([ctr, side, rng.uniform(-np.pi / 2, np.pi / 2, (b, m, 1))], -1).astype(np.float32)
    pctr, pside = (pred[..., :2] + pred[..., 2:]) / 2, pred[..., 2:] - pred[..., :2]
    pred = np.concatenate([pctr, pside, rng.uniform(-0.5, 0.5, (*pred.shape[:2], 1))], -1)
  gt = jaxtal.GroundTruth(jnp.asarray(labels, jnp.int32), jnp.asarray(boxes), jnp.asarray(mask))
  return jnp.asarray(scores, jnp.float32), jnp.asarray(pred, jnp.float32), jnp.asarray(ap, jnp.float32), gt


@functools.partial(jax.jit, static_argnames=("config", "geometry", "levels"))
def assign(scores, boxes, anchors, gt, config, geometry=None, levels=1):
  geometry = jaxtal.axis_aligned(config.overlap) if geometry is None else geometry
  split = tuple(np.cumsum([h * w for h, w in SHAPES])[:-1]) if levels > 1 else ()
  return jaxtal.assign_targets(tuple(jnp.split(scores, split, axis=1)), boxes, anchors, gt, config, geometry=geometry,
                               from_logits=False, grid=GRID)


def assert_same_targets(got: jaxtal.Targets, expected: jaxtal.Targets, rtol: float = 1e-5) -> None:
  """Discrete targets and the valid entries exactly; weights to float32 rounding (XLA:CPU contracts
  multiply-adds into FMAs differently in different fusions, as between two ``gt_chunk`` settings, and
  beta = 6 multiplies an ulp of the overlap by six)."""
  for name in ("labels", "fg_mask", "gt_index", "positives_per_gt"):
    np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
  valid = np.asarray(expected.entries.valid)
  np.testing.assert_array_equal(got.entries.valid, valid, err_msg="entries.valid")
  for name in ("anchor", "gt"):
    np.testing.assert_array_equal(np.where(valid, getattr(got.entries, name), -1), np.where(valid, getattr(expected.entries, name), -1),
                                  err_msg=f"entries.{name}")
  np.testing.assert_array_equal(got.boxes, expected.boxes)
  np.testing.assert_allclose(got.weights, expected.weights, rtol=rtol, atol=1e-9)


def dense_and_windowed(*args, geometry=None, levels=1, **kw):
  dense = assign(*args, jaxtal.AssignerConfig(windows=False, **kw), geometry, levels)
  windowed = assign(*args, jaxtal.AssignerConfig(windows=True, **kw), geometry, levels)
  return dense, windowed


# --------------------------------------------------------------------------------------------------
# jaxtal.windows against NumPy


LAYOUT = windows.layout(GRID)


def test_layout_keeps_small_windows():
  assert LAYOUT.caps == (32, 64)  # 16 * cap <= A = 1344
  assert windows.layout(((80, 80, 8), (40, 40, 16), (20, 20, 32))).caps == (32, 64, 128, 256, 512)
  assert windows.layout(((16, 16, 8), (8, 8, 16), (4, 4, 32))).caps == (32,)  # A = 336: the smallest window only
  assert windows.layout(((4, 4, 8), (2, 2, 16))).caps == ()  # A = 20: dense only


def np_window(bounds):
  """Anchors (ascending) of the cells each level's generous range spans, from the stated rule."""
  x1, y1, x2, y2 = bounds
  out, start = [], 0
  for h, w, s in GRID:
    cols = [i for i in range(w) if x1 - s / 16 < (i + 0.5) * s < x2 + s / 16]
    rows = [j for j in range(h) if y1 - s / 16 < (j + 0.5) * s < y2 + s / 16]
    if cols and rows:
      out += [start + j * w + i for j in rows for i in cols]
    start += h * w
  return out


def test_windows_hold_every_anchor_in_the_bounds_in_order():
  rng = np.random.default_rng(0)
  lo = rng.uniform(-40, SIZE + 20, (400, 2))
  side = np.exp(rng.uniform(np.log(0.5), np.log(120), (400, 2)))
  bounds = np.concatenate([lo, lo + side], -1).astype(np.float32)
  ap = anchor_px()
  bounds[:8, 0] = ap[:8, 0]  # edges exactly on anchor centres (a test that includes its edges keeps them)
  bounds[8:16, 2] = ap[8:16, 0] + 64
  every = jnp.broadcast_to(jnp.arange(len(ap), dtype=jnp.int32), (len(bounds), len(ap)))

  @jax.jit
  def window(bounds):
    c = windows.cells(bounds, LAYOUT)
    return (*windows.window_anchors(c, LAYOUT, 64), c.size, windows.window_slots(every, c, LAYOUT, 64))

  anchor, used, size, slots = (np.asarray(x) for x in window(jnp.asarray(bounds)))
  checked = 0
  for i, bd in enumerate(bounds):
    expected = np_window(bd)
    assert size[i] == len(expected)
    if len(expected) > 64:
      continue
    checked += 1
    np.testing.assert_array_equal(anchor[i][used[i]], expected, err_msg=f"box {bd}")
    inside = (ap[:, 0] >= bd[0]) & (ap[:, 0] <= bd[2]) & (ap[:, 1] >= bd[1]) & (ap[:, 1] <= bd[3])
    assert set(np.flatnonzero(inside)) <= set(expected)
    np.testing.assert_array_equal(slots[i, expected], np.arange(len(expected)))
    assert (np.delete(slots[i], expected) == 64).all()
  assert checked > 250 and (size > 64).any() and (size == 0).any()
  bad = windows.cells(jnp.asarray([[np.nan, 0, 10, 10], [0, 0, np.inf, 10]], jnp.float32), LAYOUT).size
  assert (np.asarray(bad) > len(ap)).all()  # non-finite bounds fit no window: the dense bucket
  np.testing.assert_array_equal(windows.needs(jnp.asarray(bounds), LAYOUT), np.searchsorted([32, 64], size))


@pytest.mark.parametrize("k", [3, 10])
def test_complete_top_k_is_the_top_k_over_every_anchor(k):
  rng = np.random.default_rng(k)
  a = 60
  full = np.where(rng.uniform(size=(200, a)) < 0.9, 0.0, np.round(rng.uniform(size=(200, a)) * 3) / 3).astype(np.float32)
  full[:20] = 0.0  # rows with no positive value
  full[20:40, :5] = 0.5  # ties at the lowest anchors
  win = [np.sort(np.concatenate([np.flatnonzero(r), rng.choice(a, 4, replace=False)]))[: a] for r in full]
  width = max(len(w) for w in win)
  anchor = np.zeros((200, width), np.int32)
  values = np.full((200, width), -1.0, np.float32)
  for i, w in enumerate(win):
    w = np.unique(w)
    anchor[i, : len(w)] = w
    values[i, : len(w)] = full[i, w]
  @jax.jit
  def complete(values, anchor):
    top_v, pos = jax.lax.top_k(values, k)
    return windows.complete_top_k(top_v, jnp.take_along_axis(anchor, pos, axis=1))

  got_anchor, got_value, kept = complete(jnp.asarray(values), jnp.asarray(anchor))
  expected = np.argsort(-full, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(got_anchor, expected)
  np.testing.assert_array_equal(got_value, np.take_along_axis(full, expected, axis=1))
  np.testing.assert_array_equal(kept, np.take_along_axis(full, expected, axis=1) > 0)


def test_best_per_anchor_takes_the_highest_overlap_then_the_lowest_gt():
  rng = np.random.default_rng(1)
  a, m, w = 50, 40, 12
  anchor = rng.integers(0, a, (m, w)).astype(np.int32)
  overlap = np.where(rng.uniform(size=(m, w)) < 0.3, -1.0, np.round(rng.uniform(size=(m, w)) * 4) / 4).astype(np.float32)
  ov = np.full((m, a), -1.0)
  for g in range(m):
    for s in range(w):
      ov[g, anchor[g, s]] = max(ov[g, anchor[g, s]], overlap[g, s])
  running = (jnp.full((a,), -1.0), jnp.full((a,), jnp.iinfo(jnp.int32).max, jnp.int32))
  step = jax.jit(lambda r, an, ov, g: windows.merge_best(r, windows.best_in_block(an, ov, g, a)))
  order = rng.permutation(m)  # blocks in any order of GTs
  for block in np.split(order, 5):
    running = step(running, jnp.asarray(anchor[block]), jnp.asarray(overlap[block]), jnp.asarray(block, jnp.int32))
  high, owner = (np.asarray(x) for x in running)
  np.testing.assert_array_equal(high, ov.max(0))
  hit = ov.max(0) >= 0
  np.testing.assert_array_equal(owner[hit], np.argmax(ov, axis=0)[hit])  # argmax: the first GT among equals


def test_plan_visits_every_gt_once_with_a_window_that_holds_it():
  rng = np.random.default_rng(2)
  need = jnp.asarray(np.where(np.arange(70) < 5, 2, rng.choice(3, (4, 70), p=[0.7, 0.2, 0.1])).astype(np.int32))
  sizes = (16, 8, 4)
  plan = windows.plan(need, sizes)
  seen = np.zeros((4, 70), int)
  ids_of = jax.jit(jax.vmap(lambda o, s, c, t: windows.block_ids(windows.Plan(o, s, c, plan.cum), t, sizes, 70), (0, 0, 0, None)))
  for t in range(int(plan.cum[-1])):
    buckets, block = ids_of(plan.order, plan.start, plan.count, jnp.int32(t))
    for i in range(4):
      bucket, ids = buckets[i], np.asarray(block[i])
      assert (ids[sizes[int(bucket)]:] == 70).all()
      ids = ids[ids < 70]
      seen[i, ids] += 1
      assert (np.asarray(need)[i, ids] <= int(bucket)).all()
  np.testing.assert_array_equal(seen, 1)


# --------------------------------------------------------------------------------------------------
# The windowed assignment equals the dense one


@pytest.mark.parametrize("kw", [
    dict(),
    pytest.param(dict(min_box_side=16.0, topk=13, topk2=3), marks=pytest.mark.slow),
    pytest.param(dict(overlap="iou", gt_chunk=7, topk=4), marks=pytest.mark.slow),
])
def test_windowed_equals_dense_and_numpy(kw):
  problem = crowded_problem(seed=len(kw), m=200)
  dense, windowed = dense_and_windowed(*problem, **kw)
  assert_same_targets(windowed, dense)
  got = jaxtal.to_assignment(windowed, NC)
  expected = np_assign(*problem, **{k: v for k, v in kw.items() if k != "gt_chunk"})
  for name in ("fg_mask", "gt_index", "labels", "positives_per_gt"):
    np.testing.assert_array_equal(getattr(got, name), expected[name], err_msg=name)
  np.testing.assert_allclose(got.scores, expected["scores"], rtol=1e-4, atol=1e-6)
  assert np_entries_keep_contract(windowed.fg_mask, windowed.gt_index, windowed.entries).all()
  # The problem reaches what it is for: conflicts, GTs beyond every window, zero-metric candidates kept.
  assert expected["num_multi"].sum() > 20
  assert (np.asarray(windowed.positives_per_gt)[0, :6] > 0).any()
  zero = expected["pos"] & (expected["metric"] == 0)
  assert zero.any() and not np.asarray(windowed.fg_mask)[2].any()


@pytest.mark.slow
def test_windowed_score_levels_and_many_gts_per_window():
  """Scores split per level (as the loss passes them), and GTs stacked on one spot (every window shares anchors)."""
  scores, boxes, anchors, gt = crowded_problem(seed=5)
  stacked = np.asarray(gt.boxes).copy()
  stacked[1, 100:200] = stacked[1, 100] + np.linspace(0, 3, 100)[:, None].astype(np.float32)
  gt = gt._replace(boxes=jnp.asarray(stacked))
  dense, windowed = dense_and_windowed(scores, boxes, anchors, gt, levels=3, min_box_side=8.0)
  assert_same_targets(windowed, dense)


@pytest.mark.slow
def test_rotated_windowed_equals_dense():
  problem = crowded_problem(seed=3, rotated=True)
  dense, windowed = dense_and_windowed(*problem, geometry=jaxtal.rotated(), min_box_side=16.0)
  assert_same_targets(windowed, dense, rtol=5e-5)  # ProbIoU's exp and log round a little more
  assert np.asarray(windowed.fg_mask).sum() > 500


class _Refined(tuple):
  """A refined shortlist geometry's per-GT data: the box data, wrapped (a pytree: a tuple)."""


def seam_geometry(gate: bool, shortlist: bool) -> jaxtal.Geometry:
  """IoU boxes with a gate (anchor x < 128 px) and/or a refined shortlist ((u + 1) / 2 listed, u / 2 others)."""
  base = jaxtal.axis_aligned("iou")
  unwrap = lambda g: g[0] if isinstance(g, _Refined) else g  # noqa: E731

  def overlap(g, p):
    u = base.overlap(unwrap(g), p)
    return u / 2 if isinstance(g, _Refined) else u

  def refine(g, p_listed, listed, cand, image):
    u = base.overlap(jax.tree.map(lambda x: x[:, None], g), p_listed)
    return _Refined((g,)), (jnp.maximum(u, 0.0) + 1.0) / 2

  return base._replace(
      name="test/seam",
      candidate=lambda g, p, eps: base.candidate(unwrap(g), p, eps),
      overlap=overlap,
      gate=(lambda g, p: p.anchor[..., 0] < 128.0) if gate else None,
      shortlist=2 if shortlist else 0,
      refine=refine if shortlist else None,
  )


jax.tree_util.register_pytree_node(_Refined, lambda r: (tuple(r), None), lambda _, c: _Refined(c))


@pytest.mark.parametrize("gate,shortlist", [(True, False), pytest.param(False, True, marks=pytest.mark.slow)])
def test_seam_geometries_windowed_equal_dense_and_numpy(gate, shortlist):
  problem = crowded_problem(seed=4, b=2, m=80)
  geometry = seam_geometry(gate, shortlist)
  dense, windowed = dense_and_windowed(*problem, geometry=geometry, topk=5, overlap="iou")
  assert_same_targets(windowed, dense)
  a = np.asarray(problem[2])
  kw = dict(topk=5, overlap="iou")
  if gate:
    kw["gate"] = np.broadcast_to(a[None, :, 0] < 128.0, (80, len(a)))
  if shortlist:
    kw["shortlist"] = (2, lambda u: (u + 1) / 2, lambda u: u / 2)
  expected = np_assign(*problem, **kw)
  got = jaxtal.to_assignment(windowed, NC)
  np.testing.assert_array_equal(got.fg_mask, expected["fg_mask"])
  np.testing.assert_array_equal(got.gt_index, expected["gt_index"])
  np.testing.assert_allclose(got.scores, expected["scores"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_vmapped_windowed_assignment():
  """An outer vmap (the loop's bucket is then batched: every branch runs) gives the same targets."""
  problem = crowded_problem(seed=6, b=2, m=80)
  cfg = jaxtal.AssignerConfig(windows=True)
  one = assign(*problem, cfg)
  twice = jax.jit(jax.vmap(lambda s, bx, g: assign(s, bx, problem[2], g, cfg)))(
      *(jax.tree.map(lambda x: jnp.stack([x, x]), v) for v in (problem[0], problem[1], problem[3])))
  for i in range(2):
    assert_same_targets(jax.tree.map(lambda x, i=i: x[i], twice), one)


@pytest.mark.slow
def test_detection_loss_windowed_equals_dense():
  """The loss passes its head's grid: with windows forced on, value and gradients are the dense ones."""
  rng = np.random.default_rng(7)
  b, m = 2, 150
  feats = [jnp.asarray(rng.standard_normal((b, h, w, 4 * 8 + NC)), jnp.float32) for h, w in SHAPES]
  wh = np.exp(rng.uniform(np.log(3.0), np.log(70.0), (b, m, 2)))
  xy = rng.uniform(0, SIZE, (b, m, 2))
  gt = jaxtal.GroundTruth(jnp.asarray(rng.integers(0, NC, (b, m)), jnp.int32), jnp.asarray(np.concatenate([xy - wh / 2, xy + wh / 2], -1), jnp.float32),
                          jnp.asarray(rng.uniform(size=(b, m)) > 0.1))
  out = []
  for win in (False, True):
    cfg = jaxtal.LossConfig(num_classes=NC, strides=STRIDES, reg_max=8, windows=win)
    (total, parts), grads = jax.jit(jax.value_and_grad(lambda f, c=cfg: jaxtal.detection_loss(f, gt, c), has_aux=True))(feats)
    out.append((total, parts, grads))
  np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-6)
  for g1, g0 in zip(out[1][2], out[0][2]):
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# Choosing the pass, and bad arguments


def test_the_pass_is_chosen_by_gt_count_grid_and_geometry():
  assert kernels.select("windows")(kernels.assign.WINDOW_GTS, 8400) and not kernels.select("windows")(kernels.assign.WINDOW_GTS - 1, 8400)
  assert not kernels.select("windows", ("windows",))(10_000, 8400)  # the ablation's plain form: always dense
  assert "windows" in kernels.KERNELS
  jaxpr = lambda cfg, **kw: str(jax.make_jaxpr(  # noqa: E731
      lambda *a: jaxtal.assign_targets((a[0],), a[1], a[2], a[3], cfg, geometry=jaxtal.axis_aligned(), from_logits=False, **kw)
  )(*crowded_problem(m=kernels.assign.WINDOW_GTS)))
  assert "while" in jaxpr(jaxtal.AssignerConfig(), grid=GRID)  # automatic, M = WINDOW_GTS
  assert "while" not in jaxpr(jaxtal.AssignerConfig(plain_kernels=("windows",)), grid=GRID)
  assert "while" not in jaxpr(jaxtal.AssignerConfig(windows=True))  # no grid: dense


def test_bad_grid_and_switch_raise():
  scores, boxes, anchors, gt = crowded_problem(m=30)
  with pytest.raises(ValueError, match=r"grid .* has 336 cells but there are A = 1344 anchors"):
    jaxtal.task_aligned_assign(scores, boxes, anchors, gt, grid=((16, 16, 8), (8, 8, 16), (4, 4, 32)))
  with pytest.raises(ValueError, match="grid must be one"):
    jaxtal.task_aligned_assign(scores, boxes, anchors, gt, grid=((32, 32, -8),))
  with pytest.raises(ValueError, match="windows must be None"):
    jaxtal.AssignerConfig(windows="yes")
