"""Importing the FUSE adapter leaves the process environment alone (issue 10 §3): mfusepy is
bound to libfuse 3 through FUSE_LIBRARY_PATH for its own import only."""

from __future__ import annotations

import os
import subprocess
import sys


def test_importing_the_adapter_does_not_change_the_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FUSE_LIBRARY_PATH"}
    code = (
        "import os; before = dict(os.environ); import vhdfuse.adapter as a; "
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items()); "
        "assert a.LIBFUSE_MAJOR >= 2; print(a.LIBRARY_PATH)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "fuse3" in out.stdout  # libfuse 3 is still the one chosen
