"""The assigner's steps as dense ``(b, M, A)`` arrays, for reading, teaching and testing.

:func:`assign_steps` computes the seed walkthrough's intermediate masks and metrics with the same
geometry and the same configuration as :func:`~jaxtal.task_aligned_assign`, written the plain
way: every (GT, anchor) pair materialised, one ``jax.lax.top_k`` over all ``A`` anchors, one
arg-max for conflict resolution. It costs ``O(M * A)`` memory and is slower; the fast assigner
(:mod:`jaxtal.assigner`) keeps only each GT's top-k list. Its final assignment equals the fast
path's (``tests/test_steps.py``), which makes it both the example's step-by-step view
(``examples/toy_assign.py``) and a test oracle.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtal import _validate
from jaxtal.config import AssignerConfig, make_config
from jaxtal.geometry import Geometry, axis_aligned
from jaxtal.labels import GroundTruth, valid_rows
from jaxtal.targets import Assignment


class AssignSteps(NamedTuple):
  """Each step of the task-aligned assignment, dense over (GT, anchor) pairs.

  Attributes:
    valid_gt: ``(b, M)`` bool, GT rows that may own anchors (:func:`jaxtal.labels.valid_rows`).
    in_box: ``(b, M, A)`` bool, step 1: the geometry's candidate test (seed ``__get_in_gts_mask``).
    overlaps: ``(b, M, A)`` float32 overlap clamped at 0 on candidates, 0 elsewhere.
    align_metric: ``(b, M, A)`` float32, step 2: ``s^alpha * overlap^beta`` on candidates
      (seed ``__refine_select``).
    topk_mask: ``(b, M, A)`` bool, step 3: each GT's top-k anchors that are candidates
      (seed ``__select_topk_candidates``).
    pos_mask: ``(b, M, A)`` bool, step 4: after conflict resolution (and ``topk2``), each
      anchor owned by at most one GT (seed ``__filter_repeat_assign_candidates``).
    assignment: step 5, the :class:`~jaxtal.Assignment` (seed ``__get_train_targets``).
  """

  valid_gt: jax.Array
  in_box: jax.Array
  overlaps: jax.Array
  align_metric: jax.Array
  topk_mask: jax.Array
  pos_mask: jax.Array
  assignment: Assignment


def _steps_one(scores, pred_boxes, anchors, labels, boxes, mask, *, cfg: AssignerConfig, geometry: Geometry):
  """One image: ``(A, nc)``, ``(A, D)``, ``(A, 2)``, ``(M,)``, ``(M, D)``, ``(M,)``."""
  if geometry.gate is not None or geometry.shortlist:
    raise NotImplementedError(f"assign_steps replays box geometries only; {geometry.name} has a gate or a shortlist")
  m, a = labels.shape[0], anchors.shape[0]
  nc = scores.shape[-1]
  valid = valid_rows(labels, boxes, mask, nc, geometry.box_ok(boxes))
  safe = jnp.where(valid[:, None], boxes, 0.0)
  g = jax.tree.map(lambda x: x[:, None], geometry.gt_data(safe, valid, cfg.side_floor))
  p = jax.tree.map(lambda x: x[None], geometry.pred_data(jnp.where(jnp.isfinite(pred_boxes), pred_boxes, 0.0), anchors))
  # Step 1: candidates.
  in_box = geometry.candidate(g, p, cfg.eps) & valid[:, None]
  # Step 2: align metric.
  ov = geometry.overlap(g, p)
  overlaps = jnp.where(in_box & jnp.isfinite(ov), jnp.maximum(ov, 0.0), 0.0)
  s = jnp.where(jnp.isfinite(scores), jnp.clip(scores, 0.0, 1.0), 0.0)
  s = s.T[jnp.clip(labels, 0, nc - 1)]  # (M, A) probability of each GT's class
  metric = jnp.where(in_box, s**cfg.alpha * overlaps**cfg.beta, 0.0)
  # Step 3: top-k per GT (ties: lower anchor index), candidates only.
  _, top = jax.lax.top_k(metric, cfg.topk)
  topk_mask = jnp.zeros((m, a), bool).at[jnp.arange(m)[:, None], top].set(True) & in_box
  # Step 4: an anchor claimed by several GTs goes to its candidate GT of highest overlap.
  multi = topk_mask.sum(0) > 1
  best = jnp.argmax(jnp.where(in_box, overlaps, -1.0), axis=0)
  pos = jnp.where(multi[None], (jnp.arange(m)[:, None] == best[None]) & in_box, topk_mask)
  if cfg.topk2 is not None and cfg.topk2 != cfg.topk:
    # Each GT keeps its topk2 positives of highest metric (stable: ties to the lower anchor).
    order = jnp.argsort(-jnp.where(pos, metric, -1.0), axis=1, stable=True)
    rank = jnp.zeros((m, a), jnp.int32).at[jnp.arange(m)[:, None], order].set(jnp.arange(a, dtype=jnp.int32)[None])
    pos = pos & (rank < cfg.topk2)
  # Step 5: targets, each GT's metrics normalised so its best anchor scores its best overlap.
  fg = pos.any(0)
  gt_index = jnp.where(fg, jnp.argmax(pos, axis=0), 0)
  pos_metric = jnp.where(pos, metric, 0.0)
  norm = pos_metric * jnp.max(jnp.where(pos, overlaps, 0.0), axis=1, keepdims=True)
  norm = norm / (jnp.max(pos_metric, axis=1, keepdims=True) + cfg.eps)
  weights = jnp.max(norm, axis=0)
  out_labels = jnp.where(fg, labels[gt_index], 0).astype(jnp.int32)
  assignment = Assignment(
      labels=out_labels,
      boxes=jnp.where(fg[:, None], boxes[gt_index], 0.0).astype(jnp.float32),
      scores=jax.nn.one_hot(out_labels, nc, dtype=jnp.float32) * weights[:, None],
      fg_mask=fg,
      gt_index=gt_index.astype(jnp.int32),
      positives_per_gt=pos.sum(1).astype(jnp.int32),
  )
  return AssignSteps(valid, in_box, overlaps, metric, topk_mask, pos, assignment)


def assign_steps(
    pred_scores: jax.Array,
    pred_boxes: jax.Array,
    anchor_points: jax.Array,
    gt: GroundTruth,
    config: AssignerConfig | None = None,
    **overrides,
) -> AssignSteps:
  """The task-aligned assignment step by step, dense: same arguments as :func:`~jaxtal.task_aligned_assign`.

  Returns:
    :class:`AssignSteps` with ``(b, M, A)`` masks and metrics and the final
    :class:`~jaxtal.Assignment`, which equals ``task_aligned_assign``'s (``gt_chunk`` is ignored:
    everything is one block).
  """
  cfg = make_config(AssignerConfig, config, overrides, "assign_steps")
  _, a, _ = _validate.assigner_inputs(pred_scores, pred_boxes, anchor_points, gt, 4, "assign_steps")
  _validate.topk_in_range(cfg.topk, cfg.topk2, a, "assign_steps")
  geometry = axis_aligned(cfg.overlap)
  sg = jax.lax.stop_gradient
  if gt.labels.shape[1] == 0:  # no slots: one padding slot, as the fast assigner does
    b = gt.labels.shape[0]
    gt = GroundTruth(jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1, 4), jnp.float32), jnp.zeros((b, 1), bool))

  def one(s, pb, lab, box, msk):
    return _steps_one(s, pb, sg(jnp.asarray(anchor_points, jnp.float32)), lab, box, msk, cfg=cfg, geometry=geometry)

  return jax.vmap(one)(
      sg(jnp.asarray(pred_scores, jnp.float32)),
      sg(jnp.asarray(pred_boxes, jnp.float32)),
      jnp.asarray(gt.labels, jnp.int32),
      sg(jnp.asarray(gt.boxes, jnp.float32)),
      jnp.asarray(gt.mask).astype(bool),
  )
