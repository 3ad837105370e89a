"""Azure's rules for an uploaded VHD (spec: "Hard Disk Footer Format"; Azure's documented
limits): a fixed disk of a whole number of MiB, from 20 MiB to 32 TiB, with a valid 512-byte
trailing footer; the size ``vhd convert --azure`` rounds a disk up to.  Built on ``vhd check``.
"""

from __future__ import annotations

import os

from .errors import VHDError
from .findings import ERROR
from .footer import FOOTER_SIZE, DiskType

MiB = 1024 * 1024
AZURE_MIN_SIZE = 20 * MiB
AZURE_MAX_SIZE = 32 * 1024 * 1024 * MiB


def azure_target_size(size: int) -> int:
    """The size ``vhd convert --azure`` gives a disk: rounded up to a whole MiB, at least 20 MiB."""
    return max(AZURE_MIN_SIZE, -(-size // MiB) * MiB)


def azure_check(path: str | os.PathLike[str]) -> list[str]:
    """Problems that make Azure refuse the image as an uploaded disk; empty when it accepts it.

    Azure takes fixed VHDs whose virtual size is a whole number of MiB (file = N MiB + 512),
    from 20 MiB to 32 TiB, with a valid 512-byte trailing footer.
    """
    try:
        from .check import check  # vhd.check re-exports this module

        report = check(path, check_parent=False)
    except (VHDError, OSError) as exc:
        return [str(exc)]
    out: list[str] = []
    layout = report.layout
    if layout.disk_type != DiskType.FIXED:
        label = layout.disk_type.label if layout.disk_type is not None else "unknown"
        out.append(f"the disk is {label}, Azure needs a fixed VHD")
    size = layout.footer.current_size
    if size % MiB:
        out.append(f"the size {size} is not a whole number of MiB")
    if size < AZURE_MIN_SIZE:
        out.append(f"the size {size} is below Azure's 20 MiB minimum")
    if size > AZURE_MAX_SIZE:
        out.append(f"the size {size} is above Azure's 32 TiB maximum")
    if layout.disk_type == DiskType.FIXED and layout.file_size != size + FOOTER_SIZE:
        out.append(f"the file is {layout.file_size} bytes, not size + 512 = {size + FOOTER_SIZE}")
    for finding in report.findings:
        if finding.severity == ERROR or finding.code in ("footer-features", "footer-511"):
            out.append(finding.message)
    return out
