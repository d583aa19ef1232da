"""The input contract: which inputs are errors and which are data.

* Errors are raised at trace time, before anything is computed (``jaxtal/_validate.py`` and the
  configs' validation): every case runs under ``jax.eval_shape`` (abstract values only), and the
  message must name the argument, what was expected and what was received.
* Data is masked (``jaxtal.valid_rows``): a GT row that is padding, has a zero-area, inverted or
  non-finite box, a coordinate beyond ``COORD_LIMIT``, a class outside ``[0, nc)`` or (in the
  loss) no overlap with the image gives exactly the loss and gradients of the same batch with that
  row as padding. Each such test also has a control showing the row would have mattered had it
  been valid.
* Value checks (``jaxtal.checked_*`` under ``checkify``) turn the same values into clear errors:
  see test_checks.py.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal
from support.contract import A, B, IMAGE, KW, M, NC, R, SHAPES, STRIDES, assign_inputs, make_feats, make_gt, replace


# --------------------------------------------------------------------------------------------------
# Trace-time errors
# --------------------------------------------------------------------------------------------------


def loss_call(feats=None, gt=None, **overrides):
  """A zero-argument call of detection_loss under jax.eval_shape (nothing is computed)."""
  feats = make_feats() if feats is None else feats
  gt = make_gt() if gt is None else gt
  kw = dict(KW, **overrides)
  return lambda: jax.eval_shape(lambda f, g: jaxtal.detection_loss(f, g, **kw), feats, gt)


def assign_call(scores=None, boxes=None, anchors=None, gt=None, **kw):
  s, b, a, g = assign_inputs()
  s, b, a, g = (x if y is None else y for x, y in ((s, scores), (b, boxes), (a, anchors), (g, gt)))
  return lambda: jax.eval_shape(lambda *args: jaxtal.task_aligned_assign(*args, **kw), s, b, a, g)


F = make_feats()
G = make_gt()
S, PB, AP, _ = assign_inputs()

# (id, call, exception type, patterns that must all appear in the message)
TRACE_ERRORS = [
    # head maps
    ("feats_single_array", loss_call(feats=F[0]), TypeError, ["feats", "list of per-level head maps"]),
    ("feats_empty", loss_call(feats=[]), TypeError, ["feats", "non-empty"]),
    ("feats_rank", loss_call(feats=[F[0], F[1][0]]), ValueError, [r"feats\[1\]", "rank-4", r"\(4, 4, 19\)"]),
    ("feats_int", loss_call(feats=[F[0].astype(jnp.int32), F[1]]), TypeError, [r"feats\[0\]", "float", "int32"]),
    ("channels_nc", loss_call(num_classes=NC + 2), ValueError, [r"feats\[0\]", "19 channels", "4 \\* 4 \\+ 5 = 21"]),
    ("channels_reg_max", loss_call(reg_max=16), ValueError, [r"feats\[0\]", "19 channels", "= 67"]),
    ("channels_reg_max_hint", loss_call(reg_max=16), ValueError, ["= 67", r"19 = 4 \* 4 \+ 3: did you mean reg_max=4\?"]),
    ("channels_yolo26_head", loss_call(feats=[jnp.zeros((B, h, w, 4 + NC)) for h, w in SHAPES]), ValueError,
     [r"feats\[0\] has 7 channels", r"4 \* 4 \+ 3 = 19", r"7 = 4 \* 1 \+ 3: did you mean reg_max=1 \(YOLO26's head"]),
    ("nchw_as_nhwc", loss_call(feats=make_feats(layout="NCHW")), ValueError,
     ["feats\\[0\\] has 8 channels in its last axis \\(NHWC\\)", "= 19", "axis 1 has exactly 19: pass layout='NCHW'"]),
    ("nhwc_as_nchw", loss_call(layout="NCHW"), ValueError,
     ["has 8 channels in its second axis \\(NCHW\\)", "axis 3 has exactly 19: pass layout='NHWC'"]),
    ("level_batch", loss_call(feats=[F[0], F[1][:1]]), ValueError, [r"feats\[1\]", "batch size 1", "has 2"]),
    ("layout", loss_call(layout="HWC"), ValueError, ["layout", "NHWC", "NCHW", "'HWC'"]),
    ("reg_max_0", loss_call(reg_max=0), ValueError, ["reg_max", ">= 1", "got 0"]),
    ("reg_max_frac", loss_call(reg_max=2.5), ValueError, ["reg_max", "whole number", "2.5"]),
    ("num_classes_0", loss_call(num_classes=0), ValueError, ["num_classes", ">= 1", "got 0"]),
    # strides
    ("strides_count", loss_call(strides=(4,)), ValueError, ["1 strides for 2 feature levels", "one stride per level"]),
    ("strides_scalar", loss_call(strides=4), ValueError, ["strides", "one stride per feature level"]),
    ("strides_mismatch", loss_call(strides=(4, 4)), ValueError, ["strides do not match", "level 1", "16x16", "32x32"]),
    ("strides_negative", loss_call(strides=(-4, -8)), ValueError, [r"strides\[0\]", "positive", "-4"]),
    ("strides_inf", loss_call(strides=(float("inf"), float("inf"))), ValueError, [r"strides\[0\]", "finite", "inf"]),
    # ground truth
    ("gt_tuple", loss_call(gt=tuple(G)), TypeError, ["gt", "GroundTruth", "tuple"]),
    ("gt_batch", loss_call(gt=jax.tree.map(lambda x: x[:1], G)), ValueError, ["gt", "batch size 1", "have 2"]),
    ("gt_labels_rank", loss_call(gt=G._replace(labels=G.labels[0])), ValueError, ["gt.labels", r"\(b, M\)", r"\(4,\)"]),
    ("gt_boxes_shape", loss_call(gt=G._replace(boxes=G.boxes[..., :3])), ValueError,
     ["gt.boxes", r"\(2, 4, 4\)", r"\(2, 4, 3\)"]),
    ("gt_boxes_m", loss_call(gt=G._replace(boxes=G.boxes[:, :3])), ValueError,
     ["gt.boxes", r"\(2, 4, 4\)", r"\(2, 3, 4\)"]),
    ("gt_mask_shape", loss_call(gt=G._replace(mask=G.mask[:, :2])), ValueError,
     ["gt.mask", r"\(2, 4\)", r"\(2, 2\)"]),
    ("gt_labels_float", loss_call(gt=G._replace(labels=G.labels.astype(jnp.float32))), TypeError,
     ["gt.labels", "integer", "float32"]),
    ("gt_boxes_int", loss_call(gt=G._replace(boxes=G.boxes.astype(jnp.int32))), TypeError,
     ["gt.boxes", "float", "int32"]),
    ("gt_mask_float", loss_call(gt=G._replace(mask=G.mask.astype(jnp.float32))), TypeError,
     ["gt.mask", "bool", "float32"]),
    # assigner settings
    ("topk_gt_A", loss_call(topk=A + 1), ValueError, ["topk", r"\[1, A = 80\]", "got 81"]),
    ("topk_0", loss_call(topk=0), ValueError, ["topk must be a whole number >= 1, got 0"]),
    ("topk_frac", loss_call(topk=2.5), ValueError, ["topk must be a whole number >= 1, got 2.5"]),
    ("topk2_gt_A", loss_call(topk2=A + 5), ValueError, ["topk2", r"\[1, A = 80\]", "got 85"]),
    ("min_box_side", loss_call(min_box_side=-1.0), ValueError, ["min_box_side", ">= 0", "-1.0"]),
    ("gt_chunk", loss_call(gt_chunk=0), ValueError, ["gt_chunk", ">= 1", "got 0"]),
    ("class_weights", loss_call(class_weights=jnp.ones(NC + 1)), ValueError, ["class_weights", r"\(3,\)", r"\(4,\)"]),
    ("overlap", loss_call(overlap="giou"), ValueError, ["overlap must be one of", "'giou'"]),
    ("unknown_keyword", loss_call(top_k=3), TypeError, ["detection_loss", "unknown configuration keyword", "'top_k'"]),
    ("config_kind", lambda: jaxtal.detection_loss(F, G, jaxtal.AssignerConfig()), TypeError,
     ["config must be a jaxtal.LossConfig", "AssignerConfig"]),
    # task_aligned_assign
    ("scores_rank", assign_call(scores=S[0]), ValueError, ["pred_scores", "rank 3", r"\(80, 3\)"]),
    ("scores_int", assign_call(scores=(S > 0.5).astype(jnp.int32)), TypeError, ["pred_scores", "float", "int32"]),
    ("scores_bool", assign_call(scores=S > 0.5), TypeError, ["pred_scores", "float", "bool"]),
    ("boxes_4", assign_call(boxes=PB[..., :3]), ValueError, ["pred_boxes", r"\(2, 80, 4\)", r"\(2, 80, 3\)"]),
    ("boxes_batch", assign_call(boxes=PB[:1]), ValueError, ["pred_boxes", r"\(2, 80, 4\)", r"\(1, 80, 4\)"]),
    ("anchors_A", assign_call(anchors=AP[:-1]), ValueError, ["anchor_points", r"\(80, 2\)", r"\(79, 2\)"]),
    ("assign_gt_batch", assign_call(gt=jax.tree.map(lambda x: x[:1], G)), ValueError,
     ["gt.labels", "b = 2", r"\(1, 4\)"]),
    ("assign_gt_labels_float", assign_call(gt=G._replace(labels=G.labels * 1.0)), TypeError, ["gt.labels", "integer"]),
    ("assign_topk", assign_call(topk=A + 1), ValueError, ["topk", r"\[1, A = 80\]", "got 81"]),
    ("assign_topk2", assign_call(topk2=0), ValueError, ["topk2 must be a whole number >= 1, got 0"]),
    ("assign_topk2_gt_A", assign_call(topk2=A + 1), ValueError, ["topk2", r"\[1, A = 80\]", "got 81"]),
    ("assign_unknown_keyword", assign_call(top_k=3), TypeError, ["task_aligned_assign", "'top_k'"]),
    # anchors and decoding
    ("anchors_strides", lambda: jaxtal.make_anchors(SHAPES, (4,)), ValueError, ["1 strides for 2 feature levels"]),
    ("anchors_shape", lambda: jaxtal.make_anchors([(8, 0)], (4,)), ValueError, [r"feature_shapes\[0\]", r"\(8, 0\)"]),
    ("decode_R", lambda: jaxtal.decode_boxes(jnp.zeros((2, A, 16)), AP, reg_max=16), ValueError,
     ["pred_dist", "16", "4 \\* reg_max = 64"]),
    ("flatten_layout", lambda: jaxtal.flatten_head(F, NC, R, layout="nhwc"), ValueError, ["layout", "'nhwc'"]),
]


@pytest.mark.parametrize("call, exc, patterns", [c[1:] for c in TRACE_ERRORS], ids=[c[0] for c in TRACE_ERRORS])
def test_trace_time_error(call, exc, patterns):
  with pytest.raises(exc) as info:
    call()
  for pattern in patterns:
    assert re.search(pattern, str(info.value)), f"{pattern!r} not in {str(info.value)!r}"


def test_the_module_raises_the_same_errors():
  with pytest.raises(ValueError, match="topk must be a whole number in \\[1, A = 80\\]"):
    jaxtal.DetectionLoss(topk=A + 1, **KW)(F, G)


def test_valid_arguments_trace():
  """The base arguments of the error cases are valid: each case fails only for its one defect."""
  out = loss_call()()
  assert out[0].shape == () and out[0].dtype == jnp.float32
  out = assign_call()()
  assert out.scores.shape == (B, A, NC)
  jaxtal.make_anchors(SHAPES, STRIDES)
  jaxtal.flatten_head(F, NC, R)
  jaxtal.decode_boxes(jnp.zeros((2, A, 4 * R)), AP, reg_max=R)
  # integer masks and numpy inputs are accepted
  loss_call(gt=G._replace(mask=G.mask.astype(jnp.int32)))()
  loss_call(gt=jax.tree.map(np.asarray, G))()


@pytest.mark.parametrize(
    "rows, kwargs, pattern",
    [
        (np.zeros((2, 5)), {}, r"labels must have shape \(n, 6\).*got shape \(2, 5\)"),
        ([[2, 0, 0.5, 0.5, 0.1, 0.1]], {}, r"label row 0 has batch index 2.0, expected a whole number in \[0, 2\)"),
        ([[0, -1, 0.5, 0.5, 0.1, 0.1]], {}, r"label row 0 has class -1.0, expected a whole number >= 0"),
        ([[0, 1, np.nan, 0.5, 0.1, 0.1]], {}, r"label row 0 has a non-finite value"),
        ([[0, 0, 0.5, 0.5, 0.1, 0.1]] * 5, {}, r"label row 4 is box 5 of image 0, which has 5 boxes; max_boxes is 4"),
        ([], dict(max_boxes=0), r"max_boxes must be a whole number >= 1, got 0"),
        ([[0, 0, 0.5, 0.5, 1e29, 0.1]], {}, r"label row 0 has a box coordinate beyond 1\.04858e\+06 pixels"),
    ],
)
def test_pack_labels_rejects_bad_rows_on_the_host(rows, kwargs, pattern):
  args = dict(batch_size=B, max_boxes=M, image_size=(IMAGE, IMAGE))
  args.update(kwargs)
  with pytest.raises(ValueError, match=pattern):
    jaxtal.pack_labels(np.asarray(rows, np.float32), **args)


# --------------------------------------------------------------------------------------------------
# Data: masked, never assigned, never an error
# --------------------------------------------------------------------------------------------------


@functools.cache
def jitted_loss_and_grad(min_box_side=0.0):
  def loss(feats, gt):
    return jaxtal.detection_loss(feats, gt, min_box_side=min_box_side, **KW)[0]

  return jax.jit(jax.value_and_grad(loss))


def loss_and_grad(gt, feats=None, min_box_side=0.0):
  value, grads = jitted_loss_and_grad(min_box_side)(make_feats() if feats is None else feats, gt)
  return np.asarray(value), [np.asarray(g) for g in grads]


def assert_same(x, y):
  np.testing.assert_array_equal(x[0], y[0])
  for a, b in zip(x[1], y[1]):
    np.testing.assert_array_equal(a, b)


def assert_differs(x, y):
  assert not np.array_equal(x[0], y[0]), "control failed: the row does not change the loss even when valid"


def set_row(gt, label, box, slot=2, mask=True):
  """``gt`` with image 0, slot ``slot`` set to ``(label, box, mask)``."""
  return replace(
      gt,
      labels=gt.labels.at[0, slot].set(label),
      boxes=gt.boxes.at[0, slot].set(jnp.asarray(box, jnp.float32)),
      mask=gt.mask.at[0, slot].set(mask),
  )


def with_row(label, box, min_box_side=0.0, mask=True):
  """Loss and gradients of the base batch with one extra row in image 0."""
  return loss_and_grad(set_row(make_gt(), label, box, mask=mask), min_box_side=min_box_side)


@functools.cache
def jitted_assign(min_box_side=0.0):
  return jax.jit(functools.partial(jaxtal.task_aligned_assign, min_box_side=min_box_side))


def assign_with_row(label, box, min_box_side=0.0, mask=True):
  """Assignment of the base problem with one extra row in image 0 (slot 2)."""
  scores, boxes, anchors, gt = assign_inputs()
  return jitted_assign(min_box_side)(scores, boxes, anchors, set_row(gt, label, box, mask=mask))


def assert_same_assignment(x, y):
  for a, b in zip(x, y):
    np.testing.assert_array_equal(a, b)


def owns(out, slot=2):
  """Number of anchors of image 0 assigned to GT ``slot``."""
  return int(jnp.sum(out.fg_mask[0] & (out.gt_index[0] == slot)))


GOOD_BOX = [2.0, 20.0, 13.0, 31.0]  # a box of image 0 that owns anchors when valid
PADDING = (0, [0.0] * 4)


def test_padding_rows_may_hold_anything():
  base = loss_and_grad(make_gt())
  assert_same(with_row(99, [np.nan, np.inf, -5.0, -np.inf], mask=False), base)
  assert_same(with_row(1, GOOD_BOX, mask=False), base)
  assert_differs(with_row(1, GOOD_BOX), base)
  padding = assign_with_row(*PADDING, mask=False)
  assert_same_assignment(assign_with_row(99, [np.nan, 1.0, -5.0, -np.inf], mask=False), padding)
  assert owns(assign_with_row(1, GOOD_BOX)) > 0 and owns(padding) == 0


@pytest.mark.parametrize("label", [NC, NC + 7, -1, np.iinfo(np.int32).max])
def test_class_id_outside_range_is_padding(label):
  assert_same(with_row(label, GOOD_BOX), with_row(*PADDING, mask=False))
  assert_differs(with_row(NC - 1, GOOD_BOX), with_row(*PADDING, mask=False))
  assert_same_assignment(assign_with_row(label, GOOD_BOX), assign_with_row(*PADDING, mask=False))
  assert owns(assign_with_row(NC - 1, GOOD_BOX)) > 0


@pytest.mark.parametrize(
    "box",
    [
        [np.nan, 20.0, 13.0, 31.0],
        [2.0, 20.0, np.inf, 31.0],
        [-np.inf, -np.inf, np.inf, np.inf],
        [np.nan] * 4,
    ],
)
def test_non_finite_box_inside_jit_is_padding(box):
  value = with_row(1, box)
  assert np.isfinite(value[0]) and all(np.isfinite(g).all() for g in value[1])
  assert_same(value, with_row(*PADDING, mask=False))
  assert_same_assignment(assign_with_row(1, box), assign_with_row(*PADDING, mask=False))


@pytest.mark.parametrize(
    "box",
    [
        [2.0, 20.0, 13.0, 1e29],
        [2.0, 20.0, 1e20, 31.0],
        [-1e25, 20.0, 13.0, 31.0],
        [-3e38, -3e38, 3e38, 3e38],  # finite in float32, but its area and CIoU's diagonal are not
        [2.0, 20.0, float(np.nextafter(np.float32(jaxtal.COORD_LIMIT), np.float32(np.inf))), 31.0],
    ],
)
def test_coordinates_beyond_coord_limit_inside_jit_are_padding(box):
  """pack_labels rejects such rows; a GroundTruth built otherwise has them masked: finite and equal to padding."""
  value = with_row(1, box)
  assert np.isfinite(value[0]) and all(np.isfinite(g).all() for g in value[1])
  assert_same(value, with_row(*PADDING, mask=False))
  assert_same_assignment(assign_with_row(1, box), assign_with_row(*PADDING, mask=False))


@pytest.mark.parametrize("box", [[2.0, 20.0, jaxtal.COORD_LIMIT, 31.0], [-jaxtal.COORD_LIMIT, 20.0, 13.0, 31.0]])
def test_a_coordinate_exactly_at_coord_limit_is_kept(box):
  """Kept: the loss is finite and the row owns anchors in the loss's own assignment; one ulp beyond, it does not.

  A 2^20-pixel-wide box's CIoU with every small prediction is negative (the centre distance term),
  so its align metric is 0 and it owns nothing for that reason alone; with ``overlap="iou"`` its tiny
  positive IoU makes its in-box anchors win their top-k, which shows the row is valid.
  """
  value = with_row(1, box)
  assert np.isfinite(value[0]) and all(np.isfinite(g).all() for g in value[1])
  assert int(iou_loss_targets()(make_feats(), set_row(make_gt(), 1, box)).positives_per_gt[0, 2]) > 0
  beyond = [float(np.nextafter(np.float32(x), np.float32(np.sign(x) * np.inf))) if abs(x) == jaxtal.COORD_LIMIT else x
            for x in box]
  assert int(iou_loss_targets()(make_feats(), set_row(make_gt(), 1, beyond)).positives_per_gt[0, 2]) == 0  # control


@functools.cache
def iou_loss_targets():
  return jax.jit(lambda f, g: jaxtal.detection_targets(f, g, **KW, overlap="iou")[1])


@pytest.mark.parametrize(
    "box, control",
    [
        # Degenerate boxes at the top-left: their zero metrics would tie with the first anchors in top-k,
        # so unmasked they would own anchors (as the tiny positive-area controls do).
        ([2.0, 2.0, 2.0, 6.0], [2.0, 2.0, 2.01, 6.0]),  # zero width
        ([1.0, 2.0, 7.0, 2.0], [1.0, 2.0, 7.0, 2.01]),  # zero height
        ([2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.01, 2.01]),  # a point
        ([13.0, 20.0, 2.0, 31.0], GOOD_BOX),  # inverted x
        ([2.0, 31.0, 13.0, 20.0], GOOD_BOX),  # inverted y
    ],
)
def test_zero_area_and_inverted_boxes_are_padding(box, control):
  # min_box_side > 0 widens short sides: a degenerate box that was kept would reach anchors.
  padding = assign_with_row(*PADDING, mask=False, min_box_side=8.0)
  assert_same_assignment(assign_with_row(1, box, min_box_side=8.0), padding)
  assert owns(assign_with_row(1, control, min_box_side=8.0)) > 0
  assert_same(with_row(1, box, min_box_side=8.0), with_row(*PADDING, mask=False, min_box_side=8.0))


def flat_box_feats():
  """Head maps whose box logits are all 0: every prediction is its anchor +- 1.5 cells."""
  feats = make_feats()
  return [f.at[..., : 4 * R].set(0.0) for f in feats]


OUTSIDE = [
    [32.5, 2.0, 34.0, 30.0],  # a thin box just right of the image (x2 > W = 32 > x1)
    [3.0, -1.5, 29.0, -0.2],  # just above
    [-2.0, -2.0, 0.0, 0.0],  # touching the top-left corner from outside: no overlap
    [100.0, 100.0, 140.0, 140.0],  # far away
]


@pytest.mark.parametrize("box", OUTSIDE)
def test_box_wholly_outside_the_image_is_padding_in_the_loss(box):
  feats = flat_box_feats()
  padding = loss_and_grad(set_row(make_gt(), *PADDING, mask=False), feats=feats, min_box_side=8.0)
  assert_same(loss_and_grad(set_row(make_gt(), 1, box), feats=feats, min_box_side=8.0), padding)


@pytest.mark.parametrize("box", OUTSIDE[:2])
def test_box_wholly_outside_would_be_widened_onto_a_border_anchor_by_the_bare_assigner(box):
  """Control for the test above: with the very predictions the loss decodes, task_aligned_assign (which does
  not know the image size) widens the box onto border anchors; the loss does not let it own them."""
  feats = flat_box_feats()
  dist, logits = jaxtal.flatten_head(feats, NC, R)
  anchors, strides = jaxtal.make_anchors(SHAPES, STRIDES)
  boxes = jaxtal.decode_boxes(dist, anchors, R) * strides
  gt = set_row(make_gt(), 1, box)
  out = jitted_assign(8.0)(jax.nn.sigmoid(logits), boxes, anchors * strides, gt)
  assert owns(out) > 0 and float(jnp.max(jnp.where(out.gt_index == 2, out.scores.sum(-1), 0.0))) > 0


def test_box_partly_outside_the_image_is_kept_unclipped():
  partly = [20.0, 22.0, 40.0, 38.0]  # extends past the right and bottom edges (image is 32x32)
  assert_differs(with_row(1, partly), with_row(*PADDING, mask=False))
  out = assign_with_row(1, partly)
  own = np.asarray(out.fg_mask[0] & (out.gt_index[0] == 2))
  assert own.any()
  np.testing.assert_array_equal(np.asarray(out.boxes[0])[own], np.broadcast_to(partly, (own.sum(), 4)))


def test_non_finite_predictions_never_become_targets_but_the_loss_shows_them():
  """NaN logits are a model bug, not data: the assignment stays finite, the loss is NaN (use checkify)."""
  scores, boxes, anchors, gt = assign_inputs()
  scores = scores.at[0, :40].set(jnp.nan)
  boxes = boxes.at[1, ::3].set(jnp.inf)
  out = jitted_assign()(scores, boxes, anchors, gt)
  for x in (out.scores, out.boxes):
    assert np.isfinite(np.asarray(x)).all()
  assert np.asarray(out.scores).max() <= 1.0
  feats = make_feats()
  feats[0] = feats[0].at[0, 1, 1, -1].set(jnp.nan)
  value, _ = loss_and_grad(make_gt(), feats=feats)
  assert np.isnan(value)
