"""The VHDX metadata log (MS-VHDX 1.0, 2.3): finding the active sequence, replaying it, and
building the entries vhdkit writes.

Replay (2.3.3): scan the ring for sequences of valid entries (signature, LogGuid of the header,
CRC-32C over the whole entry, every descriptor and data sector carrying the entry's sequence
number) whose head entry's Tail lies inside the sequence; the active sequence is the valid one
with the highest sequence number.  Its entries, from the tail entry to the head, give a list of
writes (data sectors and zeroed ranges) that the caller applies to the file, or, for a read-only
open, keeps as an in-memory overlay (:class:`Overlay`) so the file is never written.

Writing: :func:`build_entry` lays out one entry (header, data and zero descriptors, data sectors
with their first 8 and last 4 bytes moved into the descriptor) for a set of 4 KiB page updates.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import CorruptImageError
from ..guid import Guid
from ..record import FrozenRecord, fill
from .crc import crc32c_with_zeroed_field
from .records import (
    DESCRIPTOR,
    DESCRIPTOR_SIZE,
    LOG_ENTRY_HEADER,
    LOG_ENTRY_HEADER_SIZE,
    LOG_SECTOR,
    descriptor_sectors,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (vhd.record)
if TYPE_CHECKING:
    from ..guid import AnyGuid


class Write(FrozenRecord):
    """One replayed update: ``data`` at ``offset``, or ``zero_length`` zero bytes there."""

    _fields = ("offset", "data", "zero_length")
    __slots__ = _fields
    offset: int
    data: bytes | None
    zero_length: int

    def __init__(self, offset: int, data: bytes | None, zero_length: int = 0) -> None:
        fill(self, offset, data, zero_length)

    @property
    def length(self) -> int:
        return len(self.data) if self.data is not None else self.zero_length


class LogEntry(FrozenRecord):
    _fields = (
        "position",
        "length",
        "tail",
        "sequence_number",
        "flushed_file_offset",
        "last_file_offset",
        "writes",
    )
    __slots__ = _fields
    position: int  # offset in the log
    length: int
    tail: int
    sequence_number: int
    flushed_file_offset: int
    last_file_offset: int
    writes: tuple[Write, ...]

    def __init__(
        self,
        position: int,
        length: int,
        tail: int,
        sequence_number: int,
        flushed_file_offset: int,
        last_file_offset: int,
        writes: tuple[Write, ...],
    ) -> None:
        fill(
            self,
            position,
            length,
            tail,
            sequence_number,
            flushed_file_offset,
            last_file_offset,
            writes,
        )


class ActiveSequence(FrozenRecord):
    _fields = ("entries",)
    __slots__ = _fields
    entries: tuple[LogEntry, ...]  # tail first

    def __init__(self, entries: tuple[LogEntry, ...]) -> None:
        fill(self, entries)

    @property
    def head(self) -> LogEntry:
        return self.entries[-1]

    @property
    def writes(self) -> list[Write]:
        return [w for e in self.entries for w in e.writes]


def _ring(log: bytes, position: int, length: int) -> bytes:
    end = position + length
    if end <= len(log):
        return log[position:end]
    return log[position:] + log[: end - len(log)]


def parse_entry(log: bytes, position: int, log_guid: AnyGuid) -> LogEntry | None:
    """The valid entry at ``position`` of the ring ``log``, or None."""
    size = len(log)
    first = _ring(log, position, LOG_SECTOR)
    if first[:4] != b"loge":
        return None
    h = LOG_ENTRY_HEADER.parse(first)
    length = h.entry_length
    if length == 0 or length % LOG_SECTOR or length > size:
        return None
    if h.tail % LOG_SECTOR or h.tail >= size or h.sequence_number == 0:
        return None
    if Guid.from_bytes_le(h.log_guid) != log_guid:
        return None
    count = h.descriptor_count
    dsectors = descriptor_sectors(count)
    if dsectors * LOG_SECTOR > length:
        return None
    raw = _ring(log, position, length)
    if crc32c_with_zeroed_field(raw, 4) != h.checksum:
        return None
    writes: list[Write] = []
    data_index = dsectors
    seq = h.sequence_number
    for i in range(count):
        at = LOG_ENTRY_HEADER_SIZE + DESCRIPTOR_SIZE * i
        d = DESCRIPTOR.parse(raw[at : at + DESCRIPTOR_SIZE])
        if d.sequence_number != seq or d.file_offset % LOG_SECTOR:
            return None
        if d.signature == b"zero":
            zero_length = int.from_bytes(d.leading, "little")
            if zero_length % LOG_SECTOR:
                return None
            writes.append(Write(d.file_offset, None, zero_length))
        elif d.signature == b"desc":
            if (data_index + 1) * LOG_SECTOR > length:
                return None
            sector = raw[data_index * LOG_SECTOR : (data_index + 1) * LOG_SECTOR]
            data_index += 1
            if (
                sector[:4] != b"data"
                or int.from_bytes(sector[4:8], "little") != seq >> 32
                or int.from_bytes(sector[-4:], "little") != seq & 0xFFFFFFFF
            ):
                return None
            writes.append(Write(d.file_offset, d.leading + sector[8:-4] + d.trailing))
        else:
            return None
    if data_index * LOG_SECTOR != length:
        return None  # the number of data sectors must equal the number of data descriptors
    return LogEntry(
        position,
        length,
        h.tail,
        seq,
        h.flushed_file_offset,
        h.last_file_offset,
        tuple(writes),
    )


def find_active_sequence(log: bytes, log_guid: AnyGuid) -> ActiveSequence | None:
    """The spec's search (2.3.3) over the ring ``log``: the newest valid, complete sequence."""
    size = len(log)
    if size == 0 or size % LOG_SECTOR:
        return None
    cache: dict[int, LogEntry | None] = {}

    def entry_at(pos: int) -> LogEntry | None:
        if pos not in cache:
            cache[pos] = parse_entry(log, pos, log_guid)
        return cache[pos]

    best: ActiveSequence | None = None
    tail = old_tail = 0
    for _ in range(size // LOG_SECTOR + 1):  # each step moves the tail forward by >= 4 KiB
        current: list[LogEntry] = []
        head = tail
        while len(current) < size // LOG_SECTOR:
            e = entry_at(head)
            if e is None or (current and e.sequence_number != current[-1].sequence_number + 1):
                break
            current.append(e)
            head = (head + e.length) % size
        valid = False
        if current:
            positions = [e.position for e in current]
            if current[-1].tail in positions:
                start = positions.index(current[-1].tail)
                candidate = ActiveSequence(tuple(current[start:]))
                valid = True
                if best is None or candidate.head.sequence_number > best.head.sequence_number:
                    best = candidate
        tail = head if valid else (tail + LOG_SECTOR) % size
        if tail <= old_tail:
            break
        old_tail = tail
    return best


def build_entry(
    *,
    log_guid: AnyGuid,
    sequence_number: int,
    tail: int,
    flushed_file_offset: int,
    last_file_offset: int,
    pages: list[tuple[int, bytes]],
) -> bytes:
    """One log entry carrying ``pages`` (file offset, 4 KiB of new content each)."""
    count = len(pages)
    dsectors = descriptor_sectors(count)
    length = (dsectors + count) * LOG_SECTOR
    out = bytearray(length)
    out[:LOG_ENTRY_HEADER_SIZE] = LOG_ENTRY_HEADER.build(
        {
            "checksum": 0,
            "entry_length": length,
            "tail": tail,
            "sequence_number": sequence_number,
            "descriptor_count": count,
            "reserved": 0,
            "log_guid": log_guid.bytes_le,
            "flushed_file_offset": flushed_file_offset,
            "last_file_offset": last_file_offset,
        }
    )
    high = (sequence_number >> 32).to_bytes(4, "little")
    low = (sequence_number & 0xFFFFFFFF).to_bytes(4, "little")
    for i, (offset, page) in enumerate(pages):
        if len(page) != LOG_SECTOR or offset % LOG_SECTOR:
            raise ValueError("log pages are 4 KiB at 4 KiB-aligned offsets")
        at = LOG_ENTRY_HEADER_SIZE + DESCRIPTOR_SIZE * i
        out[at : at + DESCRIPTOR_SIZE] = DESCRIPTOR.build(
            {
                "signature": b"desc",
                "trailing": page[-4:],
                "leading": page[:8],
                "file_offset": offset,
                "sequence_number": sequence_number,
            }
        )
        s = (dsectors + i) * LOG_SECTOR
        out[s : s + 4] = b"data"
        out[s + 4 : s + 8] = high
        out[s + 8 : s + LOG_SECTOR - 4] = page[8:-4]
        out[s + LOG_SECTOR - 4 : s + LOG_SECTOR] = low
    out[4:8] = crc32c_with_zeroed_field(out, 4).to_bytes(4, "little")
    return bytes(out)


def max_pages_per_entry() -> int:
    """Pages per entry so the descriptors fit the first sector (126): entries stay < 512 KiB."""
    return (LOG_SECTOR - LOG_ENTRY_HEADER_SIZE) // DESCRIPTOR_SIZE


class Overlay:
    """Replayed writes held in memory for a read-only open: reads of the file go through it."""

    def __init__(self, writes: list[Write]) -> None:
        self.writes = writes

    def __bool__(self) -> bool:
        return bool(self.writes)

    def apply(self, dest: memoryview, offset: int) -> None:
        """Overlay the replayed writes on ``dest``, which holds the file's bytes at ``offset``."""
        end = offset + len(dest)
        for w in self.writes:  # in replay order: a later write wins
            lo = max(offset, w.offset)
            hi = min(end, w.offset + w.length)
            if lo >= hi:
                continue
            if w.data is None:
                dest[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                dest[lo - offset : hi - offset] = w.data[lo - w.offset : hi - w.offset]


def read_with(
    pread: Callable[[int, int], bytes], overlay: Overlay | None, length: int, offset: int
) -> bytes:
    """``length`` bytes at ``offset`` (zeros past end of file), through ``overlay``."""
    raw = bytearray(pread(length, offset).ljust(length, b"\0"))
    if overlay:
        overlay.apply(memoryview(raw), offset)
    return bytes(raw)


def check_descriptors(seq: ActiveSequence, limit: int) -> None:
    """Refuse replayed writes that reach past ``limit`` (a hostile entry could zero terabytes)."""
    for w in seq.writes:
        if w.offset + w.length > limit:
            raise CorruptImageError(
                f"log entry writes [{w.offset}, {w.offset + w.length}) beyond the file's "
                f"structures (LastFileOffset {limit})"
            )
