"""Parity of :func:`jaxtal.end_to_end_loss` (and the YOLOv10 sum form) with Ultralytics 8.4.190.

Every case of ``cases.E2E_CASES`` (two branches' NCHW maps + YOLO label rows, an epoch of a
run) is checked against its golden fixture (``tests/fixtures/e2e_<case>.npz``) and, marked
``live``, against ``E2ELoss`` / ``E2EDetectLoss`` run now through ``tests/reference.py``: the
reference criterion is advanced one ``update()`` per finished epoch, as its trainer does, and
jaxtal gets ``weight=one2many_weight(epoch, epochs)``.

Rules as in ``test_parity_loss.py``: total and the reported parts within ``rtol=1e-4``; per
level and branch ``max|grad - ref| <= 1e-3 * max|ref|``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import cases
import jaxtal

LOSS_RTOL = 1e-4
GRAD_RATIO = 1e-3


def _setup(case: dict):
  kwargs, m = cases.split_loss_config(case["config"])
  epoch, epochs, v10 = kwargs.pop("epoch"), kwargs.pop("epochs"), kwargs.pop("yolov10")
  cfg = jaxtal.LossConfig(**kwargs, layout="NCHW")
  feats = case["inputs"]["feats"]
  size = feats[0].shape[2] * cfg.strides[0], feats[0].shape[3] * cfg.strides[0]
  gt = jaxtal.pack_labels(case["inputs"]["label_rows"], feats[0].shape[0], m, size)
  return cfg, gt, epoch, epochs, v10


@functools.partial(jax.jit, static_argnames=("config", "v10"))
def _value_and_grad(many, one, gt, weight, *, config, v10):
  def f(many, one):
    if v10:
      return jaxtal.end_to_end_sum_loss(jaxtal.detection_loss, (many,), (one,), gt, config=config)
    return jaxtal.end_to_end_loss(jaxtal.detection_loss, (many,), (one,), gt, weight=weight, config=config)

  (total, parts), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(many, one)
  return total, parts, grads


def run_jaxtal(case: dict):
  cfg, gt, epoch, epochs, v10 = _setup(case)
  weight = np.float32(jaxtal.one2many_weight(epoch, epochs))
  many = [np.asarray(f) for f in case["inputs"]["feats"]]
  one = [np.asarray(f) for f in case["inputs"]["feats_o2o"]]
  total, parts, (g_many, g_one) = _value_and_grad(many, one, gt, weight, config=cfg, v10=v10)
  return float(total), parts, [np.asarray(g) for g in g_many], [np.asarray(g) for g in g_one]


def assert_matches(case: dict, ref: dict):
  total, parts, g_many, g_one = run_jaxtal(case)
  np.testing.assert_allclose(total, ref["total"], rtol=LOSS_RTOL, atol=1e-6, err_msg="total")
  for name in ("box", "cls", "dfl"):
    np.testing.assert_allclose(float(getattr(parts, name)), ref[name], rtol=LOSS_RTOL, atol=1e-6, err_msg=name)
  for branch, got, want in (("one2many", g_many, ref["grads"]), ("one2one", g_one, ref["grads_o2o"])):
    for level, (g, r) in enumerate(zip(got, want)):
      worst = np.max(np.abs(g - r))
      assert worst <= GRAD_RATIO * max(np.max(np.abs(r)), 1e-12), f"{branch} level {level}: {worst}"


# The default run checks one fixture (YOLOv10's form); the rest
# are marked slow (each compiles its own step), and every case runs live.
_DEFAULT_FIXTURES = ("v10",)  # the live middle_epoch and v10_reg_max1 run by default too
_FIXTURE_PARAMS = [n if n in _DEFAULT_FIXTURES else pytest.param(n, marks=pytest.mark.slow) for n in cases.E2E_CASES]


@pytest.mark.parametrize("name", _FIXTURE_PARAMS)
def test_golden_fixture(name):
  case, ref, version = cases.load_fixture("e2e", name)
  assert version == "8.4.190"
  assert_matches(case, ref)


@pytest.mark.parametrize("name", cases.E2E_CASES)
def test_fixture_inputs_match_builders(name):
  stored, _, _ = cases.load_fixture("e2e", name)
  built = cases.e2e_case(name)
  assert stored["config"] == {**built["config"], "strides": tuple(built["config"]["strides"])}
  for key in ("feats", "feats_o2o"):
    for a, b in zip(stored["inputs"][key], built["inputs"][key]):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(stored["inputs"]["label_rows"], built["inputs"]["label_rows"])


def test_cases_cover_the_schedule_and_the_edge_cases():
  configs = {n: cases.e2e_case(n)["config"] for n in cases.E2E_CASES}
  epochs = {c["epoch"] for c in configs.values() if not c["yolov10"]}
  assert {0, 19} <= epochs and len(epochs) >= 3  # first, middle, last
  assert {c["reg_max"] for c in configs.values()} == {1, 16}
  assert any(c["yolov10"] for c in configs.values())
  assert cases.e2e_case("empty_batch")["inputs"]["label_rows"].shape == (0, 6)


# Live, the default run checks two cases the default fixtures leave out (a middle epoch, YOLOv10 with
# reg_max 1); the other live cases are slow (CI runs them).
_DEFAULT_LIVE = ("middle_epoch", "v10_reg_max1")
_LIVE_PARAMS = [n if n in _DEFAULT_LIVE else pytest.param(n, marks=pytest.mark.slow) for n in cases.E2E_CASES]


@pytest.mark.live
@pytest.mark.parametrize("name", _LIVE_PARAMS)
def test_live(name, reference):
  case = cases.e2e_case(name)
  kwargs, _ = cases.split_loss_config(case["config"])
  ref = reference.e2e_loss(case["inputs"]["feats"], case["inputs"]["feats_o2o"], case["inputs"]["label_rows"], **kwargs)
  assert_matches(case, ref)
