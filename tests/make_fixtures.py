"""Writes the golden parity fixtures ``tests/fixtures/{assign,loss,e2e}_<case>.npz``.

Needs the ``parity`` extra (torch + ultralytics 8.4.190). Every case of ``cases.py`` runs
through ``reference.py``; each file holds the case's inputs, the reference outputs, the
config (JSON) and the reference version. The output is byte-for-byte reproducible.

Usage::

  python tests/make_fixtures.py           # (re)write every fixture
  python tests/make_fixtures.py --kind e2e  # (re)write only the end-to-end fixtures
  python tests/make_fixtures.py --check   # compare jaxtal with the stored fixtures, print the worst differences
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402


def reference_assign(reference, case: dict) -> dict:
  x = case["inputs"]
  return reference.assign(
      x["pred_scores"], x["pred_boxes"], x["anchor_points"], x["gt_labels"], x["gt_boxes"], x["gt_mask"], **case["config"]
  )


def reference_loss(reference, case: dict) -> dict:
  kwargs, _ = cases.split_loss_config(case["config"])
  return reference.loss(case["inputs"]["feats"], case["inputs"]["label_rows"], **kwargs)


def reference_e2e(reference, case: dict) -> dict:
  kwargs, _ = cases.split_loss_config(case["config"])
  return reference.e2e_loss(case["inputs"]["feats"], case["inputs"]["feats_o2o"], case["inputs"]["label_rows"], **kwargs)


def write_all(kinds=("assign", "loss", "e2e")) -> None:
  import reference  # noqa: PLC0415

  jobs = (
      (cases.fixture_path(kind, name), build(name), run)
      for kind, names, build, run in (
          ("assign", cases.ASSIGN_CASES, cases.assign_case, reference_assign),
          ("loss", cases.LOSS_CASES, cases.loss_case, reference_loss),
          ("e2e", cases.E2E_CASES, cases.e2e_case, reference_e2e),
      )
      if kind in kinds
      for name in names
  )
  cases.write_fixtures(reference, cases.to_arrays, jobs)


def check_all() -> None:
  """Prints jaxtal's worst differences from the stored fixtures (no reference needed)."""
  import jax  # noqa: PLC0415

  import jaxtal  # noqa: PLC0415

  worst_score = 0.0
  for name in cases.ASSIGN_CASES:
    case, ref, _ = cases.load_fixture("assign", name)
    x = case["inputs"]
    gt = jaxtal.GroundTruth(x["gt_labels"], x["gt_boxes"], x["gt_mask"])
    assign = jax.jit(functools.partial(jaxtal.task_aligned_assign, **case["config"]))
    got = assign(x["pred_scores"], x["pred_boxes"], x["anchor_points"], gt)
    diff = float(np.max(np.abs(np.asarray(got.scores) - ref["scores"]), initial=0.0))
    pos = ref["scores"].sum(-1) > 0
    fg_diff = int(np.sum(np.asarray(got.fg_mask) != ref["fg_mask"]))
    print(f"assign {name:24s} max|d scores| = {diff:.3e}  positives = {int(pos.sum()):4d}  fg differs on {fg_diff} (zero-score) anchors")
    worst_score = max(worst_score, diff)

  worst_part, worst_grad = 0.0, 0.0
  for name in cases.LOSS_CASES:
    case, ref, _ = cases.load_fixture("loss", name)
    kwargs, m = cases.split_loss_config(case["config"])
    if kwargs["class_weights"] is not None:
      kwargs["class_weights"] = np.asarray(kwargs["class_weights"], np.float32)
    feats = case["inputs"]["feats"]
    size = feats[0].shape[2] * kwargs["strides"][0]
    gt = jaxtal.pack_labels(case["inputs"]["label_rows"], feats[0].shape[0], m, (size, size))

    def f(feats, gt, kwargs=kwargs):
      total, parts = jaxtal.detection_loss(feats, gt, layout="NCHW", **kwargs)
      return total, parts

    (total, parts), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(feats, gt)
    rel = []
    for key, value in (("total", total), ("box", parts.box), ("cls", parts.cls), ("dfl", parts.dfl)):
      r = ref[key]
      rel.append(abs(float(value) - r) / abs(r) if r != 0 else abs(float(value)))
    ratios = [
        float(np.max(np.abs(np.asarray(g) - rg)) / max(np.max(np.abs(rg)), 1e-30)) for g, rg in zip(grads, ref["grads"])
    ]
    print(
        f"loss   {name:24s} total = {float(total):.6f} (ref {ref['total']:.6f})  worst rel part diff = {max(rel):.3e}"
        f"  worst grad ratio = {max(ratios):.3e}"
    )
    worst_part, worst_grad = max(worst_part, max(rel)), max(worst_grad, max(ratios))
  print(f"worst target-score abs diff over assignment cases: {worst_score:.3e}")
  print(f"worst relative loss-part diff over loss cases:     {worst_part:.3e}")
  print(f"worst gradient ratio max|diff|/max|ref grad|:      {worst_grad:.3e}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="compare jaxtal with the stored fixtures instead of writing")
  parser.add_argument(
      "--kind", nargs="+", choices=("assign", "loss", "e2e"), default=("assign", "loss", "e2e"),
      help="write only these kinds (the assignment cases' inputs are decoded by jaxtal: rewriting them moves the"
      " stored inputs by float32 rounding whenever the decode kernel changes)",
  )
  args = parser.parse_args()
  check_all() if args.check else write_all(tuple(args.kind))


if __name__ == "__main__":
  main()
