"""A legal VHDX with a large BAT (issue 11: large input never costs minutes or unbounded
memory), side by side with qemu-img on the same file.

The image is a 64 TiB dynamic VHDX with 1 MiB blocks made by ``vhd create`` (a 516 MiB file:
64 Mi BAT entries, 512 MiB of table, every block NOT_PRESENT).  (qemu-img's own image of that
size leaves 4 MiB past its last structure, which ``vhd check`` reports as orphan space and
exits 1 on, so the check row would time an error path.)  Each of
``vhd info``, ``vhd info --json``, ``vhd map`` and ``vhd check`` runs against the qemu-img
command that does the same work (``info``, ``info``, ``map --output=json``, ``check``), the
first one of the pair rotating each round; rows give the median wall time and each tool's peak
RSS.  Both tools hold the table in memory, so both peaks are about its 512 MiB; ours must not
be much above it (no second copy).  Then ``vhd resize`` (shrink to 32 TiB, grow back) and
``vhd compact`` run once each on the same image, ours alone (qemu-img does neither on a VHDX),
and ``vhd check`` must find it clean.  ``python -m benchmarks.vhdx_large [DIR]`` runs it alone.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import core

MiB = 1 << 20
ROUNDS = 3
SIZE = "64T"
TABLE = (64 << 40) // MiB * 8  # bytes of BAT entries (the interleaved bitmap entries aside)

# (what, our arguments after `vhd`, qemu-img's arguments after `qemu-img`)
PAIRS = (
    ("info", ["info"], ["info", "-f", "vhdx"]),
    ("info --json", ["info", "--json"], ["info", "-f", "vhdx", "--output=json"]),
    ("map", ["map"], ["map", "-f", "vhdx", "--output=json"]),
    ("check", ["check"], ["check", "-f", "vhdx"]),
)


def run(workdir: Path) -> list[dict[str, Any]]:
    qemu = core.prepare(workdir)
    image = workdir / "large.vhdx"
    subprocess.run(
        [core.VHD_CLI, "create", "--format", "vhdx", "--block-size", "1M", str(image), SIZE],
        check=True,
        stdout=subprocess.DEVNULL,
        env=core._ENV,
    )
    rows = []
    for what, ours, theirs in PAIRS:
        runs = core.alternating(
            [[core.VHD_CLI, *ours, str(image)], [qemu, *theirs, str(image)]], ROUNDS
        )
        mine, qemus = (statistics.median(r.wall) for r in runs)
        peak = runs[0].peak
        rows.append(
            core._row(
                f"vhd {what}: 64 TiB VHDX, 1 MiB blocks (64 Mi BAT entries)",
                mine,
                qemus,
                "s",
                f"median of {ROUNDS}; theirs = qemu-img {' '.join(theirs[:1])}; peak RSS "
                f"{peak / MiB:.0f} MiB (qemu-img {runs[1].peak / MiB:.0f} MiB; the table is "
                f"{TABLE / MiB:.0f} MiB)",
                peak_mib=round(peak / MiB, 1),
            )
        )
    # The maintenance commands on the same empty table: ours only (qemu-img resizes no VHDX
    # and compacts none), one run each, wall and peak RSS.  Each step changes the image the
    # next one starts from: shrink to 32 TiB, grow back to 64 TiB, compact.
    for what, ours in (
        ("resize --shrink 64 -> 32 TiB", ["resize", "--shrink", str(image), "32T"]),
        ("resize 32 -> 64 TiB", ["resize", str(image), SIZE]),
        ("compact", ["compact", str(image)]),
    ):
        wall, _cpu, peak = core.run_measured([core.VHD_CLI, *ours])
        rows.append(
            core._row(
                f"vhd {what}: empty VHDX, 1 MiB blocks",
                wall,
                None,
                "s",
                f"one run, ours only (qemu-img cannot); peak RSS {peak / MiB:.0f} MiB",
                peak_mib=round(peak / MiB, 1),
            )
        )
    check = subprocess.run([core.VHD_CLI, "check", "-q", str(image)], env=core._ENV, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"vhd check after resize and compact: exit {check.returncode}")
    image.unlink()
    return rows


def main() -> None:
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    for row in run(where):
        print(row)


if __name__ == "__main__":
    main()
