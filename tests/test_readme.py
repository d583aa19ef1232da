"""The README's Python blocks run as pasted, in order, in one namespace (a newcomer's first contact)."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_tour_and_the_two_commands():
  text = README.read_text()
  assert "python examples/toy_assign.py" in text and "python -m pytest" in text
  assert len(python_blocks()) >= 2


@pytest.mark.slow
def test_readme_python_blocks_run_as_pasted():
  namespace: dict = {}
  for i, block in enumerate(python_blocks()):
    try:
      exec(compile(block, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
    except Exception as e:  # noqa: BLE001
      pytest.fail(f"README python block {i} failed: {type(e).__name__}: {e}")
    if i == 0:
      # The tour's numbers are real: a finite loss, equal through both halves; one GT per image with anchors;
      # the step-by-step form equal to the fast one; another overlap gives another loss.
      total = float(namespace["total"])
      assert np.isfinite(total) and np.isclose(total, float(namespace["total2"]), rtol=1e-5)
      assert np.asarray(namespace["targets"].positives_per_gt)[:, 0].min() > 0
      np.testing.assert_array_equal(namespace["steps"].assignment.fg_mask, namespace["assignment"].fg_mask)
      assert not np.isclose(float(namespace["total_iou"]), total)
  assert np.isfinite(float(namespace["total"]))  # the last block's loss
