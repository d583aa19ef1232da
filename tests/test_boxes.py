"""jaxtal.boxes: box formats and IoU / GIoU / DIoU / CIoU against the NumPy formulas of the papers."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal
from support.oracles import np_box_iou
from support.problems import random_boxes

KINDS = ("iou", "giou", "diou", "ciou")

class TestBoxIou:

  @pytest.mark.parametrize("kind", [
      *KINDS,
  ])
  def test_matches_numpy(self, variant, kind):
    rng = np.random.default_rng(0)
    box1 = random_boxes(rng, (64,), hi=40)
    box2 = np.concatenate([random_boxes(rng, (48,), hi=40), box1[:16] + rng.uniform(-2, 2, (16, 4))]).astype(np.float32)
    got = variant(functools.partial(jaxtal.box_iou, kind=kind))(jnp.asarray(box1), jnp.asarray(box2))
    chex.assert_shape(got, (64,))
    np.testing.assert_allclose(got, np_box_iou(box1, box2, kind), rtol=1e-5, atol=2e-6)
    assert np.any(np.asarray(got) > 0.3) and np.any(np.asarray(got) <= 0)  # overlapping and disjoint pairs

  @pytest.mark.parametrize("kind", [
      *KINDS,
  ])
  def test_broadcasts(self, kind):
    rng = np.random.default_rng(1)
    box1 = random_boxes(rng, (3, 1))
    box2 = random_boxes(rng, (1, 5))
    fn = jax.jit(functools.partial(jaxtal.box_iou, kind=kind))
    got = fn(jnp.asarray(box1), jnp.asarray(box2))
    chex.assert_shape(got, (3, 5))
    np.testing.assert_allclose(got, np_box_iou(box1, box2, kind), rtol=1e-5, atol=2e-6)
    one = fn(jnp.asarray(box1[0, 0]), jnp.asarray(box2[0]))  # (4,) against (5, 4)
    chex.assert_shape(one, (5,))
    np.testing.assert_allclose(one, np.asarray(got)[0], rtol=1e-6)

  @pytest.mark.parametrize("kind", [
      *KINDS,
  ])
  def test_known_values(self, kind):
    unit = jnp.array([0.0, 0.0, 10.0, 10.0])
    same = jaxtal.box_iou(unit, unit, kind)
    np.testing.assert_allclose(same, 1.0, atol=1e-6)  # identical boxes: every kind gives 1
    far = jaxtal.box_iou(unit, jnp.array([20.0, 0.0, 30.0, 10.0]), kind)
    expected = {"iou": 0.0, "giou": -1 / 3, "diou": -(20**2) / (30**2 + 10**2), "ciou": -(20**2) / (30**2 + 10**2)}
    np.testing.assert_allclose(far, expected[kind], atol=1e-5)

  @pytest.mark.parametrize("kind", [
      *KINDS,
  ])
  def test_degenerate_boxes_give_finite_values_and_gradients(self, variant, kind):
    box1 = jnp.array([
        [5.0, 5.0, 5.0, 15.0],  # zero width
        [5.0, 5.0, 15.0, 5.0],  # zero height
        [3.0, 3.0, 3.0, 3.0],  # a point
        [4.0, 4.0, 12.0, 12.0],  # identical to its partner
        [12.0, 12.0, 4.0, 4.0],  # inverted
        [0.0, 0.0, 10.0, 10.0],
    ])
    box2 = jnp.array([
        [0.0, 0.0, 10.0, 10.0],
        [5.0, 5.0, 15.0, 5.0],
        [3.0, 3.0, 3.0, 3.0],
        [4.0, 4.0, 12.0, 12.0],
        [0.0, 0.0, 10.0, 10.0],
        [10.0, 2.0, 6.0, 8.0],  # inverted partner
    ])
    fn = functools.partial(jaxtal.box_iou, kind=kind)
    values = variant(fn)(box1, box2)
    chex.assert_shape(values, (6,))
    chex.assert_tree_all_finite(values)
    grads = variant(jax.grad(lambda a, b: jnp.sum(fn(a, b)), argnums=(0, 1)))(box1, box2)
    chex.assert_shape(grads, [(6, 4), (6, 4)])
    chex.assert_tree_all_finite(grads)
    np.testing.assert_allclose(np.asarray(values)[3], 1.0, atol=1e-6)

  def test_invalid_kind_raises(self):
    with pytest.raises(ValueError, match="kind"):
      jaxtal.box_iou(jnp.zeros(4), jnp.zeros(4), kind="eiou")

  def test_wrong_coordinate_count_raises(self):
    with pytest.raises(ValueError, match="4 coordinates"):
      jaxtal.box_iou(jnp.zeros((2, 5)), jnp.zeros((2, 4)))

  def test_xywh_round_trip(self):
    rng = np.random.default_rng(2)
    xywh = np.concatenate([rng.uniform(0, 50, (7, 2)), rng.uniform(1, 20, (7, 2))], -1).astype(np.float32)
    xyxy = jaxtal.xywh_to_xyxy(jnp.asarray(xywh))
    chex.assert_shape(xyxy, (7, 4))
    expected = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], -1)
    np.testing.assert_allclose(xyxy, expected, rtol=1e-6)
    back = jaxtal.xyxy_to_xywh(xyxy)
    chex.assert_shape(back, (7, 4))
    np.testing.assert_allclose(back, xywh, rtol=1e-5, atol=1e-5)


  def test_precomputed_aspect_angles_change_nothing(self):
    # The assigner passes each box's CIoU angle once (M + A arctangents); the result is CIoU's.
    rng = np.random.default_rng(3)
    box1, box2 = jnp.asarray(random_boxes(rng, (5, 1))), jnp.asarray(random_boxes(rng, (1, 7)))
    a1 = np.arctan((box1[..., 2] - box1[..., 0]) / (box1[..., 3] - box1[..., 1] + 1e-7))  # NumPy, not the library
    a2 = np.arctan((box2[..., 2] - box2[..., 0]) / (box2[..., 3] - box2[..., 1] + 1e-7))
    got = jaxtal.box_iou(box1, box2, "ciou", angle1=jnp.asarray(a1), angle2=jnp.asarray(a2))
    np.testing.assert_allclose(got, np_box_iou(box1, box2, "ciou"), rtol=1e-5, atol=2e-6)

