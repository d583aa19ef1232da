"""Optional value checks inside ``jit``, built on ``jax.experimental.checkify``.

Shapes, dtypes and configuration are always checked when a function is traced. Values
cannot be: inside ``jit`` they are unknown until the step runs. By default jaxtal treats
bad values as *data*: a ground-truth row that is padding, has a non-finite, inverted or
zero-area box, a class outside ``[0, nc)`` or (in the loss) no overlap with the image
never owns an anchor, and non-finite predictions never become targets. That keeps a long
training run alive, but it can also hide a broken label file.

The functions here turn those values into errors instead: :func:`check_values`, and every
task's ``checked_<task>_loss`` (:func:`~jaxtal.checked_detection_loss`,
:func:`~jaxtal.checked_obb_loss`, :func:`~jaxtal.checked_pose_loss`,
:func:`~jaxtal.checked_segment_loss`), which run it before the loss. They call
``checkify.check``, so run them under ``checkify.checkify`` (``jit`` inside or outside)::

  from jax.experimental import checkify

  loss_fn = functools.partial(
      jaxtal.checked_detection_loss, num_classes=80, strides=(8, 16, 32))
  err, (total, parts) = jax.jit(checkify.checkify(loss_fn))(feats, gt)
  err.throw()  # raises JaxRuntimeError naming the first failed check, or does nothing

Called eagerly (no ``jit``, no ``checkify``), a failed check raises at once. Called
under a plain ``jit`` without ``checkify.checkify``, tracing fails with JAX's message
that the check was not functionalized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxtal import _validate
from jaxtal.anchors import make_anchors
from jaxtal.assigner import task_aligned_assign
from jaxtal.config import AssignerConfig, make_config
from jaxtal.geometry import axis_aligned, rotated
from jaxtal.labels import COORD_LIMIT, GroundTruth
from jaxtal.targets import Assignment


def _first(bad: jax.Array) -> tuple[jax.Array, ...]:
  """Index (one int32 per axis) of the first True element of ``bad``."""
  flat = jnp.argmax(bad.reshape(-1))
  return tuple(i.astype(jnp.int32) for i in jnp.unravel_index(flat, bad.shape))


def check_values(
    gt: GroundTruth | None = None,
    *,
    num_classes: int | None = None,
    predictions: Mapping[str, jax.Array] | Sequence[jax.Array] = (),
    image_size: Sequence[int] | None = None,
) -> None:
  """Checks values with ``checkify.check``: every check that fails becomes an error.

  Only rows with ``gt.mask`` True are inspected; padding rows may hold anything.

  Args:
    gt: optional :class:`~jaxtal.GroundTruth` ``(b, M)``. Each real row must have a class
      in ``[0, num_classes)`` and finite box values within ``COORD_LIMIT``; an xyxy box must not
      be inverted (``x2 >= x1``, ``y2 >= y1``; a zero-area box is allowed and is simply never
      assigned), an xywhr box must not have a negative side; when ``image_size`` is given, the
      box must overlap the image ``[0, W] x [0, H]``. With ``gt.keypoints``: every visibility is
      finite, and every labelled keypoint (visibility non-zero, or ``D = 2``) has finite
      coordinates within ``COORD_LIMIT``. With ``gt.masks``: per-slot masks ``(b, M, mh, mw)``
      hold finite values in ``[0, 1]`` on real slots; an index map ``(b, mh, mw)`` holds values in
      ``[0, M]``. With ``gt.class_map``: every pixel's class is in ``[-1, num_classes)`` (-1: no
      instance; inside the losses other values count as uncovered).
    num_classes: ``nc``; required with ``gt``.
    predictions: arrays that must be entirely finite (head maps, logits, scores, boxes),
      as a sequence or as a ``{name: array}`` mapping (the name appears in the error).
    image_size: optional ``(H, W)`` of the input in pixels.

  Raises (through ``checkify``):
    JaxRuntimeError naming the argument, the first offending position and its value.
  """
  named = predictions.items() if isinstance(predictions, Mapping) else (
      (f"predictions[{i}]", x) for i, x in enumerate(predictions)
  )
  for name, x in named:
    finite = jnp.isfinite(x)
    idx = _first(~finite)
    checkify.check(
        jnp.all(finite),
        f"{name} (shape {tuple(x.shape)}) has {{n}} non-finite values (NaN or inf); the first is at"
        f" index {{idx}} with value {{v}}",
        n=jnp.sum(~finite),
        idx=jnp.stack(idx),
        v=x[idx].astype(jnp.float32),
    )
  if gt is None:
    return
  if num_classes is None:
    raise ValueError("check_values: num_classes is required to check gt")
  box_dim = getattr(gt.boxes, "shape", (0,))[-1]
  _validate.ground_truth(gt, None, "check_values", box_dim=5 if box_dim == 5 else 4)
  real = jnp.asarray(gt.mask).astype(bool)
  labels = jnp.asarray(gt.labels)
  boxes = jnp.asarray(gt.boxes)

  def check_rows(bad, what, label, value):
    bad = bad & real
    i, j = _first(bad)
    checkify.check(
        ~jnp.any(bad),
        f"gt: {{n}} real row(s) {what}; the first is image {{i}}, slot {{j}} with {label} {{v}}",
        n=jnp.sum(bad),
        i=i,
        j=j,
        v=value[i, j],
    )

  kind = "box xyxy" if box_dim == 4 else "box xywhr"
  check_rows((labels < 0) | (labels >= num_classes), f"have a class id outside [0, {num_classes})", "class", labels)
  finite = jnp.isfinite(boxes).all(axis=-1)
  check_rows(~finite, "have a non-finite box coordinate (NaN or inf)", kind, boxes)
  beyond = finite & (jnp.abs(boxes) > COORD_LIMIT).any(axis=-1)
  check_rows(beyond, f"have a box coordinate beyond COORD_LIMIT = {COORD_LIMIT:g} pixels", kind, boxes)
  if box_dim == 4:
    inverted = finite & ((boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1]))
    check_rows(inverted, "have an inverted box (x2 < x1 or y2 < y1)", kind, boxes)
  else:
    check_rows(finite & ((boxes[..., 2] < 0) | (boxes[..., 3] < 0)), "have a box with a negative side", kind, boxes)
  if image_size is not None:
    geometry = axis_aligned() if box_dim == 4 else rotated()
    h, w = image_size
    outside = finite & ~geometry.on_image(jnp.where(finite[..., None], boxes, 0.0), (h, w))
    check_rows(outside, f"have a box with no overlap with the {h}x{w} (HxW) image", kind, boxes)
  if gt.keypoints is not None:
    _check_keypoints(jnp.asarray(gt.keypoints), real)
  if gt.masks is not None:
    _check_masks(jnp.asarray(gt.masks), real)
  if gt.class_map is not None:
    _check_class_map(jnp.asarray(gt.class_map), num_classes)


def _check_plane(bad: jax.Array, values: jax.Array, what: str) -> None:
  """``checkify.check`` that no pixel of ``(b, h, w)`` planes is ``bad``: ``what`` names the rule; the error adds
  the count and the first pixel with its value."""
  idx = _first(bad)
  checkify.check(
      ~jnp.any(bad),
      what + "; the first is image {i}, pixel (y, x) = ({y}, {x}) with value {v}",
      n=jnp.sum(bad), i=idx[0], y=idx[1], x=idx[2], v=values[idx],
  )


def _check_class_map(cmap: jax.Array, num_classes: int) -> None:
  """A class map ``(b, h, w)``: every pixel's class in ``[-1, nc)``."""
  _check_plane((cmap < -1) | (cmap >= num_classes), cmap,
               f"gt.class_map: {{n}} pixel(s) hold a class outside [-1, {num_classes}) (-1: no instance covers the pixel)")


def _check_keypoints(kpts: jax.Array, real: jax.Array) -> None:
  """Real rows: finite visibility; labelled keypoints with finite coordinates within ``COORD_LIMIT``."""
  xy = kpts[..., :2]
  real = real[..., None]
  if kpts.shape[-1] == 3:
    vis = kpts[..., 2]
    bad_vis = real & ~jnp.isfinite(vis)
    i, j, k = _first(bad_vis)
    checkify.check(
        ~jnp.any(bad_vis),
        "gt.keypoints: {n} visibility value(s) of real rows are not finite; the first is image {i}, slot {j},"
        " keypoint {k} with value {v}",
        n=jnp.sum(bad_vis), i=i, j=j, k=k, v=vis[i, j, k],
    )
    labelled = vis != 0
  else:
    labelled = jnp.ones(kpts.shape[:-1], bool)
  bad = real & labelled & ~(jnp.abs(xy) <= COORD_LIMIT).all(axis=-1)  # NaN and inf too
  i, j, k = _first(bad)
  checkify.check(
      ~jnp.any(bad),
      f"gt.keypoints: {{n}} labelled keypoint(s) of real rows have a non-finite coordinate or one beyond COORD_LIMIT ="
      f" {COORD_LIMIT:g} pixels; the first is image {{i}}, slot {{j}}, keypoint {{k}} at {{v}}",
      n=jnp.sum(bad), i=i, j=j, k=k, v=xy[i, j, k],
  )


def _check_masks(masks: jax.Array, real: jax.Array) -> None:
  """Per-slot masks: finite values in ``[0, 1]`` on real slots; an index map: values in ``[0, M]``."""
  if masks.ndim == 4:
    values = masks.astype(jnp.float32)
    bad = real[..., None, None] & ~((values >= 0) & (values <= 1))  # NaN fails both comparisons
    idx = _first(bad)
    checkify.check(
        ~jnp.any(bad),
        "gt.masks: {n} pixel(s) of real slots are not a finite value in [0, 1]; the first is image {i}, slot {j},"
        " pixel (y, x) = ({y}, {x}) with value {v}",
        n=jnp.sum(bad), i=idx[0], j=idx[1], y=idx[2], x=idx[3], v=values[idx],
    )
    return
  m = real.shape[-1]
  _check_plane((masks < 0) | (masks > m), masks, f"gt.masks: {{n}} index-map pixel(s) are outside [0, M = {m}] (value j + 1 marks slot j)")


def checked_task_aligned_assign(
    pred_scores, pred_boxes, anchor_points, gt: GroundTruth, config: AssignerConfig | None = None, *, grid=None, **overrides
) -> Assignment:
  """:func:`~jaxtal.task_aligned_assign` that raises (through ``checkify``) on invalid values.

  Requires finite ``pred_scores`` in ``[0, 1]``, finite ``pred_boxes`` and anchor points, and for
  every real GT row a class in ``[0, nc)`` and a finite, bounded, non-inverted box. With ``grid``
  (``((H_l, W_l, stride_l), ...)``, as :func:`~jaxtal.task_aligned_assign` takes it), the anchor
  points must be that grid's cell centres in pixels, in :func:`~jaxtal.make_anchors`' order (within
  1e-3 of a pixel): a grid of the right cell count but another layout (``H`` and ``W`` swapped,
  levels reordered) would make the windowed pass read the wrong anchors. Use under ``checkify.checkify``.
  """
  cfg = make_config(AssignerConfig, config, overrides, "checked_task_aligned_assign")
  _validate.assigner_inputs(pred_scores, pred_boxes, anchor_points, gt, 4, "checked_task_aligned_assign")
  grid = _validate.grid(grid, anchor_points.shape[0], "checked_task_aligned_assign")
  if grid is not None:
    cells, strides = make_anchors([(h, w) for h, w, _ in grid], [s for _, _, s in grid])
    want = cells * strides
    off = ~(jnp.abs(jnp.asarray(anchor_points, jnp.float32) - want) <= 1e-3).all(axis=-1)  # NaN is off too
    (a,) = _first(off)
    checkify.check(
        ~jnp.any(off),
        f"anchor_points are not the cell centres of grid={grid} in make_anchors' order: {{n}} differ; the first is"
        " anchor {a} at {got}, the grid's is {want} (check each level's (H, W, stride) and the levels' order)",
        n=jnp.sum(off), a=a, got=jnp.asarray(anchor_points, jnp.float32)[a], want=want[a],
    )
  check_values(
      gt,
      num_classes=pred_scores.shape[-1],
      predictions=dict(pred_scores=pred_scores, pred_boxes=pred_boxes, anchor_points=anchor_points),
  )
  in_unit = (pred_scores >= 0) & (pred_scores <= 1)
  idx = _first(~in_unit & jnp.isfinite(pred_scores))
  checkify.check(
      jnp.all(in_unit),
      "pred_scores must be probabilities in [0, 1] (apply a sigmoid to logits); the first value outside is at"
      " index {idx}: {v}",
      idx=jnp.stack(idx),
      v=pred_scores[idx].astype(jnp.float32),
  )
  return task_aligned_assign(pred_scores, pred_boxes, anchor_points, gt, cfg, grid=grid)
