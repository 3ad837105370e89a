"""The block allocation table (spec: "Block Allocation Table and Data Blocks").

The BAT is a big-endian array of u32 sector offsets, one per block, 0xFFFFFFFF for an unallocated
block, padded to a 512-byte multiple (Windows pads with 0xFF to 4 KiB).  It lives here in a
native-order ``array('I')`` decoded with one ``byteswap``: lookups are plain indexing, no
per-entry Python objects are made, and a change marks only its 512-byte sector dirty so that a
write-back touches just that sector.
"""

from __future__ import annotations

import functools
import itertools
import operator
import re
import sys
from array import array
from collections.abc import Iterator, Sequence

UNUSED = 0xFFFFFFFF
# a byte of an entry that is not UNUSED (all ones in either byte order); entries are 4 bytes, so
# the match's offset // 4 is the entry
_NOT_UNUSED = re.compile(rb"[^\xff]")
_ALL_UNUSED = b"\xff" * 65536
ENTRIES_PER_SECTOR = 128
# The most entries vhdkit holds in memory (16 MiB as an array; `vhd check` needs about 32 bytes
# per block at most): 2 GiB at 512-byte blocks, 16 GiB at 4 KiB, 8 PiB at 2 MiB.  A header may
# claim up to 2^32 - 1, and a 2040 GiB disk of 512-byte blocks needs a 16 GiB table: such
# images are refused with a clear error, as qemu-img refuses "Max Table Entries too large".
MAX_ENTRIES = 1 << 22
_CHUNK = 1 << 20  # bytes of table per step of the whole-table scans
_FF_IS_ZERO = bytes([1] * 255 + [0])  # bytes.translate table: 0xFF -> 0, any other byte -> 1

_NATIVE_IS_LITTLE = sys.byteorder == "little"
if array("I").itemsize != 4:  # pragma: no cover - every Linux ABI has 4-byte unsigned int
    raise ImportError("array('I') is not 32-bit on this platform")


class BlockAllocationTable:
    """The in-memory BAT: native-order entries and the set of dirty 512-byte sectors."""

    __slots__ = ("_dirty", "entries")

    def __init__(self, entries: array[int]) -> None:
        self.entries = entries
        self._dirty: set[int] = set()

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview, count: int) -> BlockAllocationTable:
        table = array("I")
        table.frombytes(memoryview(raw)[: count * 4])
        if _NATIVE_IS_LITTLE:
            table.byteswap()
        return cls(table)

    @classmethod
    def empty(cls, count: int) -> BlockAllocationTable:
        return cls(array("I", [UNUSED]) * count)

    def __len__(self) -> int:
        return len(self.entries)

    def next_used(self, index: int) -> int:
        """The first block >= ``index`` with an entry, or ``len(self)``: one C-speed search over
        the table (no per-entry Python loop; a 2040 GiB disk has a million entries)."""
        view = memoryview(self.entries).cast("B")
        pos, total = index * 4, len(view)
        while pos < total:
            end = min(total, pos + len(_ALL_UNUSED))
            # bytes() copy + == is memcpy + memcmp; memoryview == compares item by item
            if bytes(view[pos:end]) != _ALL_UNUSED[: end - pos]:
                found = _NOT_UNUSED.search(view, pos, end)
                assert found is not None
                return found.start() // 4
            pos = end
        return len(self.entries)

    def run_end(self, index: int) -> int:
        """The first block after ``index`` whose entry differs from block ``index``'s (or
        ``len(self)``): C-speed comparisons of doubling spans, O(run length) in all."""
        entries = self.entries
        view = memoryview(entries).cast("B")
        unit = array("I", [entries[index]]).tobytes()
        pos, step, total = index + 1, 1, len(entries)
        while pos < total:
            n = min(step, total - pos)
            if bytes(view[pos * 4 : (pos + n) * 4]) != unit * n:
                # The difference is in this span: halve it down to the entry.
                while n > 1:
                    half = n // 2
                    if bytes(view[pos * 4 : (pos + half) * 4]) == unit * half:
                        pos += half
                        n -= half
                    else:
                        n = half
                return pos
            pos += n
            step *= 2
        return total

    def __getitem__(self, index: int) -> int:
        return self.entries[index]

    def __setitem__(self, index: int, sector: int) -> None:
        self.entries[index] = sector
        self._dirty.add(index // ENTRIES_PER_SECTOR)

    def allocated_count(self) -> int:
        return len(self.entries) - self.entries.count(UNUSED)

    def first_misplaced(
        self,
        *,
        span: int,
        last_span: int,
        file_size: int,
        regions: Sequence[tuple[int, int, str]],
    ) -> tuple[int, int, str] | None:
        """The lowest-numbered block whose space (``span`` bytes from its entry: bitmap plus
        data; ``last_span`` for the last block, which the disk size may cut) runs past
        ``file_size`` or overlaps one of the ``regions`` (start, end, label): ``(block, entry,
        where)``, or None.

        No per-entry Python work: ``min()`` and ``max()`` bound the allocated entries, and a
        test whose bad range lies outside those bounds is skipped; the others are one ``filter``
        over the table with ``range.__contains__`` (all C), stopping at the first hit.  A crafted
        table of 4 Mi entries costs a few C passes, not millions of Python steps.
        """
        entries = self.entries
        if self.next_used(0) == len(entries):
            return None  # nothing allocated (a new sparse disk): memcmp passes, no int per entry
        lowest = min(entries)  # UNUSED is the largest value: this is the lowest allocated one
        if lowest == UNUSED:
            return None
        highest = _highest_allocated(entries)
        # Entries in these ranges (in sectors) are bad for a full block.
        tests: list[tuple[range, tuple[int, int, str] | None]] = []
        for start, end, label in [(file_size, UNUSED * 512, ""), *regions]:
            bad = range(max(0, (start - span) // 512 + 1), min(UNUSED, -(-end // 512)))
            if bad and lowest < bad.stop and highest >= bad.start:
                tests.append((bad, None if not label else (start, end, label)))
        last = len(entries) - 1
        found: tuple[int, int, str] | None = None
        stop = len(entries)  # only blocks before the one found so far can come first
        for bad, region in tests:
            for entry in filter(bad.__contains__, itertools.islice(entries, stop)):
                block = entries.index(entry, 0, stop)
                if block == last and not _clashes(entry * 512, last_span, file_size, region):
                    break  # only the last block may be shorter; it is the last one
                if region is None:
                    where = f"past the end of the file ({file_size} bytes)"
                else:
                    where = f"over {region[2]} ({region[0]:#x}-{region[1]:#x})"
                found, stop = (block, entry, where), block
                break
        return found

    def allocated_indices(self) -> array[int]:
        """The numbers of the allocated blocks, ascending, in an ``array('I')``: C-level passes
        over the table's bytes, then one step per *run* of allocated blocks where runs are few
        (a sparse 2040 GiB table: a few ms) and a C-level ``compress`` where they are many (a
        crafted table alternating allocated and unallocated entries)."""
        entries = self.entries
        count = len(entries)
        blocks = array("I")
        if self.next_used(0) == count:
            return blocks
        # 1 for each byte other than 0xFF; an entry is allocated when any of its four bytes is
        # (UNUSED is all ones in either byte order), so the four lanes are ORed as big integers.
        marks = memoryview(entries).cast("B").tobytes().translate(_FF_IS_ZERO)
        lanes = (int.from_bytes(marks[lane::4], "little") for lane in range(4))
        flags = functools.reduce(operator.or_, lanes).to_bytes(count, "little")
        runs = flags.count(b"\x00\x01") + (flags[0] == 1)
        if runs * 16 > count:
            blocks.extend(itertools.compress(range(count), flags))
            return blocks
        pos = flags.find(1)
        while pos >= 0:
            end = flags.find(0, pos)
            end = count if end < 0 else end
            blocks.extend(range(pos, end))
            pos = flags.find(1, end)
        return blocks

    def allocated(self) -> Iterator[tuple[int, int]]:
        """(block index, sector) of every allocated block, in block order."""
        entries = self.entries
        for block in self.allocated_indices():
            yield block, entries[block]

    def table_bytes(self, padded_entries: int | None = None) -> bytes:
        """The whole table in on-disk (big-endian) form, padded with 0xFF to whole sectors."""
        copy = array("I", self.entries)
        if _NATIVE_IS_LITTLE:
            copy.byteswap()
        raw = copy.tobytes()
        total = padded_entries * 4 if padded_entries is not None else len(raw)
        total = (max(total, len(raw)) + 511) // 512 * 512
        return raw + b"\xff" * (total - len(raw))

    def sector_bytes(self, sector: int) -> bytes:
        """The on-disk bytes of one 512-byte sector of the table (0xFF past the last entry)."""
        chunk = self.entries[sector * ENTRIES_PER_SECTOR : (sector + 1) * ENTRIES_PER_SECTOR]
        copy = array("I", chunk)
        if _NATIVE_IS_LITTLE:
            copy.byteswap()
        raw = copy.tobytes()
        return raw + b"\xff" * (512 - len(raw))

    def resize(self, count: int) -> None:
        """Grow (new entries unallocated) or cut the table to ``count`` entries, for a table whose
        on-disk size changed (the on-disk entries must already say the same)."""
        if count < len(self.entries):
            del self.entries[count:]
            self._dirty = {s for s in self._dirty if s * ENTRIES_PER_SECTOR < count}
        elif count > len(self.entries):
            self.entries.extend(array("I", [UNUSED]) * (count - len(self.entries)))

    def take_dirty(self) -> list[int]:
        """The dirty sector numbers (sorted), clearing the set."""
        dirty = sorted(self._dirty)
        self._dirty.clear()
        return dirty

    def mark_dirty(self, sectors: list[int]) -> None:
        self._dirty.update(sectors)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)


def _highest_allocated(entries: array[int]) -> int:
    """The largest entry other than UNUSED (there must be one), at C speed.

    UNUSED entries are zeroed in a byte copy of the table by ``bytes.replace``.  That is exact
    unless an allocated entry's top byte is 0xFF (a run of 0xFF bytes could then start inside
    it): such an entry, counted in the plane of top bytes, is at 0xFF000000 sectors or more,
    and the answer is then UNUSED - 1, which callers take as "very far".  Done in chunks, so
    the copies stay small.
    """
    highest = 0
    for pos in range(0, len(entries) * 4, _CHUNK):
        chunk = entries[pos // 4 : (pos + _CHUNK) // 4]
        raw = chunk.tobytes()
        top = raw[3::4] if _NATIVE_IS_LITTLE else raw[0::4]
        if top.count(0xFF) > chunk.count(UNUSED):
            return UNUSED - 1
        cleaned = array("I")
        cleaned.frombytes(raw.replace(b"\xff\xff\xff\xff", b"\0\0\0\0"))
        highest = max(highest, max(cleaned))
    return highest


def _clashes(start: int, span: int, file_size: int, region: tuple[int, int, str] | None) -> bool:
    if region is None:
        return start + span > file_size
    return start < region[1] and start + span > region[0]
