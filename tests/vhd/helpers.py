"""Shared helpers for the tests of vhd's operations: oracles (qemu-img, libvhdi through the
system python's pyvhdi), reads and CLI runs.  Images come from :mod:`tests.images`."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vhdtools.cli import main as cli_main

import vhd
from tests.conftest import need_tool

_PYVHDI = r"""
import sys, pyvhdi, hashlib
paths = sys.argv[1:-1]
want = int(sys.argv[-1])
files = []
for p in paths:
    f = pyvhdi.file(); f.open(p); files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
f = files[0]
size = min(want, f.get_media_size())
out = sys.stdout.buffer
pos = 0
while pos < size:
    n = min(1 << 20, size - pos)
    out.write(f.read_buffer_at_offset(n, pos))
    pos += n
"""


def read_image(path: str | Path, **kw: Any) -> bytes:
    with vhd.open(path, "r", **kw) as disk:
        return disk.pread(disk.size, 0)


def qemu_raw(path: str | Path, out: Path) -> bytes:
    """The guest content as qemu-img reads it (fixed and dynamic only)."""
    qemu = need_tool("qemu-img")
    subprocess.run(
        [qemu, "convert", "-f", "vpc", "-O", "raw", str(path), str(out)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    return out.read_bytes()


def qemu_info(path: str | Path) -> dict[str, Any]:
    qemu = need_tool("qemu-img")
    res = subprocess.run(
        [qemu, "info", "-f", "vpc", "--output=json", str(path)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    info: dict[str, Any] = json.loads(res.stdout)
    return info


def libvhdi_read(chain: Sequence[str | Path], length: int) -> bytes:
    """The first ``length`` bytes of a chain (child first) as libvhdi reads them."""
    if not Path("/usr/bin/python3").exists():
        need_tool("vhdiinfo")
    res = subprocess.run(
        ["/usr/bin/python3", "-c", _PYVHDI, *map(str, chain), str(length)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    return res.stdout


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(list(argv))
    return rc, out.getvalue() + err.getvalue()
