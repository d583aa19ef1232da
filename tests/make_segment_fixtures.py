"""Writes the golden segmentation parity fixtures ``tests/fixtures/segment_<case>.npz``.

Needs the ``parity`` extra (torch + ultralytics 8.4.190). Every case of ``segment_cases.py`` runs
through ``segment_reference.py`` with stable top-k ties (``reference.stable_ties``: jaxtal's
order); each file holds the case's inputs, the reference outputs, the config (JSON) and the
reference version, byte-for-byte reproducible (``cases.save_npz``).

Usage::

  python tests/make_segment_fixtures.py           # (re)write every segmentation fixture
  python tests/make_segment_fixtures.py --check   # compare jaxtal with the stored fixtures, print the worst differences
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402
import segment_cases  # noqa: E402


def write_all() -> None:
  import segment_reference  # noqa: PLC0415

  def run(ref, case):
    return segment_cases.reference_loss(ref, case, stable=True)

  names = segment_cases.SEGMENT_CASES
  jobs = ((segment_cases.fixture_path(name), segment_cases.loss_case(name), run) for name in names)
  cases.write_fixtures(segment_reference, segment_cases.to_arrays, jobs)


def check_all() -> None:
  """Prints jaxtal's differences from the stored fixtures, case by case and the worst (no reference needed)."""
  import test_parity_segment as parity  # noqa: PLC0415

  errors = {}
  for name in segment_cases.SEGMENT_CASES:
    case, ref, _ = segment_cases.load_fixture(name)
    errors[name] = parity.loss_errors(parity.run_loss(case), ref)
    print(f"{name:14s} " + "  ".join(f"{k} {v:.2e}" for k, v in errors[name].items()))
  for key in next(iter(errors.values())):
    print(f"worst {key:20s} {max(e[key] for e in errors.values()):.3e}")


def main(argv=None) -> None:
  cases.fixture_main(__doc__, write_all, check_all, argv)


if __name__ == "__main__":
  main()
