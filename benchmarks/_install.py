"""The ``vhd`` that ``make bench`` times: a regular install of this checkout, as ``pip install
vhdkit`` gives a user (issue 9 item 17).

The dev venv's install is editable: setuptools' editable finder runs at every interpreter
start-up (pathlib, importlib.util, fnmatch, urllib.parse: about 16 ms), which a user's install
does not have, and which would dominate every start-up-bound row.  So the checkout's files are
copied (no stale ``build/`` output can leak in), built into wheels with the dependencies, and
installed with ``pip`` into a fresh venv; ``pip`` byte-compiles what it installs, as for a user.

``python -m benchmarks._install DIR`` builds it in DIR and prints the path of its ``vhd``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What is not part of the source tree (or not needed to build the wheel).
_NOT_SOURCE = (
    ".git", ".venv", "bench-out", "build", "dist", "demo-out", "tests", "__pycache__",
    "*.egg-info", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "*.pyc",
)  # fmt: skip


def _run(*args: str | Path) -> str:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=900, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def build(target: Path) -> Path:
    """(Re)build the install in ``target``; return its ``vhd`` command."""
    target = target.resolve()
    source, wheels = (
        target.with_name(target.name + "-src"),
        target.with_name(target.name + "-wheels"),
    )
    for path in (target, source, wheels):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE), symlinks=True)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "-w", wheels, source)
    _run(sys.executable, "-m", "venv", target)
    python = target / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, "vhdkit")
    shutil.rmtree(source)
    # Not editable, and byte-compiled: the package imports from the venv, from its .pyc files.
    # (-I: not the checkout's vhd/ from the current directory)
    where = _run(
        python, "-I", "-c", "import vhd, vhdtools.cli as c; print(vhd.__file__, c.__cached__)"
    )
    module, cached = where.split()
    if not module.startswith(str(target)) or not Path(cached).is_file():
        raise RuntimeError(f"{target}: not a byte-compiled regular install ({module}, {cached})")
    return target / "bin" / "vhd"


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/install")
    print(build(target))


if __name__ == "__main__":
    main()
