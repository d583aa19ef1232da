"""Writes the golden pose parity fixtures ``tests/fixtures/pose_loss_<case>.npz``.

Needs the ``parity`` extra (torch + ultralytics 8.4.190). Every case of ``pose_cases.py`` runs
through ``pose_reference.py`` (the tie cases, ``pose_cases.TIE_CASES``, under
``reference.stable_ties()``); each file holds the case's inputs, the reference outputs, the
config (JSON) and the reference version, byte-for-byte reproducible (``cases.save_npz``).

Usage::

  python tests/make_pose_fixtures.py           # (re)write every pose fixture
  python tests/make_pose_fixtures.py --check   # compare jaxtal with the stored fixtures, print the worst differences
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402
import pose_cases  # noqa: E402


def reference_loss(ref_module, case: dict, *, stable: bool | None = None) -> dict:
  """The reference on a case; ``stable`` defaults to whether the case has top-k ties."""
  kwargs, _ = pose_cases.split_loss_config(case["config"])
  x = case["inputs"]
  stable = case["name"] in pose_cases.TIE_CASES if stable is None else stable
  return ref_module.loss(x["feats"], x["kpts"], x["label_rows"], x["keypoints"], stable=stable, **kwargs)


def write_all() -> None:
  import pose_reference  # noqa: PLC0415

  names = pose_cases.POSE_LOSS_CASES
  jobs = ((pose_cases.fixture_path(name), pose_cases.loss_case(name), reference_loss) for name in names)
  cases.write_fixtures(pose_reference, pose_cases.to_arrays, jobs)


def check_all() -> None:
  """Prints jaxtal's worst differences from the stored pose fixtures (no reference needed)."""
  import test_parity_pose  # noqa: PLC0415

  errors = {}
  for name in pose_cases.POSE_LOSS_CASES:
    case, ref, _ = pose_cases.load_fixture(name)
    out = test_parity_pose.run_loss(case)
    errors[name] = test_parity_pose.loss_errors(out, ref)
    listed = "  ".join(f"{k} {v:.2e}" for k, v in errors[name].items())
    print(f"{name:14s} total = {out['total']:.6f} (ref {ref['total']:.6f})  {listed}")
  for key in errors[name]:
    name, worst = max(((n, e[key]) for n, e in errors.items()), key=lambda item: item[1])
    print(f"worst {key:22s} {worst:.3e} ({name})")


def main(argv=None) -> None:
  cases.fixture_main(__doc__, write_all, check_all, argv)


if __name__ == "__main__":
  main()
