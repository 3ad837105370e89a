"""Shared helpers for the maintenance tests: images with known content, oracles (qemu-img,
libvhdi through the system python's pyvhdi), hashes and CLI runs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vhdtools.cli import main as cli_main

import vhd
from tests.conftest import need_tool

MiB = 1024 * 1024

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


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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


def random_writes(
    disk: vhd.Disk,
    model: bytearray,
    count: int,
    seed: int,
    *,
    align: int = 4096,
    max_len: int = 3 * 4096,
) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        length = rng.randrange(1, max_len // align + 1) * align
        offset = rng.randrange(0, (disk.size - length) // align + 1) * align
        data = rng.randbytes(length)
        disk.pwrite(data, offset)
        model[offset : offset + length] = data


def make_dynamic(path: Path, size: int = 8 * MiB, *, writes: int = 20, seed: int = 1) -> bytes:
    model = bytearray(size)
    with vhd.create(path, size) as disk:
        random_writes(disk, model, writes, seed)
    return bytes(model)


def make_chain(tmp: Path, size: int = 8 * MiB, seed: int = 2) -> tuple[Path, Path, bytes]:
    parent, child = tmp / "parent.vhd", tmp / "child.vhd"
    model = bytearray(size)
    with vhd.create(parent, size) as disk:
        random_writes(disk, model, 15, seed)
    with vhd.create(child, parent=parent) as disk:
        random_writes(disk, model, 15, seed + 100)
    os.utime(parent, (1_700_000_000, 1_700_000_000))
    # Record the parent time we just set, so the chain checks clean.
    from vhd.footer import vhd_timestamp
    from vhd.header import DynamicHeader

    raw = bytearray(child.read_bytes())
    header = DynamicHeader.parse(raw[512:1536]).replace(
        parent_timestamp=vhd_timestamp(1_700_000_000)
    )
    raw[512:1536] = header.build()
    child.write_bytes(bytes(raw))
    return parent, child, bytes(model)
