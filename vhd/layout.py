"""Where things lie in a VHD file, computed one way for every reader (spec: "Hard Disk Footer",
"Dynamic Disk Header", "Block Allocation Table"): the limits of the records' fields and the
metadata regions that no data block may overlap.

:func:`vhd.open` (before writing) and ``vhd check`` both judge block placement against
:func:`metadata_regions`, so the two cannot disagree on which block overlaps metadata.  Pure
arithmetic over parsed records: this module reads nothing and decides no policy.
"""

from __future__ import annotations

from .footer import FOOTER_SIZE
from .header import HEADER_SIZE, DynamicHeader
from .locator import MAX_LOCATOR_BYTES

SECTOR = 512
MiB = 1 << 20

# The largest disk Microsoft's and qemu's tools create or open: 2040 GiB (0xFF000000 sectors).
MAX_SIZE = 0xFF000000 * SECTOR
# Block sizes are powers of two.  Images from other tools are read with blocks down to one
# sector; vhdkit creates blocks of at least 4 KiB (a whole bitmap byte per 512-byte sector run
# of 8 sectors, and 4 KiB-aligned data).
MIN_BLOCK_SIZE = SECTOR
MIN_CREATE_BLOCK_SIZE = 8 * SECTOR
MAX_BLOCK_SIZE = 256 * MiB


def block_size_ok(bs: int, minimum: int = MIN_BLOCK_SIZE) -> bool:
    """Whether ``bs`` is a power of two from ``minimum`` to :data:`MAX_BLOCK_SIZE`."""
    return minimum <= bs <= MAX_BLOCK_SIZE and not bs & (bs - 1)


def table_end(header: DynamicHeader) -> int:
    """The end of the BAT the header declares, padded to whole sectors."""
    return header.table_offset + -(-header.max_table_entries * 4 // SECTOR) * SECTOR


def metadata_regions(header_offset: int, header: DynamicHeader) -> list[tuple[int, int, str]]:
    """``(start, end, label)`` of the footer copy, the dynamic header at ``header_offset``, the
    sector-padded BAT and each in-use parent locator's payload (its data length or its space,
    whichever is larger, the space capped at :data:`MAX_LOCATOR_BYTES`; a locator claiming more
    data than that is not trusted as a region)."""
    regions = [
        (0, FOOTER_SIZE, "the footer copy"),
        (header_offset, header_offset + HEADER_SIZE, "the dynamic header"),
        (header.table_offset, table_end(header), "the BAT"),
    ]
    for slot, loc in enumerate(header.locators):
        if loc.in_use and loc.data_len <= MAX_LOCATOR_BYTES:
            length = max(loc.data_len, min(loc.space_bytes, MAX_LOCATOR_BYTES))
            if length:
                regions.append(
                    (loc.data_offset, loc.data_offset + length, f"parent locator {slot}")
                )
    return regions
