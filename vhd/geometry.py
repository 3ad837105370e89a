"""Disk geometry (cylinders/heads/sectors-per-track) from a size: the VHD spec's appendix algorithm.

The same algorithm is used by qemu (``calculate_geometry``), blktap (``vhd_chs``) and FATtools.
Every division truncates, so C*H*S*512 never exceeds the size.  The maximum geometry
65535/16/255 means "size not representable in CHS; use the footer's current size".  vhdkit writes
the spec's CHS for every size (see :func:`geometry_for_create`), as Windows does.
"""

from __future__ import annotations

import collections

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import NamedTuple

    class _Geometry(NamedTuple):
        cylinders: int
        heads: int
        sectors: int
else:
    # typing.NamedTuple's fields, from collections.namedtuple as it makes them
    _Geometry = collections.namedtuple("Geometry", ("cylinders", "heads", "sectors"))

SECTOR = 512
MAX_CHS_SECTORS = 65535 * 16 * 255


class Geometry(_Geometry):
    """Cylinders, heads and sectors per track (a tuple, in that order)."""

    __slots__ = ()

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


def packed(geometry: Geometry) -> int:
    """The footer's 4-byte geometry field as one big-endian number (cylinders, heads, sectors):
    blktap's ``vhd-util check`` compares this against ``vhd_chs(size)`` and rejects a larger one
    ("geometry too large")."""
    return geometry.cylinders << 16 | geometry.heads << 8 | geometry.sectors


def geometry_for_create(size: int) -> Geometry:
    """The geometry vhdkit writes for a new disk of ``size`` bytes: the spec's CHS, always.

    This is what Windows/Hyper-V write, and blktap's ``vhd-util check`` requires the geometry to
    be at most CHS(size) (so the maximum 65535/16/255 fails it below ~127.5 GiB).  qemu <= 9 would
    size such a disk from C*H*S (a little smaller) for a creator it does not know, which is why
    vhdkit writes a creator code qemu sizes by the current size (see :mod:`vhd.footer`).
    Virtual PC, which only knows CHS, sees C*H*S*512 bytes, as it does for Hyper-V's disks.
    """
    return chs_from_size(size)
