"""What a ``vhd`` command imports at start-up (issues 9 and 11: the interpreter's start-up and
imports are most of a sub-second command): run it in a fresh interpreter and list the modules
it loaded (the command's own imports: not what the interpreter had loaded before it ran, such
as the dev venv's editable-install finder, which a regular install does not have)."""

from __future__ import annotations

import subprocess
import sys

_LOADED = """
import sys
before = set(sys.modules)
from vhdtools.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --version and --help end in argparse's exit
    code = exc.code
print(" ".join(sorted(set(sys.modules) - before)), file=sys.stderr)
sys.exit(code)
"""


def loaded_modules(*args: object) -> set[str]:
    """The modules ``vhd ARGS...`` had loaded when it finished; the command must exit 0."""
    run = subprocess.run(
        [sys.executable, "-c", _LOADED, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return set(run.stderr.split())
