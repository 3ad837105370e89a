"""Disk geometry (cylinders/heads/sectors-per-track) from a size: the VHD spec's appendix algorithm.

The same algorithm is used by qemu (``calculate_geometry``), blktap (``vhd_chs``) and FATtools.
Every division truncates, so C*H*S*512 never exceeds the size.  The maximum geometry
65535/16/255 means "size not representable in CHS; use the footer's current size" and is what
vhdkit writes for sizes whose CHS product is not exact (see :func:`geometry_for_create`).
"""

from __future__ import annotations

from typing import NamedTuple

SECTOR = 512
MAX_CHS_SECTORS = 65535 * 16 * 255


class Geometry(NamedTuple):
    cylinders: int
    heads: int
    sectors: int

    @property
    def total_bytes(self) -> int:
        return self.cylinders * self.heads * self.sectors * SECTOR

    @property
    def is_max(self) -> bool:
        return self == MAX_GEOMETRY


MAX_GEOMETRY = Geometry(65535, 16, 255)


def chs_from_size(size: int) -> Geometry:
    """The spec's CHS for a disk of ``size`` bytes."""
    total = min(size // SECTOR, MAX_CHS_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return Geometry(cth // heads, heads, spt)


def geometry_for_create(size: int) -> Geometry:
    """The geometry vhdkit writes for a new disk of ``size`` bytes.

    Readers that size disks from CHS (qemu <= 9 for creators it does not know, Virtual PC) would
    see a smaller disk whenever C*H*S*512 != size.  So the exact CHS is written when it covers the
    size exactly, and otherwise the maximum geometry, which every reader (qemu included) takes as
    "use the current size".  Windows/Hyper-V and libvhdi ignore CHS for sizing.
    """
    chs = chs_from_size(size)
    return chs if chs.total_bytes == size else MAX_GEOMETRY
