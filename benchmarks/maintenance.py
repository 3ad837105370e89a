"""Maintenance speed (issue 3): ``vhd commit`` against ``cp``, and ``vhd check`` times.

* commit: a differencing child holding 512 MiB of changed data is merged into a fully allocated
  1 GiB dynamic parent, against ``cp`` of a 512 MiB file followed by ``sync`` of the copy (commit
  ends with an fsync too).  Target: <= 2x.  Both run on warm page cache; medians of a few rounds
  (each commit round gets a fresh child/parent pair made by copying prepared files).
* check: the metadata check of a 2040 GiB sparse dynamic image (1 044 480 BAT entries, a few
  blocks) and of a fully allocated 1 GiB one; and ``--deep`` (bitmaps and a read of every block)
  of the 1 GiB one.  qemu-img has no check for VHD, so ``qemu-img info -f vpc`` (which also
  reads the BAT) is shown beside it for scale.

``run(workdir)`` returns the rows ``make bench`` prints; ``python -m benchmarks.maintenance [DIR]``
runs it alone.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vhd
from vhd.check import check
from vhd.commit import commit

MiB = 1 << 20
GiB = 1 << 30
ROUNDS = 3


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(ROUNDS):
        if setup is not None:
            setup()
        times.append(_timed(fn))
    return statistics.median(times)


def _fill(disk: vhd.Disk, start: int, length: int, seed: int) -> None:
    chunk = bytearray(os.urandom(4 * MiB))
    pos = start
    while pos < start + length:
        chunk[:8] = (pos + seed).to_bytes(8, "little")
        disk.pwrite(chunk, pos)
        pos += len(chunk)


def _row(
    name: str, ours: float, theirs: float | None, note: str, unit: str = "s"
) -> dict[str, Any]:
    return {
        "benchmark": name,
        "ours": round(ours, 4),
        "theirs": round(theirs, 4) if theirs is not None else None,
        "ratio": round(ours / theirs, 2) if theirs else None,
        "unit": unit,
        "note": note,
    }


def bench_commit(work: Path) -> dict[str, Any]:
    parent0, child0 = work / "parent0.vhd", work / "child0.vhd"
    with vhd.create(parent0, GiB) as disk:
        _fill(disk, 0, GiB, 1)
    with vhd.create(child0, parent=parent0) as disk:
        _fill(disk, 256 * MiB, 512 * MiB, 2)
    parent, child = work / "parent.vhd", work / "child.vhd"

    def setup() -> None:
        shutil.copyfile(parent0, parent)
        shutil.copyfile(child0, child)
        # The child records the parent's name: parent0.vhd; point it at the copy explicitly.
        from vhd.reparent import set_parent

        set_parent(child, parent)

    ours = _median(lambda: commit(child), setup)
    raw = work / "data.raw"
    with open(raw, "wb") as f:
        for _ in range(128):
            f.write(os.urandom(4 * MiB))
    copy = work / "copy.raw"

    def cp() -> None:
        subprocess.run(["cp", str(raw), str(copy)], check=True)
        subprocess.run(["sync", str(copy)], check=True)

    def cp_setup() -> None:
        if copy.exists():
            copy.unlink()

    theirs = _median(cp, cp_setup)
    return _row(
        "commit 512 MiB child into 1 GiB parent",
        ours,
        theirs,
        "vs cp + sync of 512 MiB; target ratio <= 2",
    )


def bench_check(work: Path) -> list[dict[str, Any]]:
    rows = []
    qemu = shutil.which("qemu-img")
    big = work / "sparse-2040g.vhd"
    with vhd.create(big, 2040 * GiB) as disk:
        for i in range(16):
            disk.pwrite(b"\x55" * 4096, i * 97 * GiB)
    full = work / "full-1g.vhd"
    with vhd.create(full, GiB) as disk:
        _fill(disk, 0, GiB, 3)

    def qemu_info(path: Path) -> Callable[[], object]:
        return lambda: subprocess.run(
            [qemu or "qemu-img", "info", "-f", "vpc", str(path)], check=True, capture_output=True
        )

    for label, path in (("2040 GiB sparse dynamic", big), ("1 GiB full dynamic", full)):
        ours = _median(lambda p=path: check(p))  # type: ignore[misc]
        theirs = _median(qemu_info(path)) if qemu else None
        rows.append(
            _row(
                f"check (metadata) {label}",
                ours,
                theirs,
                "vs qemu-img info -f vpc (no VHD check in qemu-img); reads no data blocks",
            )
        )
    deep = _median(lambda: check(full, deep=True))
    rows.append(
        _row(
            "check --deep 1 GiB full dynamic",
            deep,
            None,
            f"{GiB / deep / MiB:.0f} MiB/s: bitmaps and a read of every block",
        )
    )
    return rows


def run(workdir: Path) -> list[dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="maint-", dir=workdir))
    try:
        return [bench_commit(work), *bench_check(work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import json

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir())
    for row in run(target):
        print(json.dumps(row))
