"""Ground truth at a fixed size: YOLO label rows packed into ``(b, M)`` padded arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np


class GroundTruth(NamedTuple):
  """Ground-truth boxes of a batch, padded to a static ``M`` per image.

  Attributes:
    labels: ``(b, M)`` int32 class ids; 0 on padding rows.
    boxes: ``(b, M, 4)`` float32 xyxy boxes in input pixels; 0 on padding rows.
    mask: ``(b, M)`` bool, True on real rows. Padding is read from here only
      (never from "coordinates sum to zero").
  """

  labels: jax.Array
  boxes: jax.Array
  mask: jax.Array


def check_ground_truth(gt: GroundTruth, batch: int | None, caller: str) -> int:
  """Trace-time validation of a :class:`GroundTruth`; returns ``M``.

  Checks the type, ``labels (b, M)`` integer, ``boxes (b, M, 4)`` float, ``mask (b, M)`` bool
  or integer, and (when ``batch`` is given) that ``b == batch``. Raises TypeError / ValueError
  naming the field, what was expected and what was received. Values are never read here.
  """
  if not isinstance(gt, GroundTruth):
    raise TypeError(f"{caller}: gt must be a jaxtal.GroundTruth(labels, boxes, mask), got {type(gt).__name__}")
  labels, boxes, mask = (getattr(x, "shape", None) for x in gt)
  if labels is None or len(labels) != 2:
    raise ValueError(f"{caller}: gt.labels must be (b, M) class ids, got shape {labels}")
  b, m = labels
  if batch is not None and b != batch:
    raise ValueError(
        f"{caller}: gt has batch size {b} (gt.labels {tuple(labels)}) but the predictions have {batch};"
        f" gt.labels must be (b, M) with b = {batch}"
    )
  if boxes is None or tuple(boxes) != (b, m, 4):
    raise ValueError(f"{caller}: gt.boxes must be (b, M, 4) = ({b}, {m}, 4) xyxy pixels, got shape {boxes}")
  if mask is None or tuple(mask) != (b, m):
    raise ValueError(f"{caller}: gt.mask must be (b, M) = ({b}, {m}), got shape {mask}")
  if not jax.numpy.issubdtype(gt.labels.dtype, jax.numpy.integer):
    raise TypeError(f"{caller}: gt.labels must be integer class ids, got dtype {gt.labels.dtype}")
  if not jax.numpy.issubdtype(gt.boxes.dtype, jax.numpy.floating):
    raise TypeError(f"{caller}: gt.boxes must be a float array of xyxy pixels, got dtype {gt.boxes.dtype}")
  if not (gt.mask.dtype == bool or jax.numpy.issubdtype(gt.mask.dtype, jax.numpy.integer)):
    raise TypeError(f"{caller}: gt.mask must be bool (True on real rows), got dtype {gt.mask.dtype}")
  return int(m)


def _row_error(row: int, what: str, value) -> ValueError:
  return ValueError(f"pack_labels: label row {row} {what} (row = {value})")


def pack_labels(
    labels: np.ndarray,
    batch_size: int,
    max_boxes: int,
    image_size: Sequence[int],
) -> GroundTruth:
  """Packs YOLO label rows into a fixed-size :class:`GroundTruth` (host side, NumPy).

  Args:
    labels: ``(n, 6)`` rows ``[batch_idx, cls, cx, cy, w, h]``, the box normalised to ``[0, 1]``.
      ``n = 0`` is valid and gives an all-padding result.
    batch_size: ``b``, number of images.
    max_boxes: ``M``, static number of box slots per image.
    image_size: ``(height, width)`` of the network input in pixels.

  Returns:
    A :class:`GroundTruth` of NumPy arrays (``labels (b, M) int32``, ``boxes (b, M, 4) float32``
    xyxy pixels, ``mask (b, M) bool``). Rows keep their order within each image.

  Raises:
    ValueError: naming the offending row for a batch index outside ``[0, batch_size)`` or not whole,
      a negative or non-whole class, a non-finite value, or more than ``max_boxes`` rows for one image;
      or naming the argument for a wrong shape or size.
  """
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"pack_labels: batch_size must be a whole number >= 1, got {batch_size!r}")
  if int(max_boxes) != max_boxes or max_boxes < 1:
    raise ValueError(f"pack_labels: max_boxes must be a whole number >= 1, got {max_boxes!r}")
  if len(image_size) != 2 or min(image_size) <= 0:
    raise ValueError(f"pack_labels: image_size must be a positive (height, width), got {tuple(image_size)!r}")
  arr = np.asarray(labels)
  if arr.size == 0:
    arr = arr.reshape(0, 6)
  if arr.ndim != 2 or arr.shape[1] != 6:
    raise ValueError(
        f"pack_labels: labels must have shape (n, 6) = [batch_idx, cls, cx, cy, w, h] per row, got shape {arr.shape}"
    )
  if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
    raise ValueError(f"pack_labels: labels must be a real numeric array, got dtype {arr.dtype}")
  arr64 = arr.astype(np.float64)
  for r in np.flatnonzero(~np.isfinite(arr64).all(axis=1))[:1]:
    raise _row_error(int(r), "has a non-finite value", arr[r].tolist())
  bidx, cls = arr64[:, 0], arr64[:, 1]
  for r in np.flatnonzero((bidx != np.round(bidx)) | (bidx < 0) | (bidx >= batch_size))[:1]:
    raise _row_error(
        int(r), f"has batch index {arr[r, 0].item()!r}, expected a whole number in [0, {batch_size})", arr[r].tolist()
    )
  for r in np.flatnonzero((cls != np.round(cls)) | (cls < 0))[:1]:
    raise _row_error(int(r), f"has class {arr[r, 1].item()!r}, expected a whole number >= 0", arr[r].tolist())

  n = arr.shape[0]
  image = bidx.astype(np.int64)
  order = np.argsort(image, kind="stable")
  counts = np.bincount(image, minlength=batch_size)
  for img in np.flatnonzero(counts > max_boxes)[:1]:
    row = int(order[np.searchsorted(image[order], img) + max_boxes])
    raise _row_error(
        row, f"is box {max_boxes + 1} of image {img}, which has {counts[img]} boxes; max_boxes is {max_boxes}",
        arr[row].tolist(),
    )
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  slot = np.empty(n, dtype=np.int64)
  slot[order] = np.arange(n) - starts[image[order]]

  height, width = float(image_size[0]), float(image_size[1])
  # float32 throughout, scale first and then convert: the same rounding as the reference.
  xywh = arr[:, 2:6].astype(np.float32) * np.array([width, height, width, height], dtype=np.float32)
  half = xywh[:, 2:] / np.float32(2)
  xyxy = np.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], axis=1)

  out_labels = np.zeros((batch_size, max_boxes), np.int32)
  out_boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
  out_mask = np.zeros((batch_size, max_boxes), bool)
  out_labels[image, slot] = cls.astype(np.int32)
  out_boxes[image, slot] = xyxy
  out_mask[image, slot] = True
  return GroundTruth(out_labels, out_boxes, out_mask)
