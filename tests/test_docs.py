"""The README and docs/ pages: every Python block runs as pasted (each file's blocks in order, in one namespace), the
README stays short, and its links resolve."""

import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))


def python_blocks(path: pathlib.Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def run_blocks(name: str) -> dict:
  namespace: dict = {"__name__": f"docs_{pathlib.Path(name).stem}"}
  for i, block in enumerate(python_blocks(ROOT / name)):
    try:
      exec(compile(block, f"{name} python block {i}", "exec"), namespace)  # noqa: S102
    except Exception as e:  # noqa: BLE001
      pytest.fail(f"{name} python block {i} failed: {type(e).__name__}: {e}")
  return namespace


def test_readme_is_short_and_has_the_two_commands():
  text = README.read_text()
  assert len(text) <= 10_000, f"README.md has {len(text)} characters (at most 10,000)"
  assert "python examples/toy_assign.py" in text and "python -m pytest" in text
  assert len(python_blocks(README)) >= 2


@pytest.mark.parametrize("name", PAGES)
def test_relative_links_resolve(name):
  path = ROOT / name
  for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue
    assert (path.parent / target.split("#")[0]).exists(), f"{name} links to a missing file: {target}"


def test_readme_links_every_docs_page():
  text = README.read_text() + (DOCS / "index.md").read_text()
  for page in DOCS.glob("*.md"):
    assert f"{page.name})" in text, f"docs/{page.name} is linked from neither README.md nor docs/index.md"


@pytest.mark.slow
def test_readme_blocks_run():
  ns = run_blocks("README.md")
  assert np.isfinite(float(ns["total"]))
  losses = ns["losses"]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses  # the training step trains


@pytest.mark.slow
def test_detection_page_blocks_run():
  ns = run_blocks("docs/detection.md")
  # The tour's numbers are real: a finite loss, equal through both halves; one GT per image with anchors;
  # the step-by-step form equal to the fast one; another overlap gives another loss.
  total = float(ns["total"])
  assert np.isfinite(total) and np.isclose(total, float(ns["total2"]), rtol=1e-5)
  assert np.asarray(ns["targets"].positives_per_gt)[:, 0].min() > 0
  np.testing.assert_array_equal(ns["steps"].assignment.fg_mask, ns["assignment"].fg_mask)
  assert not np.isclose(float(ns["total_iou"]), total)
  assert np.isfinite(float(ns["total26"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", [p for p in PAGES if p not in ("README.md", "docs/detection.md")])
def test_page_blocks_run(name):
  ns = run_blocks(name)
  if "total" in ns:
    assert np.isfinite(float(ns["total"]))
