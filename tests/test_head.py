"""jaxtal.head: flattening and decoding head maps, against NumPy (softmax expectation, log-sum-exp)."""

from __future__ import annotations

import functools

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal
from support.oracles import np_anchors, np_decode, np_dfl_expectation, np_flat_head, np_logsumexp
from support.problems import FEATURE_SHAPES, NC, R, STRIDES, head_maps, loss_config


class TestFlattenHead:

  def test_nhwc_and_nchw_agree_with_numpy(self):
    nhwc = head_maps(seed=3)
    nchw = head_maps(seed=3, layout="NCHW")
    dist, logits = jaxtal.flatten_head(nhwc, NC, R)
    dist2, logits2 = jaxtal.flatten_head(nchw, NC, R, layout="NCHW")
    chex.assert_shape([dist, logits, dist2, logits2], [(2, 20, 16), (2, 20, 3)] * 2)
    flat = np.concatenate([np.asarray(f).reshape(2, -1, 4 * R + NC) for f in nhwc], axis=1)
    np.testing.assert_array_equal(dist, flat[..., : 4 * R])
    np.testing.assert_array_equal(logits, flat[..., 4 * R :])
    np.testing.assert_array_equal(dist2, dist)
    np.testing.assert_array_equal(logits2, logits)

  def test_anchor_order_matches_make_anchors(self):
    # Put each cell's own (x, y) in its first two channels: after flattening they must equal the anchors - 0.5.
    maps = []
    for h, w in FEATURE_SHAPES:
      f = np.zeros((1, h, w, 4 * R + NC), np.float32)
      f[0, :, :, 0], f[0, :, :, 1] = np.meshgrid(np.arange(w), np.arange(h))
      maps.append(jnp.asarray(f))
    dist, _ = jaxtal.flatten_head(maps, NC, R)
    anchors, _ = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
    np.testing.assert_array_equal(dist[0, :, :2], np.asarray(anchors) - 0.5)

  def test_wrong_channel_count_raises(self):
    maps = head_maps()
    maps[1] = maps[1][..., :-1]
    with pytest.raises(ValueError, match=r"feats\[1\] has 18 channels"):
      jaxtal.flatten_head(maps, NC, R)
    with pytest.raises(ValueError, match="channels"):
      jaxtal.flatten_head(head_maps(), NC, R, layout="NCHW")  # NHWC maps read as NCHW

  def test_wrong_rank_raises(self):
    maps = head_maps()
    maps[0] = maps[0][0]
    with pytest.raises(ValueError, match="rank-4"):
      jaxtal.flatten_head(maps, NC, R)

  def test_batch_mismatch_raises(self):
    maps = head_maps()
    maps[1] = maps[1][:1]
    with pytest.raises(ValueError, match="batch size"):
      jaxtal.flatten_head(maps, NC, R)

  def test_bad_layout_and_containers_raise(self):
    with pytest.raises(ValueError, match="layout"):
      jaxtal.flatten_head(head_maps(), NC, R, layout="NCWH")
    with pytest.raises(TypeError):
      jaxtal.flatten_head(head_maps()[0], NC, R)  # one array, not a list of levels
    with pytest.raises(TypeError):
      jaxtal.flatten_head([m.astype(jnp.int32) for m in head_maps()], NC, R)


class TestDecodeBoxes:

  @pytest.mark.parametrize("reg_max", [
      4,
      16,
  ])
  def test_matches_numpy_softmax_expectation(self, variant, reg_max):
    rng = np.random.default_rng(reg_max)
    anchors, _ = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
    dist = (3 * rng.standard_normal((2, 20, 4 * reg_max))).astype(np.float32)
    got = variant(functools.partial(jaxtal.decode_boxes, reg_max=reg_max))(jnp.asarray(dist), anchors)
    chex.assert_shape(got, (2, 20, 4))
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, np_decode(dist, anchors, reg_max), rtol=1e-5, atol=1e-5)
    # Each side's distance lies in [0, R - 1].
    ltrb = np.concatenate([np.asarray(anchors) - np.asarray(got)[..., :2], np.asarray(got)[..., 2:] - np.asarray(anchors)], -1)
    assert ltrb.min() >= -1e-5 and ltrb.max() <= reg_max - 1 + 1e-5

  def test_reg_max_one_is_a_passthrough(self, variant):
    anchors = jnp.array([[0.5, 0.5], [1.5, 0.5], [0.5, 1.5]])
    ltrb = jnp.array([[[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]])
    got = variant(functools.partial(jaxtal.decode_boxes, reg_max=1))(ltrb, anchors)
    chex.assert_shape(got, (1, 3, 4))
    expected = [[[0.4, 0.3, 0.8, 0.9], [0.5, -1.5, 4.5, 4.5], [0.5, 1.5, 0.5, 1.5]]]
    np.testing.assert_allclose(got, expected, rtol=1e-6)

  def test_low_precision_input_decodes_in_float32(self):
    anchors, _ = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
    dist = jnp.asarray(np.random.default_rng(0).standard_normal((1, 20, 16)), jnp.bfloat16)
    got = jaxtal.decode_boxes(dist, anchors, reg_max=4)
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, np_decode(np.asarray(dist, np.float32), anchors, 4), rtol=1e-5, atol=1e-5)

  def test_bad_shapes_raise(self):
    anchors, _ = jaxtal.make_anchors(FEATURE_SHAPES, STRIDES)
    with pytest.raises(ValueError, match="4 \\* reg_max"):
      jaxtal.decode_boxes(jnp.zeros((1, 20, 15)), anchors, reg_max=4)
    with pytest.raises(ValueError, match="anchor_points"):
      jaxtal.decode_boxes(jnp.zeros((1, 20, 16)), anchors[:19], reg_max=4)


  def test_dfl_expectation_matches_numpy(self):
    dist = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 4 * 16)) * 4, jnp.float32)
    got = jaxtal.dfl_expectation(dist, 16)
    chex.assert_shape(got, (3, 5, 4))
    np.testing.assert_allclose(got, np_dfl_expectation(dist, 16), rtol=1e-5, atol=2e-5)


class TestBoxConversion:

  def test_ltrb_and_xyxy_hand_worked(self):
    anchors = jnp.array([[2.0, 3.0], [0.5, 0.5]])
    ltrb = jnp.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.25, 0.0, 1.0]])
    xyxy = jaxtal.ltrb_to_xyxy(ltrb, anchors)
    np.testing.assert_array_equal(xyxy, [[1.0, 1.0, 5.0, 7.0], [0.0, 0.25, 0.5, 1.5]])
    np.testing.assert_array_equal(jaxtal.xyxy_to_ltrb(xyxy, anchors), ltrb)


class TestDecodeHead:
  """decode_head is what the loss runs: every field of Head against NumPy."""

  @pytest.mark.parametrize("layout,reg_max,nc", [
      ("NHWC", 4, 3),  # 19 channels: the kernel reduces the bins itself
      ("NCHW", 4, 4),  # 20 channels, a multiple of R: bin maxima from whole rows
      ("NHWC", 1, 3),  # direct ltrb regression, no log-sum-exp
  ])
  def test_fields_match_numpy(self, variant, layout, reg_max, nc):
    feats = head_maps(seed=4, layout=layout, reg_max=reg_max, nc=nc, scale=3.0)
    cfg = loss_config(num_classes=nc, reg_max=reg_max, layout=layout)
    head = variant(functools.partial(jaxtal.decode_head, config=cfg))(feats)
    dist, logits = np_flat_head(feats, nc, reg_max, layout)
    anchors, strides = np_anchors(FEATURE_SHAPES, STRIDES)
    b, a = dist.shape[:2]
    split = FEATURE_SHAPES[0][0] * FEATURE_SHAPES[0][1]
    np.testing.assert_array_equal(head.anchors, anchors)
    np.testing.assert_array_equal(head.strides, strides)
    chex.assert_shape(list(head.logits), [(b, split, nc), (b, a - split, nc)])
    chex.assert_shape(list(head.dist), [(b, split, 4, reg_max), (b, a - split, 4, reg_max)])
    np.testing.assert_array_equal(np.concatenate(head.logits, 1), logits.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate(head.dist, 1).reshape(b, a, -1), dist.astype(np.float32))
    np.testing.assert_allclose(head.ltrb, np_dfl_expectation(dist, reg_max), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(head.boxes, np_decode(dist, anchors, reg_max), rtol=1e-5, atol=2e-5)
    if reg_max == 1:
      assert head.lse is None
    else:
      np.testing.assert_allclose(head.lse, np_logsumexp(dist.reshape(b, a, 4, reg_max)), rtol=1e-6, atol=1e-5)

  def test_bf16_maps_decode_in_float32(self):
    feats = [f.astype(jnp.bfloat16) for f in head_maps(seed=5)]
    head = jaxtal.decode_head(feats, loss_config())
    chex.assert_type([head.ltrb, head.boxes, head.lse, *head.logits], jnp.float32)

  def test_nchw_maps_without_layout_say_pass_layout_nchw(self):
    # A PyTorch head's maps read as NHWC: the channel count is on axis 1. The message says what to do.
    nchw = head_maps(layout="NCHW")
    with pytest.raises(ValueError, match=r"has exactly 19: pass layout='NCHW'"):
      jaxtal.decode_head(nchw, loss_config())
    with pytest.raises(ValueError, match=r"pass layout='NCHW'"):
      jaxtal.flatten_head(nchw, NC, R)
    with pytest.raises(ValueError, match=r"pass layout='NHWC'"):
      jaxtal.decode_head(head_maps(), loss_config(layout="NCHW"))

  def test_strides_must_match_the_maps(self):
    with pytest.raises(ValueError, match="strides do not match"):
      jaxtal.decode_head(head_maps(), loss_config(strides=(8, 8)))

