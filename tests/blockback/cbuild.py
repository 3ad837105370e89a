"""Compile the C test programs of tests/blockback against Debian's libxen-dev headers."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import need_tool

HERE = Path(__file__).parent


def compile_c(
    source: str, out: Path, *, defines: tuple[str, ...] = (), libs: tuple[str, ...] = ()
) -> Path:
    """Build ``HERE/source`` (a path below tests/blockback) into ``out`` (gcc -O2 -Wall -Werror); return ``out``."""
    gcc = need_tool("gcc")
    cmd = [gcc, "-O2", "-Wall", "-Werror", "-I", str(HERE)]
    cmd += [f"-D{d}" for d in defines]
    cmd += ["-o", str(out), str(HERE / source)]
    cmd += [f"-l{lib}" for lib in libs]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise AssertionError(f"gcc failed: {' '.join(cmd)}\n{result.stderr}")
    return out
