"""Sector bitmaps (spec: "Block Allocation Table and Data Blocks"): one bit per 512-byte sector of
a block, **MSB-first** (sector i is bit ``0x80 >> (i & 7)`` of byte ``i >> 3``).

In a dynamic disk a set bit means "data here" and a clear bit reads as zero; in a differencing
disk a clear bit means "read it from the parent".  Runs of equal bits are found with C-speed byte
operations (``lstrip`` over whole bytes), so a bitmap that marks a range alike costs no
per-sector Python work.
"""

from __future__ import annotations

from collections.abc import Iterator

Bitmap = bytes | bytearray


def bit(bitmap: Bitmap, sector: int) -> bool:
    return bool(bitmap[sector >> 3] & (0x80 >> (sector & 7)))


def _run_end(bitmap: Bitmap, pos: int, stop: int, value: bool) -> int:
    """First sector in [pos, stop) whose bit differs from ``value`` (or ``stop``)."""
    while pos < stop and pos & 7:
        if bit(bitmap, pos) != value:
            return pos
        pos += 1
    if pos >= stop:
        return stop
    whole_end = stop >> 3
    first = pos >> 3
    if whole_end > first:
        chunk = bytes(bitmap[first:whole_end])
        same = len(chunk) - len(chunk.lstrip(b"\xff" if value else b"\x00"))
        pos = (first + same) * 8
        if same < len(chunk):
            stop_here = min(stop, pos + 8)
            while pos < stop_here:
                if bit(bitmap, pos) != value:
                    return pos
                pos += 1
            return pos  # pragma: no cover - the byte differed, so a bit above must differ
    while pos < stop:
        if bit(bitmap, pos) != value:
            return pos
        pos += 1
    return stop


def runs(bitmap: Bitmap, start: int, stop: int) -> Iterator[tuple[int, int, bool]]:
    """Maximal runs ``(first, end, value)`` of equal bits covering sectors [start, stop)."""
    pos = start
    while pos < stop:
        value = bit(bitmap, pos)
        end = _run_end(bitmap, pos, stop, value)
        yield pos, end, value
        pos = end


def all_equal(bitmap: Bitmap, start: int, stop: int, value: bool) -> bool:
    return start >= stop or _run_end(bitmap, start, stop, value) == stop


def any_set(bitmap: Bitmap, sectors: int) -> bool:
    whole = sectors >> 3
    if bytes(bitmap[:whole]).strip(b"\x00"):
        return True
    return any(bit(bitmap, s) for s in range(whole * 8, sectors))


def count_set(bitmap: Bitmap, sectors: int) -> int:
    whole = sectors >> 3
    total = int.from_bytes(bitmap[:whole], "big").bit_count() if whole else 0
    return total + sum(1 for s in range(whole * 8, sectors) if bit(bitmap, s))


def set_range(bitmap: bytearray, start: int, stop: int, value: bool = True) -> bool:
    """Set (or clear) the bits of sectors [start, stop); return whether anything changed."""
    changed = False
    pos = start
    while pos < stop and pos & 7:
        changed |= _set_bit(bitmap, pos, value)
        pos += 1
    first, last = pos >> 3, stop >> 3
    if last > first:
        fill = (b"\xff" if value else b"\x00") * (last - first)
        if bitmap[first:last] != fill:
            bitmap[first:last] = fill
            changed = True
        pos = last * 8
    while pos < stop:
        changed |= _set_bit(bitmap, pos, value)
        pos += 1
    return changed


def _set_bit(bitmap: bytearray, sector: int, value: bool) -> bool:
    mask = 0x80 >> (sector & 7)
    old = bitmap[sector >> 3]
    new = old | mask if value else old & ~mask
    bitmap[sector >> 3] = new
    return new != old
