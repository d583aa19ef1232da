"""Anchor points of a multi-level detection head.

One anchor per feature-map cell: its centre in grid units of its own level and
the stride that maps that level back to input pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtal import _validate


def make_anchors(
    feature_shapes: Sequence[Sequence[int]],
    strides: Sequence[float],
    offset: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
  """Anchor centres and strides for every cell of every level.

  Args:
    feature_shapes: one ``(H, W)`` per level, e.g. ``[(80, 80), (40, 40), (20, 20)]``.
    strides: one stride per level (input pixels per cell), e.g. ``[8, 16, 32]``.
    offset: position of the anchor inside its cell; ``0.5`` is the cell centre.

  Returns:
    ``anchor_points``: ``(A, 2)`` float32 ``(x, y)`` in grid units of their level,
    row-major within a level, levels in the given order (``A = sum(H * W)``).
    ``anchor_strides``: ``(A, 1)`` float32 stride of each anchor. Multiply the two
    for anchor centres in input pixels.
  """
  strides = _validate.strides(strides)
  shapes = tuple(tuple(int(s) for s in hw) for hw in feature_shapes)
  if not shapes:
    raise ValueError("make_anchors: feature_shapes is empty; expected one (H, W) per level")
  for i, hw in enumerate(shapes):
    if len(hw) != 2 or min(hw) < 1:
      raise ValueError(f"make_anchors: feature_shapes[{i}] must be a positive (H, W) pair, got {hw}")
  if len(strides) != len(shapes):
    raise ValueError(
        f"make_anchors: got {len(strides)} strides for {len(shapes)} feature levels; expected one stride per level"
    )
  points, stride_col = [], []
  for (h, w), s in zip(shapes, strides):
    ys, xs = np.meshgrid(
        np.arange(h, dtype=np.float32) + offset, np.arange(w, dtype=np.float32) + offset, indexing="ij"
    )
    points.append(np.stack([xs, ys], axis=-1).reshape(-1, 2))
    stride_col.append(np.full((h * w, 1), s, dtype=np.float32))
  return jnp.asarray(np.concatenate(points)), jnp.asarray(np.concatenate(stride_col))
