"""Trace-time validation, in one place: structure, shapes, dtypes and configuration.

Values inside ``jit`` are never read here (see :mod:`jaxtal.checks` for that). Every error
names the argument, says what was expected and shows what was received.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp  # issubdtype knows bfloat16 (NumPy's does not)
import numpy as np

from jaxtal.labels import GroundTruth
from jaxtal.targets import ForegroundEntries, Targets


def whole(name: str, x, *, low: int | None = None, caller: str | None = None) -> int:
  """``x`` as an int if it is a whole number ``>= low`` (bools rejected), else ValueError."""
  prefix = f"{caller}: " if caller else ""
  try:
    ok = isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool) and float(x) == int(x)
  except (TypeError, ValueError, OverflowError):
    ok = False
  if not ok or (low is not None and int(x) < low):
    bound = "" if low is None else f" >= {low}"
    raise ValueError(f"{prefix}{name} must be a whole number{bound}, got {x!r}")
  return int(x)


def finite_number(name: str, x, *, low: float | None = None) -> float:
  """``x`` as a float if finite (and ``>= low``), else ValueError."""
  v = float(x) if isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool) else math.nan
  if not math.isfinite(v) or (low is not None and v < low):
    bound = "" if low is None else f" >= {low:g}"
    raise ValueError(f"{name} must be a finite number{bound}, got {x!r}")
  return v


def one_of(name: str, x, allowed: Sequence[str]) -> str:
  if x not in allowed:
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {x!r}")
  return x


def strides(values) -> tuple[float, ...]:
  """One finite positive stride per level, as a hashable tuple (whole strides become ints)."""
  if isinstance(values, (int, float, np.number)) or not isinstance(values, Sequence | np.ndarray):
    raise ValueError(f"strides must be a sequence with one stride per feature level, e.g. (8, 16, 32); got {values!r}")
  out = []
  for i, s in enumerate(values):
    v = finite_number(f"strides[{i}]", s)
    if v <= 0:
      raise ValueError(f"strides[{i}] must be a finite positive number, got {s!r}")
    out.append(int(v) if v.is_integer() else v)
  if not out:
    raise ValueError("strides is empty; expected one stride per feature level, e.g. (8, 16, 32)")
  return tuple(out)


def grid(value, num_anchors: int, caller: str) -> tuple[tuple[int, int, float], ...] | None:
  """An anchor grid ``((H_l, W_l, stride_l), ...)`` whose cells number ``A``, normalised; None passes."""
  if value is None:
    return None
  try:
    levels = tuple((whole("H", h, low=1), whole("W", w, low=1), float(s)) for h, w, s in value)
  except (TypeError, ValueError):
    levels = None
  if not levels or not all(math.isfinite(s) and s > 0 for _, _, s in levels):
    raise ValueError(
        f"{caller}: grid must be one (H, W, stride) per level (whole H, W >= 1, a positive finite stride), got {value!r}"
    )
  cells = sum(h * w for h, w, _ in levels)
  if cells != num_anchors:
    raise ValueError(
        f"{caller}: grid {levels} has {cells} cells but there are A = {num_anchors} anchors; pass the levels' (H, W, stride)"
        " of the make_anchors call that made anchor_points, in the same order"
    )
  return levels


def topk_in_range(topk: int, topk2: int | None, num_anchors: int, caller: str) -> None:
  """``topk`` (and ``topk2`` unless None) at most ``A``; the config checked they are whole and >= 1."""
  for name, k in (("topk", topk), ("topk2", topk2)):
    if k is not None and k > num_anchors:
      raise ValueError(f"{caller}: {name} must be a whole number in [1, A = {num_anchors}] (A = number of anchors), got {k!r}")


def float_array(caller: str, name: str, x, rank: int) -> None:
  if getattr(x, "ndim", None) != rank:
    raise ValueError(f"{caller}: {name} must have rank {rank}, got shape {getattr(x, 'shape', None)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{caller}: {name} must be a float array, got dtype {x.dtype}")


def maps(values, layout: str, name: str, caller: str, channels: int | None = None) -> tuple[int, tuple[tuple[int, int], ...]]:
  """A non-empty list of rank-4 float maps, one per level, of one batch size (and ``channels`` per
  cell when given); returns ``(b, ((H_l, W_l), ...))``."""
  if isinstance(values, jax.Array | np.ndarray) or not isinstance(values, Sequence) or len(values) == 0:
    raise TypeError(f"{caller}: {name} must be a non-empty list of per-level maps, one array per level")
  batch, shapes = None, []
  for i, f in enumerate(values):
    shape = getattr(f, "shape", None)
    if shape is None or len(shape) != 4:
      raise ValueError(f"{caller}: {name}[{i}] must be a rank-4 {layout} array, got shape {shape}")
    if not jnp.issubdtype(f.dtype, jnp.floating):
      raise TypeError(f"{caller}: {name}[{i}] must be a float array, got dtype {f.dtype}")
    b, c, h, w = (shape[0], shape[3], shape[1], shape[2]) if layout == "NHWC" else shape
    if channels is not None and c != channels:
      where = "last" if layout == "NHWC" else "second"
      raise ValueError(f"{caller}: {name}[{i}] has {c} channels in its {where} axis ({layout}), expected {channels} (shape {tuple(shape)})")
    if batch is None:
      batch = b
    elif b != batch:
      raise ValueError(f"{caller}: {name}[{i}] has batch size {b} but {name}[0] has {batch}")
    shapes.append((int(h), int(w)))
  return int(batch), tuple(shapes)


def head(feats, num_classes: int, reg_max: int, layout: str, caller: str) -> tuple[int, tuple[tuple[int, int], ...]]:
  """Per-level head maps of ``4 * reg_max + num_classes`` channels; returns ``(b, ((H, W), ...))``."""
  if isinstance(feats, jax.Array | np.ndarray) or not isinstance(feats, Sequence) or len(feats) == 0:
    raise TypeError(f"{caller}: feats must be a non-empty list of per-level head maps, one array per level")
  for i, f in enumerate(feats):  # a clearer message than maps' for logits of the wrong dtype
    if getattr(f, "dtype", None) is not None and getattr(f, "ndim", 0) == 4 and not jnp.issubdtype(f.dtype, jnp.floating):
      raise TypeError(f"{caller}: feats[{i}] must be a float array (logits), got dtype {f.dtype}")
  batch, shapes = maps(feats, layout, "feats", caller)
  channels = 4 * reg_max + num_classes
  for i, f in enumerate(feats):
    shape = f.shape
    c = shape[3] if layout == "NHWC" else shape[1]
    if c != channels:
      where = "last" if layout == "NHWC" else "second"
      formula = f"4 * reg_max + num_classes = 4 * {reg_max} + {num_classes}"
      hint = ""
      other = shape[1] if layout == "NHWC" else shape[3]
      if other == channels:
        hint = f"; axis {'1' if layout == 'NHWC' else '3'} has exactly {channels}: pass layout={'NCHW' if layout == 'NHWC' else 'NHWC'!r}"
      elif c > num_classes and (c - num_classes) % 4 == 0:
        r = (c - num_classes) // 4
        yolo26 = " (YOLO26's head: direct ltrb regression, no DFL bins)" if r == 1 else ""
        hint = f"; {c} = 4 * {r} + {num_classes}: did you mean reg_max={r}{yolo26}?"
      raise ValueError(
          f"{caller}: feats[{i}] has {c} channels in its {where} axis ({layout}); expected {formula} = {channels}"
          f" (shape {tuple(shape)}){hint}"
      )
  return batch, shapes


def level_maps(maps, shapes, batch: int, channels: int, layout: str, name: str, caller: str) -> None:
  """Per-level maps that ride beside the head maps (OBB angles, pose keypoints): a list with one float
  map per level, ``(b, H_l, W_l, channels)`` for NHWC or ``(b, channels, H_l, W_l)`` for NCHW."""
  if isinstance(maps, jax.Array | np.ndarray) or not isinstance(maps, Sequence) or len(maps) != len(shapes):
    length = f" of length {len(maps)}" if isinstance(maps, Sequence) else ""
    raise TypeError(
        f"{caller}: {name} must be a list of per-level maps, one per level of feats ({len(shapes)}), got"
        f" {type(maps).__name__}{length}"
    )
  for i, (x, (h, w)) in enumerate(zip(maps, shapes)):
    want = (batch, h, w, channels) if layout == "NHWC" else (batch, channels, h, w)
    if tuple(getattr(x, "shape", ())) != want:
      raise ValueError(
          f"{caller}: {name}[{i}] must be {want} ({layout}: {channels} per cell of feats[{i}]), got shape"
          f" {getattr(x, 'shape', None)}"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{caller}: {name}[{i}] must be a float array, got dtype {x.dtype}")


def strides_match(shapes: Sequence[tuple[int, int]], strides_: Sequence[float], caller: str) -> tuple[float, float]:
  """One stride per level, every level mapping to the same input size; returns that ``(H, W)``."""
  if len(strides_) != len(shapes):
    raise ValueError(
        f"{caller}: got {len(strides_)} strides for {len(shapes)} feature levels; expected one stride per level"
    )
  h0, w0 = shapes[0][0] * strides_[0], shapes[0][1] * strides_[0]
  for i, ((h, w), s) in enumerate(zip(shapes, strides_)):
    if (h * s, w * s) != (h0, w0):
      raise ValueError(
          f"{caller}: strides do not match the feature maps: level {i} is {h}x{w} with stride {s}, i.e. an input of"
          f" {h * s}x{w * s} pixels, but level 0 ({shapes[0][0]}x{shapes[0][1]}, stride {strides_[0]}) implies"
          f" {h0}x{w0}"
      )
  return h0, w0


def ground_truth(gt, batch: int | None, caller: str, box_dim: int = 4) -> int:
  """A :class:`~jaxtal.GroundTruth` of ``labels (b, M)`` int, ``boxes (b, M, D)`` float, ``mask (b, M)``; returns ``M``."""
  if not isinstance(gt, GroundTruth):
    raise TypeError(f"{caller}: gt must be a jaxtal.GroundTruth(labels, boxes, mask), got {type(gt).__name__}")
  labels, boxes, mask = (getattr(x, "shape", None) for x in (gt.labels, gt.boxes, gt.mask))
  if labels is None or len(labels) != 2:
    raise ValueError(f"{caller}: gt.labels must be (b, M) class ids, got shape {labels}")
  b, m = labels
  if batch is not None and b != batch:
    raise ValueError(
        f"{caller}: gt has batch size {b} (gt.labels {tuple(labels)}) but the predictions have {batch};"
        f" gt.labels must be (b, M) with b = {batch}"
    )
  kind = "xyxy pixels" if box_dim == 4 else "xywhr pixels"
  if boxes is None or tuple(boxes) != (b, m, box_dim):
    raise ValueError(f"{caller}: gt.boxes must be (b, M, {box_dim}) = ({b}, {m}, {box_dim}) {kind}, got shape {boxes}")
  if mask is None or tuple(mask) != (b, m):
    raise ValueError(f"{caller}: gt.mask must be (b, M) = ({b}, {m}), got shape {mask}")
  if not np.issubdtype(gt.labels.dtype, np.integer):
    raise TypeError(f"{caller}: gt.labels must be integer class ids, got dtype {gt.labels.dtype}")
  if not jnp.issubdtype(gt.boxes.dtype, jnp.floating):
    raise TypeError(f"{caller}: gt.boxes must be a float array of {kind}, got dtype {gt.boxes.dtype}")
  if not (gt.mask.dtype == bool or np.issubdtype(gt.mask.dtype, np.integer)):
    raise TypeError(f"{caller}: gt.mask must be bool (True on real rows), got dtype {gt.mask.dtype}")
  return int(m)


def _gt_field_shape(gt, field: str, caller: str, needs: str) -> tuple[int, ...]:
  """The shape of the optional ``gt.<field>``; a clear error (``needs``: what the task needs there) when it is None."""
  value = getattr(gt, field)
  if value is None:
    raise ValueError(f"{caller}: gt.{field} is None; {needs}")
  return tuple(getattr(value, "shape", ()))


def gt_keypoints(gt, num_keypoints: int, caller: str) -> int:
  """``gt.keypoints`` present as ``(b, M, K, D)`` float with ``K = num_keypoints`` and ``D`` 2 or 3; returns ``D``."""
  b, m = gt.labels.shape
  shape = _gt_field_shape(
      gt, "keypoints", caller, "pose needs (b, M, K, D) keypoints in pixels: pack them with"
      " jaxtal.pack_labels(..., keypoints=...)"
  )
  if len(shape) != 4 or shape[:3] != (b, m, num_keypoints) or shape[3] not in (2, 3):
    raise ValueError(
        f"{caller}: gt.keypoints must be (b, M, K, D) = ({b}, {m}, {num_keypoints}, 2 or 3) pixels (K from kpt_shape),"
        f" got shape {shape}"
    )
  if not jnp.issubdtype(gt.keypoints.dtype, jnp.floating):
    raise TypeError(f"{caller}: gt.keypoints must be a float array of pixels, got dtype {gt.keypoints.dtype}")
  return shape[3]


def gt_masks(gt, caller: str) -> tuple[bool, tuple[int, int]]:
  """``gt.masks`` present as an index map ``(b, mh, mw)`` int or per-slot masks ``(b, M, mh, mw)``;
  returns ``(is_index_map, (mh, mw))``."""
  b, m = gt.labels.shape
  shape = _gt_field_shape(
      gt, "masks", caller, "segmentation needs an index map (b, mh, mw) from jaxtal.pack_masks or"
      " per-slot binary masks (b, M, mh, mw) in GroundTruth.masks"
  )
  dtype = gt.masks.dtype
  if len(shape) == 3 and shape[0] == b and jnp.issubdtype(dtype, jnp.integer) and dtype != bool:
    return True, shape[1:]
  if len(shape) == 4 and shape[:2] == (b, m) and (dtype == bool or jnp.issubdtype(dtype, jnp.number)):
    return False, shape[2:]
  raise ValueError(
      f"{caller}: gt.masks must be an integer index map (b, mh, mw) = ({b}, mh, mw) (value j + 1 marks slot j, see"
      f" jaxtal.pack_masks) or per-slot binary masks (b, M, mh, mw) = ({b}, {m}, mh, mw), bool or 0/1 numbers;"
      f" got shape {shape} dtype {dtype}"
  )


def gt_class_map(gt, caller: str) -> None:
  """``gt.class_map``, when given, an integer ``(b, h, w)`` map (any resolution)."""
  if gt.class_map is None:
    return
  b = gt.labels.shape[0]
  shape, dtype = tuple(getattr(gt.class_map, "shape", ())), getattr(gt.class_map, "dtype", None)
  if len(shape) != 3 or shape[0] != b or dtype is None or dtype == bool or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(
        f"{caller}: gt.class_map must be an integer (b, h, w) = ({b}, h, w) map of each pixel's class (-1 where no"
        f" instance covers it); got shape {shape} dtype {dtype}"
    )


def class_weights(weights, num_classes: int, caller: str) -> None:
  if weights is not None and np.shape(weights) != (num_classes,):
    raise ValueError(f"{caller}: class_weights must have shape (nc,) = ({num_classes},), got {np.shape(weights)}")


def assigner_inputs(pred_scores, pred_boxes, anchor_points, gt, box_dim: int, caller: str) -> tuple[int, int, int]:
  """``pred_scores (b, A, nc)``, ``pred_boxes (b, A, D)``, ``anchor_points (A, 2)`` and ``gt``; returns ``(b, A, nc)``."""
  for name, x, rank in (("pred_scores", pred_scores, 3), ("pred_boxes", pred_boxes, 3), ("anchor_points", anchor_points, 2)):
    float_array(caller, name, x, rank)
  b, a, nc = pred_scores.shape
  if pred_boxes.shape != (b, a, box_dim):
    raise ValueError(
        f"{caller}: pred_boxes must be (b, A, {box_dim}) = ({b}, {a}, {box_dim}) to match pred_scores"
        f" {pred_scores.shape}, got {pred_boxes.shape}"
    )
  if anchor_points.shape != (a, 2):
    raise ValueError(f"{caller}: anchor_points must be (A, 2) = ({a}, 2), got {anchor_points.shape}")
  ground_truth(gt, b, caller, box_dim)
  return b, a, nc


def targets(t, batch: int, caller: str, box_dim: int = 4) -> None:
  """A :class:`~jaxtal.Targets` whose arrays agree on ``(b, A)``, ``(b, A, D)`` and ``(b, E)``."""
  if not isinstance(t, Targets) or not isinstance(t.entries, ForegroundEntries):
    raise TypeError(
        f"{caller}: targets must be a jaxtal.Targets (from a jaxtal <task>_targets or jaxtal.targets_from_assignment),"
        f" got {type(t).__name__}"
    )
  shape = getattr(t.labels, "shape", None)
  if shape is None or len(shape) != 2 or shape[0] != batch:
    raise ValueError(f"{caller}: targets.labels must be (b, A) with b = {batch}, got shape {shape}")
  for name in ("weights", "fg_mask", "gt_index"):
    if tuple(getattr(t, name).shape) != tuple(shape):
      raise ValueError(f"{caller}: targets.{name} must be (b, A) = {tuple(shape)}, got {getattr(t, name).shape}")
  if tuple(getattr(t.boxes, "shape", ())) != (*shape, box_dim):
    raise ValueError(f"{caller}: targets.boxes must be (b, A, {box_dim}) = {(*shape, box_dim)} pixels, got {getattr(t.boxes, 'shape', None)}")
  e = t.entries.anchor.shape
  for name in ("gt", "valid"):
    if tuple(getattr(t.entries, name).shape) != tuple(e):
      raise ValueError(f"{caller}: targets.entries.{name} must be (b, E) = {tuple(e)}, got {getattr(t.entries, name).shape}")
  if len(e) != 2 or e[0] != batch:
    raise ValueError(f"{caller}: targets.entries.anchor must be (b, E) with b = {batch}, got shape {e}")


def kpt_shape(value) -> tuple[int, int]:
  try:
    k, d = value
  except (TypeError, ValueError):
    raise ValueError(
        f"kpt_shape must be (K, D): K keypoints of D = 2 (x, y) or 3 (x, y, visibility) values, got {value!r}"
    ) from None
  k = whole("kpt_shape[0] (K, the number of keypoints)", k, low=1)
  d = whole("kpt_shape[1] (D)", d)
  if d not in (2, 3):
    raise ValueError(f"kpt_shape[1] (D) must be 2 (x, y) or 3 (x, y, visibility logit), got {value!r}")
  return k, d


def per_keypoint(name: str, value, kpt_shape: tuple[int, int], default: tuple[float, ...], *, positive: bool = True) -> tuple[float, ...]:
  """``K`` finite numbers, one per keypoint (positive, or non-negative with ``positive=False``), or
  ``default`` for None; returned as a tuple of floats."""
  k = kpt_shape[0]
  kind = "positive" if positive else "non-negative"
  if value is None:
    return default
  flat = np.asarray(value, dtype=object).reshape(-1) if not isinstance(value, (str, bytes)) else None
  if flat is None or np.ndim(value) == 0 or flat.size != k:
    raise ValueError(
        f"{name} must be {k} {kind} finite numbers, one per keypoint (K = {k} from kpt_shape), or None; got {value!r}"
        f" (after changing kpt_shape, give {name} again or None)"
    )
  out = []
  for i, s in enumerate(flat):
    v = finite_number(f"{name}[{i}]", s)
    if v < 0 or (positive and v == 0):
      raise ValueError(f"{name}[{i}] must be a {kind} finite number, got {s!r}")
    out.append(v)
  return tuple(out)


def sigmas(value, kpt_shape: tuple[int, int], default: tuple[float, ...]) -> tuple[float, ...]:
  return per_keypoint("sigmas", value, kpt_shape, default)


def level_range(value) -> tuple[float, float]:
  """``(lo, hi)`` with ``0 <= lo <= hi`` (``hi`` may be inf): a pyramid level's GT size range in strides."""
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    lo = hi = float("nan")
  if not (0 <= lo <= hi and lo < float("inf")):
    raise ValueError(
        f"level_range must be (lo, hi) with 0 <= lo <= hi, a GT size range per pyramid level in strides (hi may be"
        f" inf; (0, inf) turns the level gate off), got {value!r}"
    )
  return lo, hi
