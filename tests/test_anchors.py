"""jaxtal.anchors.make_anchors: order, offsets, strides and argument errors (hand-worked values)."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtal


class TestMakeAnchors:

  def test_order_offsets_and_strides(self):
    points, strides = jaxtal.make_anchors([(2, 3), (1, 2)], [8, 16])
    chex.assert_shape([points, strides], [(8, 2), (8, 1)])
    chex.assert_type([points, strides], [jnp.float32, jnp.float32])
    # (x, y) cell centres, row-major (x fastest) within a level, levels in order.
    expected = [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5], [1.5, 0.5]]
    np.testing.assert_array_equal(points, expected)
    np.testing.assert_array_equal(strides[:, 0], [8, 8, 8, 8, 8, 8, 16, 16])

  def test_offset(self):
    points, _ = jaxtal.make_anchors([(2, 2)], [4], offset=0.0)
    np.testing.assert_array_equal(points, [[0, 0], [1, 0], [0, 1], [1, 1]])
    points, _ = jaxtal.make_anchors([(1, 2)], [4], offset=0.25)
    np.testing.assert_array_equal(points, [[0.25, 0.25], [1.25, 0.25]])

  def test_pixels_are_points_times_strides(self):
    points, strides = jaxtal.make_anchors([(80, 80), (40, 40), (20, 20)], [8, 16, 32])
    chex.assert_shape([points, strides], [(8400, 2), (8400, 1)])
    px = np.asarray(points * strides)
    np.testing.assert_array_equal(px[0], [4, 4])
    np.testing.assert_array_equal(px[6400], [8, 8])
    np.testing.assert_array_equal(px[-1], [624, 624])

  @pytest.mark.parametrize("shapes,strides,match", [
      ([(2, 2), (1, 1)], [8], "strides"),
      ([(2, 2)], [8, 16], "strides"),
      ([], [], "empty"),
      ([(2, 2)], [0], "positive"),
      ([(2, 2)], [-8], "positive"),
      ([(2, 0)], [8], "positive"),
      ([(2, 2, 2)], [8], "pair"),
  ])
  def test_bad_arguments_raise(self, shapes, strides, match):
    with pytest.raises(ValueError, match=match):
      jaxtal.make_anchors(shapes, strides)


  def test_non_integer_strides_and_whole_float_strides(self):
    _, strides = jaxtal.make_anchors([(1, 1), (1, 1)], [8.0, 12.5])
    np.testing.assert_array_equal(strides[:, 0], [8.0, 12.5])

  def test_scalar_strides_raise_with_an_example(self):
    with pytest.raises(ValueError, match=r"one stride per feature level, e\.g\. \(8, 16, 32\)"):
      jaxtal.make_anchors([(2, 2)], 8)

