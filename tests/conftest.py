"""Shared test setup: ``tests/`` on ``sys.path`` (so test files import the ``support`` package), the
``variant`` fixture (compiled and eager), and the reference fixtures for live parity.

``reference`` is the module ``tests/support/reference.py`` (Ultralytics 8.4.190 on NumPy inputs);
``obb_reference``, ``pose_reference``, ``pose26_reference``, ``segment_reference`` and ``segment26_reference`` are
the task drivers built on it.
When torch or ultralytics cannot be imported, or the installed Ultralytics is not the
pinned version, tests that use them are skipped, unless ``JAXTAL_REQUIRE_REFERENCE=1`` (set
in CI): then a missing reference fails those tests instead.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import jax
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
  sys.path.insert(0, TESTS_DIR)


def reference_required() -> bool:
  """Whether a missing reference must fail the live tests (``JAXTAL_REQUIRE_REFERENCE=1``)."""
  return os.environ.get("JAXTAL_REQUIRE_REFERENCE", "").strip() == "1"


@functools.cache
def _import_reference():
  """``(module, None)`` or ``(None, reason)``; imported once per session."""
  try:
    from support import reference  # noqa: PLC0415  (imports torch and ultralytics)
  except ImportError as e:
    return None, f"reference not importable (torch + ultralytics, the 'parity' extra): {e}"
  if reference.VERSION != reference.REFERENCE_VERSION:
    return None, f"reference is ultralytics {reference.VERSION}, parity is pinned to {reference.REFERENCE_VERSION}"
  return reference, None


def load_reference():
  """The ``reference`` module, or skip (fail under ``JAXTAL_REQUIRE_REFERENCE=1``) when it is unavailable."""
  module, reason = _import_reference()
  if module is None:
    if reference_required():
      pytest.fail(f"JAXTAL_REQUIRE_REFERENCE=1 but {reason}", pytrace=False)
    pytest.skip(reason)
  return module


@pytest.fixture(scope="session")
def reference():
  """Ultralytics 8.4.190 as a black-box reference (``tests/support/reference.py``)."""
  return load_reference()


def _task_reference(name: str):
  """``support.<name>`` (a task's reference driver), or skip (fail under ``JAXTAL_REQUIRE_REFERENCE=1``)."""
  load_reference()
  try:
    return importlib.import_module(f"support.{name}")
  except ImportError as e:
    reason = f"{name} not importable (Ultralytics' task loss and assigner): {e}"
    if reference_required():
      pytest.fail(f"JAXTAL_REQUIRE_REFERENCE=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def obb_reference():
  """``tests/support/obb_reference.py``: Ultralytics' OBB pieces as a black box (after ``reference``'s checks)."""
  return _task_reference("obb_reference")


@pytest.fixture(scope="session")
def pose_reference():
  """``tests/support/pose_reference.py``: Ultralytics' pose loss as a black box (after ``reference``'s checks)."""
  return _task_reference("pose_reference")


@pytest.fixture(scope="session")
def pose26_reference():
  """``tests/support/pose26_reference.py``: Ultralytics' YOLO26 pose loss and assigner as a black box."""
  return _task_reference("pose26_reference")


@pytest.fixture(scope="session")
def segment_reference():
  """``tests/support/segment_reference.py``: Ultralytics' segmentation loss as a black box (after ``reference``'s checks)."""
  return _task_reference("segment_reference")


@pytest.fixture(scope="session")
def segment26_reference():
  """``tests/support/segment26_reference.py``: Ultralytics' YOLO26 segmentation loss as a black box (after ``reference``'s checks)."""
  return _task_reference("segment26_reference")


@pytest.fixture(params=["with_jit", "without_jit"])
def variant(request):
  """The function under test compiled (``jax.jit``, keyword arguments passed on) or run eagerly: the
  pytest form of ``@chex.variants(with_jit=True, without_jit=True)``."""
  if request.param == "with_jit":
    return lambda fn, **jit_kwargs: jax.jit(fn, **jit_kwargs)
  return lambda fn, **jit_kwargs: fn
