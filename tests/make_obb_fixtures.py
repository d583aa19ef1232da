"""Writes the golden OBB parity fixtures ``tests/fixtures/obb_{assign,loss}_<case>.npz``.

Needs the ``parity`` extra (torch + ultralytics 8.4.190). Every case of ``obb_cases.py`` runs
through ``obb_reference.py``; each file holds the case's inputs, the reference outputs, the
config (JSON) and the reference version, byte-for-byte reproducible (``cases.save_npz``).

Usage::

  python tests/make_obb_fixtures.py           # (re)write every OBB fixture
  python tests/make_obb_fixtures.py --check   # compare jaxtal with the stored fixtures, print the worst differences
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402
import obb_cases  # noqa: E402


def reference_assign(ref_module, case: dict) -> dict:
  x = case["inputs"]
  return ref_module.assign(
      x["pred_scores"], x["pred_boxes"], x["anchor_points"], x["gt_labels"], x["gt_boxes"], x["gt_mask"], **case["config"]
  )


def reference_loss(ref_module, case: dict) -> dict:
  kwargs, _ = obb_cases.split_loss_config(case["config"])
  x = case["inputs"]
  return ref_module.loss(x["feats"], x["angles"], x["label_rows"], **kwargs)


def write_all() -> None:
  import obb_reference  # noqa: PLC0415

  jobs = (
      (obb_cases.fixture_path(kind, name), build(name), run)
      for kind, names, build, run in (
          ("assign", obb_cases.OBB_ASSIGN_CASES, obb_cases.assign_case, reference_assign),
          ("loss", obb_cases.OBB_LOSS_CASES, obb_cases.loss_case, reference_loss),
          ("probiou", ("pairs",), lambda _: obb_cases.probiou_case(), obb_cases.reference_probiou),
      )
      for name in names
  )
  cases.write_fixtures(obb_reference, obb_cases.to_arrays, jobs)


def check_all() -> None:
  """Prints jaxtal's worst differences from the stored OBB fixtures (no reference needed)."""
  import test_parity_obb  # noqa: PLC0415

  worst = {}

  def keep(key, value):
    worst[key] = max(worst.get(key, 0.0), value)

  for name in obb_cases.OBB_ASSIGN_CASES:
    case, ref, _ = obb_cases.load_fixture("assign", name)
    got = test_parity_obb.run_assign(case)
    diff = float(np.max(np.abs(got["scores"] - ref["scores"]), initial=0.0))
    pos = int((ref["scores"].sum(-1) > 0).sum())
    print(f"assign {name:20s} max|d scores| = {diff:.3e}  positives = {pos:4d}")
    keep("assign target score abs", diff)

  for name in obb_cases.OBB_LOSS_CASES:
    case, ref, _ = obb_cases.load_fixture("loss", name)
    out = test_parity_obb.run_loss(case)
    errs = test_parity_obb.loss_errors(out, ref)
    print(f"loss   {name:20s} total = {out['total']:.6f} (ref {ref['total']:.6f})  " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    for k, v in errs.items():
      keep(k, v)
  for k, v in worst.items():
    print(f"worst {k:28s} {v:.3e}")


def main(argv=None) -> None:
  cases.fixture_main(__doc__, write_all, check_all, argv)


if __name__ == "__main__":
  main()
