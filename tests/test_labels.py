"""jaxtal.labels: valid_rows, the one rule for which GT rows count (hand-worked rows). The host-side
packers that build a GroundTruth are test_packing.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import jaxtal


class TestValidRows:
  """The one rule of which rows count, against hand-worked rows."""

  def test_each_condition(self):
    limit = jaxtal.COORD_LIMIT
    rows = [  # (label, box, mask, expected)
        (0, [0.0, 0.0, 4.0, 4.0], True, True),
        (2, [0.0, 0.0, 4.0, 4.0], True, True),
        (0, [0.0, 0.0, 4.0, 4.0], False, False),  # padding
        (3, [0.0, 0.0, 4.0, 4.0], True, False),  # class == nc
        (-1, [0.0, 0.0, 4.0, 4.0], True, False),  # negative class
        (0, [0.0, np.nan, 4.0, 4.0], True, False),
        (0, [-np.inf, 0.0, 4.0, 4.0], True, False),
        (0, [0.0, 0.0, limit, 4.0], True, True),  # exactly at the limit: kept
        (0, [-limit, 0.0, 4.0, 4.0], True, True),
        (0, [0.0, 0.0, np.nextafter(np.float32(limit), np.float32(np.inf)), 4.0], True, False),
        (0, [-1e25, 0.0, 4.0, 4.0], True, False),
        (0, [0.0, 0.0, 3e38, 4.0], True, False),
        (0, [0.0, 0.0, 4.0, 4.0], True, False),  # the geometry says no (box_ok False below)
    ]
    labels = jnp.array([r[0] for r in rows], jnp.int32)
    boxes = jnp.array([r[1] for r in rows], jnp.float32)
    mask = jnp.array([r[2] for r in rows])
    box_ok = jnp.array([True] * (len(rows) - 1) + [False])
    got = jaxtal.valid_rows(labels, boxes, mask, 3, box_ok)
    np.testing.assert_array_equal(got, [r[3] for r in rows])
    # Batched shapes (..., M) work the same.
    got2 = jaxtal.valid_rows(labels[None], boxes[None], mask[None].astype(jnp.int32), 3, box_ok[None])
    np.testing.assert_array_equal(got2[0], got)


def test_a_captured_gt_is_a_constant_of_the_compiled_step():
  """Why ``gt`` is an argument of the jitted step (GroundTruth's docstring): a step that closes over ``gt`` keeps
  the batch it was compiled with after the Python variable is reassigned; one taking it as an argument does not."""
  import jax

  from support.problems import LOSS_CFG, loss_problem

  feats, gt = loss_problem(seed=0)
  _, other = loss_problem(seed=1)
  as_argument = jax.jit(lambda f, g: jaxtal.detection_loss(f, g, LOSS_CFG)[0])  # one compilation, both batches
  want_first, want_other = float(as_argument(feats, gt)), float(as_argument(feats, other))
  assert not np.isclose(want_first, want_other)  # control: the two batches' losses differ

  captured = jax.jit(lambda f: jaxtal.detection_loss(f, gt, LOSS_CFG)[0])
  np.testing.assert_allclose(captured(feats), want_first, rtol=1e-6)
  gt = other  # the next batch, assigned to the captured name: the compiled step does not see it
  np.testing.assert_allclose(captured(feats), want_first, rtol=1e-6)
