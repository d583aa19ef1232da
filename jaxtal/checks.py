"""Optional value checks inside ``jit``, built on ``jax.experimental.checkify``.

Shapes, dtypes and configuration are always checked when a function is traced. Values
cannot be: inside ``jit`` they are unknown until the step runs. By default jaxtal treats
bad values as *data*: a ground-truth row that is padding, has a non-finite, inverted or
zero-area box, a class outside ``[0, nc)`` or (in the loss) no overlap with the image
never owns an anchor, and non-finite predictions never become targets. That keeps a long
training run alive, but it can also hide a broken label file.

The functions here turn those values into errors instead. They call
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
from jaxtal.assigner import task_aligned_assign
from jaxtal.config import AssignerConfig, LossConfig, _make_config
from jaxtal.labels import COORD_LIMIT, GroundTruth
from jaxtal.loss import LossParts, detection_loss, loss_from_targets
from jaxtal.targets import Assignment, Targets, entries_cover_foreground


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
      in ``[0, num_classes)``, finite box coordinates, ``x2 >= x1`` and ``y2 >= y1`` (an
      inverted box is an error; a zero-area box is allowed and is simply never assigned)
      and, when ``image_size`` is given, some overlap with the image ``[0, W] x [0, H]``.
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
  _validate.ground_truth(gt, None, "check_values")
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

  check_rows((labels < 0) | (labels >= num_classes), f"have a class id outside [0, {num_classes})", "class", labels)
  finite = jnp.isfinite(boxes).all(axis=-1)
  check_rows(~finite, "have a non-finite box coordinate (NaN or inf)", "box xyxy", boxes)
  beyond = finite & (jnp.abs(boxes) > COORD_LIMIT).any(axis=-1)
  check_rows(beyond, f"have a box coordinate beyond COORD_LIMIT = {COORD_LIMIT:g} pixels", "box xyxy", boxes)
  inverted = finite & ((boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1]))
  check_rows(inverted, "have an inverted box (x2 < x1 or y2 < y1)", "box xyxy", boxes)
  if image_size is not None:
    h, w = image_size
    outside = finite & ((boxes[..., 0] >= w) | (boxes[..., 2] <= 0) | (boxes[..., 1] >= h) | (boxes[..., 3] <= 0))
    check_rows(outside, f"have a box with no overlap with the {h}x{w} (HxW) image", "box xyxy", boxes)


def _loss_config(feats, config, overrides, caller):
  cfg = _make_config(LossConfig, config, overrides, caller)
  _, shapes = _validate.head(feats, cfg.num_classes, cfg.reg_max, cfg.layout, caller)
  return cfg, _validate.strides_match(shapes, cfg.strides, caller)


def checked_detection_loss(
    feats: Sequence[jax.Array], gt: GroundTruth, config: LossConfig | None = None, *, class_weights=None, **overrides
) -> tuple[jax.Array, LossParts]:
  """:func:`~jaxtal.detection_loss` that raises (through ``checkify``) on invalid values.

  Takes exactly the arguments of :func:`~jaxtal.detection_loss`. Before computing the loss,
  :func:`check_values` requires finite head maps, and for every real GT row a class in
  ``[0, num_classes)``, a finite, bounded, non-inverted box and some overlap with the image
  (whose size comes from the maps and ``strides``). Use under ``checkify.checkify``.

  Returns:
    ``(total, LossParts)``, identical to :func:`~jaxtal.detection_loss` when no check fails.
  """
  cfg, image_size = _loss_config(feats, config, overrides, "checked_detection_loss")
  maps = {f"feats[{i}]": f for i, f in enumerate(feats)}
  check_values(gt, num_classes=cfg.num_classes, predictions=maps, image_size=image_size)
  return detection_loss(feats, gt, cfg, class_weights=class_weights)


def checked_loss_from_targets(
    feats: Sequence[jax.Array], targets: Targets, config: LossConfig | None = None, *, class_weights=None, **overrides
) -> tuple[jax.Array, LossParts]:
  """:func:`~jaxtal.loss_from_targets` that checks (through ``checkify``) the entry-list contract.

  Every foreground anchor must be listed exactly once as a valid entry, no background anchor may
  be, and each valid entry must name its anchor's GT (see :mod:`jaxtal.targets`); head maps must
  be finite. Use under ``checkify.checkify``.
  """
  cfg, _ = _loss_config(feats, config, overrides, "checked_loss_from_targets")
  check_values(predictions={f"feats[{i}]": f for i, f in enumerate(feats)})
  ok = entries_cover_foreground(targets)
  checkify.check(
      jnp.all(ok),
      "targets.entries breaks the foreground entry-list contract (every foreground anchor listed once as valid,"
      " naming its GT) in {n} image(s); the first is image {i}. Build entries with jaxtal.foreground_entries",
      n=jnp.sum(~ok),
      i=jnp.argmax(~ok).astype(jnp.int32),
  )
  return loss_from_targets(feats, targets, cfg, class_weights=class_weights)


def checked_task_aligned_assign(
    pred_scores, pred_boxes, anchor_points, gt: GroundTruth, config: AssignerConfig | None = None, **overrides
) -> Assignment:
  """:func:`~jaxtal.task_aligned_assign` that raises (through ``checkify``) on invalid values.

  Requires finite ``pred_scores`` in ``[0, 1]``, finite ``pred_boxes`` and anchor points, and for
  every real GT row a class in ``[0, nc)`` and a finite, bounded, non-inverted box.
  Use under ``checkify.checkify``.
  """
  cfg = _make_config(AssignerConfig, config, overrides, "checked_task_aligned_assign")
  _validate.assigner_inputs(pred_scores, pred_boxes, anchor_points, gt, 4, "checked_task_aligned_assign")
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
  return task_aligned_assign(pred_scores, pred_boxes, anchor_points, gt, cfg)
