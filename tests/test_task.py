"""jaxtal.task: every task offers the same entry points with the same calling convention, each input is
validated once, and a task's loss equals its loss from its own targets, as a module, end to end and checked."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxtal
from jaxtal import _validate

B, NC, R, STRIDES, IMAGE = 2, 3, 4, (8, 16), 64
K, NM, MH = 4, 3, 16
TASKS = ("detection", "obb", "pose", "segment")
CLASS = {"detection": "Detection", "obb": "OBB", "pose": "Pose", "segment": "Segment"}


def _maps(channels, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(B, IMAGE // s, IMAGE // s, channels)).astype(np.float32) * scale) for s in STRIDES]


ROWS = np.array([[0, 1, 0.5, 0.5, 0.5, 0.4], [1, 0, 0.3, 0.4, 0.4, 0.5], [1, 2, 0.7, 0.6, 0.3, 0.3]])


def problem(task: str):
  """``(preds, gt, config)`` of a small batch for ``task``; every image has a GT that owns anchors."""
  feats = _maps(4 * R + NC, seed=1)
  gt = jaxtal.pack_labels(ROWS, B, 3, IMAGE)
  if task == "detection":
    return jaxtal.Predictions(feats), jax.tree.map(jnp.asarray, gt), jaxtal.DetectionLossConfig(num_classes=NC, strides=STRIDES, reg_max=R)
  if task == "obb":
    rows = np.c_[ROWS, [0.3, -0.4, 1.0]]
    gt = jaxtal.pack_rotated_labels(rows, B, 3, IMAGE)
    preds = jaxtal.Predictions(feats, angles=_maps(1, seed=2, scale=0.5))
    return preds, jax.tree.map(jnp.asarray, gt), jaxtal.OBBLossConfig(num_classes=NC, strides=STRIDES, reg_max=R)
  if task == "pose":
    kpts = np.random.default_rng(3).uniform(0.3, 0.7, (len(ROWS), K, 3))
    kpts[..., 2] = [[2, 1, 0, 2]] * len(ROWS)
    gt = jaxtal.pack_labels(ROWS, B, 3, IMAGE, keypoints=kpts)
    preds = jaxtal.Predictions(feats, keypoints=_maps(K * 3, seed=4, scale=0.5))
    return preds, jax.tree.map(jnp.asarray, gt), jaxtal.PoseLossConfig(num_classes=NC, strides=STRIDES, reg_max=R, kpt_shape=(K, 3))
  inst = np.zeros((len(ROWS), MH, MH), bool)
  for r, (_, _, cx, cy, w, h) in enumerate(ROWS):
    inst[r, int((cy - h / 2) * MH) : int((cy + h / 2) * MH), int((cx - w / 2) * MH) : int((cx + w / 2) * MH)] = True
  gt = gt._replace(masks=jaxtal.pack_masks(inst, ROWS[:, 0], B, 3))
  proto = jnp.asarray(np.random.default_rng(5).normal(size=(B, MH, MH, NM)).astype(np.float32))
  preds = jaxtal.Predictions(feats, mask_coefs=_maps(NM, seed=6, scale=0.5), proto=proto)
  return preds, jax.tree.map(jnp.asarray, gt), jaxtal.SegmentLossConfig(num_classes=NC, strides=STRIDES, reg_max=R)


def entry(task: str, kind: str):
  names = {
      "config": f"{CLASS[task]}LossConfig", "parts": f"{CLASS[task]}LossParts", "targets": f"{task}_targets",
      "from_targets": f"{task}_loss_from_targets", "loss": f"{task}_loss", "module": f"{CLASS[task]}Loss",
      "checked": f"checked_{task}_loss",
  }
  return getattr(jaxtal, names[kind]), names[kind]


@pytest.mark.parametrize("task", TASKS)
def test_every_task_exports_the_same_entry_points_with_one_calling_convention(task):
  for kind in ("config", "parts", "targets", "from_targets", "loss", "module", "checked"):
    obj, name = entry(task, kind)
    assert name in jaxtal.__all__
  params = lambda f: list(inspect.signature(f).parameters)[:4]  # noqa: E731
  assert params(entry(task, "loss")[0])[:3] == ["preds", "gt", "config"]
  assert params(entry(task, "checked")[0])[:3] == ["preds", "gt", "config"]
  assert params(entry(task, "targets")[0])[:3] == ["preds", "gt", "config"]
  assert params(entry(task, "from_targets")[0]) == ["preds", "targets", "gt", "config"]
  loss, _ = entry(task, "loss")
  assert loss.config_class is entry(task, "config")[0]
  assert entry(task, "parts")[0]._fields[0] == "box"  # Ultralytics' order starts with the box term


def test_detection_keeps_its_first_names_as_aliases():
  assert jaxtal.LossConfig is jaxtal.DetectionLossConfig
  assert jaxtal.LossParts is jaxtal.DetectionLossParts
  assert jaxtal.loss_from_targets is jaxtal.detection_loss_from_targets


@pytest.mark.parametrize("task", [*TASKS[:1], pytest.param("obb", marks=pytest.mark.slow),
                                  pytest.param("pose", marks=pytest.mark.slow), pytest.param(TASKS[3], marks=pytest.mark.slow)])
def test_loss_equals_the_loss_from_its_own_targets_and_the_module(task):
  preds, gt, cfg = problem(task)
  loss, _ = entry(task, "loss")
  total, parts = jax.jit(functools.partial(loss, config=cfg))(preds, gt)
  head, targets = jax.jit(functools.partial(entry(task, "targets")[0], config=cfg))(preds, gt)
  assert int(np.asarray(targets.fg_mask).sum()) > 0
  assert head.boxes.shape[-1] == gt.boxes.shape[-1]  # the task's box form (xywhr for OBB)
  total2, parts2 = jax.jit(functools.partial(entry(task, "from_targets")[0], config=cfg))(preds, targets, gt)
  total3, parts3 = jax.jit(lambda p, g: entry(task, "module")[0](cfg)(p, g))(preds, gt)
  assert isinstance(parts, entry(task, "parts")[0])
  for t, p in ((total2, parts2), (total3, parts3)):
    np.testing.assert_allclose(t, total, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p), np.asarray(parts), rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(float(total), float(sum(parts)) * B, rtol=1e-6)


@pytest.mark.slow  # the same property per task is in test_<task>.py; all tasks at once here
@pytest.mark.parametrize("task", ("detection", "obb"))
def test_loss_from_targets_needs_no_gt_for_box_tasks(task):
  preds, gt, cfg = problem(task)
  _, targets = jax.jit(functools.partial(entry(task, "targets")[0], config=cfg))(preds, gt)
  from_targets = jax.jit(lambda p, t, g: entry(task, "from_targets")[0](p, t, g, cfg)[0])
  np.testing.assert_allclose(from_targets(preds, targets, None), from_targets(preds, targets, gt), rtol=1e-7)


@pytest.mark.parametrize("task", ("pose", "segment"))
def test_loss_from_targets_of_tasks_that_read_the_gt_names_it(task):
  preds, gt, cfg = problem(task)
  _, targets = jax.jit(functools.partial(entry(task, "targets")[0], config=cfg))(preds, gt)
  with pytest.raises(ValueError, match=f"gt is None; the {task} terms read the ground truth"):
    entry(task, "from_targets")[0](preds, targets, None, cfg)


def test_predictions_name_what_is_missing_or_extra():
  preds, gt, cfg = problem("pose")
  with pytest.raises(TypeError, match=r"the pose loss needs preds\.keypoints"):
    jaxtal.pose_loss(preds._replace(keypoints=None), gt, cfg)
  with pytest.raises(TypeError, match=r"the detection loss does not read preds\.keypoints .*another task's model"):
    jaxtal.detection_loss(preds, gt, jaxtal.LossConfig(num_classes=NC, strides=STRIDES, reg_max=R))
  with pytest.raises(TypeError, match=r"pose_loss: predictions must be jaxtal\.Predictions\(feats, keypoints=\.\.\.\)"):
    jaxtal.pose_loss(list(preds.feats), gt, cfg)
  with pytest.raises(TypeError, match="not a tuple of arguments"):  # the old end_to_end_loss branch form
    jaxtal.detection_loss((list(preds.feats),), gt, jaxtal.LossConfig(num_classes=NC, strides=STRIDES, reg_max=R))


@pytest.mark.slow  # the same property per task is in test_<task>.py; all tasks at once here
def test_a_plain_list_of_head_maps_is_detection_predictions():
  preds, gt, cfg = problem("detection")
  np.testing.assert_array_equal(jaxtal.detection_loss(list(preds.feats), gt, cfg)[0], jaxtal.detection_loss(preds, gt, cfg)[0])


@pytest.mark.parametrize("task", TASKS)
def test_each_input_is_validated_once_per_call(task, monkeypatch):
  preds, gt, cfg = problem(task)
  calls = {}
  for name in ("head", "strides_match", "level_maps", "ground_truth", "class_weights", "gt_keypoints", "gt_masks", "float_array"):
    original = getattr(_validate, name)

    def counted(*args, _name=name, _original=original, **kwargs):
      calls[_name] = calls.get(_name, 0) + 1
      return _original(*args, **kwargs)

    monkeypatch.setattr(_validate, name, counted)
  jax.jit(functools.partial(entry(task, "loss")[0], config=cfg))(preds, gt)  # validation runs while tracing
  assert calls and max(calls.values()) == 1, calls
  assert calls["head"] == calls["ground_truth"] == calls["class_weights"] == 1
  if task == "obb" or task == "pose":
    assert calls["level_maps"] == 1


@pytest.mark.slow  # the same property per task is in test_<task>.py; all tasks at once here
@pytest.mark.parametrize("task", TASKS)
def test_end_to_end_loss_forwards_each_branch_and_takes_the_task_config_class(task):
  preds, gt, cfg = problem(task)
  loss, _ = entry(task, "loss")
  e2e = jaxtal.EndToEndLoss(loss_fn=loss, num_classes=NC, strides=STRIDES, reg_max=R, **({"kpt_shape": (K, 3)} if task == "pose" else {}))
  assert type(e2e.config) is entry(task, "config")[0]
  total, parts = jax.jit(lambda p, g: e2e(p, p, g, weight=0.25))(preds, gt)
  many = jax.jit(lambda p, g: loss(p, g, cfg)[0])(preds, gt)
  one, one_parts = jax.jit(lambda p, g: loss(p, g, cfg, topk=7, topk2=1))(preds, gt)
  np.testing.assert_allclose(total, 0.25 * many + 0.75 * one, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(parts), np.asarray(one_parts), rtol=1e-6)


def test_end_to_end_loss_of_a_foreign_loss_needs_its_config():
  with pytest.raises(TypeError, match="not a jaxtal task loss"):
    jaxtal.EndToEndLoss(loss_fn=lambda preds, gt, **kw: None, num_classes=NC, strides=STRIDES)


@pytest.mark.slow  # the same property per task is in test_<task>.py; all tasks at once here
@pytest.mark.parametrize("task", TASKS)
def test_checked_loss_equals_the_loss_on_valid_input(task):
  preds, gt, cfg = problem(task)
  err, (total, parts) = jax.jit(checkify.checkify(functools.partial(entry(task, "checked")[0], config=cfg)))(preds, gt)
  err.throw()
  np.testing.assert_allclose(total, entry(task, "loss")[0](preds, gt, cfg)[0], rtol=1e-6)


@functools.cache
def _checked(task, cfg):
  return jax.jit(checkify.checkify(functools.partial(entry(task, "checked")[0], config=cfg)))


def _checked_error(task, preds, gt, cfg):
  err, _ = _checked(task, cfg)(preds, gt)  # compiled once per task and input shapes; the values vary
  return err.get()


@pytest.mark.slow  # five checkified losses compiled; check_values alone is tested below in the default run
def test_checked_losses_name_a_bad_value_of_each_task():
  preds, gt, cfg = problem("obb")
  msg = _checked_error("obb", preds, gt._replace(boxes=gt.boxes.at[1, 0, 3].set(-4.0)), cfg)
  assert msg and "negative side" in msg and "image 1, slot 0" in msg, msg
  preds, gt, cfg = problem("pose")
  msg = _checked_error("pose", preds, gt._replace(keypoints=gt.keypoints.at[0, 0, 1, 0].set(jnp.nan)), cfg)
  assert msg and "labelled keypoint" in msg and "image 0, slot 0, keypoint 1" in msg, msg
  msg = _checked_error("pose", preds, gt._replace(keypoints=gt.keypoints.at[0, 0, 2, 0].set(jnp.nan)), cfg)
  assert msg is None  # keypoint 2 is unlabelled (visibility 0): its coordinates may hold anything
  msg = _checked_error("pose", preds, gt._replace(keypoints=gt.keypoints.at[1, 1, 0, 2].set(jnp.inf)), cfg)
  assert msg and "visibility" in msg and "image 1, slot 1, keypoint 0" in msg, msg
  preds, gt, cfg = problem("segment")
  msg = _checked_error("segment", preds, gt._replace(masks=gt.masks.at[1, 3, 4].set(7)), cfg)
  assert msg and "outside [0, M = 3]" in msg and "image 1, pixel (y, x) = (3, 4)" in msg, msg
  per_slot = jnp.stack([gt.masks == j + 1 for j in range(3)], axis=1).astype(jnp.float32)
  assert _checked_error("segment", preds, gt._replace(masks=per_slot.at[0, 2, 0, 0].set(jnp.nan)), cfg) is None  # padding slot
  msg = _checked_error("segment", preds, gt._replace(masks=per_slot.at[0, 0, 5, 6].set(jnp.nan)), cfg)
  assert msg and "image 0, slot 0, pixel (y, x) = (5, 6)" in msg, msg
  msg = _checked_error("segment", preds._replace(proto=preds.proto.at[0, 0, 0, 0].set(jnp.inf)), gt, cfg)
  assert msg and "preds.proto" in msg, msg


def _values_error(gt):
  err, _ = jax.jit(checkify.checkify(lambda g: jaxtal.check_values(g, num_classes=NC, image_size=(IMAGE, IMAGE))))(gt)
  return err.get()


def test_check_values_names_bad_keypoints_masks_and_class_maps():
  _, gt, _ = problem("pose")
  assert _values_error(gt) is None
  assert _values_error(gt._replace(keypoints=gt.keypoints.at[0, 2, 1, 0].set(jnp.nan))) is None  # slot 2 is padding
  msg = _values_error(gt._replace(keypoints=gt.keypoints.at[0, 0, 0, 1].set(2e6)))
  assert msg and "beyond COORD_LIMIT" in msg and "image 0, slot 0, keypoint 0" in msg, msg
  _, gt, _ = problem("segment")
  per_slot = jnp.stack([gt.masks == j + 1 for j in range(3)], axis=1).astype(jnp.float32)
  msg = _values_error(gt._replace(masks=per_slot.at[1, 1, 2, 3].set(1.5)))
  assert msg and "not a finite value in [0, 1]" in msg and "image 1, slot 1, pixel (y, x) = (2, 3)" in msg, msg
  msg = _values_error(gt._replace(masks=gt.masks.at[0, 0, 0].set(-1)))
  assert msg and "outside [0, M = 3]" in msg, msg
  cmap = jnp.full(gt.masks.shape, -1, jnp.int32).at[:, :4, :4].set(NC - 1)  # a pipeline's class map
  assert _values_error(gt._replace(class_map=cmap)) is None
  msg = _values_error(gt._replace(class_map=cmap.at[1, 5, 6].set(NC)))
  assert msg and f"class outside [-1, {NC})" in msg and "image 1, pixel (y, x) = (5, 6) with value {NC}".format(NC=NC) in msg, msg
  assert "gt.class_map" in _values_error(gt._replace(class_map=cmap.at[0, 0, 0].set(-2)))
