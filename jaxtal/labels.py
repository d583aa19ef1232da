"""Ground truth at a fixed size: the :class:`GroundTruth` container of ``(b, M)`` padded slots.

Also the one rule for which GT rows count (:func:`valid_rows`), used by every geometry, the
assigner, the loss and the value checks alike. :mod:`jaxtal.packing` fills a
``GroundTruth`` from YOLO label rows.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Largest |coordinate| of a GT box, in pixels. Rows beyond it are rejected by the packers and
# masked inside jit: squares of coordinates (areas, CIoU's diagonal, ProbIoU's covariances) then
# stay far from float32's range (2^40 << 3.4e38), so every overlap stays finite.
COORD_LIMIT = float(2**20)
# Ultralytics' OBB loss drops GT boxes with a side under this many input pixels (exactly 2 is kept).
MIN_ROTATED_SIDE = 2.0


class GroundTruth(NamedTuple):
  """Ground truth of a batch, padded to a static ``M`` per image.

  Attributes:
    labels: ``(b, M)`` int32 class ids; 0 on padding rows.
    boxes: ``(b, M, D)`` float32 boxes in input pixels: xyxy (``D = 4``), or xywhr with the angle in
      radians (``D = 5``, :func:`~jaxtal.pack_rotated_labels`); 0 on padding rows.
    mask: ``(b, M)`` bool, True on real rows. Padding is read from here only
      (never from "coordinates sum to zero").
    keypoints: optional ``(b, M, K, D)`` float32 keypoints of each row in input pixels, ``D = 3``
      ``(x, y, visibility)`` or ``D = 2`` (every keypoint labelled); a keypoint counts as labelled
      when its visibility is non-zero (1 and 2 alike). Pose only (:func:`jaxtal.pose_loss`).
    masks: optional instance masks (segmentation only, :func:`jaxtal.segment_loss`): an index map
      ``(b, mh, mw)`` int where pixel value ``j + 1`` marks GT slot ``j`` and 0 is background
      (:func:`~jaxtal.pack_masks`), or per-slot binary masks ``(b, M, mh, mw)`` bool or 0/1 float.
    class_map: optional ``(b, h, w)`` int class of each pixel, -1 where no instance covers it: the
      semantic term's target, straight from a data pipeline (Ultralytics' ``sem_masks`` with its
      uncovered pixels set to -1). Read only with semantic logits (``Predictions.semantic``); without
      it the segmentation losses derive the map from ``masks`` (:func:`jaxtal.segment.class_map`).

  The optional fields are ``None`` when unused (``None`` is an empty pytree: ``jax.tree.map``,
  ``jit`` and ``stop_gradient`` pass it through). Build arrays from a packed NumPy result with
  ``jax.tree.map(jnp.asarray, gt)``.

  Pass it to the jitted training step **as an argument** (``step(params, images, gt)``), never by
  closing over it. ``jit`` bakes a captured ``gt`` into the compiled step as a constant: reassigning
  the Python variable to the next batch does not change the compiled step, which keeps computing
  the loss of the first batch without any warning. As an argument, ``gt`` is
  traced like the images, and one compilation serves every batch of the same shapes.
  """

  labels: jax.Array
  boxes: jax.Array
  mask: jax.Array
  keypoints: jax.Array | None = None
  masks: jax.Array | None = None
  class_map: jax.Array | None = None


def valid_rows(labels: jax.Array, boxes: jax.Array, mask: jax.Array, num_classes: int, box_ok: jax.Array) -> jax.Array:
  """Which GT rows may own anchors: the one rule, shared by every geometry.

  A row counts when it is real (``mask``), its class is in ``[0, nc)``, every box coordinate is
  finite with ``|x| <= COORD_LIMIT`` pixels, and the geometry accepts its box (``box_ok``: for
  xyxy boxes a positive area, and for the loss some overlap with the image).

  Shapes: ``(..., M)``, ``(..., M, D)``, ``(..., M)``, ``(..., M)`` -> ``(..., M)`` bool.
  """
  bounded = (jnp.abs(boxes) <= COORD_LIMIT).all(axis=-1)  # False for NaN and inf too
  in_range = (labels >= 0) & (labels < num_classes)
  return jnp.asarray(mask).astype(bool) & bounded & in_range & box_ok
