"""jaxtal on a parity case, one runner per task: the only place the parity tests and the fixture
checker call jaxtal's assigners and task losses.

Each runner jits its computation with the case's configuration static (one compilation per
configuration and pytest process) and returns NumPy: assignments as dicts of ``Assignment`` fields,
losses as ``(total, parts, grads)`` (detection, end-to-end) or :func:`loss_outputs` dicts (the tasks,
with the assignment inside the loss).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxtal
from support import cases, obb_cases, pose26_cases, pose_cases, segment26_cases, segment_cases

# ``JAXTAL_TEST_WINDOWS=1`` runs every assignment of the parity runners through the windowed pass
# (jaxtal.windows), ``=0`` through the dense one; unset, jaxtal chooses (dense for these small cases).
# CI runs the parity suites both ways (.ci/run).
WINDOWS = {"1": True, "0": False}.get(os.environ.get("JAXTAL_TEST_WINDOWS", "").strip())


def with_windows(config: dict) -> dict:
  """``config`` with the ``windows`` setting ``JAXTAL_TEST_WINDOWS`` asks for (unchanged when unset)."""
  return config if WINDOWS is None else {**config, "windows": WINDOWS}


def anchor_grid(anchor_points) -> tuple[tuple[int, int, float], ...]:
  """The ``(H, W, stride)`` levels whose cell centres (``make_anchors``) are ``anchor_points (A, 2)`` pixels.

  Read level by level (stride from the first centre, width from the first row, height from where the
  pattern ends) and checked against every point, so a case with other anchors fails loudly here.
  """
  points = np.asarray(anchor_points, np.float64)
  levels, i = [], 0
  while i < len(points):
    s = 2.0 * points[i, 0]
    w = int(np.argmax(points[i:, 1] != points[i, 1])) or len(points) - i
    h = 1
    while i + (h + 1) * w <= len(points) and np.isclose(points[i + h * w, 1], (h + 0.5) * s) and np.isclose(points[i + h * w, 0], 0.5 * s):
      h += 1
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    np.testing.assert_allclose(points[i:i + h * w], np.stack([xs, ys], -1).reshape(-1, 2) * s, rtol=1e-6, err_msg="anchors are no grid")
    levels.append((h, w, s))
    i += h * w
  return tuple(levels)

# ----------------------------------------------------------------------------- detection: assignment


def assign_gt(inputs) -> jaxtal.GroundTruth:
  """The GroundTruth of an assignment case's inputs."""
  return jaxtal.GroundTruth(inputs["gt_labels"], inputs["gt_boxes"], inputs["gt_mask"])


def assign_args(inputs):
  """``(pred_scores, pred_boxes, anchor_points, gt)``: an assignment case's arguments of the assigner."""
  return inputs["pred_scores"], inputs["pred_boxes"], inputs["anchor_points"], assign_gt(inputs)


@functools.partial(jax.jit, static_argnames=("config", "grid"))
def _assign_jit(pred_scores, pred_boxes, anchor_points, gt, *, config, grid):
  return jaxtal.task_aligned_assign(pred_scores, pred_boxes, anchor_points, gt, config, grid=grid)


def run_assign(case: dict, gt_chunk: int | None = None) -> dict:
  """jaxtal's assignment of a case (jitted, the case's config as a static AssignerConfig, the anchors'
  grid given) as NumPy arrays."""
  config = jaxtal.AssignerConfig(**with_windows(case["config"]), gt_chunk=gt_chunk)
  args = assign_args(case["inputs"])
  out = _assign_jit(*args, config=config, grid=anchor_grid(args[2]))
  return {k: np.asarray(v) for k, v in out._asdict().items()}


# ----------------------------------------------------------------------------- detection: loss


def detection_config(config: dict, layout: str = "NCHW") -> tuple[jaxtal.LossConfig, np.ndarray | None]:
  """A case's config as a (static, hashable) LossConfig and its class weights (an array, not configuration)."""
  kwargs, _ = cases.split_loss_config(config)
  cw = kwargs.pop("class_weights")
  return jaxtal.LossConfig(**with_windows(kwargs), layout=layout), None if cw is None else np.asarray(cw, np.float32)


def detection_gt(case: dict) -> jaxtal.GroundTruth:
  """A detection loss case's label rows packed into its ``max_boxes`` slots."""
  _, m = cases.split_loss_config(case["config"])
  feats = case["inputs"]["feats"]
  size = feats[0].shape[2] * case["config"]["strides"][0], feats[0].shape[3] * case["config"]["strides"][0]
  return jaxtal.pack_labels(case["inputs"]["label_rows"], feats[0].shape[0], m, size)


@functools.partial(jax.jit, static_argnames="config")
def _detection_value_and_grad(feats, gt, class_weights, *, config):
  def f(feats):
    return jaxtal.detection_loss(feats, gt, config, class_weights=class_weights)

  (total, parts), grads = jax.value_and_grad(f, has_aux=True)(feats)
  return total, parts, grads


def run_detection_loss(case: dict, layout: str = "NCHW"):
  """``(total, LossParts, grads)`` of jaxtal on a case, as NumPy; grads in the layout of the input."""
  feats = [np.asarray(f) for f in case["inputs"]["feats"]]
  if layout == "NHWC":
    feats = [f.transpose(0, 2, 3, 1) for f in feats]
  config, class_weights = detection_config(case["config"], layout)
  total, parts, grads = _detection_value_and_grad(feats, detection_gt(case), class_weights, config=config)
  return float(total), jaxtal.LossParts(*(float(p) for p in parts)), [np.asarray(g) for g in grads]


# ----------------------------------------------------------------------------- end-to-end


def _end_to_end_setup(case: dict):
  kwargs, m = cases.split_loss_config(case["config"])
  epoch, epochs, v10 = kwargs.pop("epoch"), kwargs.pop("epochs"), kwargs.pop("yolov10")
  cfg = jaxtal.LossConfig(**with_windows(kwargs), layout="NCHW")
  feats = case["inputs"]["feats"]
  size = feats[0].shape[2] * cfg.strides[0], feats[0].shape[3] * cfg.strides[0]
  gt = jaxtal.pack_labels(case["inputs"]["label_rows"], feats[0].shape[0], m, size)
  return cfg, gt, epoch, epochs, v10


@functools.partial(jax.jit, static_argnames=("config", "v10"))
def _end_to_end_value_and_grad(many, one, gt, weight, *, config, v10):
  def f(many, one):
    if v10:
      return jaxtal.end_to_end_sum_loss(jaxtal.detection_loss, many, one, gt, config=config)
    return jaxtal.end_to_end_loss(jaxtal.detection_loss, many, one, gt, weight=weight, config=config)

  (total, parts), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(many, one)
  return total, parts, grads


def run_end_to_end(case: dict):
  """``(total, parts, one-to-many grads, one-to-one grads)`` of jaxtal's end-to-end loss on a case, as NumPy."""
  cfg, gt, epoch, epochs, v10 = _end_to_end_setup(case)
  weight = np.float32(jaxtal.one2many_weight(epoch, epochs))
  many = [np.asarray(f) for f in case["inputs"]["feats"]]
  one = [np.asarray(f) for f in case["inputs"]["feats_o2o"]]
  total, parts, (g_many, g_one) = _end_to_end_value_and_grad(many, one, gt, weight, config=cfg, v10=v10)
  return float(total), parts, [np.asarray(g) for g in g_many], [np.asarray(g) for g in g_one]


# ----------------------------------------------------------------------------- the tasks' shared output


def loss_outputs(total, parts, grads, targets, **more_grads) -> dict:
  """A jitted task-loss run as NumPy: ``total``, ``parts`` (floats, the same NamedTuple), ``grads`` (per-level head
  maps), each of ``more_grads`` (a per-level list, or one array) and the assignment inside the loss (``weights``,
  ``fg_mask``, ``gt_index``: :class:`jaxtal.DetectionTargets` fields)."""
  def numpy(g):
    return [np.asarray(x) for x in g] if isinstance(g, (list, tuple)) else np.asarray(g)

  return dict(
      total=float(total),
      parts=type(parts)(*(float(p) for p in parts)),
      grads=numpy(grads),
      **{k: numpy(v) for k, v in more_grads.items()},
      weights=np.asarray(targets.weights),
      fg_mask=np.asarray(targets.fg_mask),
      gt_index=np.asarray(targets.gt_index),
  )


# ----------------------------------------------------------------------------- oriented boxes


@functools.partial(jax.jit, static_argnames=("floor",))
def probiou_and_grads(box1, box2, *, floor):
  """``(probiou, (d/dbox1, d/dbox2))`` of the sum, jitted."""
  iou = jaxtal.probiou(box1, box2, floor=floor)
  return iou, jax.grad(lambda a, b: jaxtal.probiou(a, b, floor=floor).sum(), argnums=(0, 1))(box1, box2)


@functools.partial(jax.jit, static_argnames=("config",))
def _obb_assign_jit(pred_scores, pred_boxes, anchor_points, gt, *, config):
  return jaxtal.rotated_task_aligned_assign(pred_scores, pred_boxes, anchor_points, gt, **dict(config))


def run_obb_assign(case: dict) -> dict:
  """jaxtal's rotated assignment of an OBB assignment case (jitted) as NumPy arrays."""
  x = case["inputs"]
  gt = assign_gt(x)
  config = tuple(sorted({**with_windows(case["config"]), "grid": anchor_grid(x["anchor_points"])}.items()))
  out = _obb_assign_jit(x["pred_scores"], x["pred_boxes"], x["anchor_points"], gt, config=config)
  return {k: np.asarray(v) for k, v in out._asdict().items()}


def _obb_static(config: dict) -> tuple:
  kwargs, _ = obb_cases.split_loss_config(config)
  if kwargs["class_weights"] is not None:
    kwargs["class_weights"] = tuple(kwargs["class_weights"])
  return tuple(sorted(with_windows(kwargs).items()))


def obb_loss_gt(case: dict) -> jaxtal.GroundTruth:
  """An OBB loss case's label rows packed into its ``max_boxes`` slots."""
  _, m = obb_cases.split_loss_config(case["config"])
  feats = case["inputs"]["feats"]
  s = case["config"]["strides"][0]
  return jaxtal.pack_rotated_labels(case["inputs"]["label_rows"], feats[0].shape[0], m, (feats[0].shape[2] * s, feats[0].shape[3] * s))


@functools.partial(jax.jit, static_argnames=("config",))
def _obb_loss_jit(feats, angles, gt, *, config):
  kwargs = dict(config)
  if kwargs["class_weights"] is not None:
    kwargs["class_weights"] = np.asarray(kwargs["class_weights"], np.float32)

  def f(feats, angles):
    return jaxtal.obb_loss(jaxtal.Predictions(feats, angles=angles), gt, layout="NCHW", **kwargs)

  (total, parts), (grads, angle_grads) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(feats, angles)
  kwargs.pop("class_weights")
  _, targets = jaxtal.obb_targets(jaxtal.Predictions(feats, angles=angles), gt, layout="NCHW", **kwargs)
  return total, parts, grads, angle_grads, targets


def run_obb_loss(case: dict) -> dict:
  """jaxtal's OBB loss on a case (jitted): total, parts, gradients and the assignment, as NumPy."""
  x = case["inputs"]
  total, parts, grads, angle_grads, t = _obb_loss_jit(x["feats"], x["angles"], obb_loss_gt(case), config=_obb_static(case["config"]))
  return loss_outputs(total, parts, grads, t, angle_grads=angle_grads)


# ----------------------------------------------------------------------------- pose


def _pose_config(config: dict) -> tuple[jaxtal.PoseLossConfig, np.ndarray | None]:
  kwargs, _ = pose_cases.split_loss_config(config)
  cw = kwargs.pop("class_weights")
  return jaxtal.PoseLossConfig(**with_windows(kwargs), layout="NCHW"), None if cw is None else np.asarray(cw, np.float32)


@functools.partial(jax.jit, static_argnames="config")
def _pose_loss_jit(feats, kpts, gt, class_weights, *, config):
  def f(feats, kpts):
    return jaxtal.pose_loss(jaxtal.Predictions(feats, keypoints=kpts), gt, config, class_weights=class_weights)

  (total, parts), (grads, kpt_grads) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(feats, kpts)
  _, targets = jaxtal.detection_targets(feats, gt, config)
  return total, parts, grads, kpt_grads, targets


def run_pose_loss(case: dict) -> dict:
  """jaxtal's pose loss on a case (jitted): total, parts, gradients and the assignment, as NumPy."""
  x = case["inputs"]
  config, class_weights = _pose_config(case["config"])
  gt = pose_cases.gt_of(case)
  total, parts, grads, kpt_grads, t = _pose_loss_jit(x["feats"], x["kpts"], gt, class_weights, config=config)
  return loss_outputs(total, parts, grads, t, kpt_grads=kpt_grads)


# ----------------------------------------------------------------------------- segmentation


@functools.partial(jax.jit, static_argnames=("config", "overrides"))
def _segment_loss_jit(feats, coefs, proto, gt, *, config, overrides=()):
  kwargs = dict(config)
  kwargs.pop("class_weights")

  def f(feats, coefs, proto):
    preds = jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto)
    return jaxtal.segment_loss(preds, gt, layout="NCHW", **kwargs, **dict(overrides))

  (total, parts), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(feats, coefs, proto)
  _, targets = jaxtal.detection_targets(feats, gt, layout="NCHW", **kwargs)
  return total, parts, grads, targets


def run_segment_loss(case: dict, **overrides) -> dict:
  """jaxtal's segmentation loss on a case (jitted): total, parts, gradients and the assignment, as NumPy.
  ``overrides``: settings that must not change the result (e.g. ``mask_window``)."""
  kwargs, _, _ = segment_cases.split_config(case["config"])
  assert kwargs["class_weights"] is None
  x = case["inputs"]
  total, parts, (grads, coef_grads, proto_grad), t = _segment_loss_jit(
      x["feats"], x["coefs"], x["proto"], segment_cases.ground_truth(case), config=tuple(sorted(with_windows(kwargs).items())),
      overrides=tuple(sorted(overrides.items())),
  )
  return loss_outputs(total, parts, grads, t, coef_grads=coef_grads, proto_grad=proto_grad)


# ----------------------------------------------------------------------------- YOLO26 segmentation


def _segment26_static(case: dict) -> tuple:
  kwargs, _, _ = segment26_cases.split_config(case["config"])  # min_box_side None: jaxtal's default, strides[1]
  return tuple(sorted(with_windows(kwargs).items()))


def _segment26_preds(feats, coefs, proto, semantic):
  return jaxtal.Predictions(feats, mask_coefs=coefs, proto=proto, semantic=semantic)


@functools.partial(jax.jit, static_argnames=("config", "loss"))
def _segment26_jit(feats, coefs, proto, semantic, gt, *, config, loss):
  kwargs = dict(config, layout="NCHW")
  loss_fn = jaxtal.segment_loss if loss == "v8" else jaxtal.segment26_loss
  targets_fn = jaxtal.segment_targets if loss == "v8" else jaxtal.segment26_targets

  def f(*args):
    return loss_fn(_segment26_preds(*args), gt, **kwargs)

  argnums = (0, 1, 2) if semantic is None else (0, 1, 2, 3)
  (total, parts), grads = jax.value_and_grad(f, argnums=argnums, has_aux=True)(feats, coefs, proto, semantic)
  _, targets = targets_fn(_segment26_preds(feats, coefs, proto, semantic), gt, **kwargs)
  return total, parts, grads, targets


@functools.partial(jax.jit, static_argnames=("config",))
def _segment26_e2e_jit(many, one, gt, weight, *, config):
  def f(many, one):
    return jaxtal.end_to_end_loss(
        jaxtal.segment26_loss, _segment26_preds(*many), _segment26_preds(*one), gt, weight=weight, layout="NCHW", **dict(config)
    )

  (total, parts), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(many, one)
  return total, parts, grads


def _segment26_grads(grads) -> dict:
  out = dict(grads=[np.asarray(g) for g in grads[0]], coef_grads=[np.asarray(g) for g in grads[1]], proto_grad=np.asarray(grads[2]))
  if len(grads) > 3:
    out["sem_grad"] = np.asarray(grads[3])
  return out


def run_segment26_loss(case: dict) -> dict:
  """jaxtal on a YOLO26 segmentation case (jitted; ``segment26_loss``, ``segment_loss`` with a semantic head,
  or ``end_to_end_loss(segment26_loss, ...)`` as the case's ``loss`` says): total, parts, gradients and (not
  end-to-end) the assignment, as NumPy; end-to-end the branches' gradients under ``o2m`` and ``o2o``."""
  x, loss = case["inputs"], case["config"]["loss"]
  gt, config = segment26_cases.ground_truth(case), _segment26_static(case)
  if loss == "e2e":
    weight = np.float32(jaxtal.one2many_weight(case["config"]["epoch"], case["config"]["epochs"]))
    many = (x["feats"], x["coefs"], x["proto"], x["semantic"])
    one = (x["feats_o2o"], x["coefs_o2o"], x["proto_o2o"], x["semantic_o2o"])
    total, parts, (g_many, g_one) = _segment26_e2e_jit(many, one, gt, weight, config=config)
    return dict(total=float(total), parts=type(parts)(*(float(p) for p in parts)), o2m=_segment26_grads(g_many),
                o2o=_segment26_grads(g_one))
  total, parts, grads, t = _segment26_jit(x["feats"], x["coefs"], x["proto"], x.get("semantic"), gt, config=config, loss=loss)
  grads = _segment26_grads(grads)
  return loss_outputs(total, parts, grads.pop("grads"), t, **grads)


# ----------------------------------------------------------------------------- YOLO26 pose


def pose26_config(config: dict, layout: str = "NCHW") -> tuple[jaxtal.Pose26LossConfig, np.ndarray | None, dict]:
  """A pose26 case's config as a static Pose26LossConfig, its class weights and the end-to-end settings
  (``epoch``, ``epochs``; empty for a loss case). ``min_box_side`` None is jaxtal's default (Ultralytics'
  ``strides[1]``): left out when the config's default is None, else given as ``strides[1]``."""
  kwargs, _ = pose26_cases.split_config(config)
  cw = kwargs.pop("class_weights")
  e2e = {k: kwargs.pop(k) for k in ("epoch", "epochs") if k in kwargs}
  if kwargs["min_box_side"] is None:
    del kwargs["min_box_side"]
    if jaxtal.Pose26LossConfig.__dataclass_fields__["min_box_side"].default is not None:
      kwargs["min_box_side"] = float(kwargs["strides"][1])
  cfg = jaxtal.Pose26LossConfig(**with_windows(kwargs), layout=layout)
  return cfg, None if cw is None else np.asarray(cw, np.float32), e2e


def pose26_flow(arrays: dict) -> jaxtal.FlowParams:
  """A case's flow arrays (``pose26_cases.flow_arrays``) as FlowParams."""
  return jaxtal.FlowParams(**{k: jnp.asarray(v) for k, v in arrays.items()})


def _preds26(feats, kpts, sigmas):
  return jaxtal.Predictions(feats, keypoints=kpts, keypoint_sigmas=sigmas)


@functools.partial(jax.jit, static_argnames="config")
def _pose26_loss_jit(feats, kpts, sigmas, flow, gt, class_weights, *, config):
  def f(feats, kpts, sigmas, flow):
    return jaxtal.pose26_loss(_preds26(feats, kpts, sigmas), gt, config, flow=flow, class_weights=class_weights)

  (total, parts), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(feats, kpts, sigmas, flow)
  _, targets = jaxtal.pose26_targets(_preds26(feats, kpts, sigmas), gt, config)
  return total, parts, grads, targets


def run_pose26_loss(case: dict) -> dict:
  """jaxtal's YOLO26 pose loss on a case (jitted): total, parts, gradients w.r.t. the head, keypoint and
  sigma maps (``grads``, ``kpt_grads``, ``sigma_grads``) and the flow (``flow_grads``, a dict of its
  fields), and the assignment, as NumPy."""
  x = case["inputs"]
  config, class_weights, _ = pose26_config(case["config"])
  total, parts, (g, gk, gs, gf), t = _pose26_loss_jit(
      x["feats"], x["kpts"], x["kpt_sigmas"], pose26_flow(x["flow"]), pose26_cases.gt_of(case), class_weights, config=config
  )
  out = loss_outputs(total, parts, g, t, kpt_grads=gk, sigma_grads=gs)
  return out | {"flow_grads": {k: np.asarray(v) for k, v in gf._asdict().items()}}


@functools.partial(jax.jit, static_argnames="config")
def _pose26_e2e_jit(many, one, flow, gt, weight, *, config):
  def f(many, one, flow):
    return jaxtal.end_to_end_loss(jaxtal.pose26_loss, _preds26(*many), _preds26(*one), gt, weight=weight, flow=flow, config=config)

  return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(many, one, flow)


def run_pose26_e2e(case: dict) -> dict:
  """jaxtal's ``end_to_end_loss(pose26_loss, ...)`` on an end-to-end case (jitted), as NumPy: ``total``,
  ``parts`` (the one-to-one branch's), the gradients of both branches' maps and of the shared flow."""
  x = case["inputs"]
  config, _, e2e = pose26_config(case["config"])
  weight = np.float32(jaxtal.one2many_weight(e2e["epoch"], e2e["epochs"]))
  many = (x["feats"], x["kpts"], x["kpt_sigmas"])
  one = (x["feats_o2o"], x["kpts_o2o"], x["kpt_sigmas_o2o"])
  (total, parts), (gm, go, gf) = _pose26_e2e_jit(many, one, pose26_flow(x["flow"]), pose26_cases.gt_of(case), weight, config=config)
  lists = lambda gs: [np.asarray(g) for g in gs]  # noqa: E731
  return dict(
      total=float(total), parts=type(parts)(*(float(p) for p in parts)),
      grads=lists(gm[0]), kpt_grads=lists(gm[1]), sigma_grads=lists(gm[2]),
      grads_o2o=lists(go[0]), kpt_grads_o2o=lists(go[1]), sigma_grads_o2o=lists(go[2]),
      flow_grads={k: np.asarray(v) for k, v in gf._asdict().items()},
  )


@functools.partial(jax.jit, static_argnames="config")
def _pose26_assign_jit(x, gt, *, config):
  kw = dict(config)
  return jaxtal.pose_task_aligned_assign(
      x["pred_scores"], x["pred_boxes"], x["pred_kpts"], x["anchor_points"], x["anchor_strides"], gt, **kw
  )


def run_pose26_assign(case: dict) -> dict:
  """jaxtal's ``pose_task_aligned_assign`` on a pose26 assignment case (jitted) as NumPy arrays."""
  x = case["inputs"]
  gt = jaxtal.GroundTruth(x["gt_labels"], x["gt_boxes"], x["gt_mask"], keypoints=x["gt_kpts"])
  arrays = {k: x[k] for k in ("pred_scores", "pred_boxes", "pred_kpts", "anchor_points", "anchor_strides")}
  config = tuple(sorted({**with_windows(case["config"]), "grid": anchor_grid(x["anchor_points"])}.items()))
  out = _pose26_assign_jit(arrays, gt, config=config)
  return {k: np.asarray(v) for k, v in out._asdict().items()}
