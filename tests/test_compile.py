"""One compilation per configuration, and determinism.

* The jitted training step (loss, gradients, optimiser update) compiles once for a fixed
  ``(b, M, feature shapes, config)`` and is reused for batches with any number of real boxes
  (none, one, all ``M``, invalid rows). Compilations are counted three ways: Python traces of
  the step, the jitted function's cache size, and XLA backend compiles reported through
  ``jax.monitoring``. A control shows the counters do move when ``M`` or the config changes.
* The same inputs give bit-identical results run to run (and after recompiling), and jit
  equals eager within float32 tolerance.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxtal

NC, R = 3, 4
SHAPES = ((8, 8), (4, 4))
STRIDES = (4, 8)
IMAGE = 32
B, M = 2, 5
KW = dict(num_classes=NC, strides=STRIDES, reg_max=R, topk=5)

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_backend_compiles():
  """Counts XLA backend compilations inside the block (``counts[0]``)."""
  counts = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == BACKEND_COMPILE:
      counts[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def head_maps(seed=0, b=B):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(0.0, 1.0, (b, h, w, 4 * R + NC)), jnp.float32) for h, w in SHAPES]


def random_rows(rng, counts):
  """YOLO rows ``[image, class, cx, cy, w, h]`` (normalised) with ``counts[i]`` boxes in image ``i``."""
  rows = []
  for i, n in enumerate(counts):
    for _ in range(n):
      w, h = rng.uniform(0.1, 0.6, 2)
      cx, cy = rng.uniform(0.1, 0.9, 2)
      rows.append([i, rng.integers(NC), cx, cy, w, h])
  return np.asarray(rows, np.float32).reshape(-1, 6)


def batches(m=M):
  """Ground truths of one fixed shape with 0, 1, all-M and random numbers of real boxes, and invalid rows."""
  rng = np.random.default_rng(0)
  counts = [(0, 0), (1, 0), (m, m), (2, 4), (3, 1)]
  out = [jaxtal.pack_labels(random_rows(rng, c), B, m, (IMAGE, IMAGE)) for c in counts]
  bad = out[-1]
  labels, boxes = bad.labels.copy(), bad.boxes.copy()
  labels[0, 0] = NC + 3  # class out of range
  boxes[1, 0, 2] = np.nan  # non-finite coordinate
  out.append(jaxtal.GroundTruth(labels, boxes, bad.mask))
  return out


def make_train_step(traces, **config):
  """A jitted SGD step on the head maps themselves (standing in for a model's parameters)."""
  optimizer = optax.sgd(1e-3)

  def loss_fn(params, gt):
    return jaxtal.detection_loss(params, gt, **dict(KW, **config))

  @jax.jit
  def step(params, opt_state, gt):
    traces.append(jax.tree.map(lambda x: x.shape, gt))  # runs once per trace
    (total, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, gt)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, total, parts

  return step, optimizer


def test_train_step_compiles_once_for_any_number_of_real_boxes():
  traces = []
  step, optimizer = make_train_step(traces)
  params = head_maps()
  opt_state = optimizer.init(params)
  gts = batches()
  real = [int(np.asarray(g.mask).sum()) for g in gts]
  assert real == [0, 1, 2 * M, 6, 4, 4], real
  with count_backend_compiles() as compiles:
    totals = []
    for gt in gts * 2:  # every batch twice
      params, opt_state, total, _ = step(params, opt_state, gt)
      totals.append(float(total))
  assert np.isfinite(totals).all()
  assert len(set(totals)) > 1  # the batches really differ
  assert len(traces) == 1, f"the step was traced {len(traces)} times"
  assert step._cache_size() == 1
  assert compiles[0] == 1, f"{compiles[0]} backend compilations for {len(gts) * 2} batches"


@pytest.mark.slow  # > 4 s; CI runs it in the slow set
def test_counters_detect_a_recompilation():
  """Control: a different M (a different static shape) does compile again."""
  traces = []
  step, optimizer = make_train_step(traces)
  params = head_maps()
  opt_state = optimizer.init(params)
  with count_backend_compiles() as compiles:
    step(params, opt_state, batches(M)[3])
    step(params, opt_state, batches(M + 1)[3])
  assert len(traces) == 2 and step._cache_size() == 2 and compiles[0] == 2


def test_numpy_and_jax_ground_truth_share_one_compilation():
  """pack_labels gives NumPy arrays; feeding them or their device copies hits the same cache entry."""
  traces = []
  step, optimizer = make_train_step(traces)
  params = head_maps()
  opt_state = optimizer.init(params)
  gt = batches()[3]
  on_device = jax.tree.map(jnp.asarray, gt)
  with count_backend_compiles() as compiles:
    a = step(params, opt_state, gt)
    b = step(params, opt_state, on_device)
  assert compiles[0] == 1 and len(traces) == 1
  np.testing.assert_array_equal(a[2], b[2])


def test_nnx_module_step_compiles_once():
  loss_module = jaxtal.DetectionLoss(**KW)
  traces = []

  @nnx.jit
  def step(module, feats, gt):
    traces.append(1)
    return jax.value_and_grad(lambda f: module(f, gt)[0])(feats)

  feats = head_maps()
  with count_backend_compiles() as compiles:
    for gt in batches():
      value, grads = step(loss_module, feats, gt)
      assert np.isfinite(float(value))
  assert len(traces) == 1 and compiles[0] == 1


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------


def value_and_grads(feats, gt):
  return jax.value_and_grad(lambda f, g: jaxtal.detection_loss(f, g, **KW), has_aux=True)(feats, gt)


def as_numpy(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("index", [2, 4])
def test_same_inputs_give_bit_identical_results(index):
  feats, gt = head_maps(seed=1), batches()[index]
  fn = jax.jit(value_and_grads)
  first = as_numpy(fn(feats, gt))
  for _ in range(3):
    for x, y in zip(first, as_numpy(fn(feats, gt))):
      np.testing.assert_array_equal(x, y)
  recompiled = jax.jit(lambda f, g: value_and_grads(f, g))  # a new function: compiled again
  for x, y in zip(first, as_numpy(recompiled(feats, gt))):
    np.testing.assert_array_equal(x, y)


def test_assignment_is_bit_identical_run_to_run():
  rng = np.random.default_rng(3)
  anchors, strides = jaxtal.make_anchors(SHAPES, STRIDES)
  anchors = anchors * strides
  scores = jnp.asarray(rng.uniform(0, 1, (B, anchors.shape[0], NC)), jnp.float32)
  d = jnp.asarray(rng.uniform(1, 10, (B, anchors.shape[0], 4)), jnp.float32)
  boxes = jnp.concatenate([anchors - d[..., :2], anchors + d[..., 2:]], -1)
  gt = batches()[2]
  fn = jax.jit(functools.partial(jaxtal.task_aligned_assign, topk=5))
  first = as_numpy(fn(scores, boxes, anchors, gt))
  assert first[3].any()  # fg_mask: there are positives
  for _ in range(3):
    for x, y in zip(first, as_numpy(fn(scores, boxes, anchors, gt))):
      np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_jit_equals_eager():
  """The loss and its parts; the assignment's jit/eager agreement is a property in test_properties.py.

  (Slow: op by op, the eager loss costs ~15 s of compiles on CPU. Eager gradients are left out.)
  """
  feats, gt = head_maps(seed=2), batches()[3]
  loss = functools.partial(jaxtal.detection_loss, **KW)
  total_j, parts_j = jax.jit(loss)(feats, gt)
  total_e, parts_e = loss(feats, gt)
  assert float(parts_j.box) > 0
  np.testing.assert_allclose(total_j, total_e, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(parts_j), np.asarray(parts_e), rtol=1e-5)
