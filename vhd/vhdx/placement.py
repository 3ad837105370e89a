"""Where a VHDX's blocks may lie (MS-VHDX 2.5 and 3.1.3): a payload block or a sector bitmap
block holds guest data or bits, so it must not overlap the log, the BAT region or the metadata
region.  One over them turns a guest's write (through ``vhd mount`` or ``vhd serve``) into a
write over the image's own structures, so :func:`vhd.vhdx.open_vhdx` refuses such an image, as
:func:`vhd.open` refuses a VHD whose block lies over its metadata.  ``vhd check`` lists every
offender (:mod:`vhd.vhdx.check`).

Blocks before the first MiB (the headers) or past the end of the file are refused when they are
reached (:meth:`VHDXDisk._block_offset`), so they are not looked for here.

Pure: the BAT as an ``array('Q')`` in, the first offender out.  No per-entry Python work: a
crafted table of millions of entries costs a few C-level passes (the states masked with one
big-integer AND, then ``filter`` over ``range.__contains__``); Python steps are taken only for
allocated entries that lie in a forbidden range (a sector bitmap block just before a region may
be one), and the first payload one ends the search.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence

from . import records as r

MiB = r.MiB
# A table of the low byte of an entry: 0xFF where its state is FULLY_PRESENT or
# PARTIALLY_PRESENT (payload) / PRESENT (bitmap, with the reserved 7), 0x00 elsewhere.
_ALLOCATED = bytes(
    0xFF if b & r.STATE_MASK in (r.PayloadState.FULLY_PRESENT, r.PayloadState.PARTIALLY_PRESENT)
    else 0
    for b in range(256)
)  # fmt: skip


def allocated_only(bat: array[int]) -> array[int]:
    """``bat`` with every entry whose state is not 6 or 7 replaced by 0 (C-level passes)."""
    raw = bat.tobytes()
    low = 0 if array("Q", [1]).tobytes()[0] else 7  # where an entry's low byte lies
    keep = raw[low::8].translate(_ALLOCATED)
    out = array("Q")
    if b"\xff" not in keep:
        out.frombytes(bytes(len(raw)))
        return out
    mask = bytearray(len(raw))
    for k in range(8):
        mask[k::8] = keep
    # One AND of two big integers is the bytewise AND of the two strings (same byte order).
    anded = int.from_bytes(raw, "little") & int.from_bytes(mask, "little")
    out.frombytes(anded.to_bytes(len(raw), "little"))
    return out


def first_misplaced(
    bat: array[int],
    *,
    chunk_ratio: int,
    block_size: int,
    regions: Sequence[tuple[int, int, str]],
) -> tuple[int, int, str] | None:
    """The first allocated block over one of ``regions`` (``(start, end, name)``, each 1 MiB
    aligned and at or past the first MiB): ``(BAT index, entry, region name)``, or None.

    Entry *i* is a sector bitmap entry when ``i % (chunk_ratio + 1) == chunk_ratio`` (1 MiB of
    bits; allocated when PRESENT, 6), a payload entry otherwise (``block_size`` bytes; allocated
    when FULLY_ or PARTIALLY_PRESENT, 6 or 7)."""
    masked = allocated_only(bat)
    stride = chunk_ratio + 1
    found: tuple[int, int, str] | None = None
    for start, end, name in regions:
        # A block at offset o (a MiB multiple) of span L overlaps [start, end) iff
        # start - L < o < end; as an entry (o plus state bits): start - L + MiB <= e < end.
        # (L is the payload block size: a superset for the 1 MiB bitmap blocks.)
        bad = range(max(MiB, start - block_size + MiB), end)
        stop = len(masked) if found is None else found[0]  # only earlier entries can come first
        candidates = map(bad.__contains__, itertools.islice(masked, stop))
        for index in itertools.compress(range(stop), candidates):  # ascending, C-level
            if _overlaps(index, masked[index], stride, block_size, start, end):
                found = (index, bat[index], name)
                break
    return found


def _overlaps(index: int, entry: int, stride: int, block_size: int, start: int, end: int) -> bool:
    offset = entry & r.OFFSET_MASK
    if index % stride == stride - 1:  # a sector bitmap entry: PRESENT only, 1 MiB
        return entry & r.STATE_MASK == r.BitmapState.PRESENT and start <= offset < end
    return start - block_size < offset < end
