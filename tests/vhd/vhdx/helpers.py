"""Oracles and fixtures for VHDX tests: qemu-img/qemu-io (fixed and dynamic VHDX), libvhdi
(all three types, via pyvhdi with the system Python), and raw edits of records for damage."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

from tests.conftest import need_tool
from tests.interop.oracles import TIMEOUT
from vhd.vhdx import records as r

MiB = 1024 * 1024


def run(*args: str) -> subprocess.CompletedProcess[str]:
    tool = need_tool(args[0])
    return subprocess.run(
        [tool, *args[1:]], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def qemu_create(path: Path, size: int, *, block_size: int = 0, subformat: str = "dynamic") -> None:
    opts = f"subformat={subformat}" + (f",block_size={block_size}" if block_size else "")
    proc = run("qemu-img", "create", "-q", "-f", "vhdx", "-o", opts, str(path), str(size))
    assert proc.returncode == 0, proc.stderr


def qemu_write(path: Path, *commands: str) -> None:
    args: list[str] = []
    for c in commands:
        args += ["-c", c]
    proc = run("qemu-io", "-f", "vhdx", *args, str(path))
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def qemu_raw(path: Path, out: Path) -> bytes:
    proc = run("qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(path), str(out))
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def qemu_check(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", "check", "-f", "vhdx", *extra, str(path))


def assert_qemu_clean(path: Path) -> None:
    proc = qemu_check(path)
    assert proc.returncode == 0 and "No errors" in proc.stdout, proc.stdout + proc.stderr


def unpack_corpus(corpus: Path, name: str, dest: Path) -> Path:
    out = dest / name
    with gzip.open(corpus / "vhdx" / f"{name}.gz") as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def current_header(data: bytes | bytearray) -> tuple[int, r.Header]:
    """(file offset, header) of the current header of the image bytes ``data``."""
    best: tuple[int, r.Header] | None = None
    for off in r.HEADER_OFFSETS:
        try:
            h = r.Header.parse(bytes(data[off : off + r.HEADER_SIZE]))
        except Exception:
            continue
        if best is None or h.sequence_number > best[1].sequence_number:
            best = (off, h)
    assert best is not None
    return best
