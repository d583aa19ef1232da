"""jaxtal.assigner: task_aligned_assign and assign_targets against the NumPy oracle ``oracles.np_assign``.

The oracle is the dense ``(M, A)`` algorithm of the TOOD paper and the jaxtal docstring, in float64;
the key test runs compiled and eager (the ``variant`` fixture). Problems are small (A = 20 anchors) except
the many-anchor tests (A = 2100 over three levels) that make the two-stage top-k prune tiles.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal
from support.oracles import np_assign
from support.problems import (
    NC,
    assert_assignment_equal,
    assert_assignment_shapes,
    assign,
    assign_problem,
    many_anchor_problem,
    np_entries_keep_contract,
    pad_gt_slots,
)


@functools.partial(jax.jit, static_argnames=("config", "from_logits"))
def assign_targets_jit(levels, boxes, anchors, gt, config, from_logits=False):
  return jaxtal.assign_targets(levels, boxes, anchors, gt, config, geometry=jaxtal.axis_aligned(config.overlap),
                               from_logits=from_logits)


class TestTaskAlignedAssign:

  def test_matches_numpy(self):
    scores, boxes, anchors, gt = assign_problem(seed=0)
    target = assign(scores, boxes, anchors, gt)
    assert_assignment_shapes(target, 3, 20, NC, m=4)
    expected = np_assign(scores, boxes, anchors, gt)
    assert expected["fg_mask"].sum() >= 8  # a non-trivial assignment
    assert_assignment_equal(target, expected)

  @pytest.mark.slow
  def test_eager_matches_numpy(self):
    """The same without jit (op by op: ~10 s of compiles on CPU, hence slow)."""
    scores, boxes, anchors, gt = assign_problem(seed=0)
    target = jaxtal.task_aligned_assign(scores, boxes, anchors, gt)
    assert_assignment_shapes(target, 3, 20, NC, m=4)
    assert_assignment_equal(target, np_assign(scores, boxes, anchors, gt))

  @pytest.mark.parametrize("kw", [
      dict(topk=3),
      dict(topk=3, topk2=1),
      dict(topk=10, min_box_side=16.0),
      dict(topk=4, alpha=1.0, beta=2.0),
      dict(topk=3, overlap="iou"),
      dict(topk=4, topk2=2, overlap="iou", min_box_side=16.0),
  ])
  def test_options_match_numpy(self, kw):
    for seed in (0, 5):
      scores, boxes, anchors, gt = assign_problem(seed=seed)
      target = assign(scores, boxes, anchors, gt, **kw)
      assert_assignment_shapes(target, 3, 20, NC, m=4)
      assert_assignment_equal(target, np_assign(scores, boxes, anchors, gt, **kw))

  def test_numpy_problem_exercises_every_step(self):
    # Conflicts, padding and top-k truncation must all occur, or test_matches_numpy proves less than it says.
    scores, boxes, anchors, gt = assign_problem(seed=0)
    expected = np_assign(scores, boxes, anchors, gt, topk=3)
    assert expected["num_multi"].sum() > 0  # anchors claimed by several GTs
    assert expected["num_in_box"].max() > 3  # a GT with more in-box anchors than topk
    assert not np.asarray(gt.mask).all()

  def test_iou_and_ciou_give_different_assignments(self):
    """The overlap option is not ignored: on this input IoU and CIoU pick different anchors (and the
    oracle agrees with each)."""
    differ = 0
    for seed in (2, 7):
      scores, boxes, anchors, gt = assign_problem(seed=seed)
      ciou = assign(scores, boxes, anchors, gt, topk=3)
      iou = assign(scores, boxes, anchors, gt, topk=3, overlap="iou")
      differ += int(np.sum(np.asarray(ciou.fg_mask) != np.asarray(iou.fg_mask)))
      differ += int(np.sum(np.asarray(ciou.gt_index) != np.asarray(iou.gt_index)))
      assert not np.allclose(np.asarray(ciou.scores), np.asarray(iou.scores), atol=1e-3)
      expected = np_assign(scores, boxes, anchors, gt, topk=3, overlap="iou")
      assert_assignment_equal(iou, expected)
    assert differ > 0

  def test_positives_per_gt(self):
    """(b, M) int32: anchors each GT owns; 0 on padding; sums to the foreground count per image."""
    for kw in (dict(), dict(topk=3, topk2=1), dict(min_box_side=16.0)):
      scores, boxes, anchors, gt = assign_problem(seed=5)
      out = assign(scores, boxes, anchors, gt, **kw)
      counts = np.asarray(out.positives_per_gt)
      chex.assert_shape(out.positives_per_gt, (3, 4))
      chex.assert_type(out.positives_per_gt, jnp.int32)
      np.testing.assert_array_equal(counts[~np.asarray(gt.mask)], 0)
      np.testing.assert_array_equal(counts.sum(1), np.asarray(out.fg_mask).sum(1))
      fg, idx = np.asarray(out.fg_mask), np.asarray(out.gt_index)
      for i in range(3):
        np.testing.assert_array_equal(counts[i], np.bincount(idx[i][fg[i]], minlength=4))
      np.testing.assert_array_equal(counts, np_assign(scores, boxes, anchors, gt, **kw)["positives_per_gt"])
      assert counts.max() > 0

  def test_batch_equals_per_image(self):
    scores, boxes, anchors, gt = assign_problem(seed=1)
    batch = assign(scores, boxes, anchors, gt)
    for i in range(3):
      one = assign(scores[i : i + 1], boxes[i : i + 1], anchors, jax.tree.map(lambda x: x[i : i + 1], gt))
      assert_assignment_shapes(one, 1, 20, NC, m=4)
      chex.assert_trees_all_close(one, jax.tree.map(lambda x: x[i : i + 1], batch), rtol=1e-6, atol=1e-8)

  @pytest.mark.parametrize("topk,gt_chunk", [
      (3, None),
      (6, None),
      (6, 2),
  ])
  def test_scores_split_by_level_equal_one_block(self, topk, gt_chunk):
    # The loss hands the assigner one score block per level; the two-stage top-k (kernels.top_k)
    # keeps each GT's best tiles of TILE anchors per level and then its top k over the candidates,
    # taken in anchor order. Quantised scores (many exact ties, some 0) check that ties still go to
    # the lower anchor index across level boundaries; topk=6 exceeds level 1's 4 anchors.
    scores, boxes, anchors, gt = assign_problem(seed=6)
    scores = (jnp.round(scores * 4) / 4).at[0].set(0.0)  # image 0: every metric is 0, top-k is all ties
    split = 16
    cfg = jaxtal.AssignerConfig(topk=topk, gt_chunk=gt_chunk)
    one = assign_targets_jit((scores,), boxes, anchors, gt, cfg)
    levels = assign_targets_jit((scores[:, :split], scores[:, split:]), boxes, anchors, gt, cfg)
    chex.assert_trees_all_close(levels, one, rtol=1e-6, atol=1e-8)
    expected = np_assign(scores, boxes, anchors, gt, topk=topk)
    np.testing.assert_array_equal(np.asarray(levels.fg_mask), expected["fg_mask"])
    np.testing.assert_array_equal(np.asarray(levels.gt_index), expected["gt_index"])
    np.testing.assert_allclose(np.asarray(levels.weights), expected["scores"].sum(-1), rtol=1e-5, atol=1e-7)
    assert np.asarray(levels.fg_mask).sum() > 0

  @pytest.mark.parametrize("topk,quantise", [
      (13, False),
      (10, True),
  ])
  def test_many_anchors_match_numpy(self, topk, quantise):
    # A = 2100 anchors over three levels (sizes 1600, 400, 100: the last is not a whole number of
    # top-k tiles), so the two-stage top-k really prunes tiles; quantised scores add exact ties.
    scores, pred_boxes, anchor_px, gt, sizes = many_anchor_problem(np.random.default_rng(7), NC, 12)
    if quantise:
      scores = np.round(scores * 3) / 3
    target = assign(jnp.asarray(scores), jnp.asarray(pred_boxes), jnp.asarray(anchor_px), gt, topk=topk)
    expected = np_assign(scores, pred_boxes, anchor_px, gt, topk=topk)
    assert expected["num_in_box"].max() > 16 * topk  # some GT has more in-box anchors than the kept tiles
    assert_assignment_equal(target, expected, rtol=1e-4, atol=1e-6)
    cfg = jaxtal.AssignerConfig(topk=topk, gt_chunk=5)
    levels = assign_targets_jit(tuple(jnp.asarray(s) for s in np.split(scores, sizes, axis=1)), jnp.asarray(pred_boxes),
                                jnp.asarray(anchor_px), gt, cfg)
    np.testing.assert_array_equal(np.asarray(levels.fg_mask), expected["fg_mask"])
    np.testing.assert_array_equal(np.asarray(levels.gt_index), expected["gt_index"])

  @pytest.mark.parametrize("kw", [
      dict(alpha=0.5),
      dict(alpha=0.3, beta=2.0, topk=13),
  ])
  def test_fewer_gt_slots_than_classes_give_the_same_assignment(self, kw):
    # With M < nc, score ** alpha is taken only at the (GT, anchor) pairs read; with M >= nc, over the
    # whole score map first. Padding slots change nothing, so padding M = 12 up to M = nc = 16
    # switches paths: the results must agree (scores to float32 rounding: M changes how XLA vectorises),
    # invalid scores (NaN, inf, < 0, > 1) included.
    # A = 2100 anchors, so the tile maxima of the two-stage top-k decide which anchors are kept.
    nc, m = 16, 12
    scores, pred_boxes, anchor_px, gt, _ = many_anchor_problem(np.random.default_rng(8), nc, m)
    scores, pred_boxes, anchor_px = jnp.asarray(scores), jnp.asarray(pred_boxes), jnp.asarray(anchor_px)
    padded = pad_gt_slots(gt, nc)
    target = assign(scores, pred_boxes, anchor_px, gt, **kw)
    expected = np_assign(scores, pred_boxes, anchor_px, gt, **kw)
    assert expected["num_in_box"].max() > 16 * kw.get("topk", 10)
    assert_assignment_equal(target, expected, rtol=1e-4, atol=1e-6)
    bad = scores.at[0, :6, 0].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf, -0.5, 1.5, 2.0]))
    bad = bad.at[1, ::5].set(jnp.nan).at[1, 1::7].set(3.0)
    for s in (scores, bad):
      few_slots = assign(s, pred_boxes, anchor_px, gt, **kw)
      many_slots = assign(s, pred_boxes, anchor_px, padded, **kw)
      chex.assert_trees_all_close(few_slots[:5], many_slots[:5], rtol=1e-5, atol=1e-8)
      np.testing.assert_array_equal(many_slots.positives_per_gt[:, :m], few_slots.positives_per_gt)
      np.testing.assert_array_equal(many_slots.positives_per_gt[:, m:], 0)
      assert np.asarray(few_slots.fg_mask).sum() > 0

  def test_few_gt_slots_from_logits_give_the_same_targets(self):
    # From logits (the loss's path) sigmoid and score ** alpha are taken over the whole map from M >= nc
    # on, per (GT, anchor) pair below. Padding M = 6 up to 16 = nc switches paths; NaN and infinite
    # logits included.
    nc, m = 16, 6
    scores, pred_boxes, anchor_px, gt, split = many_anchor_problem(np.random.default_rng(9), nc, m)
    logits = jnp.asarray(np.log(scores / (1 - scores)))
    logits = logits.at[0, :4, 0].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf, 90.0])).at[1, ::7].set(jnp.nan)
    levels = tuple(jnp.split(logits, split, axis=1))
    cfg = jaxtal.AssignerConfig()
    per_pair = assign_targets_jit(levels, jnp.asarray(pred_boxes), jnp.asarray(anchor_px), gt, cfg, from_logits=True)
    shared = assign_targets_jit(levels, jnp.asarray(pred_boxes), jnp.asarray(anchor_px), pad_gt_slots(gt, nc), cfg,
                                from_logits=True)
    for name in ("labels", "fg_mask", "gt_index"):
      np.testing.assert_array_equal(getattr(per_pair, name), getattr(shared, name), err_msg=name)
    np.testing.assert_allclose(per_pair.weights, shared.weights, rtol=1e-6, atol=1e-8)
    probs = np.asarray(jax.nn.sigmoid(logits))  # NaN logits score 0 in both paths, as in the reference
    expected = np_assign(np.where(np.isnan(probs), 0.0, probs), pred_boxes, anchor_px, gt)
    np.testing.assert_array_equal(per_pair.fg_mask, expected["fg_mask"])
    assert np.asarray(per_pair.fg_mask).sum() > 0

  @pytest.mark.parametrize("topk,topk2,gt_chunk", [
      (6, None, 2),
      (4, 1, None),
  ])
  def test_entry_list_holds_each_foreground_anchor_once(self, topk, topk2, gt_chunk):
    # The loss reads its foreground-only terms at the valid entries: exactly the foreground anchors,
    # each once, even when several GTs list the same anchor (see jaxtal.targets).
    scores, boxes, anchors, gt = assign_problem(seed=5)
    m = gt.labels.shape[1]
    t = assign_targets_jit((scores,), boxes, anchors, gt, jaxtal.AssignerConfig(topk=topk, topk2=topk2, gt_chunk=gt_chunk))
    chex.assert_shape([t.entries.anchor, t.entries.gt, t.entries.valid], [(scores.shape[0], m * topk)] * 3)
    np.testing.assert_array_equal(np_entries_keep_contract(t.fg_mask, t.gt_index, t.entries), True)
    np.testing.assert_array_equal(jaxtal.entries_cover_foreground(t), True)
    repeated = [np.unique(a).size < a.size for a in np.asarray(t.entries.anchor)]
    assert any(repeated) and np.asarray(t.fg_mask).sum() > 0

  @pytest.mark.parametrize("gt_chunk", [
      1,
      3,
  ])
  def test_gt_chunk_does_not_change_the_result(self, gt_chunk):
    scores, boxes, anchors, gt = assign_problem(seed=3)
    dense = assign(scores, boxes, anchors, gt)
    chunked = assign(scores, boxes, anchors, gt, gt_chunk=gt_chunk)
    assert_assignment_shapes(chunked, 3, 20, NC, m=4)
    chex.assert_trees_all_close(chunked, dense, rtol=1e-6, atol=1e-8)
    assert np.asarray(dense.fg_mask).sum() > 0

  def test_padding_and_invalid_rows_never_own_anchors(self):
    scores, boxes, anchors, gt = assign_problem(seed=4)
    target = assign(scores, boxes, anchors, gt)
    fg, owner = np.asarray(target.fg_mask), np.asarray(target.gt_index)
    mask = np.asarray(gt.mask)
    assert fg.any()
    for i in range(3):
      assert mask[i, owner[i, fg[i]]].all()
    # Whatever padding rows hold, the result is that of all-zero padding.
    zeroed = gt._replace(boxes=jnp.where(gt.mask[..., None], gt.boxes, 0.0), labels=jnp.where(gt.mask, gt.labels, 0))
    chex.assert_trees_all_close(assign(scores, boxes, anchors, zeroed), target)
    # Real rows with a zero-area box, a class outside [0, nc) or a coordinate beyond COORD_LIMIT are padding too.
    bad = gt._replace(
        boxes=gt.boxes.at[0, 0].set(jnp.array([4.0, 4.0, 4.0, 30.0])).at[2, 2].set(jnp.array([4.0, 4.0, 30.0, 1e29])),
        labels=gt.labels.at[2, 1].set(NC),
    )
    bad_target = assign(scores, boxes, anchors, bad)
    bad_fg, bad_owner = np.asarray(bad_target.fg_mask), np.asarray(bad_target.gt_index)
    for i, j in ((0, 0), (2, 1), (2, 2)):
      assert np.any(fg[i] & (owner[i] == j))  # they owned anchors before
      assert not np.any(bad_fg[i] & (bad_owner[i] == j))
      assert int(bad_target.positives_per_gt[i, j]) == 0

  def test_empty_ground_truth(self):
    scores, boxes, anchors, gt = assign_problem(seed=0)
    target = assign(scores, boxes, anchors, gt._replace(mask=jnp.zeros_like(gt.mask)))
    assert_assignment_shapes(target, 3, 20, NC, m=4)
    for x in target:
      np.testing.assert_array_equal(x, 0)

  def test_no_gradient_flows(self):
    scores, boxes, anchors, gt = assign_problem(seed=0)
    grad = jax.jit(jax.grad(lambda s, b: jnp.sum(jaxtal.task_aligned_assign(s, b, anchors, gt).scores), argnums=(0, 1)))
    g = grad(scores, boxes)
    chex.assert_trees_all_close(g, jax.tree.map(jnp.zeros_like, g))

  def test_bad_arguments_raise(self):
    scores, boxes, anchors, gt = assign_problem(seed=0)
    with pytest.raises(ValueError, match="pred_boxes"):
      jaxtal.task_aligned_assign(scores, boxes[:, :-1], anchors, gt)
    with pytest.raises(ValueError, match="anchor_points"):
      jaxtal.task_aligned_assign(scores, boxes, anchors[:-1], gt)
    with pytest.raises(ValueError, match=r"topk must be a whole number in \[1, A = 20\]"):
      jaxtal.task_aligned_assign(scores, boxes, anchors, gt, topk=21)
    with pytest.raises(ValueError, match="gt"):
      jaxtal.task_aligned_assign(scores, boxes, anchors, jax.tree.map(lambda x: x[:2], gt))
    with pytest.raises(TypeError):
      jaxtal.task_aligned_assign(scores, boxes, anchors, tuple(gt))


class TestAssignTargets:
  """assign_targets, the form the loss reads: factored scores, entries, and to_assignment back."""

  def test_to_assignment_equals_task_aligned_assign(self):
    scores, boxes, anchors, gt = assign_problem(seed=2)
    cfg = jaxtal.AssignerConfig(topk=4)
    t = assign_targets_jit((scores,), boxes, anchors, gt, cfg)
    dense = assign(scores, boxes, anchors, gt, cfg)
    chex.assert_trees_all_close(jaxtal.to_assignment(t, NC), dense, rtol=1e-6, atol=1e-8)
    expected = np_assign(scores, boxes, anchors, gt, topk=4)
    np.testing.assert_allclose(t.weights, expected["scores"].sum(-1), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(t.positives_per_gt, expected["positives_per_gt"])

  def test_image_hw_masks_gts_off_the_image(self):
    scores, boxes, anchors, gt = assign_problem(seed=2)
    outside = gt._replace(boxes=gt.boxes.at[0, 0].set(jnp.array([40.0, 4.0, 60.0, 30.0])))  # right of a 32 x 32 image
    cfg = jaxtal.AssignerConfig(topk=4, min_box_side=64.0)  # widened far enough to reach the anchors
    run = jax.jit(lambda g, hw: jaxtal.assign_targets((scores,), boxes, anchors, g, cfg, geometry=jaxtal.axis_aligned(),
                                                       from_logits=False, image_hw=hw), static_argnums=1)
    bare, masked = run(outside, None), run(outside, (32.0, 32.0))
    assert int(bare.positives_per_gt[0, 0]) > 0 and int(masked.positives_per_gt[0, 0]) == 0
    expected = np_assign(scores, boxes, anchors, outside, topk=4, min_box_side=64.0, image_hw=(32.0, 32.0))
    np.testing.assert_array_equal(masked.fg_mask, expected["fg_mask"])
    np.testing.assert_array_equal(masked.gt_index, expected["gt_index"])

  def test_zero_gt_slots(self):
    scores, boxes, anchors, gt = assign_problem(seed=2)
    none = jax.tree.map(lambda x: x[:, :0], gt)
    t = assign_targets_jit((scores,), boxes, anchors, none, jaxtal.AssignerConfig(topk=4))
    assert not np.asarray(t.fg_mask).any() and not np.asarray(t.entries.valid).any()
    np.testing.assert_array_equal(jaxtal.entries_cover_foreground(t), True)



class _Refined(NamedTuple):
  inner: Any  # the box geometry's per-GT data, after a shortlist refinement


def _unwrap(g):
  return g.inner if isinstance(g, _Refined) else g


def _seam_geometry(gate: bool, shortlist: bool) -> jaxtal.Geometry:
  """IoU boxes plus a gate (anchor x < 16 px) and/or a shortlist of topk pairs (listed pairs (u + 1) / 2, others u / 2)."""
  base = jaxtal.axis_aligned("iou")

  def overlap(g, p):
    u = base.overlap(_unwrap(g), p)
    return u / 2 if isinstance(g, _Refined) else u

  def refine(g, p_listed, listed, cand, image):
    del listed, cand, image
    u = base.overlap(jax.tree.map(lambda x: x[:, None], g), p_listed)
    return _Refined(g), (jnp.maximum(u, 0.0) + 1.0) / 2

  return base._replace(
      name="test/seam",
      candidate=lambda g, p, eps: base.candidate(_unwrap(g), p, eps),
      overlap=overlap,
      gate=(lambda g, p: (p.anchor[..., 0] < 16.0) & jnp.isfinite(_unwrap(g).box[..., 0])) if gate else None,
      shortlist=1 if shortlist else 0,
      refine=refine if shortlist else None,
  )


class TestGeometrySeam:
  """The assigner's generic gate and shortlist rules against the dense NumPy oracle."""

  @pytest.mark.parametrize("gate,shortlist", [(True, False), (False, True), (True, True)])
  @pytest.mark.parametrize("gt_chunk", [None, pytest.param(1, marks=pytest.mark.slow)])
  def test_matches_numpy(self, gate, shortlist, gt_chunk):
    geometry = _seam_geometry(gate, shortlist)
    cfg = jaxtal.AssignerConfig(topk=3, overlap="iou", gt_chunk=gt_chunk)
    for seed in (0, 5):
      scores, boxes, anchors, gt = assign_problem(seed=seed)
      targets = jax.jit(lambda s, bx, a, g: jaxtal.assign_targets((s,), bx, a, g, cfg, geometry=geometry, from_logits=False))(
          scores, boxes, anchors, gt)
      got = jaxtal.to_assignment(targets, NC)
      a = np.asarray(anchors)
      kw = dict(topk=3, overlap="iou")
      if gate:
        kw["gate"] = np.broadcast_to(a[None, :, 0] < 16.0, (gt.labels.shape[1], a.shape[0]))
      if shortlist:
        kw["shortlist"] = (1, lambda u: (u + 1) / 2, lambda u: u / 2)
      expected = np_assign(scores, boxes, anchors, gt, **kw)
      assert_assignment_equal(got, expected)
      assert np_entries_keep_contract(got.fg_mask, got.gt_index, targets.entries).all()

  def test_the_rules_change_the_assignment(self):
    """Each rule is exercised: gated, shortlisted and plain assignments differ on this input, and
    a GT lying wholly right of the gate keeps its (ungated) candidates."""
    scores, boxes, anchors, gt = assign_problem(seed=0)
    kw = dict(topk=3, overlap="iou")
    a = np.asarray(anchors)
    gate = np.broadcast_to(a[None, :, 0] < 16.0, (gt.labels.shape[1], a.shape[0]))
    plain = np_assign(scores, boxes, anchors, gt, **kw)
    gated = np_assign(scores, boxes, anchors, gt, gate=gate, **kw)
    listed = np_assign(scores, boxes, anchors, gt, shortlist=(2, lambda u: (u + 1) / 2, lambda u: u / 2), **kw)
    assert not np.array_equal(plain["pos"], gated["pos"])
    assert not np.allclose(plain["scores"], listed["scores"])
    right = np.asarray(gt.boxes)[..., 0] >= 16.0
    kept = gated["in_box"].any(-1) & right
    assert kept.any()  # a GT the gate would empty keeps its candidates

  @pytest.mark.slow
  def test_extras_reach_the_geometry(self):
    """GeometryExtra's leaves are split per image and handed to gt_data / pred_data / refine."""
    base = jaxtal.axis_aligned("iou")
    seen = {}

    def gt_data(boxes, valid, side, extra):
      seen["gt"] = extra.shape
      return base.gt_data(boxes + 0.0 * extra[:, :1], valid, side)

    def pred_data(boxes, anchors, extra):
      seen["pred"] = extra.shape
      return base.pred_data(boxes, anchors)

    geometry = base._replace(gt_data=gt_data, pred_data=pred_data)
    scores, boxes, anchors, gt = assign_problem(seed=0)
    b, m = gt.labels.shape
    extra = jaxtal.GeometryExtra(gt=jnp.ones((b, m, 3)), pred=jnp.ones((b, anchors.shape[0], 2)))
    cfg = jaxtal.AssignerConfig(topk=3, overlap="iou")
    targets = jaxtal.assign_targets((scores,), boxes, anchors, gt, cfg, geometry=geometry, from_logits=False, extra=extra)
    assert seen == {"gt": (m, 3), "pred": (anchors.shape[0], 2)}
    assert_assignment_equal(jaxtal.to_assignment(targets, NC), np_assign(scores, boxes, anchors, gt, topk=3, overlap="iou"))
