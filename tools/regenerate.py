"""Regenerate the committed modules in generated/ (or, with --check, say which ones are stale).

python tools/regenerate.py            # rewrite generated/*.py
python tools/regenerate.py --check    # exit 1 if any committed module differs from what symattn emits now
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's generator, not whichever symattn is installed

from symattn.cli import main  # noqa: E402

# (module file, spec, options): the committed examples
MODULES = [
    ("notebook.py", "notebook", ["--weights", "folded"]),
    ("notebook_inputs.py", "notebook", ["--weights", "inputs"]),
    ("four_tokens.py", "four_tokens", ["--weights", "folded"]),
    ("four_tokens_vectorized.py", "four_tokens", ["--weights", "folded", "--strategy", "vectorized"]),
]


def run(check: bool, folder: Path = ROOT / "generated") -> int:
    status = 0
    for filename, spec, options in MODULES:
        args = ["generate", spec, "-o", str(folder / filename), *options] + (["--check"] if check else [])
        status = max(status, main(args))
    return status


if __name__ == "__main__":
    sys.exit(run("--check" in sys.argv[1:]))
