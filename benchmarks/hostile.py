"""Hostile layouts (issue 12, items 5 and 6): what crafted tables and sparse fixed disks cost,
against qemu-img on the same files.

* ``vhd convert`` of a 128 MiB dynamic disk of 512-byte blocks whose table is all zeros (every
  block at offset 0, over the footer copy): refused at open since issue 12 (exit 2, one line
  naming block 0), timed against ``qemu-img convert``, which reads all 262 144 blocks.
* ``vhd check`` of 32 000 staggered overlapping blocks (each overlaps its neighbours: the
  overlap sweep), vs ``qemu-img info -f vpc`` for scale (qemu-img has no VHD check).
* ``vhd convert`` of a sparse 2040 GiB fixed VHD holding 8 KiB of data (``SEEK_DATA``), vs
  ``qemu-img convert -f vpc``.

``run(workdir)`` returns the rows ``make bench`` prints.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.images import craft, craft_fixed

from .core import VHD_CLI

MiB = 1 << 20
GiB = 1 << 30


def _seconds(argv: list[str], expect: int = 0) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, check=False, capture_output=True)
    seconds = time.perf_counter() - start
    if done.returncode != expect:
        raise RuntimeError(f"{argv[1:]} exited {done.returncode}, not {expect}: {done.stderr!r}")
    return seconds


def _vhd(*args: str) -> list[str]:
    # the regular install make bench made (benchmarks/core.py): a refused convert is start-up
    return [VHD_CLI, *args]


def _row(name: str, ours: float, theirs: float | None, note: str) -> dict[str, Any]:
    return {
        "benchmark": name,
        "ours": round(ours, 3),
        "theirs": round(theirs, 3) if theirs is not None else None,
        "ratio": round(ours / theirs, 2) if theirs else None,
        "unit": "s",
        "note": note,
    }


def run(workdir: Path) -> list[dict[str, Any]]:
    qemu = shutil.which("qemu-img") or "qemu-img"
    rows = []
    zero = craft(workdir / "zero512.vhd", size=128 * MiB, block_size=512, bat_fill=b"\0")
    out = workdir / "out.raw"
    ours = _seconds(_vhd("convert", str(zero), str(out)), expect=2)  # refused: nothing written
    assert not out.exists()
    theirs = _seconds([qemu, "convert", "-f", "vpc", "-O", "raw", str(zero), str(out)])
    out.unlink()
    rows.append(_row("convert, 512-byte blocks, zero table", ours, theirs,
                     "ours refuses it (exit 2: block 0 over the footer copy); "
                     "vs qemu-img convert, which reads every block"))  # fmt: skip

    count = 32000
    half = (4096 + 512) // 2 // 512 * 512
    bat = {b: (0x40000 + b * half) // 512 for b in range(count)}
    stag = craft(workdir / "staggered.vhd", size=count * 4096, block_size=4096, bat=bat,
                 file_size=0x40000 + (count + 8) * half)  # fmt: skip
    # check exits 1 (problems found): timed without check=True.
    start = time.perf_counter()
    subprocess.run(_vhd("check", str(stag)), check=False, capture_output=True)
    ours = time.perf_counter() - start
    theirs = _seconds([qemu, "info", "-f", "vpc", str(stag)])
    rows.append(_row("check, 32000 staggered overlapping blocks", ours, theirs,
                     "vs qemu-img info -f vpc, for scale (no VHD check in qemu-img)"))  # fmt: skip

    fixed = craft_fixed(workdir / "fixed.vhd", 2040 * GiB,
                        data={0: b"x" * 4096, 1000 * GiB: b"y" * 4096})  # fmt: skip
    ours = _seconds(_vhd("convert", str(fixed), str(out)))
    out.unlink()
    theirs = _seconds([qemu, "convert", "-f", "vpc", "-O", "raw", str(fixed), str(out)])
    out.unlink()
    rows.append(_row("convert, sparse 2040 GiB fixed", ours, theirs, "vs qemu-img convert"))
    return rows


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for row in run(Path(tmp)):
            print(row)


if __name__ == "__main__":
    main()
