"""The public API is exactly ``jaxtal.__all__``, and every public name is documented."""

from __future__ import annotations

import ast
import inspect
import pathlib
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


def _cross_module_private_uses(path: pathlib.Path, modules: set[str]) -> list[str]:
  """``from jaxtal.x import _name`` and ``x._name`` (``x`` a jaxtal module imported here, also from a subpackage:
  ``from jaxtal.kernels import masks``) in one file.

  Package-internal modules (``_validate``, ``_parallel``) may be imported whole; NamedTuple's own
  ``_replace``/``_fields``/``_asdict``/``_make`` are public API despite the underscore.
  """
  tree = ast.parse(path.read_text())
  module_aliases, found = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxtal":
      for alias in node.names:
        if alias.name in modules:
          module_aliases[alias.asname or alias.name] = alias.name
        elif alias.name.startswith("_"):
          found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("jaxtal.") and alias.asname:
          module_aliases[alias.asname] = alias.name.split(".")[-1]
  namedtuple_api = {"_replace", "_fields", "_asdict", "_make"}
  for node in ast.walk(tree):
    if (
        isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
        and node.attr.startswith("_") and not node.attr.startswith("__") and node.attr not in namedtuple_api
    ):
      found.append(f"{path.name}:{node.lineno} reads {module_aliases[node.value.id]}.{node.attr}")
  return found


def test_no_module_reads_another_modules_underscore_names():
  """What two modules share has a public name in the module that owns it (the shared loss terms live in jaxtal.terms)."""
  package = pathlib.Path(jaxtal.__file__).parent
  files = sorted(package.rglob("*.py"))  # the subpackage jaxtal.kernels and its modules too
  modules = {p.parent.name if p.stem == "__init__" else p.stem for p in files} - {package.name}
  found = [use for path in files for use in _cross_module_private_uses(path, modules)]
  assert not found, f"cross-module underscore names: {found}"


def test_the_walker_finds_what_it_forbids(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(
      "from jaxtal.terms import _x\nfrom jaxtal import segment, _validate\nsegment._mask_sum(1)\nt._replace(a=1)\n"
      "from jaxtal.kernels import masks\nmasks._chunks(1)\n"
  )
  found = _cross_module_private_uses(bad, {"segment", "_validate", "terms", "masks"})
  assert found == ["bad.py:1 imports jaxtal.terms._x", "bad.py:3 reads segment._mask_sum", "bad.py:6 reads masks._chunks"], found
