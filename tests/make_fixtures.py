"""Writes the golden parity fixtures ``tests/fixtures/*.npz`` (``support/fixtures.py``).

Needs the ``parity`` extra (torch + ultralytics 8.4.190). Every case of ``support/cases.py``,
``obb_cases.py``, ``pose_cases.py``, ``segment_cases.py``, ``segment26_cases.py`` and ``pose26_cases.py`` runs
through its reference driver (``support/reference.py``, ``obb_reference.py``, ``pose_reference.py``,
``segment_reference.py``, ``segment26_reference.py``, ``pose26_reference.py``);
each file holds the case's inputs, the reference outputs, the config (JSON) and the reference
version. The output is byte-for-byte reproducible on one machine and torch build; on another, the
inputs and config bit for bit and the reference's outputs to float32 rounding (the parity tests'
``test_fixture_script_reproduces_the_file``, live and slow, check it).

Usage::

  python tests/make_fixtures.py                  # (re)write every fixture
  python tests/make_fixtures.py --kind e2e obb   # (re)write only these kinds: assign loss e2e obb pose segment segment26 pose26
  python tests/make_fixtures.py --check          # compare jaxtal with the stored fixtures, print the worst differences
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import fixtures  # noqa: E402


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="compare jaxtal with the stored fixtures instead of writing")
  parser.add_argument("--kind", nargs="+", choices=fixtures.KINDS, default=fixtures.KINDS, help="only these kinds")
  args = parser.parse_args(argv)
  fixtures.check(tuple(args.kind)) if args.check else fixtures.write(fixtures.jobs(tuple(args.kind)))


if __name__ == "__main__":
  main()
