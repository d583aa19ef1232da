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

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402
import segment_cases  # noqa: E402


def write_all() -> None:
  import torch  # noqa: PLC0415

  import segment_reference as ref  # noqa: PLC0415

  torch.set_num_threads(1)  # fixed reduction order: the same bytes on every run
  if ref.VERSION != ref.REFERENCE_VERSION:
    raise SystemExit(f"reference is ultralytics {ref.VERSION}, fixtures must come from {ref.REFERENCE_VERSION}")
  os.makedirs(cases.FIXTURES_DIR, exist_ok=True)
  sizes = {}
  for name in segment_cases.SEGMENT_CASES:
    case = segment_cases.loss_case(name)
    arrays = segment_cases.to_arrays(case, segment_cases.reference_loss(ref, case, stable=True), ref.VERSION)
    cases.save_npz(segment_cases.fixture_path(name), arrays)
    sizes[name] = os.path.getsize(segment_cases.fixture_path(name))
  print("\n".join(f"segment_{name}.npz: {size / 1024:.1f} KiB" for name, size in sizes.items()))
  print(f"total {sum(sizes.values()) / 1024:.1f} KiB")


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
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="print jaxtal's differences from the stored fixtures")
  (check_all if parser.parse_args(argv).check else write_all)()


if __name__ == "__main__":
  main()
