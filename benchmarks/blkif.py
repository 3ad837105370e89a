"""Xen blkif backend speed on the simulated hypervisor: a dynamic VHD against a raw file.

The C test frontend (``tests/blockback/frontend.c``, Xen's ring macros) drives the backend
through the sim transport with the ring kept full, against the same 256 MiB of random data held
once in a dynamic VHD and once in a raw file (both in page cache; the raw file is served through
the same backend with a minimal ``preadv``/``pwrite`` disk).  There is no other blkif backend that
runs without Xen, so the raw file is the reference: it measures the protocol path alone, and the
ratio shows what the VHD layer costs.  Runs alternate between the two images, several rounds, and
medians are reported.

Workloads (docs/blkif.md §6): 4 KiB random reads and writes with 32 requests in flight (ring order
0, full ring), 4 KiB random reads with 512 in flight (order 4, full ring), 44 KiB (11 segments)
sequential reads and 1 MiB (256-segment INDIRECT) sequential reads.  Targets from issue 5:
>= 50k IOPS at 4 KiB reads, >= 1 GB/s at 1 MiB reads, VHD within 1.5x of raw.

``run(workdir)`` returns the rows ``make bench`` prints; ``python -m benchmarks.blkif [DIR]`` runs
it alone.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import vhd
from blockback.sim import SimBackend
from blockback.vbd import BackendOptions

MiB = 1 << 20
SIZE = 256 * MiB
ROUNDS = 3
SECONDS = 2.0
ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "blockback" / "frontend.c"

# name, frontend arguments, unit
WORKLOADS: list[tuple[str, list[str], str]] = [
    (
        "4k-randread-order0-qd32",
        ["--op", "read", "--segs", "1", "--random", "--order", "0"],
        "IOPS",
    ),
    (
        "4k-randwrite-order0-qd32",
        ["--op", "write", "--segs", "1", "--random", "--order", "0"],
        "IOPS",
    ),
    (
        "4k-randread-order4-qd512",
        ["--op", "read", "--segs", "1", "--random", "--order", "4", "--depth", "512"],
        "IOPS",
    ),
    ("44k-seqread-order0-qd32", ["--op", "read", "--segs", "11", "--order", "0"], "MB/s"),
    ("1m-seqread-indirect-qd32", ["--op", "read", "--segs", "256", "--order", "0"], "MB/s"),
]


class RawDisk:
    """A raw image file with the positional-I/O methods the executor uses."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.read_only = False

    def preadinto(self, buffer: Any, offset: int) -> int:
        return os.preadv(self.fd, [buffer], offset)

    def pwrite(self, data: Any, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    def flush(self) -> None:
        os.fsync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        os.pwrite(self.fd, bytes(length), offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        os.pwrite(self.fd, bytes(length), offset)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Any]:
        return iter(())

    def close(self) -> None:
        os.close(self.fd)


def _build(workdir: Path) -> Path:
    exe = workdir / "blkif-frontend"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-I",
            str(SOURCE.parent),
            "-o",
            str(exe),
            str(SOURCE),
            "-lxenstore",
        ],
        check=True,
        timeout=120,
    )
    return exe


def _images(workdir: Path) -> tuple[Path, Path]:
    raw = workdir / "blkif-bench.raw"
    image = workdir / "blkif-bench.vhd"
    if not raw.exists() or not image.exists():
        data = os.urandom(MiB)
        with open(raw, "wb") as f, vhd.create(str(image), SIZE) as disk:
            for i in range(SIZE // MiB):
                chunk = data[i % 7 :] + data[: i % 7]
                f.write(chunk)
                disk.pwrite(chunk, i * MiB)
    for path in (raw, image):  # into the page cache
        with open(path, "rb") as f:
            while f.read(8 * MiB):
                pass
    return image, raw


def _reopen(sim: SimBackend) -> None:
    """Walk the frontend back to Initialising so the backend offers InitWait again."""
    deadline = time.monotonic() + 10
    while sim.xs.try_read(f"{sim.backend_path}/state") != b"6":
        if time.monotonic() > deadline:
            raise RuntimeError("backend did not close after the benchmark run")
        time.sleep(0.01)
    sim.xs.write(f"{sim.frontend_path}/state", "1")
    while sim.xs.try_read(f"{sim.backend_path}/state") != b"2":
        if time.monotonic() > deadline:
            raise RuntimeError("backend did not reopen")
        time.sleep(0.01)


def _measure(exe: Path, sim: SimBackend, args: list[str]) -> dict[str, float]:
    env = dict(os.environ, XENSTORED_PATH=sim.frontend_xenstored_path)
    cmd = [str(exe), str(sim.directory), sim.frontend_path, "bench", "--seconds", str(SECONDS)]
    result = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=120)
    if result.returncode:
        raise RuntimeError(f"frontend failed: {result.stderr.strip()}")
    _reopen(sim)
    row: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return row


def run(workdir: Path) -> list[dict[str, object]]:
    workdir.mkdir(parents=True, exist_ok=True)
    exe = _build(workdir)
    image, raw = _images(workdir)
    disk = vhd.open(str(image), "r+")
    rawdisk = RawDisk(raw)
    options = BackendOptions()
    sims = {
        "vhd": SimBackend(workdir / "sim-vhd", disk, image=str(image), options=options).start(),
        "raw": SimBackend(workdir / "sim-raw", rawdisk, image=str(raw), options=options).start(),
    }
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for _ in range(ROUNDS):
            for name, args, _unit in WORKLOADS:
                for kind, sim in sims.items():
                    results.setdefault((name, kind), []).append(_measure(exe, sim, args))
    finally:
        for sim in sims.values():
            sim.stop()
        disk.close()
        rawdisk.close()
    rows: list[dict[str, object]] = []
    for name, _args, unit in WORKLOADS:
        key = "iops" if unit == "IOPS" else "mbps"
        ours = statistics.median(r[key] for r in results[(name, "vhd")])
        theirs = statistics.median(r[key] for r in results[(name, "raw")])
        other = "mbps" if key == "iops" else "iops"
        other_value = statistics.median(r[other] for r in results[(name, "vhd")])
        rows.append(
            {
                "benchmark": f"blkif {name}",
                "ours": round(ours, 1),
                "theirs": round(theirs, 1),
                "ratio": round(ours / theirs, 3) if theirs else None,
                "unit": unit,
                "note": f"dynamic VHD vs raw file through the same backend (sim transport, C "
                f"frontend); VHD {other}={other_value:.0f}; median of {ROUNDS}x{SECONDS:.0f}s",
            }
        )
    return rows


def main() -> int:
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="blkif-"))
    for row in run(workdir):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
