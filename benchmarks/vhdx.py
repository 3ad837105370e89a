"""VHDX conversion speed (issue 11), side by side with qemu-img in one run.

On the 1 GiB half-data, half-zeros raw disk of :mod:`benchmarks.core` (in page cache):

* ``vhd convert`` raw -> dynamic VHDX against ``qemu-img convert -O vhdx`` (both 32 MiB blocks,
  Hyper-V's default; target <= 1.0x qemu-img's time), with each tool's peak RSS;
* dynamic VHDX -> raw against ``qemu-img convert -f vhdx`` reading the same VHDX (target 1.0x);
* dynamic VHDX -> fixed VHD for Azure (``vhd convert --azure``) against qemu-img's two steps
  (``-O vpc -o subformat=fixed,force_size``: it cannot round the size itself, so a 1 GiB
  disk needs none; the same output both ways).

Times are medians of alternating runs.  ``python -m benchmarks.vhdx [DIR]`` runs it alone.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import core

MiB = 1 << 20


def run(workdir: Path) -> list[dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    qemu = shutil.which("qemu-img")
    if qemu is None:
        raise RuntimeError("qemu-img is not installed")
    core._ENV = core._child_env(workdir)
    core._run_child([core.VHD_CLI, "--version"])  # byte-code cache filled before timing
    src = workdir / "source.raw"
    ours = workdir / "ours.vhdx"
    theirs = workdir / "qemu.vhdx"
    out_ours = workdir / "ours.raw"
    out_q = workdir / "qemu.raw"
    azure_ours = workdir / "ours-azure.vhd"
    azure_q = workdir / "qemu-azure.vhd"
    rows: list[dict[str, Any]] = []
    try:
        core._make_source(src)
        core._warm(src)

        def clean_vhdx() -> None:
            ours.unlink(missing_ok=True)
            theirs.unlink(missing_ok=True)

        (t_o, rss_o), (t_q, rss_q) = core._medians(
            [
                [core.VHD_CLI, "convert", str(src), str(ours)],
                [
                    qemu,
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "vhdx",
                    "-o",
                    "block_size=32M",
                    str(src),
                    str(theirs),
                ],
            ],
            clean_vhdx,
        )
        rows.append(
            core._row(
                "convert raw -> dynamic VHDX (1 GiB, half zeros)",
                t_o,
                t_q,
                "s",
                f"vs qemu-img convert -O vhdx; target <= 1.0x; qemu peak {rss_q / MiB:.0f} MiB",
                peak_mib=round(rss_o / MiB, 1),
            )
        )
        core._run_child([core.VHD_CLI, "convert", str(src), str(ours)])
        core._warm(ours)

        def clean_raw() -> None:
            out_ours.unlink(missing_ok=True)
            out_q.unlink(missing_ok=True)

        (t_o, rss_o), (t_q, rss_q) = core._medians(
            [
                [core.VHD_CLI, "convert", str(ours), str(out_ours)],
                [qemu, "convert", "-f", "vhdx", "-O", "raw", str(ours), str(out_q)],
            ],
            clean_raw,
        )
        rows.append(
            core._row(
                "convert dynamic VHDX -> raw (1 GiB)",
                t_o,
                t_q,
                "s",
                f"vs qemu-img convert -f vhdx; target <= 1.0x; qemu peak {rss_q / MiB:.0f} MiB",
                peak_mib=round(rss_o / MiB, 1),
            )
        )

        def clean_azure() -> None:
            azure_ours.unlink(missing_ok=True)
            azure_q.unlink(missing_ok=True)

        (t_o, rss_o), (t_q, _) = core._medians(
            [
                [core.VHD_CLI, "convert", "--azure", str(ours), str(azure_ours)],
                [
                    qemu,
                    "convert",
                    "-f",
                    "vhdx",
                    "-O",
                    "vpc",
                    "-o",
                    "subformat=fixed,force_size=on",
                    str(ours),
                    str(azure_q),
                ],
            ],
            clean_azure,
        )
        rows.append(
            core._row(
                "convert dynamic VHDX -> fixed VHD for Azure (1 GiB)",
                t_o,
                t_q,
                "s",
                "vs qemu-img convert -O vpc subformat=fixed,force_size (ours also fsyncs and "
                "checks the Azure rules)",
                peak_mib=round(rss_o / MiB, 1),
            )
        )
    finally:
        for p in (src, ours, theirs, out_ours, out_q, azure_ours, azure_q):
            p.unlink(missing_ok=True)
    return rows


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="bench-vhdx-"))
    for row in run(out):
        print(row)
