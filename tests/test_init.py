"""The public API is exactly ``jaxtal.__all__``, and every public name is documented."""

from __future__ import annotations

import inspect
import types

import jaxtal


def test_every_name_in_all_is_importable_and_unique():
  assert len(jaxtal.__all__) == len(set(jaxtal.__all__))
  for name in jaxtal.__all__:
    assert hasattr(jaxtal, name), name
  namespace = {}
  exec("from jaxtal import *", namespace)  # noqa: S102
  assert set(namespace) - {"__builtins__"} == set(jaxtal.__all__)


def test_no_public_attribute_outside_all():
  extra = [
      n for n in dir(jaxtal)
      if not n.startswith("_") and n not in jaxtal.__all__ and not isinstance(getattr(jaxtal, n), types.ModuleType)
  ]
  assert not extra, f"public attributes not in jaxtal.__all__: {extra}"
  assert isinstance(jaxtal.__version__, str)


def _public_members(obj):
  """``obj``'s own public methods and properties (defined in jaxtal, not inherited from Flax or tuple)."""
  for name, member in vars(obj).items():
    if name.startswith("_") and name != "__call__":
      continue
    if inspect.isfunction(member) or isinstance(member, property):
      yield name, member


def test_every_public_name_has_a_docstring():
  missing = []
  for name in jaxtal.__all__:
    obj = getattr(jaxtal, name)
    if not (callable(obj) or inspect.isclass(obj)):
      continue  # constants such as COORD_LIMIT
    if not (inspect.getdoc(obj) or "").strip():
      missing.append(name)
    if inspect.isclass(obj) and getattr(obj, "__module__", "").startswith("jaxtal"):
      for member, fn in _public_members(obj):
        if not (inspect.getdoc(fn) or "").strip():
          missing.append(f"{name}.{member}")
  assert not missing, f"public names without a docstring: {missing}"


def test_public_callables_come_from_jaxtal():
  """Nothing re-exported by accident from a dependency."""
  for name in jaxtal.__all__:
    obj = getattr(jaxtal, name)
    module = getattr(obj, "__module__", None)
    if module is not None and (callable(obj) or inspect.isclass(obj)):
      assert module.startswith("jaxtal"), (name, module)
