"""Shared test support: problems, NumPy oracles, parity cases, the Ultralytics reference drivers and
the parity comparisons. ``tests/conftest.py`` puts ``tests/`` on ``sys.path``, so test files write
``from support import oracles`` or ``from support.problems import ...``. Nothing here is a test; no
module here imports another's underscore names.

* ``problems``: small fixed problems, jitted entry points and assertion helpers (unit tests).
* ``contract``: the input contract's small problem (shared by test_contract and test_checks).
* ``oracles``: NumPy oracles written from the papers, never calling jaxtal.
* ``cases``, ``obb_cases``, ``pose_cases``, ``segment_cases``: deterministic parity cases and fixture I/O.
* ``reference``, ``obb_reference``, ``pose_reference``, ``segment_reference``: Ultralytics 8.4.190 as a
  black box (need torch and ultralytics).
* ``runners``: jaxtal on a parity case, one function per task (the only place parity calls the task losses).
* ``parity``: tolerances and comparisons of jaxtal's results with the reference's.
* ``fixtures``: writes, checks and regenerates the golden fixtures (``tests/make_fixtures.py`` is its command line).
"""
