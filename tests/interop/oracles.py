"""Reference readers used as oracles: qemu-img (``-f vpc``) and libvhdi (``pyvhdi``, run with the
system Python in a subprocess).

Known limits of the oracles (docs/vhd-format.md): qemu-img 7.2 ignores differencing parents, so
it is never used for children; libvhdi takes the size from the *original size* field and reads
sector bitmaps wrongly inside a byte with a set bit, so it is given only 4 KiB-aligned writes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, need_tool

TIMEOUT = 120

_PYVHDI_READ = r"""
import json, sys
import pyvhdi
paths, out = json.loads(sys.argv[1]), sys.argv[2]
files = []
for path in paths:  # base first
    f = pyvhdi.file()
    f.open(path)
    if files:
        f.set_parent(files[-1])
    files.append(f)
leaf = files[-1]
size = leaf.get_media_size()
with open(out, "wb") as sink:
    pos = 0
    while pos < size:
        n = min(1 << 20, size - pos)
        sink.write(leaf.read_buffer_at_offset(n, pos))
        pos += n
print(json.dumps({"size": size, "type": leaf.get_disk_type()}))
for f in reversed(files):
    f.close()
"""


_PYVHDI_OK: bool | None = None


def need_pyvhdi() -> str:
    """The system Python with pyvhdi; skip without it, or fail under CI=true (like need_tool)."""
    global _PYVHDI_OK
    python = need_tool("/usr/bin/python3")
    if _PYVHDI_OK is None:
        probe = subprocess.run(
            [python, "-c", "import pyvhdi"], capture_output=True, timeout=TIMEOUT, check=False
        )
        _PYVHDI_OK = probe.returncode == 0
    if not _PYVHDI_OK:
        message = "pyvhdi (Debian python3-libvhdi) is not installed for /usr/bin/python3"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return python


def libvhdi_read(chain: list[Path], out: Path) -> dict[str, Any]:
    """Read the image ``chain[-1]`` (parents first in ``chain``) with libvhdi into ``out``."""
    python = need_pyvhdi()
    proc = subprocess.run(
        [python, "-c", _PYVHDI_READ, json.dumps([str(p) for p in chain]), str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"libvhdi failed: {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    tool = need_tool("qemu-img")
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def qemu_raw(image: Path, out: Path) -> bytes:
    """qemu-img convert -f vpc -O raw: what qemu reads (parents ignored)."""
    proc = qemu_img("convert", "-f", "vpc", "-O", "raw", str(image), str(out))
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def qemu_info(image: Path) -> dict[str, Any]:
    proc = qemu_img("info", "-f", "vpc", "--output=json", str(image))
    assert proc.returncode == 0, proc.stderr
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def vhdiinfo(image: Path) -> str:
    tool = need_tool("vhdiinfo")
    proc = subprocess.run([tool, str(image)], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout
