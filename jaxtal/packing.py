"""Packing: YOLO label rows (host side, NumPy) into a fixed-size :class:`~jaxtal.GroundTruth`.

Every packer validates its rows and names the offending one in its error, so a broken label file
fails here, before any tracing; what reaches ``jit`` is ``(b, M)`` padded slots with a mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jaxtal import _validate
from jaxtal.labels import COORD_LIMIT, MIN_ROTATED_SIDE, GroundTruth

# Largest normalised centre or size a label row may hold. Ultralytics' rows are normalised to
# [0, 1] (its pipeline clips boxes to the image); a row slightly outside (a box partly off the
# image after another pipeline's augmentation) is data, and the loss ignores the part outside.
# Beyond twice the image, a row is pixel coordinates given as normalised ones: rejected.
NORMALISED_LIMIT = 2.0
_NORMALISE_HINT = "labels must be normalised to [0, 1] (divide pixel coordinates by the image width/height)"


def _on_host(caller: str, **arrays) -> None:
  """TypeError when an argument holds a traced JAX value: the packers are NumPy code run before the jitted step."""
  for name, x in arrays.items():
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x)):
      raise TypeError(
          f"{caller}: {name} is a traced JAX value ({caller} was called inside jax.jit, grad or vmap); packing"
          f" runs on the host with NumPy, before the jitted step: call {caller} outside jit and pass the"
          " GroundTruth it returns to the jitted step as an argument"
      )


def _row_error(caller: str, row: int, what: str, value) -> ValueError:
  return ValueError(f"{caller}: label row {row} {what} (row = {value})")


def _image_hw(image_size, caller: str) -> tuple[float, float]:
  """``(height, width)`` from an int (square input, as Ultralytics' ``imgsz``) or a pair."""
  if isinstance(image_size, (int, float, np.integer, np.floating)) and not isinstance(image_size, bool):
    image_size = (image_size, image_size)
  try:
    h, w = (float(v) for v in image_size)
  except (TypeError, ValueError):
    raise ValueError(
        f"{caller}: image_size must be the network input's (height, width) in pixels, or one int for a square"
        f" input; got {image_size!r}"
    ) from None
  if not (np.isfinite(h) and np.isfinite(w) and h > 0 and w > 0):
    raise ValueError(f"{caller}: image_size must be positive, got {image_size!r}")
  return h, w


def _label_rows(labels, batch_size: int, max_boxes: int, columns: int, caller: str, keep=None, num_classes=None):
  """Validates YOLO label rows; returns ``(rows (n, columns) array, image (n,) int64, slot (n,) int64)``.

  ``labels`` is one ``(n, columns)`` array ``[batch_idx, cls, ...]``, or a list of ``batch_size``
  per-image arrays ``(n_i, columns - 1)`` without the batch index. Rows keep their order within
  each image; the error for a bad row names it. ``keep``: optional ``rows (n, columns) -> (n,)
  bool`` of the validated rows that take a slot; the others get slot -1 and do not count
  towards ``max_boxes``. ``num_classes``: when given, a class id ``>= num_classes`` is an error.
  """
  batch_size = _validate_whole(caller, "batch_size", batch_size)
  max_boxes = _validate_whole(caller, "max_boxes", max_boxes)
  if isinstance(labels, (list, tuple)) and labels and any(np.ndim(x) == 2 for x in labels):
    labels = _per_image_rows(labels, batch_size, columns, caller)
  try:
    arr = np.asarray(labels)
  except ValueError:
    raise ValueError(
        f"{caller}: labels must be one (n, {columns}) array of rows [batch_idx, cls, ...], or a list of"
        f" batch_size per-image (n_i, {columns - 1}) arrays; got a {type(labels).__name__} of mixed shapes"
    ) from None
  if arr.size == 0:
    arr = arr.reshape(0, columns)
  if arr.ndim != 2 or arr.shape[1] != columns:
    raise ValueError(f"{caller}: labels must have shape (n, {columns}) = [batch_idx, cls, ...] per row, got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
    raise ValueError(f"{caller}: labels must be a real numeric array, got dtype {arr.dtype}")
  arr64 = arr.astype(np.float64)
  for r in np.flatnonzero(~np.isfinite(arr64).all(axis=1))[:1]:
    raise _row_error(caller, int(r), "has a non-finite value", arr[r].tolist())
  bidx, cls = arr64[:, 0], arr64[:, 1]
  for r in np.flatnonzero((bidx != np.round(bidx)) | (bidx < 0) | (bidx >= batch_size))[:1]:
    raise _row_error(
        caller, int(r), f"has batch index {arr[r, 0].item()!r}, expected a whole number in [0, {batch_size})",
        arr[r].tolist(),
    )
  for r in np.flatnonzero((cls != np.round(cls)) | (cls < 0))[:1]:
    raise _row_error(caller, int(r), f"has class {arr[r, 1].item()!r}, expected a whole number >= 0", arr[r].tolist())
  if num_classes is not None:
    nc = _validate_whole(caller, "num_classes", num_classes)
    for r in np.flatnonzero(cls >= nc)[:1]:
      raise _row_error(
          caller, int(r), f"has class {arr[r, 1].item()!r}, expected a class id in [0, num_classes = {nc})", arr[r].tolist()
      )
  image = bidx.astype(np.int64)
  kept = np.ones(arr.shape[0], bool) if keep is None else np.asarray(keep(arr64), bool)
  order = np.flatnonzero(kept)[np.argsort(image[kept], kind="stable")]
  counts = np.bincount(image[kept], minlength=batch_size)
  for img in np.flatnonzero(counts > max_boxes)[:1]:
    row = int(order[np.searchsorted(image[order], img) + max_boxes])
    raise _row_error(
        caller, row, f"is box {max_boxes + 1} of image {img}, which has {counts[img]} boxes; max_boxes is {max_boxes}",
        arr[row].tolist(),
    )
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  slot = np.full(arr.shape[0], -1, dtype=np.int64)
  slot[order] = np.arange(order.size) - starts[image[order]]
  return arr, image, slot


def _per_image_rows(labels, batch_size: int, columns: int, caller: str) -> np.ndarray:
  """The list form: one ``(n_i, columns - 1)`` array per image -> ``(n, columns)`` rows with the batch index.

  An entry of size 0 of any shape (``np.zeros(0)``, ``[]``) is an image without labels.
  """
  width = columns - 1
  entries = [np.asarray(x) for x in labels]
  entries = [x.reshape(0, width) if x.size == 0 else x for x in entries]
  bad = [i for i, x in enumerate(entries) if x.ndim != 2 or x.shape[1] != width]
  if bad or len(entries) != batch_size:
    widths = sorted({x.shape[1] for x in entries if x.ndim == 2})
    which = ""
    if bad:
      i = bad[0]
      which = (
          f"; labels[{i}] has shape {np.shape(labels[i])} (an image without labels is np.zeros((0, {width})),"
          f" one row is a (1, {width}) array)"
      )
    raise ValueError(
        f"{caller}: a list of labels must hold one (n_i, {width}) array per image (batch_size ="
        f" {batch_size}), without the batch index; got {len(entries)} arrays of widths {widths}{which}"
    )
  return np.concatenate([np.c_[np.full((len(x), 1), i), x.astype(np.float64)] for i, x in enumerate(entries)])


def _validate_whole(caller: str, name: str, x) -> int:
  return _validate.whole(name, x, low=1, caller=caller)


def _not_normalised(arr: np.ndarray) -> np.ndarray:
  """``(n,)`` bool: rows whose ``cx, cy, w`` or ``h`` (columns 2-5) exceeds :data:`NORMALISED_LIMIT`."""
  return (arr[:, 2:6].astype(np.float64) > NORMALISED_LIMIT).any(axis=1)


def _check_coordinates(caller: str, arr: np.ndarray, pixels: np.ndarray) -> None:
  """Rejects rows whose pixel coordinates exceed :data:`COORD_LIMIT` (they would overflow squares),
  then rows that hold pixel coordinates instead of normalised ones (:data:`NORMALISED_LIMIT`)."""
  for r in np.flatnonzero(~(np.abs(pixels.astype(np.float64)) <= COORD_LIMIT).all(axis=1))[:1]:
    hint = f"; {_NORMALISE_HINT}" if _not_normalised(arr[r : r + 1])[0] else ""
    raise _row_error(
        caller, int(r), f"has a box coordinate beyond {COORD_LIMIT:g} pixels once scaled to the input{hint}",
        arr[r].tolist(),
    )
  for r in np.flatnonzero(_not_normalised(arr))[:1]:
    raise _row_error(
        caller, int(r), f"has a centre or size above {NORMALISED_LIMIT:g} (pixel coordinates?): {_NORMALISE_HINT}",
        arr[r].tolist(),
    )


def pack_labels(
    labels,
    batch_size: int,
    max_boxes: int,
    image_size: int | Sequence[int],
    *,
    keypoints=None,
    num_classes: int | None = None,
) -> GroundTruth:
  """Packs YOLO label rows into a fixed-size :class:`GroundTruth` (host side, NumPy).

  Call it outside ``jit``, once per batch, and pass the result to the jitted step **as an
  argument**: ``step(params, feats, gt)``, not a step that reads a ``gt`` from the enclosing scope.
  A captured ``gt`` is baked into the compiled step as a constant, so reassigning the Python
  variable afterwards does not change what the compiled step computes (it keeps training on the
  first batch, silently); as an argument, one compilation serves every batch of the same shapes.

  Args:
    labels: ``(n, 6)`` rows ``[batch_idx, cls, cx, cy, w, h]``, the box **normalised** to
      ``[0, 1]`` (Ultralytics' label files and data pipeline), in any row order; or a list of
      ``batch_size`` per-image ``(n_i, 5)`` arrays without the batch index, where an image without
      labels is ``np.zeros((0, 5))`` (any size-0 entry, ``np.zeros(0)`` or ``[]``, is accepted as
      one). ``n = 0`` is valid and gives an all-padding result. A centre or size up to
      :data:`NORMALISED_LIMIT` ``= 2`` is accepted (a box partly off the image; the loss ignores
      the part outside, and a box with no overlap is treated as padding); a larger one is taken
      for pixel coordinates and rejected: divide pixel coordinates by the image width / height.
    batch_size: ``b``, number of images.
    max_boxes: ``M``, static number of box slots per image.
    image_size: ``(height, width)`` of the network input in pixels, or one int for a square input.
    keypoints: optional keypoints of the rows (pose), ``(n, K, D)`` in the rows' order with ``x, y``
      normalised to ``[0, 1]`` and ``D = 3`` ``(x, y, visibility)`` or ``D = 2`` (every keypoint
      visible, as Ultralytics treats it); a list of per-image ``(n_i, K, D)`` arrays when
      ``labels`` is a list. Visibility 1 and 2 both mean labelled, 0 unlabelled. A keypoint
      outside ``[0, 1]`` is marked unlabelled (visibility 0) and its coordinates clipped into the
      image, as Ultralytics' data pipeline does.
    num_classes: optional ``nc``: when given, a row whose class id is ``>= num_classes`` is an
      error (without it such a row is packed, and the loss treats it as padding).

  Returns:
    A :class:`GroundTruth` of NumPy arrays (``labels (b, M) int32``, ``boxes (b, M, 4) float32``
    xyxy pixels, ``mask (b, M) bool``; with ``keypoints``, ``keypoints (b, M, K, 3) float32`` in
    input pixels with the visibility last, always ``D = 3``). Rows keep their order within each
    image; padding rows are 0 throughout.

  Raises:
    ValueError: naming the offending row for a batch index outside ``[0, batch_size)`` or not whole,
      a negative or non-whole class (or one ``>= num_classes``), a non-finite value, a coordinate
      beyond ``COORD_LIMIT`` pixels, a centre or size above ``NORMALISED_LIMIT`` (pixel
      coordinates), or more than ``max_boxes`` rows for one image; naming the argument (and the
      list entry) for a wrong shape or size; for ``keypoints``, a count or shape that does not
      match the rows, or a non-finite value.
    TypeError: when called inside ``jit`` (an argument is a tracer): packing runs on the host.
  """
  caller = "pack_labels"
  _on_host(caller, labels=labels, keypoints=keypoints)
  height, width = _image_hw(image_size, caller)
  arr, image, slot = _label_rows(labels, batch_size, max_boxes, 6, caller, num_classes=num_classes)
  kpts = None if keypoints is None else _keypoint_rows(keypoints, labels, arr.shape[0], caller)
  # float32 throughout, scale first and then convert: the same rounding as the reference. A huge
  # value overflows to inf here, which the coordinate check below names (no NumPy warning first).
  with np.errstate(over="ignore", invalid="ignore"):
    xywh = arr[:, 2:6].astype(np.float32) * np.array([width, height, width, height], dtype=np.float32)
    half = xywh[:, 2:] / np.float32(2)
    xyxy = np.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], axis=1)
  _check_coordinates(caller, arr, xyxy)

  out_labels = np.zeros((batch_size, max_boxes), np.int32)
  out_boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
  out_mask = np.zeros((batch_size, max_boxes), bool)
  out_labels[image, slot] = arr[:, 1].astype(np.int32)
  out_boxes[image, slot] = xyxy
  out_mask[image, slot] = True
  if kpts is None:
    return GroundTruth(out_labels, out_boxes, out_mask)
  out_kpts = np.zeros((batch_size, max_boxes, kpts.shape[1], 3), np.float32)
  out_kpts[image, slot] = _keypoint_pixels(kpts, height, width)
  return GroundTruth(out_labels, out_boxes, out_mask, keypoints=out_kpts)


def _keypoint_rows(keypoints, labels, n: int, caller: str) -> np.ndarray:
  """``(n, K, D)`` float64 keypoints in the rows' order (a per-image list concatenated), validated."""
  if isinstance(keypoints, (list, tuple)) and isinstance(labels, (list, tuple)):
    if len(keypoints) != len(labels):
      raise ValueError(f"{caller}: keypoints must be a list of one (n_i, K, D) array per image, like labels; got {len(keypoints)} for {len(labels)} images")
    for i, (k, l) in enumerate(zip(keypoints, labels)):
      if np.shape(k)[:1] != np.shape(l)[:1]:
        raise ValueError(f"{caller}: keypoints[{i}] has {np.shape(k)[:1]} rows but labels[{i}] has {np.shape(l)[:1]}")
    parts = [np.asarray(k, np.float64) for k in keypoints]
    # An image without labels may give its keypoints as any size-0 array (np.zeros(0)), as its labels.
    keypoints = np.concatenate([k for k in parts if k.ndim == 3 or k.size] or parts)
  kpts = np.asarray(keypoints)
  if kpts.ndim != 3 or kpts.shape[2] not in (2, 3) or kpts.shape[0] != n:
    raise ValueError(
        f"{caller}: keypoints must be (n, K, D) with one row per label row (n = {n}) and D = 2 (x, y) or 3 (x, y,"
        f" visibility), normalised to [0, 1]; got shape {kpts.shape}"
    )
  if not np.issubdtype(kpts.dtype, np.number) or np.issubdtype(kpts.dtype, np.complexfloating):
    raise ValueError(f"{caller}: keypoints must be a real numeric array, got dtype {kpts.dtype}")
  kpts = kpts.astype(np.float64)
  for r in np.flatnonzero(~np.isfinite(kpts).reshape(n, kpts.shape[1] * kpts.shape[2]).all(axis=1))[:1]:
    raise ValueError(f"{caller}: keypoints of label row {r} have a non-finite value ({kpts[r].tolist()})")
  return kpts


def _keypoint_pixels(kpts: np.ndarray, height: float, width: float) -> np.ndarray:
  """``(n, K, D)`` normalised keypoints -> ``(n, K, 3)`` float32 pixels; outside ``[0, 1]`` -> visibility 0, clipped."""
  xy = kpts[..., :2]
  vis = kpts[..., 2] if kpts.shape[-1] == 3 else np.ones(kpts.shape[:-1])
  inside = ((xy >= 0) & (xy <= 1)).all(axis=-1)
  vis = np.where(inside, vis, 0.0)
  px = np.clip(xy, 0.0, 1.0).astype(np.float32) * np.array([width, height], np.float32)
  return np.concatenate([px, vis[..., None].astype(np.float32)], axis=-1)


def pack_masks(instance_masks, batch_idx, batch_size: int, max_boxes: int) -> np.ndarray:
  """Draws per-instance binary masks into per-image index maps (host side, NumPy): ``GroundTruth.masks``.

  Pixel value ``j + 1`` of image ``i`` marks GT slot ``j`` of that image and 0 is background: the
  form Ultralytics' segmentation pipeline makes with ``overlap_mask=True`` (its default). Slots
  follow the row order within each image, as :func:`pack_labels` gives them, so the masks must be
  in **the same row order as the boxes given to** :func:`pack_labels`. Where instances overlap,
  later rows are drawn over earlier ones. Ultralytics' pipeline sorts each image's rows
  largest-area first before drawing (so smaller objects win overlaps) and reorders the boxes the
  same way; do the same if you want its targets. For instances that must keep overlapping
  pixels, put per-slot binary masks ``(b, M, mh, mw)`` in ``GroundTruth.masks`` instead.

  Args:
    instance_masks: ``(n, mh, mw)`` binary masks (bool, or numbers 0 and 1), one per label row.
    batch_idx: ``(n,)`` (or ``(n, 1)``) image index of each row, whole numbers in ``[0, batch_size)``.
    batch_size: ``b``.
    max_boxes: ``M``, the slots per image (as given to :func:`pack_labels`).

  Returns:
    ``(b, mh, mw)`` int32 index map.

  Raises:
    ValueError: naming the argument for a wrong shape, a mask value other than 0/1, a bad image
      index, or more than ``max_boxes`` rows for one image.
    TypeError: when called inside ``jit`` (an argument is a tracer): packing runs on the host.
  """
  caller = "pack_masks"
  _on_host(caller, instance_masks=instance_masks, batch_idx=batch_idx)
  masks = np.asarray(instance_masks)
  if masks.ndim != 3:
    raise ValueError(f"{caller}: instance_masks must be (n, mh, mw) binary masks, one per label row; got shape {masks.shape}")
  n = masks.shape[0]
  bidx = np.asarray(batch_idx).reshape(-1)
  if bidx.shape != (n,):
    raise ValueError(f"{caller}: batch_idx must be (n,) = ({n},), one image index per mask; got shape {np.shape(batch_idx)}")
  if masks.dtype != bool:
    if not np.issubdtype(masks.dtype, np.number) or not np.isin(masks, (0, 1)).all():
      raise ValueError(f"{caller}: instance_masks must be binary (bool, or 0 and 1 only); got dtype {masks.dtype} with other values")
  rows = np.c_[bidx.astype(np.float64), np.zeros(n)] if n else np.zeros((0, 2))
  _, image, slot = _label_rows(rows, batch_size, max_boxes, 2, caller)
  out = np.zeros((_validate_whole(caller, "batch_size", batch_size), *masks.shape[1:]), np.int32)
  for r in range(n):  # host-side packing, in row order: later rows are drawn over earlier ones
    out[image[r]][masks[r].astype(bool)] = slot[r] + 1
  return out


def _rotated_pixels(rows: np.ndarray, height: float, width: float) -> np.ndarray:
  """``(n, 5)`` float32 xywhr pixel boxes of ``(n, 7)`` rows (scale in float32, as the reference)."""
  xywh = rows[:, 2:6].astype(np.float32) * np.array([width, height, width, height], dtype=np.float32)
  return np.concatenate([xywh, rows[:, 6:7].astype(np.float32)], axis=1)


def pack_rotated_labels(
    labels,
    batch_size: int,
    max_boxes: int,
    image_size: int | Sequence[int],
    *,
    num_classes: int | None = None,
) -> GroundTruth:
  """Packs YOLO OBB label rows into a fixed-size :class:`GroundTruth` of xywhr boxes (host side, NumPy).

  Args:
    labels: ``(n, 7)`` rows ``[batch_idx, cls, cx, cy, w, h, angle]``, the box normalised to
      ``[0, 1]`` and the angle in radians (the rows Ultralytics' OBB datasets produce), in any
      row order; or a list of ``batch_size`` per-image ``(n_i, 6)`` arrays without the batch
      index (an image without labels is ``np.zeros((0, 6))``; any size-0 entry is accepted as
      one). ``n = 0`` is valid and gives an all-padding result. As in :func:`pack_labels`, a
      centre or size above :data:`NORMALISED_LIMIT` ``= 2`` is taken for pixel coordinates and
      rejected.
    batch_size: ``b``, number of images.
    max_boxes: ``M``, static number of box slots per image.
    image_size: ``(height, width)`` of the network input in pixels, or one int for a square input.
    num_classes: optional ``nc``: when given, a row whose class id is ``>= num_classes`` is an error.

  Returns:
    A :class:`GroundTruth` of NumPy arrays: ``labels (b, M) int32``, ``boxes (b, M, 5) float32``
    ``(cx, cy, w, h, angle)`` with centre and sides in input pixels, ``mask (b, M) bool``. A row
    whose width or height is under 2 pixels of the input (exactly 2 is kept) is dropped and
    takes no slot, as Ultralytics' OBB loss drops it (:func:`jaxtal.obb_loss` also masks such
    rows of a GroundTruth built another way). Rows keep their order within each image.

  Raises:
    ValueError: as :func:`pack_labels` (bad batch index or class, non-finite value, a centre,
      size or angle beyond ``COORD_LIMIT`` once scaled, a centre or size above
      ``NORMALISED_LIMIT``, more than ``max_boxes`` kept rows in one image, wrong shape).
    TypeError: when called inside ``jit`` (an argument is a tracer): packing runs on the host.
  """
  caller = "pack_rotated_labels"
  _on_host(caller, labels=labels)
  height, width = _image_hw(image_size, caller)

  def keep(rows):
    with np.errstate(over="ignore", invalid="ignore"):
      wh = _rotated_pixels(rows, height, width)[:, 2:4]
    return (wh >= MIN_ROTATED_SIDE).all(axis=1)

  arr, image, slot = _label_rows(labels, batch_size, max_boxes, 7, caller, keep=keep, num_classes=num_classes)
  with np.errstate(over="ignore", invalid="ignore"):
    xywhr = _rotated_pixels(arr, height, width)
  _check_coordinates(caller, arr, xywhr)

  kept = slot >= 0
  out_labels = np.zeros((batch_size, max_boxes), np.int32)
  out_boxes = np.zeros((batch_size, max_boxes, 5), np.float32)
  out_mask = np.zeros((batch_size, max_boxes), bool)
  out_labels[image[kept], slot[kept]] = arr[kept, 1].astype(np.int32)
  out_boxes[image[kept], slot[kept]] = xywhr[kept]
  out_mask[image[kept], slot[kept]] = True
  return GroundTruth(out_labels, out_boxes, out_mask)
