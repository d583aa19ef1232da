"""Where a task plugs in: the :class:`Task` value and the entry points every task shares.

Every task (detection, oriented boxes, pose, segmentation) offers the same entry points, named
alike: ``<task>_targets`` (decode + assign), ``<task>_loss_from_targets``, ``<task>_loss``,
``checked_<task>_loss`` and the NNX module ``<Task>Loss``. They are written once, here, over a
:class:`Task`: a NamedTuple of the task's static facts and pure functions (like
:class:`~jaxtal.geometry.Geometry` for the assigner), so a new task is a new value, not a copy of
the flow. The flow of one call::

    Predictions --validate (once each)--> Inputs(head, side, ...) --assign or given--> Targets
        --task.parts (jaxtal.terms + the task's own terms)--> parts --finish--> (total, parts)

The calling convention, the same for every task: predictions first (one
:class:`~jaxtal.Predictions`; for detection also a plain list of head maps), then the ground
truth, then the config (a ``<Task>LossConfig`` or keyword overrides) and ``class_weights``.
``loss_from_targets`` takes the targets second and ``gt`` third (detection and oriented boxes
read nothing from it and accept None). A task loss function carries its config class as
``loss_fn.config_class``, which :class:`~jaxtal.module.TaskLossModule` and
:class:`~jaxtal.EndToEndLoss` read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxtal import _validate
from jaxtal import checks
from jaxtal import terms
from jaxtal.config import LossConfig, make_config
from jaxtal.geometry import GeometryExtra
from jaxtal.head import Head, Predictions, decode_maps, level_rows
from jaxtal.labels import GroundTruth
from jaxtal.targets import Targets, entries_cover_foreground


class Inputs(NamedTuple):
  """A task call's validated, decoded inputs (built inside the traced function).

  Attributes:
    preds: the :class:`~jaxtal.Predictions` (a plain list of head maps wrapped).
    head: the decoded :class:`~jaxtal.Head` (``boxes`` of the task's box form).
    side: the task's decoded side data (``prepare``'s result), or None.
    gt: the :class:`~jaxtal.GroundTruth`, or None (``loss_from_targets`` of detection or OBB).
    gt_info: static facts the task's ``check_gt`` returned (e.g. the mask form), or None.
    batch: ``b``.
    image_hw: the input ``(H, W)`` in pixels.
  """

  preds: Predictions
  head: Head
  side: Any
  gt: GroundTruth | None
  gt_info: Any
  batch: int
  image_hw: tuple[float, float]


class Task(NamedTuple):
  """A task loss as a value: what differs between tasks, nothing else.

  Attributes:
    name: the task's name in entry points and messages (``"detection"``, ``"obb"``, ...).
    config_class: its frozen config class (a :class:`~jaxtal.LossConfig` subclass, or it).
    needs: the :class:`~jaxtal.Predictions` fields it reads besides ``feats``; the others must be None.
    form: its :class:`~jaxtal.terms.BoxForm` (the GT boxes are ``(b, M, form.dim)``).
    prepare: ``(preds, head, cfg, batch, shapes, caller) -> (head, side)``: validates and decodes
      the side maps (once) and may complete the head (oriented boxes put their angle in ``head.boxes``).
    check_gt: ``(gt, cfg, caller) -> gt_info``: validates the task's own GT fields (keypoints,
      masks) and returns static facts about them; None when the task reads none.
    parts: ``(inputs, targets, cfg, class_weights) -> parts``: the gain-scaled terms, not yet
      finished (:func:`jaxtal.terms.detection_parts` plus the task's own terms).
    assign_extra: optional ``(inputs, cfg) -> GeometryExtra``: what the task's geometry reads
      beyond boxes (YOLO26 pose: predicted and GT keypoints; YOLO26 segmentation: mask
      coefficients, prototypes and GT masks); None for box geometries.
  """

  name: str
  config_class: type
  needs: tuple[str, ...]
  form: terms.BoxForm
  prepare: Callable[..., tuple[Head, Any]]
  check_gt: Callable[[GroundTruth, Any, str], Any] | None
  parts: Callable[[Inputs, Targets, Any, Any], Any]
  assign_extra: Callable[[Inputs, Any], GeometryExtra] | None = None


def no_side(preds: Predictions, head: Head, cfg, batch: int, shapes, caller: str) -> tuple[Head, None]:
  """``Task.prepare`` of a task that reads no side maps (detection)."""
  del preds, cfg, batch, shapes, caller
  return head, None


def side_rows(maps, shapes, batch: int, channels: int, layout: str, name: str, caller: str) -> jax.Array:
  """Per-level maps that ride beside the head maps (OBB angles, pose keypoints, mask coefficients),
  validated against the head's levels; returns their ``(b, A, channels)`` float32 anchor rows in
  the head's anchor order."""
  _validate.level_maps(maps, shapes, batch, channels, layout, name, caller)
  return jnp.concatenate(level_rows(maps, layout), axis=1).astype(jnp.float32)


def predictions(preds, task: Task, caller: str) -> Predictions:
  """``preds`` as a :class:`~jaxtal.Predictions` holding exactly the fields ``task`` reads.

  Detection (``needs == ()``) also takes a plain list of head maps. Raises TypeError naming what
  is missing or extra (a model's outputs for another task).
  """
  if not isinstance(preds, Predictions):
    is_maps = isinstance(preds, Sequence) and not isinstance(preds, str) and all(hasattr(x, "shape") for x in preds)
    if not task.needs and is_maps:
      return Predictions(feats=preds)
    old_tuple = isinstance(preds, tuple) and len(preds) >= 1 and isinstance(preds[0], list | tuple)
    hint = " (end_to_end_loss now takes each branch's predictions as such, not a tuple of arguments)" if old_tuple else ""
    fields = ", ".join(f"{n}=..." for n in task.needs)
    want = f"jaxtal.Predictions(feats, {fields})" if fields else "jaxtal.Predictions(feats) or a list of per-level head maps"
    raise TypeError(f"{caller}: predictions must be {want}, got {type(preds).__name__}{hint}")
  missing = [n for n in task.needs if getattr(preds, n) is None]
  extra = [n for n in Predictions._fields[1:] if n not in task.needs and getattr(preds, n) is not None]
  if missing or extra:
    what = []
    if missing:
      what.append(f"needs {', '.join('preds.' + n for n in missing)}")
    if extra:
      what.append(f"does not read {', '.join('preds.' + n for n in extra)} (set them to None: is this another task's model?)")
    raise TypeError(f"{caller}: the {task.name} loss {' and '.join(what)}")
  return preds


def _inputs(task: Task, preds, gt, cfg: LossConfig, class_weights, caller: str, *, gt_required: bool) -> Inputs:
  """Validates every input once and decodes the head and the side maps."""
  preds = predictions(preds, task, caller)
  batch, shapes = _validate.head(preds.feats, cfg.num_classes, cfg.reg_max, cfg.layout, caller)
  image_hw = _validate.strides_match(shapes, cfg.strides, caller)
  _validate.topk_in_range(cfg.topk, cfg.topk2, sum(h * w for h, w in shapes), caller)
  head, side = task.prepare(preds, decode_maps(preds.feats, cfg, shapes), cfg, batch, shapes, caller)
  gt_info = None
  if gt is None and not gt_required and task.check_gt is not None:
    raise ValueError(f"{caller}: gt is None; the {task.name} terms read the ground truth (pass the GroundTruth the targets were made from)")
  if gt is not None or gt_required:
    _validate.ground_truth(gt, batch, caller, box_dim=task.form.dim)
    if task.check_gt is not None:
      gt_info = task.check_gt(gt, cfg, caller)
  _validate.class_weights(class_weights, cfg.num_classes, caller)
  return Inputs(preds, head, side, gt, gt_info, batch, image_hw)


def _check_values(inputs: Inputs, cfg: LossConfig) -> None:
  """The checked forms' value checks (through ``checkify``): finite predictions, and every real GT
  row's class, box (and the task's keypoints and masks) valid and overlapping the input."""
  named = {}
  for field, value in zip(Predictions._fields, inputs.preds):
    if isinstance(value, Sequence):
      named.update({f"preds.{field}[{i}]": x for i, x in enumerate(value)})
    elif value is not None:
      named[f"preds.{field}"] = value
  checks.check_values(inputs.gt, num_classes=cfg.num_classes, predictions=named, image_size=inputs.image_hw)


def _assign(task: Task, inputs: Inputs, cfg) -> Targets:
  extra = None if task.assign_extra is None else task.assign_extra(inputs, cfg)
  return terms.assign(inputs.head, inputs.gt, cfg, inputs.image_hw, task.form, extra)


def targets(task: Task, preds, gt, config, overrides: dict, caller: str) -> tuple[Head, Targets]:
  """``<task>_targets``: the decoded head and the assignment the loss trains against."""
  cfg = make_config(task.config_class, config, overrides, caller)
  inputs = _inputs(task, preds, gt, cfg, None, caller, gt_required=True)
  return inputs.head, _assign(task, inputs, cfg)


def loss(task: Task, preds, gt, config, class_weights, overrides: dict, caller: str, *, checked: bool = False):
  """``<task>_loss`` (and with ``checked``, ``checked_<task>_loss``): ``(total, parts)``."""
  cfg = make_config(task.config_class, config, overrides, caller)
  inputs = _inputs(task, preds, gt, cfg, class_weights, caller, gt_required=True)
  if checked:
    _check_values(inputs, cfg)
  t = _assign(task, inputs, cfg)
  return terms.finish(task.parts(inputs, t, cfg, class_weights), inputs.batch, cfg.axis_name)


def loss_from_targets(task: Task, preds, targets_, gt, config, class_weights, overrides: dict, caller: str, *, checked: bool = False):
  """``<task>_loss_from_targets``: the loss against given targets (treated as constants)."""
  cfg = make_config(task.config_class, config, overrides, caller)
  inputs = _inputs(task, preds, gt, cfg, class_weights, caller, gt_required=False)
  _validate.targets(targets_, inputs.batch, caller, box_dim=task.form.dim)
  if checked:
    _check_values(inputs._replace(gt=None), cfg)
    ok = entries_cover_foreground(targets_)
    checkify.check(
        jnp.all(ok),
        "targets.entries breaks the foreground entry-list contract (every foreground anchor listed once as valid,"
        " naming its GT) in {n} image(s); the first is image {i}. Build entries with jaxtal.foreground_entries",
        n=jnp.sum(~ok),
        i=jnp.argmax(~ok).astype(jnp.int32),
    )
  t = jax.lax.stop_gradient(targets_)
  return terms.finish(task.parts(inputs, t, cfg, class_weights), inputs.batch, cfg.axis_name)

