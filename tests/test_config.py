"""jaxtal.config: frozen, hashable, validated configuration objects and how functions take them."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

import jaxtal
from support.oracles import np_assign
from support.problems import LOSS_CFG, NC, R, STRIDES, assign, assign_problem, loss_config, loss_problem


def test_defaults_are_ultralytics_v8_detection_loss():
  """Hand-copied from Ultralytics 8.4.190's v8DetectionLoss / TaskAlignedAssigner as the loss builds it."""
  cfg = jaxtal.LossConfig(num_classes=80, strides=(8, 16, 32))
  assert (cfg.topk, cfg.topk2, cfg.alpha, cfg.beta, cfg.eps) == (10, None, 0.5, 6.0, 1e-9)
  assert (cfg.box, cfg.cls, cfg.dfl, cfg.reg_max) == (7.5, 0.5, 1.5, 16)
  assert (cfg.min_box_side, cfg.overlap, cfg.layout, cfg.gt_chunk, cfg.axis_name) == (None, "ciou", "NHWC", None, None)
  # Ultralytics 8.4.190 widens GT sides under strides[1] ("stride_val") for the in-box test.
  assert cfg.side_floor == float(cfg.strides[1])
  assert isinstance(cfg, jaxtal.AssignerConfig)


def test_frozen():
  cfg = jaxtal.AssignerConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.topk = 3
  lcfg = loss_config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    lcfg.strides = (8,)


def test_keyword_only():
  with pytest.raises(TypeError):
    jaxtal.AssignerConfig(10)  # positional: which field would 10 be?


def test_equal_configs_are_equal_and_hash_equal():
  a = jaxtal.LossConfig(num_classes=3, strides=[8, 16.0], topk=5)  # a list, a whole float
  b = jaxtal.LossConfig(num_classes=3, strides=(8, 16), topk=5)
  assert a == b and hash(a) == hash(b)
  assert a.strides == (8, 16) and isinstance(a.strides, tuple)
  assert all(type(s) is int for s in a.strides)  # whole strides become ints
  assert jaxtal.LossConfig(num_classes=3, strides=(8, 12.5)).strides == (8, 12.5)
  assert a != dataclasses.replace(a, topk=6)
  assert hash(jaxtal.AssignerConfig(overlap="iou")) == hash(jaxtal.AssignerConfig(overlap="iou"))
  assert len({a, b, dataclasses.replace(a, topk=6)}) == 2


def test_one_compilation_for_equal_configs():
  """A config is a jit static argument: equal configs share one compilation, a different one compiles."""
  traces = []

  @functools.partial(jax.jit, static_argnames="config")
  def assign(scores, boxes, anchors, gt, config):
    traces.append(config)
    return jaxtal.task_aligned_assign(scores, boxes, anchors, gt, config)

  scores, boxes, anchors, gt = assign_problem(seed=0)
  first = assign(scores, boxes, anchors, gt, config=jaxtal.AssignerConfig(topk=3, alpha=1.0))
  again = assign(scores, boxes, anchors, gt, config=jaxtal.AssignerConfig(alpha=1.0, topk=3))  # a new, equal object
  assert len(traces) == 1 and assign._cache_size() == 1
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x, y)
  assign(scores, boxes, anchors, gt, config=jaxtal.AssignerConfig(topk=4, alpha=1.0))
  assert len(traces) == 2 and assign._cache_size() == 2


BAD = [
    (dict(topk=0), "topk must be a whole number >= 1, got 0"),
    (dict(topk=2.5), "topk must be a whole number >= 1, got 2.5"),
    (dict(topk=True), "topk must be a whole number >= 1, got True"),
    (dict(topk2=0), "topk2 must be a whole number >= 1, got 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number >= 0, got nan"),
    (dict(beta=-1.0), "beta must be a finite number >= 0, got -1.0"),
    (dict(eps=float("inf")), "eps must be a finite number"),
    (dict(min_box_side=-8), "min_box_side must be a finite number >= 0, got -8"),
    (dict(overlap="giou"), r"overlap must be one of \('ciou', 'iou'\), got 'giou'"),
    (dict(gt_chunk=0), "gt_chunk must be a whole number >= 1, got 0"),
]
LOSS_BAD = [
    (dict(layout="NHW"), r"layout must be one of \('NHWC', 'NCHW'\), got 'NHW'"),
    (dict(strides=8), r"strides must be a sequence with one stride per feature level, e\.g\. \(8, 16, 32\); got 8"),
    (dict(strides=(8, -16)), r"strides\[1\] must be a finite positive number, got -16"),
    (dict(strides=(8, float("nan"))), r"strides\[1\] must be a finite number, got nan"),
    (dict(strides=()), "strides is empty"),
    (dict(num_classes=0), "num_classes must be a whole number >= 1, got 0"),
    (dict(num_classes=2.5), "num_classes must be a whole number >= 1, got 2.5"),
    (dict(reg_max=0), "reg_max must be a whole number >= 1, got 0"),
    (dict(box=float("inf")), "box must be a finite number, got inf"),
    (dict(cls="high"), "cls must be a finite number, got 'high'"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[str(k) for k, _ in BAD])
def test_assigner_config_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    jaxtal.AssignerConfig(**kwargs)
  with pytest.raises(ValueError, match=message):  # inherited by the loss's config
    loss_config(**kwargs)


@pytest.mark.parametrize("kwargs, message", LOSS_BAD, ids=[str(k) for k, _ in LOSS_BAD])
def test_loss_config_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    loss_config(**kwargs)


def test_loss_config_requires_num_classes_and_strides():
  with pytest.raises(TypeError, match="num_classes"):
    jaxtal.LossConfig(strides=(8,))
  with pytest.raises(TypeError, match="strides"):
    jaxtal.LossConfig(num_classes=3)


def test_validation_happens_where_the_config_is_written():
  """A bad keyword fails in the call that received it, before any tracing."""
  feats, gt = loss_problem()
  with pytest.raises(ValueError, match="topk must be a whole number >= 1, got 0"):
    jaxtal.detection_loss(feats, gt, num_classes=NC, strides=STRIDES, reg_max=R, topk=0)
  scores, boxes, anchors, agt = assign_problem()
  with pytest.raises(ValueError, match="overlap must be one of"):
    jaxtal.task_aligned_assign(scores, boxes, anchors, agt, overlap="giou")


def test_unknown_keyword_is_a_type_error_naming_it():
  feats, gt = loss_problem()
  with pytest.raises(TypeError, match=r"detection_loss: unknown configuration keyword\(s\) \['top_k'\]; LossConfig takes"):
    jaxtal.detection_loss(feats, gt, num_classes=NC, strides=STRIDES, reg_max=R, top_k=3)
  scores, boxes, anchors, agt = assign_problem()
  with pytest.raises(TypeError, match=r"task_aligned_assign: unknown configuration keyword\(s\) \['num_classes'\]"):
    jaxtal.task_aligned_assign(scores, boxes, anchors, agt, num_classes=3)  # a loss field, not the assigner's
  with pytest.raises(TypeError, match=r"\['stride'\]"):
    jaxtal.DetectionLoss(num_classes=NC, stride=STRIDES)
  with pytest.raises(TypeError, match=r"\['top_k'\]"):
    jaxtal.detection_targets(feats, gt, loss_config(), top_k=3)


def test_config_of_the_wrong_kind_is_a_type_error():
  feats, gt = loss_problem()
  with pytest.raises(TypeError, match="detection_loss: config must be a jaxtal.LossConfig, got AssignerConfig"):
    jaxtal.detection_loss(feats, gt, jaxtal.AssignerConfig())
  with pytest.raises(TypeError, match="config must be a jaxtal.AssignerConfig, got dict"):
    jaxtal.task_aligned_assign(*assign_problem(), dict(topk=3))


def test_a_loss_config_works_for_the_assigner():
  """task_aligned_assign reads its own fields of a LossConfig (a subclass)."""
  args = assign_problem(seed=1)
  got = assign(*args, loss_config(topk=3, alpha=1.0, min_box_side=8.0))
  expected = np_assign(*args, topk=3, alpha=1.0, min_box_side=8.0)
  np.testing.assert_array_equal(got.fg_mask, expected["fg_mask"])
  np.testing.assert_array_equal(got.gt_index, expected["gt_index"])
  np.testing.assert_allclose(got.scores, expected["scores"], rtol=1e-5, atol=1e-7)


def test_keywords_amend_a_given_config():
  args = assign_problem(seed=1)
  base = jaxtal.AssignerConfig(topk=3)
  amended = jax.jit(lambda *a: jaxtal.task_aligned_assign(*a, base, alpha=1.0, min_box_side=8.0))(*args)
  expected = np_assign(*args, topk=3, alpha=1.0, min_box_side=8.0)
  np.testing.assert_array_equal(amended.fg_mask, expected["fg_mask"])
  np.testing.assert_allclose(amended.scores, expected["scores"], rtol=1e-5, atol=1e-7)
  assert base == jaxtal.AssignerConfig(topk=3)  # the given config is not modified
  module = jaxtal.DetectionLoss(LOSS_CFG, topk=5, box=2.0)
  assert module.config == dataclasses.replace(LOSS_CFG, topk=5, box=2.0) and LOSS_CFG.topk == 10


@pytest.mark.slow
def test_whole_float_topk_is_stored_as_an_int():
  cfg = jaxtal.AssignerConfig(topk=3.0)
  assert type(cfg.topk) is int
  jaxtal.task_aligned_assign(*assign_problem(), cfg)


@pytest.mark.parametrize("kwargs", [dict(topk="3"), dict(num_classes="3"), dict(box="7.5")])
def test_strings_are_rejected(kwargs):
  with pytest.raises((TypeError, ValueError)):
    loss_config(**kwargs)


def test_side_floor_follows_the_strides():
  """``min_box_side=None`` is read through the strides at use, so replacing the strides moves the floor."""
  cfg = jaxtal.LossConfig(num_classes=3, strides=(8, 16, 32))
  assert cfg.side_floor == 16.0
  assert dataclasses.replace(cfg, strides=(4, 8)).side_floor == 8.0
  assert jaxtal.LossConfig(num_classes=3, strides=(32,)).side_floor == 32.0
  assert dataclasses.replace(cfg, min_box_side=0).side_floor == 0.0
  assert jaxtal.AssignerConfig().side_floor == 16.0


def test_side_floor_is_the_references_stride_val():
  """Independently of jaxtal: Ultralytics' loss sets its assigner's side floor from the model's strides."""
  pytest.importorskip("ultralytics")
  from support import reference
  from ultralytics.utils.loss import v8DetectionLoss
  from ultralytics.utils.tal import TaskAlignedAssigner

  for strides in ((8, 16, 32), (8, 16, 32, 64), (16,)):
    crit = reference.criterion(v8DetectionLoss, num_classes=3, strides=strides, min_box_side=None)
    floor = jaxtal.LossConfig(num_classes=3, strides=strides).side_floor
    assert float(crit.assigner.stride_val) == floor, strides
  assert float(TaskAlignedAssigner().stride_val) == jaxtal.AssignerConfig().side_floor
