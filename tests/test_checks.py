"""jaxtal.checks: value checks under ``checkify`` turn bad values into clear errors.

By default bad values are data (masked, see test_contract.py); these functions make them errors
instead. Each check's message names the argument, the first offending position and its value.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxtal
# The same small problem as the masking rules of test_contract.py: the checks turn those rules into errors.
from support.contract import KW, NC, R, SHAPES, STRIDES, assign_inputs, make_feats, make_gt, replace
from support.problems import broken, crowded_loss_problem, loss_config, targets_jit

F = make_feats()
G = make_gt()



@functools.cache
def checked_loss():
  return jax.jit(checkify.checkify(functools.partial(jaxtal.checked_detection_loss, **KW)))


def check_error(feats, gt):
  err, out = checked_loss()(feats, gt)
  return err.get(), out


def test_checked_loss_passes_valid_inputs_and_equals_the_loss():
  gt = make_gt()
  # padding rows may hold garbage without failing a check
  gt = replace(gt, labels=gt.labels.at[1, 3].set(99), boxes=gt.boxes.at[1, 3].set(jnp.nan))
  msg, (total, parts) = check_error(F, gt)
  assert msg is None
  expected = jax.jit(functools.partial(jaxtal.detection_loss, **KW))(F, gt)
  np.testing.assert_array_equal(total, expected[0])
  np.testing.assert_array_equal(np.asarray(parts), np.asarray(expected[1]))


@pytest.mark.parametrize(
    "defect, patterns",
    [
        ("nan_logit", [r"feats\[1\] \(shape \(2, 4, 4, 19\)\) has 1 non-finite", r"index \[ *1 +2 +3 +17\]", "nan"]),
        ("inf_dist", [r"feats\[0\]", "2 non-finite", "inf"]),
        ("class_high", ["1 real row", r"class id outside \[0, 3\)", "image 1, slot 0", "class 5"]),
        ("class_negative", [r"class id outside \[0, 3\)", "image 0, slot 1", "class -2"]),
        ("nan_box", ["non-finite box coordinate", "image 0, slot 0", "nan"]),
        ("inverted_box", ["inverted box", "image 1, slot 0", r"\[26\. +8\. +6\. +24\.\]"]),
        ("outside_image", ["no overlap with the 32x32", "image 0, slot 1", r"\[40\. +12\. +50\. +30\.\]"]),
    ],
)
def test_checked_loss_turns_invalid_values_into_errors(defect, patterns):
  feats, gt = list(F), make_gt()
  if defect == "nan_logit":
    feats[1] = feats[1].at[1, 2, 3, 4 * R + 1].set(jnp.nan)
  elif defect == "inf_dist":
    feats[0] = feats[0].at[0, 0, 0, :2].set(jnp.inf)
  elif defect == "class_high":
    gt = replace(gt, labels=gt.labels.at[1, 0].set(5))
  elif defect == "class_negative":
    gt = replace(gt, labels=gt.labels.at[0, 1].set(-2))
  elif defect == "nan_box":
    gt = replace(gt, boxes=gt.boxes.at[0, 0, 3].set(jnp.nan))
  elif defect == "inverted_box":
    gt = replace(gt, boxes=gt.boxes.at[1, 0].set(jnp.array([26.0, 8.0, 6.0, 24.0])))
  elif defect == "outside_image":
    gt = replace(gt, boxes=gt.boxes.at[0, 1].set(jnp.array([40.0, 12.0, 50.0, 30.0])))
  msg, _ = check_error(feats, gt)
  assert msg is not None, f"{defect} passed the checks"
  for pattern in patterns:
    assert re.search(pattern, msg), f"{pattern!r} not in {msg!r}"
  err, _ = checked_loss()(feats, gt)
  with pytest.raises(checkify.JaxRuntimeError):
    err.throw()


def test_checked_loss_eagerly_raises_at_once():
  gt = replace(make_gt(), labels=make_gt().labels.at[0, 0].set(NC))
  with pytest.raises(checkify.JaxRuntimeError, match=r"class id outside \[0, 3\)"):
    jaxtal.checked_detection_loss(F, gt, **KW)


def test_checked_loss_still_checks_shapes_at_trace_time():
  with pytest.raises(ValueError, match="strides do not match"):
    checkify.checkify(functools.partial(jaxtal.checked_detection_loss, num_classes=NC, strides=(4, 4), reg_max=R))(F, G)


@pytest.mark.slow
def test_checked_loss_works_under_grad():
  def loss(feats, gt):
    return jaxtal.checked_detection_loss(feats, gt, **KW)[0]

  step = jax.jit(checkify.checkify(jax.value_and_grad(loss)))
  err, (value, grads) = step(F, G)
  assert err.get() is None
  expected = jax.jit(jax.value_and_grad(lambda f, g: jaxtal.detection_loss(f, g, **KW)[0]))(F, G)
  np.testing.assert_allclose(value, expected[0], rtol=1e-6)
  bad = [F[0].at[0, 0, 0, 0].set(jnp.nan), F[1]]
  err, _ = step(bad, G)
  assert "non-finite" in err.get()


def test_checked_loss_needs_checkify_under_jit():
  """Documented: under a plain jit the check cannot be staged without checkify.checkify."""
  with pytest.raises(ValueError, match="checkify"):
    jax.jit(functools.partial(jaxtal.checked_detection_loss, **KW))(F, G)


def test_checked_assign():
  scores, boxes, anchors, gt = assign_inputs()
  fn = jax.jit(checkify.checkify(functools.partial(jaxtal.checked_task_aligned_assign, topk=5)))
  err, out = fn(scores, boxes, anchors, gt)
  assert err.get() is None
  expected = jax.jit(functools.partial(jaxtal.task_aligned_assign, topk=5))(scores, boxes, anchors, gt)
  for x, y in zip(out, expected):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  err, _ = fn(scores.at[1, 7, 2].set(3.0), boxes, anchors, gt)
  assert re.search(r"pred_scores must be probabilities in \[0, 1\].*index \[1 7 2\]: 3", err.get()), err.get()
  err, _ = fn(scores, boxes.at[0, 3, 1].set(jnp.nan), anchors, gt)
  assert re.search(r"pred_boxes .* 1 non-finite .* index \[0 3 1\]", err.get()), err.get()
  err, _ = fn(scores, boxes, anchors, replace(gt, labels=gt.labels.at[0, 0].set(NC)))
  assert "class id outside [0, 3)" in err.get()


def test_checked_assign_checks_the_grid_layout():
  """``grid=``: the anchors must be that grid's cell centres in make_anchors' order; a grid of the right cell count
  but another layout (the levels in another order) is named, as are anchors off the grid."""
  scores, boxes, anchors, gt = assign_inputs()
  grid = tuple((h, w, float(s)) for (h, w), s in zip(SHAPES, STRIDES))
  run = lambda g, a=anchors: jax.jit(checkify.checkify(  # noqa: E731
      functools.partial(jaxtal.checked_task_aligned_assign, topk=5, grid=g)))(scores, boxes, a, gt)
  err, out = run(grid)
  assert err.get() is None
  expected = jax.jit(functools.partial(jaxtal.task_aligned_assign, topk=5))(scores, boxes, anchors, gt)
  np.testing.assert_array_equal(out.fg_mask, expected.fg_mask)
  msg = run(grid[::-1])[0].get()
  assert msg and "are not the cell centres of grid=" in msg and "the first is anchor 0" in msg, msg
  msg = run(grid, anchors.at[5, 1].add(0.5))[0].get()
  assert msg and "1 differ; the first is anchor 5" in msg, msg


def test_check_values_requires_num_classes_with_gt():
  with pytest.raises(ValueError, match="num_classes is required"):
    jaxtal.check_values(G)


def test_check_values_names_a_coordinate_beyond_coord_limit():
  gt = replace(G, boxes=G.boxes.at[1, 0, 2].set(1e29))
  err, _ = jax.jit(checkify.checkify(lambda g: jaxtal.check_values(g, num_classes=NC)))(gt)
  msg = err.get()
  assert msg is not None and re.search(r"beyond COORD_LIMIT = 1\.04858e\+06 pixels.*image 1, slot 0", msg), msg
  ok, _ = jax.jit(checkify.checkify(lambda g: jaxtal.check_values(g, num_classes=NC)))(
      replace(G, boxes=G.boxes.at[1, 0, 2].set(jaxtal.COORD_LIMIT)))
  assert ok.get() is None  # exactly at the limit is allowed


# --------------------------------------------------------------------------------------------------
# checked_loss_from_targets: the entry-list contract


@functools.cache
def checked_from_targets():
  return jax.jit(checkify.checkify(functools.partial(jaxtal.checked_loss_from_targets, config=loss_config())))


def test_checked_loss_from_targets_passes_valid_targets_and_equals_the_loss():
  feats, gt = crowded_loss_problem(seed=0)
  _, t = targets_jit(feats, gt, config=loss_config())
  err, (total, parts) = checked_from_targets()(feats, t)
  assert err.get() is None
  want = jax.jit(lambda f, t: jaxtal.loss_from_targets(f, t, None, loss_config()))(feats, t)
  np.testing.assert_array_equal(total, want[0])
  np.testing.assert_array_equal(np.asarray(parts), np.asarray(want[1]))


@pytest.mark.parametrize("how", ["duplicate", "missing", "background", "wrong_gt"])
def test_checked_loss_from_targets_detects_a_broken_entry_list(how):
  feats, gt = crowded_loss_problem(seed=0)
  _, t = targets_jit(feats, gt, config=loss_config())
  err, _ = checked_from_targets()(feats, broken(t, how, image=1))
  msg = err.get()
  assert msg is not None, f"{how} passed the check"
  assert re.search(r"targets.entries breaks the foreground entry-list contract .* in 1 image\(s\); the first is image 1",
                   msg), msg
  with pytest.raises(checkify.JaxRuntimeError, match="foreground entry-list contract"):
    err.throw()


def test_checked_loss_from_targets_checks_the_maps():
  feats, gt = crowded_loss_problem(seed=0)
  _, t = targets_jit(feats, gt, config=loss_config())
  bad = [feats[0], feats[1].at[1, 0, 1, 2].set(jnp.inf)]
  err, _ = checked_from_targets()(bad, t)
  assert re.search(r"feats\[1\] .* 1 non-finite .* index \[1 0 1 2\]", err.get()), err.get()

