"""Where a VHDX's blocks may lie, and C-level passes over its BAT (MS-VHDX 2.5 BAT, 2.5.1
entry states, 3.1.3 region placement).

A payload block or a sector bitmap block holds guest data or bits, so it must not overlap the
log, the BAT region or the metadata region.  One over them turns a guest's write (through
``vhd mount`` or ``vhd serve``) into a write over the image's own structures, so
:func:`vhd.vhdx.open_vhdx` refuses such an image, as :func:`vhd.open` refuses a VHD whose block
lies over its metadata.  ``vhd check`` lists every offender (:mod:`vhd.vhdx.check`).

Blocks before the first MiB (the headers) or past the end of the file are refused when they are
reached (:meth:`VHDXDisk._block_offset`), so they are not looked for here.

Pure: the BAT as an ``array('Q')`` in, answers out.  A legal 64 TiB disk of 1 MiB blocks has
64 Mi entries (a 512 MiB table), so nothing here makes a Python object per entry or copies the
table: each pass walks it in windows of at most :data:`WINDOW` entries, taking the low byte of
every entry (its state, bits 0-2) with one strided slice and classifying those bytes with
``bytes.translate``; windows with nothing of interest cost a ``bytes.find`` and nothing more.
Python steps are taken only for the entries a caller asks about (allocated ones, mostly), and
``run_end`` grows its window from a few entries, so a caller asking about one block pays for
one block.
"""

from __future__ import annotations

import itertools
import re
import sys
from array import array
from collections.abc import Iterator, Sequence

from . import records as r

MiB = r.MiB
WINDOW = 1 << 17  # entries per step of a whole-table pass (1 MiB of table)
_NONZERO = re.compile(rb"[^\x00]")
_LOW = 0 if sys.byteorder == "little" else 7  # where an entry's low byte (its state) lies


def _table(keep: Sequence[int]) -> bytes:
    """A ``bytes.translate`` table from an entry's low byte: 0xFF where its state (bits 0-2)
    is one of ``keep``, 0x00 elsewhere."""
    return bytes(0xFF if b & r.STATE_MASK in keep else 0 for b in range(256))


# FULLY_PRESENT or PARTIALLY_PRESENT (payload) / PRESENT (bitmap, with the reserved 7).
_ALLOCATED = _table((r.PayloadState.FULLY_PRESENT, r.PayloadState.PARTIALLY_PRESENT))
# The state itself (bits 0-2) of an entry's low byte.
STATES = bytes(b & r.STATE_MASK for b in range(256))
# Entry bits 3-19 are reserved (2.5.1): lanes 0, 1 and 2 of the entry, where those bits lie.
_RESERVED_LANES = (
    (_LOW, bytes(1 if b & 0xF8 else 0 for b in range(256))),
    (1 if _LOW == 0 else 6, bytes([0] + [1] * 255)),
    (2 if _LOW == 0 else 5, bytes(1 if b & 0x0F else 0 for b in range(256))),
)


# Bits 20-63 (FileOffsetMB): the high nibble of byte 2, and bytes 3-7 (``None``: as they are).
_OFFSET_LANES: tuple[tuple[int, bytes | None], ...] = (
    (2 if _LOW == 0 else 5, bytes(b >> 4 for b in range(256))),
    *((lane if _LOW == 0 else 7 - lane, None) for lane in range(3, 8)),
)


def _nonzero(data: bytes, table: bytes | None) -> bool:
    """Whether any byte of ``data`` (through ``table``) is non-zero: a memcmp against zeros
    (a calloc), several times faster than ``bytes.count``."""
    if table is not None:
        data = data.translate(table)
    return data != bytes(len(data))


def _lane(bat: array[int], start: int, stop: int, lane: int) -> bytes:
    """Byte ``lane`` of each of the entries [start, stop): one strided copy, the view let go
    at once (a live export would stop the table from growing)."""
    with memoryview(bat) as view, view.cast("B") as raw:
        # A contiguous copy (memcpy) then a strided bytes slice: six times faster than a
        # strided memoryview's tobytes, which copies item by item.
        return raw[start * 8 : stop * 8].tobytes()[lane::8]


def states(bat: array[int], start: int, stop: int) -> bytes:
    """The states (entry & 7) of entries [start, stop), one byte each."""
    return _lane(bat, start, stop, _LOW).translate(STATES)


def run_end(bat: array[int], index: int, stop: int, stride: int, classes: bytes) -> int:
    """The first payload entry in (index, stop) whose class (``classes`` applied to its low
    byte) differs from entry ``index``'s, or ``stop``.  Sector bitmap entries (every
    ``stride``-th, the last of each chunk) are skipped.  The window doubles from 64 entries:
    O(run length) in all, whether the run is one block or the whole disk."""
    want = classes[_lane(bat, index, index + 1, _LOW)[0]]
    same = bytes([want])
    pos, step = index + 1, 64
    limit = min(stop, len(bat))  # (a caller's stop may name the entry after the table)
    while pos < limit:
        end = min(limit, pos + step)
        cls = bytearray(_lane(bat, pos, end, _LOW).translate(classes))
        first_bitmap = pos + (stride - 1 - pos) % stride
        if first_bitmap < end:  # a bitmap entry counts as "the same"
            cls[first_bitmap - pos :: stride] = same * len(range(first_bitmap, end, stride))
        rest = len(cls.lstrip(same))
        if rest:
            return end - rest
        pos, step = end, min(step * 2, WINDOW)
    return stop


def count_payload_states(bat: array[int], stop: int, stride: int) -> list[int]:
    """How many payload entries in [0, stop) have each state 0-7 (bitmap entries left out)."""
    counts = [0] * 8
    for pos in range(0, stop, WINDOW):
        end = min(stop, pos + WINDOW)
        st = states(bat, pos, end)
        first_bitmap = pos + (stride - 1 - pos) % stride
        bitmaps = st[first_bitmap - pos :: stride] if first_bitmap < end else b""
        for s in range(8):
            key = bytes([s])
            counts[s] += st.count(key) - bitmaps.count(key)
    return counts


def bitmap_states(bat: array[int], chunks: int, stride: int) -> bytes:
    """The states of the sector bitmap entries of the first ``chunks`` chunks that the table
    holds, one byte each (one strided copy: a 64 TiB disk has at most 16 Ki of them)."""
    stop = min(len(bat), chunks * stride)
    if stop < stride:
        return b""
    with memoryview(bat) as view, view.cast("B") as raw:
        lane = raw[(stride - 1) * 8 + _LOW : stop * 8 : stride * 8].tobytes()
    return lane.translate(STATES)


def flagged(bat: array[int], start: int, stop: int, table: bytes) -> Iterator[int]:
    """Indices in [start, stop), ascending, of the entries whose low byte ``table`` maps to
    non-zero: Python steps only for those."""
    for pos in range(start, stop, WINDOW):
        end = min(stop, pos + WINDOW)
        marks = _lane(bat, pos, end, _LOW).translate(table)
        if not _nonzero(marks, None):
            continue  # (the regex scan below is slower on nothing)
        for m in _NONZERO.finditer(marks):
            yield pos + m.start()


def nonzero_entries(bat: array[int], start: int, stop: int) -> Iterator[int]:
    """Indices in [start, stop), ascending, of the entries that are not 0: a window of the
    table that is all zeros costs one compare."""
    for pos in range(start, stop, WINDOW):
        end = min(stop, pos + WINDOW)
        window = bat[pos:end]
        if not _nonzero(window.tobytes(), None):
            continue
        yield from (pos + i for i, e in enumerate(window) if e)


def flagged_bytes(marks: bytes) -> Iterator[int]:
    """Positions of the non-zero bytes of ``marks``, ascending."""
    for m in _NONZERO.finditer(marks):
        yield m.start()


def with_reserved_bits(bat: array[int], start: int, stop: int) -> Iterator[int]:
    """Indices in [start, stop), ascending, of the entries with any of bits 3-19 set."""
    for pos in range(start, stop, WINDOW):
        end = min(stop, pos + WINDOW)
        n = end - pos
        with memoryview(bat) as view, view.cast("B") as raw:
            window = raw[pos * 8 : end * 8].tobytes()
        lanes = [window[lane::8].translate(table) for lane, table in _RESERVED_LANES]
        if not any(_nonzero(marks, None) for marks in lanes):
            continue
        acc = 0
        for marks in lanes:
            acc |= int.from_bytes(marks, "little")
        for m in _NONZERO.finditer(acc.to_bytes(n, "little")):
            yield pos + m.start()


def highest(bat: array[int]) -> tuple[int, int] | None:
    """(index, entry) of the largest entry among those with a FileOffsetMB (the offset is the
    high bits: the last space any entry names), the first such; None when none has one.

    A window whose entries are all below 1 MiB (no offset: an empty disk's NOT_PRESENT, or
    the ZERO entries qemu-img writes) is skipped on its bytes 2-7, ORed as big integers;
    ``max`` runs only over the others."""
    best: tuple[int, int] | None = None
    for pos in range(0, len(bat), WINDOW):
        end = min(len(bat), pos + WINDOW)
        with memoryview(bat) as view, view.cast("B") as raw:
            window = raw[pos * 8 : end * 8].tobytes()
        if not any(_nonzero(window[lane::8], table) for lane, table in _OFFSET_LANES):
            continue
        chunk = bat[pos:end]
        top = max(chunk)
        if best is None or top > best[1]:
            best = (pos + chunk.index(top), top)
    return best


def _masked(chunk: array[int]) -> tuple[array[int], int, int] | None:
    """``chunk`` with every entry that is not allocated (state 6 or 7) replaced by 0, and the
    lowest and highest allocated entries; None when none is.  C-level: the allocated lanes as
    a byte mask, one AND of two big integers (the bytewise AND of two strings of the same byte
    order), one OR with the inverted mask for the lowest."""
    raw = chunk.tobytes()
    keep = raw[_LOW::8].translate(_ALLOCATED)
    if b"\xff" not in keep:
        return None
    mask = bytearray(len(raw))
    for k in range(8):
        mask[k::8] = keep
    bits = int.from_bytes(mask, "little")
    value = int.from_bytes(raw, "little")
    masked = array("Q")
    masked.frombytes((value & bits).to_bytes(len(raw), "little"))
    lifted = array("Q")  # the entries left out read as all ones: min() is the lowest allocated
    lifted.frombytes((value | (bits ^ ((1 << (8 * len(raw))) - 1))).to_bytes(len(raw), "little"))
    return masked, min(lifted), max(masked)


def allocated_only(bat: array[int]) -> array[int]:
    """``bat`` with every entry whose state is not 6 or 7 replaced by 0."""
    got = _masked(bat)
    return got[0] if got is not None else array("Q", bytes(8 * len(bat)))


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
    when FULLY_ or PARTIALLY_PRESENT, 6 or 7).

    Window by window: one with no allocated entry costs a ``bytes.find``; in the others the
    allocated entries are masked (:func:`_masked`), and only a region that lies between their
    lowest and highest offsets is tested entry by entry (``range.__contains__`` over the
    window, C-level): blocks lie after the regions in a real image, so none is."""
    stride = chunk_ratio + 1
    # A block at offset o (a MiB multiple) of span L overlaps [start, end) iff
    # start - L < o < end; as an entry (o plus state bits): start - L + MiB <= e < end.
    # (L is the payload block size: a superset for the 1 MiB bitmap blocks.)
    tests = [
        (range(max(MiB, start - block_size + MiB), end), start, end, name)
        for start, end, name in regions
    ]
    for pos in range(0, len(bat), WINDOW):
        stop = min(len(bat), pos + WINDOW)
        if b"\xff" not in _lane(bat, pos, stop, _LOW).translate(_ALLOCATED):
            continue
        chunk = bat[pos:stop]
        got = _masked(chunk)
        assert got is not None
        masked, lowest, top = got
        found: tuple[int, int, str] | None = None
        for bad, start, end, name in tests:
            if bad.stop <= lowest or bad.start > top:
                continue
            limit = len(masked) if found is None else found[0] - pos  # only earlier ones count
            hits = map(bad.__contains__, itertools.islice(masked, limit))
            for j in itertools.compress(range(limit), hits):  # ascending, C-level
                if _overlaps(pos + j, masked[j], stride, block_size, start, end):
                    found = (pos + j, chunk[j], name)
                    break
        if found is not None:
            return found
    return None


def _overlaps(index: int, entry: int, stride: int, block_size: int, start: int, end: int) -> bool:
    offset = entry & r.OFFSET_MASK
    if index % stride == stride - 1:  # a sector bitmap entry: PRESENT only, 1 MiB
        return entry & r.STATE_MASK == r.BitmapState.PRESENT and start <= offset < end
    return start - block_size < offset < end
