"""Builds jaxtal's API reference (HTML) from its docstrings with pdoc, every warning an error.

    pip install -e ".[docs]"
    python docs/build_api.py [OUTPUT_DIR]          # default: build/api

The reference documents ``jaxtal``'s public API (``__all__``), docstrings read as Google style. Any warning pdoc
emits (a broken cross-reference, an unparsable docstring, ...) fails the build, with one exception: pdoc cannot
evaluate string annotations of generated ``__init__`` methods (NamedTuples, and dataclass fields inherited across
modules, e.g. ``Overlap`` on ``OBBLossConfig``) whose names are not in the generating module's namespace; it then
shows the annotation as written. Those warnings are about pdoc's type evaluation, not the docstrings, and are
ignored here by their message.
"""

from __future__ import annotations

import pathlib
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
  out = pathlib.Path(argv[0]) if argv else ROOT / "build" / "api"
  sys.path.insert(0, str(ROOT))
  warnings.simplefilter("error")
  warnings.filterwarnings("ignore", message=r"Error parsing type annotation .* for jaxtal\.")
  import pdoc  # noqa: PLC0415

  pdoc.render.configure(docformat="google", footer_text="jaxtal")
  pdoc.pdoc("jaxtal", output_directory=out)
  print(f"API reference written to {out}/index.html")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
