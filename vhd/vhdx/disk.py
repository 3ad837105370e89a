"""VHDX disks: open, positional I/O and crash-safe metadata updates (MS-VHDX 1.0, 2.2 header
section, 2.3.3 log replay, 2.4 blocks, 2.5 BAT, 2.6 metadata region).

Opening parses every record once: the current header (the valid one with the higher sequence
number), the region table (first valid copy), the metadata table and known items, the parent
locator, and the BAT into a native ``array('Q')``.  A non-zero LogGuid means the log is replayed
first: in the file for an ``r+`` open, into an in-memory :class:`~vhd.vhdx.log.Overlay` for a
read-only one, which then never writes.

Data path: guest block *b* has BAT entry ``b + b // chunk_ratio`` (sector bitmap entries are
interleaved after each chunk).  FULLY_PRESENT blocks read from the file; PARTIALLY_PRESENT
(differencing only) consult the sector bitmap (bit *i* of the chunk's 1 MiB bitmap block, least
significant bit first, is logical sector *i* of the chunk); NOT_PRESENT reads from the parent of a
differencing disk and as zeros otherwise, as do ZERO, UNMAPPED and UNDEFINED.

Crash safety: payload data is written in place (new blocks at the 1 MiB-aligned end of file);
BAT entries and sector bitmaps change in memory only.  :meth:`VHDXDisk.flush` is a transaction
through the log, in the spec's order (2.3):

1. ``fdatasync``: the payload data and file extension are durable before any metadata names them;
2. the dirty 4 KiB metadata pages are written as log entries under a fresh LogGuid at the start of
   the log, then ``fdatasync``;
3. the header is updated (the non-current copy, sequence + 1) with that LogGuid, ``fdatasync``:
   from here on an open replays the entries;
4. the pages are written to their final places, ``fdatasync``;
5. the header is updated again with a zero LogGuid, ``fdatasync``: the image is clean at rest.

A crash before 3 leaves the old metadata (the unflushed writes are lost, their space orphaned);
from 3 on, replay produces the new metadata.  A fresh LogGuid per transaction makes every older
entry invalid, so entries always start at the beginning of the log.  The first modification in
a session updates both headers with a new FileWriteGuid and DataWriteGuid (2.2.2.1).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence

from ..chain import (
    MAX_CHAIN_DEPTH,
    ParentPolicy,
    _show,
    _tried_text,
    open_chosen,
    read_candidate,
    search_candidates,
)
from ..disk import _BYTE_FORMATS, Buffer, Disk, Extent, bitmap_extents, parent_extents
from ..errors import (
    ChainLoopError,
    CorruptImageError,
    InvalidArgumentError,
    NotAVHDError,
    ParentMismatchError,
    ParentNotFoundError,
    UnsupportedFeatureError,
    VHDError,
)
from ..fileio import (
    file_size,
    open_image_file,
    punch_hole,
    read_exact_into,
    read_upto,
    write_all,
    zero_fill,
)
from ..footer import DiskType
from ..guid import Guid
from ..locator import windows_to_posix
from ..newfile import NewFile
from ..probe import is_vhdx_file
from ..record import Record, fill
from . import log as vlog
from . import placement
from . import records as r
from .placement import first_misplaced

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (vhd.record)
if TYPE_CHECKING:
    from ..guid import AnyGuid

MiB = r.MiB
LOG_SECTOR = r.LOG_SECTOR
_MAX_LOG = 1024 * MiB  # a log is read whole; real ones are 1 MiB
_MAX_GROWTH = 64 * 1024 * MiB  # how far past EOF a replayed log may extend the file


class Metadata(Record):
    """The known metadata items, decoded, plus the raw table for ``vhd info``."""

    _fields = (
        "entries",
        "block_size",
        "leave_blocks_allocated",
        "has_parent",
        "virtual_size",
        "virtual_disk_id",
        "logical_sector_size",
        "physical_sector_size",
        "parent_locator",
        "raw_items",
    )
    __slots__ = _fields
    entries: tuple[r.MetadataEntry, ...]
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    virtual_disk_id: AnyGuid
    logical_sector_size: int
    physical_sector_size: int
    parent_locator: r.ParentLocator | None
    raw_items: dict[AnyGuid, bytes]

    def __init__(
        self,
        entries: tuple[r.MetadataEntry, ...],
        block_size: int,
        leave_blocks_allocated: bool,
        has_parent: bool,
        virtual_size: int,
        virtual_disk_id: AnyGuid,
        logical_sector_size: int,
        physical_sector_size: int,
        parent_locator: r.ParentLocator | None,
        raw_items: dict[AnyGuid, bytes] | None = None,
    ) -> None:
        fill(
            self,
            entries,
            block_size,
            leave_blocks_allocated,
            has_parent,
            virtual_size,
            virtual_disk_id,
            logical_sector_size,
            physical_sector_size,
            parent_locator,
            {} if raw_items is None else raw_items,
        )


class Layout(Record):
    """Everything an open reads before the data path: for ``vhd info`` and ``vhd check``."""

    _fields = (
        "creator",
        "headers",
        "header_errors",
        "current",
        "region_tables",
        "region_errors",
        "bat_region",
        "metadata_region",
        "metadata",
        "replayed",
    )
    __slots__ = _fields
    creator: str
    headers: list[r.Header | None]
    header_errors: list[str]
    current: int
    region_tables: list[r.RegionTable | None]
    region_errors: list[str]
    bat_region: r.Region
    metadata_region: r.Region
    metadata: Metadata
    replayed: vlog.ActiveSequence | None

    def __init__(
        self,
        creator: str,
        headers: list[r.Header | None],
        header_errors: list[str],
        current: int,
        region_tables: list[r.RegionTable | None],
        region_errors: list[str],
        bat_region: r.Region,
        metadata_region: r.Region,
        metadata: Metadata,
        replayed: vlog.ActiveSequence | None,
    ) -> None:
        fill(
            self,
            creator,
            headers,
            header_errors,
            current,
            region_tables,
            region_errors,
            bat_region,
            metadata_region,
            metadata,
            replayed,
        )


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    return ((1 << 23) * logical_sector_size) // block_size


def bat_entries(size: int, block_size: int, lss: int, differencing: bool) -> int:
    """Entries the BAT must hold (2.5): payload entries plus the interleaved bitmap entries."""
    ratio = chunk_ratio(block_size, lss)
    blocks = -(-size // block_size)
    if differencing:
        return -(-blocks // ratio) * (ratio + 1)
    return blocks + (blocks - 1) // ratio if blocks else 0


def _bits_runs(bits: int, first: int, last: int) -> Iterator[tuple[int, int, bool]]:
    """Runs of equal bits of the little-endian bitmap ``bits`` in [first, last)."""
    pos = first
    while pos < last:
        value = bool((bits >> pos) & 1)
        rest = (~bits if value else bits) >> pos
        end = pos + ((rest & -rest).bit_length() - 1) if rest else last
        end = min(end, last)
        yield pos, end, value
        pos = end


class VHDXDisk(Disk):
    """A VHDX opened for positional I/O.  Use :func:`vhd.vhdx.open_vhdx` or
    :func:`vhd.vhdx.create_vhdx`."""

    format = "vhdx"

    def __init__(
        self,
        *,
        path: str,
        fd: int,
        writable: bool,
        layout: Layout,
        bat: array[int],
        fsize: int,
        overlay: vlog.Overlay | None,
        warnings: list[str],
    ) -> None:
        # Disk.__init__ is VHD-specific (footer); the attributes the shared API uses are set here.
        self._init_file(path, fd, writable, fsize, warnings)
        self.layout = layout
        md = layout.metadata
        self.metadata = md
        self.size = md.virtual_size
        self.block_size = md.block_size
        self.logical_sector_size = md.logical_sector_size
        self.physical_sector_size = md.physical_sector_size
        if md.has_parent:
            self.type = DiskType.DIFFERENCING
        elif md.leave_blocks_allocated:
            self.type = DiskType.FIXED
        else:
            self.type = DiskType.DYNAMIC
        self._differencing = md.has_parent
        self._bs = md.block_size
        self._lss = md.logical_sector_size
        self._ratio = chunk_ratio(md.block_size, md.logical_sector_size)
        self._spb = md.block_size // md.logical_sector_size
        self.bat = bat
        self._bat_offset = layout.bat_region.file_offset
        self._overlay = overlay
        self._dirty_bat: set[int] = set()  # BAT page numbers
        self._bitmap_pages: dict[int, bytearray] = {}  # file offset of a 4 KiB page -> content
        self._dirty_bitmaps: set[int] = set()
        self._session = False
        self._eof = -(-fsize // MiB) * MiB
        # Set by create_vhdx while the file is still under its temporary name (vhd.newfile).
        self.unpublished: NewFile | None = None
        self._data_map_known = False
        self._data_map_cache: list[int] | None = None

    # -- headers ---------------------------------------------------------------------------

    @property
    def current_header(self) -> r.Header:
        h = self.layout.headers[self.layout.current]
        assert h is not None
        return h

    def _write_header(self, durable: bool, **changes: object) -> None:
        """The update procedure of 2.2.2.1: the non-current copy gets sequence + 1."""
        cur = self.current_header
        new = cur.replace(sequence_number=cur.sequence_number + 1, **changes)
        slot = 1 - self.layout.current
        write_all(self._fd, new.build(), r.HEADER_OFFSETS[slot])
        if durable:
            os.fdatasync(self._fd)
        self.layout.headers[slot] = new
        self.layout.current = slot

    def _begin_session(
        self, data_write_guid: AnyGuid | None = None, *, keep_data: bool = False
    ) -> None:
        """Before the first modification (2.2.2): a new FileWriteGuid in both header copies, and
        a new DataWriteGuid (``data_write_guid`` when the caller chose it, so a child can be told
        the new identity before the data changes), or the old one when ``keep_data`` (a change
        that keeps the guest-visible data, so the disk's children still accept it)."""
        if self._session:
            return
        changes: dict[str, AnyGuid] = {"file_write_guid": Guid.random()}
        if not keep_data:
            changes["data_write_guid"] = data_write_guid or Guid.random()
        # A file not yet published under its name (vhd convert's output) is opened by no one
        # and a crash leaves only the partial file, so syncing these updates would buy nothing:
        # the flush before publishing (durable when the caller asks) orders what gets a name.
        durable = self.unpublished is None or self.unpublished.published
        self._write_header(durable, **changes)
        self._write_header(durable)
        self._session = True

    # -- reads -----------------------------------------------------------------------------

    def preadinto(self, buffer: Buffer, offset: int) -> int:
        # Fast path for the common small read (NBD, blkif, FUSE), as the VHD one: inside one
        # block, a FULLY_PRESENT block is a single preadv into the caller's buffer and a block
        # that reads as zeros one fill, with no further Python work.
        if (
            type(buffer) is memoryview
            and buffer.format in _BYTE_FORMATS
            and not buffer.readonly
            and self._overlay is None
            and not self._closed
        ):
            n = len(buffer)
            bs = self._bs
            block, inner = divmod(offset, bs)
            if n and offset >= 0 and offset + n <= self.size and inner + n <= bs:
                entry = self.bat[block + block // self._ratio]
                state = entry & r.STATE_MASK
                if state == r.PayloadState.FULLY_PRESENT:
                    at = entry & r.OFFSET_MASK
                    if (
                        at >= MiB
                        and at + bs <= max(self.file_size, self._eof)
                        and os.preadv(self._fd, [buffer], at + inner) == n
                    ):
                        return n
                elif state <= r.PayloadState.UNMAPPED and not (
                    state == r.PayloadState.NOT_PRESENT and self._differencing
                ):
                    zero_fill(buffer)  # NOT_PRESENT (no parent), UNDEFINED, ZERO, UNMAPPED
                    return n
        return super().preadinto(buffer, offset)

    def _entry(self, block: int) -> int:
        return self.bat[block + block // self._ratio]

    def _pread_file(self, dest: memoryview, offset: int) -> None:
        read_exact_into(self._fd, dest, offset, path=self.path)
        if self._overlay:
            self._overlay.apply(dest, offset)

    def _block_offset(self, block: int, entry: int) -> int:
        off = entry & r.OFFSET_MASK
        if off < MiB or off + self._bs > max(self.file_size, self._eof):
            raise CorruptImageError(
                f"payload block {block} at file offset {off} lies outside the file",
                path=self.path,
            )
        return off

    def _readinto(self, dest: memoryview, offset: int) -> None:
        bs = self._bs
        pos = 0
        total = len(dest)
        while pos < total:
            block, inner = divmod(offset + pos, bs)
            n = min(total - pos, bs - inner)
            entry = self._entry(block)
            state = entry & r.STATE_MASK
            if state == r.PayloadState.FULLY_PRESENT:
                # Coalesce blocks that lie one after the other in the file into one read.
                start = self._block_offset(block, entry) + inner
                end = pos + n
                nxt = block + 1
                while end < total:
                    e2 = self._entry(nxt)
                    if (e2 & r.STATE_MASK) != r.PayloadState.FULLY_PRESENT or (
                        e2 & r.OFFSET_MASK
                    ) != start - inner + (nxt - block) * bs:
                        break
                    self._block_offset(nxt, e2)
                    end = min(total, end + bs)
                    nxt += 1
                self._pread_file(dest[pos:end], start)
                pos = end
                continue
            self._read_block(block, inner, entry, state, dest[pos : pos + n])
            pos += n

    def _read_block(self, block: int, inner: int, entry: int, state: int, dest: memoryview) -> None:
        guest = block * self._bs + inner
        if state == r.PayloadState.PARTIALLY_PRESENT:
            if not self._differencing:
                raise CorruptImageError(
                    f"payload block {block} is PARTIALLY_PRESENT in a disk without a parent",
                    path=self.path,
                )
            data = self._block_offset(block, entry)
            lss = self._lss
            bits = self._block_bits(block)
            first = inner // lss
            last = (inner + len(dest) + lss - 1) // lss
            for a_s, z_s, present in _bits_runs(bits, first, last):
                a = max(a_s * lss, inner) - inner
                z = min(z_s * lss, inner + len(dest)) - inner
                if present:
                    self._pread_file(dest[a:z], data + inner + a)
                else:
                    self._read_parent(dest[a:z], guest + a)
        elif state == r.PayloadState.NOT_PRESENT and self._differencing:
            self._read_parent(dest, guest)
        elif state in (
            r.PayloadState.NOT_PRESENT,
            r.PayloadState.ZERO,
            r.PayloadState.UNMAPPED,
            r.PayloadState.UNDEFINED,
        ):
            zero_fill(dest)
        else:
            raise CorruptImageError(
                f"payload block {block} has the reserved state {state}", path=self.path
            )

    # -- sector bitmaps (differencing) -----------------------------------------------------

    def _bitmap_location(self, block: int) -> tuple[int, int]:
        """(BAT index of the chunk's bitmap entry, byte offset of the block's bits in it)."""
        chunk, j = divmod(block, self._ratio)
        return chunk * (self._ratio + 1) + self._ratio, j * self._spb // 8

    def _bitmap_page(self, page_offset: int) -> bytearray:
        page = self._bitmap_pages.get(page_offset)
        if page is None:
            buf = bytearray(LOG_SECTOR)
            self._pread_file(memoryview(buf), page_offset)
            page = self._bitmap_pages.setdefault(page_offset, buf)
        return page

    def _bitmap_base(self, block: int, allocate: bool = False) -> int | None:
        index, _ = self._bitmap_location(block)
        entry = self.bat[index]
        state = entry & r.STATE_MASK
        if state == r.BitmapState.PRESENT:
            off = entry & r.OFFSET_MASK
            if off < MiB or off + MiB > max(self.file_size, self._eof):
                raise CorruptImageError(
                    f"sector bitmap block at file offset {off} lies outside the file",
                    path=self.path,
                )
            return off
        if state != r.BitmapState.NOT_PRESENT:
            raise CorruptImageError(
                f"sector bitmap entry {index} has the reserved state {state}", path=self.path
            )
        if not allocate:
            return None
        off = self._grow(r.SECTOR_BITMAP_BLOCK_SIZE)
        for p in range(0, r.SECTOR_BITMAP_BLOCK_SIZE, LOG_SECTOR):
            self._bitmap_pages[off + p] = bytearray(LOG_SECTOR)
        self._set_entry(index, off | r.BitmapState.PRESENT)
        return off

    def _block_bits(self, block: int) -> int:
        """The block's sector bits as an int (bit i = sector i of the block)."""
        base = self._bitmap_base(block)
        if base is None:
            raise CorruptImageError(
                f"payload block {block} is PARTIALLY_PRESENT but its chunk has no sector bitmap",
                path=self.path,
            )
        _, rel = self._bitmap_location(block)
        return int.from_bytes(self._bitmap_bytes(base + rel, self._spb // 8), "little")

    def _bitmap_bytes(self, offset: int, length: int) -> bytes:
        out = bytearray()
        pos = offset
        while pos < offset + length:
            page_off = pos - pos % LOG_SECTOR
            page = self._bitmap_page(page_off)
            n = min(offset + length, page_off + LOG_SECTOR) - pos
            out += page[pos - page_off : pos - page_off + n]
            pos += n
        return bytes(out)

    def _set_bits(self, block: int, first: int, last: int) -> None:
        base = self._bitmap_base(block, allocate=True)
        assert base is not None
        _, rel = self._bitmap_location(block)
        start = base + rel
        for sector in range(first, last):  # per byte below; ranges are short-lived Python ints
            if sector % 8 == 0 and sector + 8 <= last:
                continue
            byte = start + sector // 8
            page = self._bitmap_page(byte - byte % LOG_SECTOR)
            page[byte % LOG_SECTOR] |= 1 << (sector % 8)
            self._dirty_bitmaps.add(byte - byte % LOG_SECTOR)
        full_lo = -(-first // 8)
        full_hi = last // 8
        pos = full_lo
        while pos < full_hi:
            byte = start + pos
            page_off = byte - byte % LOG_SECTOR
            page = self._bitmap_page(page_off)
            n = min(full_hi - pos, LOG_SECTOR - byte % LOG_SECTOR)
            page[byte % LOG_SECTOR : byte % LOG_SECTOR + n] = b"\xff" * n
            self._dirty_bitmaps.add(page_off)
            pos += n

    # -- writes ----------------------------------------------------------------------------

    def _grow(self, length: int) -> int:
        """Space for a new block at the 1 MiB-aligned end of file (never reused while open)."""
        off = self._eof
        self._eof = off + length
        os.ftruncate(self._fd, self._eof)
        self.file_size = self._eof
        return off

    def _truncate(self, end: int) -> None:
        """Cut the file at ``end`` (1 MiB-aligned; nothing durable names the space past it),
        synced; new blocks go there."""
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        self.file_size = self._eof = end

    def _relocate_bat(self, at: int, length: int) -> None:
        """Write the whole in-memory BAT (``length`` bytes of room) at ``at``, synced, and use it
        from here on: the caller then names it in the region tables, through the log."""
        table = memoryview(self.bat).cast("B")
        write_all(self._fd, bytes(table[: min(len(table), length)]), at)
        os.fdatasync(self._fd)
        self._dirty_bat.clear()
        self._bat_offset = at

    def _write_region_table(self, slot: int, table: r.RegionTable) -> None:
        """Region table copy ``slot`` (2.2.3) rewritten in place, synced (a damaged copy mended
        from its twin)."""
        write_all(self._fd, table.build(), r.REGION_TABLE_OFFSETS[slot])
        os.fsync(self._fd)
        self.layout.region_tables[slot] = table

    # What vhd.vhdx.ops has just written through the log, taken in so this Disk describes the
    # file as it now is (no operation assigns to a Disk's state itself).

    def _adopt_size(self, size: int) -> None:
        """The virtual disk size item (2.6.2.2)."""
        self.size = self.metadata.virtual_size = size
        self.metadata.raw_items[r.VIRTUAL_DISK_SIZE] = size.to_bytes(8, "little")

    def _adopt_parent_locator(
        self, entries: tuple[r.MetadataEntry, ...], locator: r.ParentLocator, blob: bytes
    ) -> None:
        """The parent locator item (2.6.2.6) and the metadata table that places it."""
        self.metadata.entries = entries
        self.metadata.parent_locator = locator
        self.metadata.raw_items[r.PARENT_LOCATOR] = blob

    def _adopt_region_table(self, table: r.RegionTable) -> None:
        """Both region table copies (2.2.3), and the BAT region they name."""
        self.layout.region_tables = [table, table]
        self.layout.bat_region = next(g for g in table.entries if g.guid == r.BAT_REGION)

    def _set_entry(self, index: int, value: int) -> None:
        self.bat[index] = value
        self._dirty_bat.add(index * 8 // LOG_SECTOR)

    def _write(self, src: memoryview, offset: int) -> None:
        bs = self._bs
        block, inner = divmod(offset, bs)
        if self._session and inner + len(src) <= bs:
            # Inside one FULLY_PRESENT block: only data changes, no metadata, no lock (the
            # session's header update is done; entries are published after their data).
            entry = self._entry(block)
            if entry & r.STATE_MASK == r.PayloadState.FULLY_PRESENT:
                write_all(self._fd, src, self._block_offset(block, entry) + inner)
                return
        with self._lock:
            self._begin_session()
            bs = self._bs
            pos = 0
            while pos < len(src):
                block, inner = divmod(offset + pos, bs)
                n = min(len(src) - pos, bs - inner)
                self._write_block(block, inner, src[pos : pos + n])
                pos += n

    def _write_block(self, block: int, inner: int, src: memoryview) -> None:
        index = block + block // self._ratio
        entry = self.bat[index]
        state = entry & r.STATE_MASK
        if state == r.PayloadState.FULLY_PRESENT:
            write_all(self._fd, src, self._block_offset(block, entry) + inner)
            return
        if state == r.PayloadState.PARTIALLY_PRESENT and self._differencing:
            self._write_sectors(block, self._block_offset(block, entry), inner, src)
            return
        if state not in (0, 1, 2, 3):
            what = "PARTIALLY_PRESENT without a parent" if state == 7 else f"reserved state {state}"
            raise CorruptImageError(f"payload block {block} has the {what}", path=self.path)
        # A new block: its data goes at the end of file, the rest of it reads as zeros there.
        off = self._grow(self._bs)
        if self._differencing and state == r.PayloadState.NOT_PRESENT:
            # Only the written sectors become this file's; the others still read from the parent.
            self._write_sectors(block, off, inner, src)
            self._set_entry(index, off | r.PayloadState.PARTIALLY_PRESENT)
            return
        write_all(self._fd, src, off + inner)
        self._set_entry(index, off | r.PayloadState.FULLY_PRESENT)

    def _write_sectors(self, block: int, data: int, inner: int, src: memoryview) -> None:
        """Write into a PARTIALLY_PRESENT block: a partly written sector whose bit is clear is
        first completed with what the guest saw there (the parent's data), then its bit set."""
        lss = self._lss
        first = inner // lss
        last = (inner + len(src) + lss - 1) // lss
        base = self._bitmap_base(block)
        bits = self._block_bits(block) if base is not None else 0
        head = inner - first * lss
        tail = last * lss - (inner + len(src))
        if head or tail:
            buf = bytearray((last - first) * lss)
            view = memoryview(buf)
            guest = block * self._bs + first * lss
            for sector in {first, last - 1}:
                if (sector == first and head) or (sector == last - 1 and tail):
                    at = (sector - first) * lss
                    piece = view[at : at + lss]
                    if (bits >> sector) & 1:
                        self._pread_file(piece, data + sector * lss)
                    else:
                        self._read_parent(piece, guest + at)
            view[head : head + len(src)] = src
            write_all(self._fd, view, data + first * lss)
        else:
            write_all(self._fd, src, data + inner)
        self._set_bits(block, first, last)

    def _discard(self, offset: int, length: int) -> None:
        self._free(offset, length, zeros=False)

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._free(offset, length, zeros=True)

    def _free(self, offset: int, length: int, *, zeros: bool) -> None:
        """Discard (TRIM) or, with ``zeros``, make the range read as zeros."""
        with self._lock:
            self._begin_session()
            bs = self._bs
            pos = offset
            end = offset + length
            while pos < end:
                block, inner = divmod(pos, bs)
                n = min(end - pos, bs - inner)
                self._free_block(block, inner, n, zeros)
                pos += n

    def _free_block(self, block: int, inner: int, n: int, zeros: bool) -> None:
        index = block + block // self._ratio
        entry = self.bat[index]
        state = entry & r.STATE_MASK
        whole = inner == 0 and (n == self._bs or block * self._bs + n == self.size)
        if whole and not self.metadata.leave_blocks_allocated:
            if state == r.PayloadState.FULLY_PRESENT or state == r.PayloadState.PARTIALLY_PRESENT:
                off = self._block_offset(block, entry)
            else:
                off = 0
            # Differencing: ZERO hides the parent; dynamic: NOT_PRESENT reads as zeros.
            new = r.PayloadState.ZERO if self._differencing else r.PayloadState.NOT_PRESENT
            self._set_entry(index, int(new))
            if off:
                # The old space is never reused while open, so no live entry can alias it.
                punch_hole(self._fd, off, self._bs)
            return
        if state == r.PayloadState.FULLY_PRESENT:
            a, z = inner, inner + n
            if self._differencing and not zeros:
                # A TRIM on a child leaves partly covered sectors as they were (Disk.discard).
                lss = self._lss
                a, z = -(-a // lss) * lss, z // lss * lss
            if z > a:
                punch_hole(self._fd, self._block_offset(block, entry) + a, z - a)
        elif not self._differencing:
            return
        elif zeros and state in (r.PayloadState.NOT_PRESENT, r.PayloadState.PARTIALLY_PRESENT):
            # Zeros must hide the parent: written, which may allocate the block.
            self._write_block(block, inner, memoryview(bytes(n)))
        elif state == r.PayloadState.PARTIALLY_PRESENT:
            # A TRIM never allocates (a guest's fstrim must not grow the child): the sectors it
            # covers entirely are given back to the parent, as Disk.discard promises.
            lss = self._lss
            self._clear_bits(block, -(-inner // lss), (inner + n) // lss)

    def _clear_bits(self, block: int, first: int, last: int) -> None:
        """Clear the block's sector bits [first, last): those sectors read the parent again."""
        base = self._bitmap_base(block)
        if base is None or first >= last:
            return
        _, rel = self._bitmap_location(block)
        start = base + rel
        for sector in range(first, last):
            byte = start + sector // 8
            if sector % 8 == 0 and sector + 8 <= last:
                page_off = byte - byte % LOG_SECTOR
                self._bitmap_page(page_off)[byte % LOG_SECTOR] = 0
            else:
                page_off = byte - byte % LOG_SECTOR
                self._bitmap_page(page_off)[byte % LOG_SECTOR] &= ~(1 << (sector % 8)) & 0xFF
            self._dirty_bitmaps.add(page_off)

    # -- metadata changes of vhd.vhdx.ops, through the log ---------------------------------

    def _grow_table(self, old_count: int, count: int) -> None:
        """Room in the in-memory BAT for ``count`` entries (whole 4 KiB pages); entries
        [old_count, count) are 0 (NOT_PRESENT, bitmaps too) and their pages dirty: whatever the
        file held there is overwritten."""
        want = -(-count * 8 // LOG_SECTOR) * LOG_SECTOR // 8
        if len(self.bat) < want:
            self.bat.frombytes(bytes(8 * (want - len(self.bat))))
        if count > old_count:  # (pages, not entries: a 64 TiB table has 16 Mi of them)
            self.bat[old_count:count] = array("Q", bytes(8 * (count - old_count)))
            self._dirty_bat.update(
                range(old_count * 8 // LOG_SECTOR, (count * 8 - 1) // LOG_SECTOR + 1)
            )

    def _forget_bitmap_block(self, offset: int) -> None:
        """Drop the cached (and unlogged) pages of the sector bitmap block at ``offset``: its
        entry no longer names it."""
        for page in range(offset, offset + r.SECTOR_BITMAP_BLOCK_SIZE, LOG_SECTOR):
            self._bitmap_pages.pop(page, None)
            self._dirty_bitmaps.discard(page)

    def _log_pages(self, extra: Sequence[tuple[int, bytes]] = ()) -> None:
        """Write the dirty BAT and bitmap pages and the ``extra`` pages through the log.

        The ``extra`` pages (size, locator, region tables: what a reader sees) go in the last
        transaction; when the log cannot take everything at once, the earlier transactions carry
        only BAT and bitmap pages, each a consistent state on its own (entries the old size does
        not reach, or moves of blocks that are copied already)."""
        with self._lock:
            dirty = self._dirty_pages()
            per_entry = r.DESCRIPTORS_IN_FIRST_SECTOR
            log_pages = self.current_header.log_length // LOG_SECTOR
            per_txn = max(1, log_pages // (1 + per_entry)) * per_entry
            if len(extra) > per_txn:
                raise InvalidArgumentError("the change does not fit one log transaction")
            if len(dirty) + len(extra) <= per_txn:
                if dirty or extra:
                    self._transaction([*dirty, *extra], True)
            else:
                for i in range(0, len(dirty), per_txn):
                    self._transaction(dirty[i : i + per_txn], True)
                if extra:
                    self._transaction(list(extra), True)
            self._dirty_bat.clear()
            self._dirty_bitmaps.clear()

    # -- flush: the log transaction --------------------------------------------------------

    def _dirty_pages(self) -> list[tuple[int, bytes]]:
        raw = memoryview(self.bat).cast("B")
        pages = [
            (self._bat_offset + p * LOG_SECTOR, bytes(raw[p * LOG_SECTOR : (p + 1) * LOG_SECTOR]))
            for p in sorted(self._dirty_bat)
        ]
        pages += [(off, bytes(self._bitmap_pages[off])) for off in sorted(self._dirty_bitmaps)]
        return pages

    def _flush_locked(self, durable: bool) -> None:
        if not (self._dirty_bat or self._dirty_bitmaps):
            if durable:
                os.fdatasync(self._fd)
            return
        pages = self._dirty_pages()
        per_entry = vlog.max_pages_per_entry()
        entry_sectors = 1 + per_entry
        per_txn = max(1, self.current_header.log_length // LOG_SECTOR // entry_sectors) * per_entry
        for start in range(0, len(pages), per_txn):
            self._transaction(pages[start : start + per_txn], durable)
        self._dirty_bat.clear()
        self._dirty_bitmaps.clear()

    def _transaction(self, pages: list[tuple[int, bytes]], durable: bool) -> None:
        sync: Callable[[], None] = (lambda: os.fdatasync(self._fd)) if durable else (lambda: None)
        sync()  # 1. data and file size first
        log_guid = Guid.random()
        h = self.current_header
        at = h.log_offset
        per_entry = vlog.max_pages_per_entry()
        seq = 1
        for i in range(0, len(pages), per_entry):
            entry = vlog.build_entry(
                log_guid=log_guid,
                sequence_number=seq,
                tail=0,
                flushed_file_offset=self._eof,
                last_file_offset=self._eof,
                pages=pages[i : i + per_entry],
            )
            write_all(self._fd, entry, at)
            at += len(entry)
            seq += 1
        sync()  # 2. the entries
        self._write_header(durable, log_guid=log_guid)  # 3. from here an open replays
        for off, page in pages:  # 4. the metadata in place
            write_all(self._fd, page, off)
        sync()
        self._write_header(durable, log_guid=r.ZERO_GUID)  # 5. clean at rest

    def close(self, *, durable: bool = True) -> None:
        if self._closed:
            return
        try:
            self.flush(durable=durable)
            if self._session and not self.read_only:
                # Both copies up to date (2.2.2.1 "SHOULD perform the update a second time").
                self._write_header(durable)
        finally:
            self._closed = True
            os.close(self._fd)
            if self.parent is not None:
                self.parent.close()

    # -- extents ---------------------------------------------------------------------------

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        bs = self._bs
        pos = start
        while pos < end:
            block = pos // bs
            block_end = min((block + 1) * bs, end)
            entry = self._entry(block)
            state = entry & r.STATE_MASK
            if state == r.PayloadState.FULLY_PRESENT:
                base = self._block_offset(block, entry) - block * bs
                yield from self._present_extents(base, pos, block_end)
            elif state == r.PayloadState.PARTIALLY_PRESENT and self._differencing:
                base = block * bs
                lss = self._lss
                bits = self._block_bits(block)
                first = (pos - base) // lss
                last = (block_end - base + lss - 1) // lss
                runs = _bits_runs(bits, first, last)
                yield from bitmap_extents(runs, base, lss, pos, block_end, self._parent_extents)
            elif state <= r.PayloadState.UNMAPPED:
                # A run of blocks that read as zeros (or, NOT_PRESENT in a differencing disk,
                # from the parent) is one extent, found by C-level passes over the BAT: an
                # empty 64 TiB disk of 1 MiB blocks is 64 Mi entries, not 64 Mi Python steps.
                classes = _DIFF_CLASSES if self._differencing else _CLASSES
                stop = self._payload_index(-(-end // bs))
                run = placement.run_end(self.bat, self._payload_index(block), stop, self._ratio + 1, classes)  # fmt: skip
                run_end = min(end, self._block_of(run) * bs)
                if state == r.PayloadState.NOT_PRESENT and self._differencing:
                    yield from self._parent_extents(pos, run_end)
                else:
                    yield Extent(pos, run_end - pos, None)
                pos = run_end
                continue
            else:
                raise CorruptImageError(
                    f"payload block {block} has the reserved state {state}", path=self.path
                )
            pos = block_end

    def _payload_index(self, block: int) -> int:
        """The BAT entry of payload block ``block`` (2.5: a bitmap entry after each chunk)."""
        return block + block // self._ratio

    def _block_of(self, index: int) -> int:
        """The first payload block whose entry is at or after BAT entry ``index``."""
        chunk, inner = divmod(index, self._ratio + 1)
        return chunk * self._ratio + min(inner, self._ratio)

    def _present_extents(self, base: int, start: int, end: int) -> Iterator[Extent]:
        """A present range, split where the file has holes (``SEEK_DATA``/``SEEK_HOLE``):
        new blocks are file space the writer never touched past their data, and holes read as
        zeros, so copies can skip them without reading."""
        segments = self._data_map()
        if segments is not None:
            yield from _split_by_segments(segments, base, start, end)
            return
        pos = start
        while pos < end:
            try:
                data = os.lseek(self._fd, base + pos, os.SEEK_DATA) - base
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # no SEEK_DATA support: call it all data
                    yield Extent(pos, end - pos, 0)
                    return
                data = end  # ENXIO: nothing but a hole from here to the end of the file
            if data > pos:
                yield Extent(pos, min(data, end) - pos, None)
                pos = min(data, end)
                if pos >= end:
                    return
            hole = min(os.lseek(self._fd, pos + base, os.SEEK_HOLE) - base, end)
            if hole <= pos:  # cannot happen on a sane file system; never loop on it
                hole = end
            yield Extent(pos, hole - pos, 0)
            pos = hole

    def _data_map(self) -> list[int] | None:
        """A read-only disk's file data segments, ``[start, end, start, end, ...]`` in file
        order, from one ``SEEK_DATA``/``SEEK_HOLE`` walk over the whole file, kept while open.

        Why: ``SEEK_HOLE`` from inside data looks for the next hole wherever it is, and tmpfs
        looks page by page; payload blocks lie end to end, so probing block by block walked to
        the end of the file's data for every block (0.38 s per 1 GiB extents pass on tmpfs,
        against 1.5 ms on ext4).  None, and each block is probed as before, for a writable disk
        (writes fill and punch holes), where the file system cannot tell, or past
        ``_MAX_SEGMENTS`` segments (memory stays bounded on a file full of holes).
        """
        if not self.read_only:
            return None
        if self._data_map_known:
            return self._data_map_cache
        segments: list[int] | None = []
        pos = 0
        try:
            while segments is not None and pos < self.file_size:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    break  # only a hole from here to the end of the file
                hole = os.lseek(self._fd, data, os.SEEK_HOLE)
                if hole <= data or len(segments) >= 2 * _MAX_SEGMENTS:
                    segments = None  # an insane answer, or too many to keep: probe per block
                else:
                    segments += (data, hole)
                    pos = hole
        except OSError:
            segments = None  # no SEEK_DATA here: the per-block path says what it can
        self._data_map_cache = segments
        self._data_map_known = True
        return segments

    def _parent_extents(self, start: int, end: int) -> Iterator[Extent]:
        return parent_extents(self.parent, start, end)

    def __enter__(self) -> VHDXDisk:
        return self

    def __repr__(self) -> str:
        return f"<VHDXDisk {self.path!r} {self.type.label} {self.size} bytes>"


# -- open ---------------------------------------------------------------------------------------


# Payload states as classes for placement.run_end: the ones that read alike share a class.
# Without a parent NOT_PRESENT, UNDEFINED, ZERO and UNMAPPED all read as zeros; with one,
# NOT_PRESENT reads the parent and the other three zeros.  The rest each stand alone.
_CLASSES = bytes(b & 7 if b & 7 > r.PayloadState.UNMAPPED else 0 for b in range(256))
_DIFF_CLASSES = bytes(1 if b & 7 in (1, 2, 3) else b & 7 for b in range(256))
_MAX_SEGMENTS = 1 << 16  # data segments a read-only disk keeps (two ints each)


def _split_by_segments(segments: list[int], base: int, start: int, end: int) -> Iterator[Extent]:
    """Guest range [start, end), stored at file offset ``base + start``, split into data
    (layer 0) and holes (layer None) by the file's sorted data ``segments``."""
    # (imported here: only mapping present blocks needs it; info, create and a convert into a
    # VHDX do not)
    from bisect import bisect_right

    pos = start
    while pos < end:
        i = bisect_right(segments, base + pos)
        # an odd index: inside data up to segments[i]; an even one: a hole up to segments[i]
        nxt = segments[i] - base if i < len(segments) else end
        stop = min(nxt, end)
        yield Extent(pos, stop - pos, 0 if i % 2 else None)
        pos = stop


def is_vhdx(fd: int) -> bool:
    return read_upto(fd, 8, 0) == r.SIGNATURE


def probe_vhdx(path: str) -> bool:
    """True when ``path`` is a regular file or block device starting with "vhdxfile": the one
    probe, :func:`vhd.probe.is_vhdx_file` (never blocks, never raises)."""
    return is_vhdx_file(path)


def open_vhdx(
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    parent: Disk | str | os.PathLike[str] | None = None,
    parent_dirs: Sequence[str] = (),
    open_parent: bool = True,
    allow_parent_mismatch: bool = False,
    parent_policy: ParentPolicy | None = None,
    _seen: frozenset[tuple[int, int]] = frozenset(),
    _expect: tuple[int, int] | None = None,
    force_share: bool = False,
    misplaced_blocks: bool = False,
) -> VHDXDisk:
    """Open a VHDX image (``mode`` 'r' or 'r+').  A differencing disk's parent is found through
    its locator (relative_path, then the file name of volume_path and absolute_win32_path next
    to the child and in ``parent_dirs``) unless ``parent`` names it or ``open_parent`` is False.

    An image with a block over its log, BAT or metadata region is refused
    (:mod:`vhd.vhdx.placement`) unless ``misplaced_blocks`` (``vhd check``, which lists them)."""
    if mode not in ("r", "r+"):
        raise InvalidArgumentError(f"mode must be 'r' or 'r+', not {mode!r}")
    spath = os.fspath(path)
    writable = mode == "r+"
    policy = (parent_policy or ParentPolicy()).with_dirs(parent_dirs)
    fd, _st = open_image_file(spath, writable=writable, force_share=force_share, expect=_expect)
    want_parent = open_parent or parent is not None
    return _open_chain(
        fd,
        spath,
        writable,
        parent,
        policy,
        allow_parent_mismatch,
        _seen,
        want_parent,
        misplaced_blocks=misplaced_blocks,
    )


def open_vhdx_locked(
    fd: int,
    path: str,
    *,
    parent: Disk | None = None,
    allow_parent_mismatch: bool = False,
    unpublished: NewFile | None = None,
) -> VHDXDisk:
    """A writable :class:`VHDXDisk` on ``fd``, which the caller opened read-write and locked
    exclusively (:mod:`vhd.newfile`: an image being written under its temporary name, then
    ``unpublished``, see :meth:`VHDXDisk._begin_session`), with the open ``parent`` the caller
    gives for a differencing disk; the disk owns ``fd`` from here on, even on failure."""
    disk = _open_chain(
        fd,
        path,
        True,
        parent,
        ParentPolicy(),
        allow_parent_mismatch,
        frozenset(),
        parent is not None,
    )
    disk.unpublished = unpublished
    return disk


def _open_chain(
    fd: int,
    path: str,
    writable: bool,
    parent: Disk | str | os.PathLike[str] | None,
    policy: ParentPolicy,
    allow_mismatch: bool,
    seen: frozenset[tuple[int, int]],
    want_parent: bool,
    *,
    misplaced_blocks: bool = False,
) -> VHDXDisk:
    """The disk on ``fd`` and, for a differencing disk when ``want_parent``, its parent
    (:func:`_open_parent`; ``seen`` the files of the chain below, this one added).  ``fd`` is
    closed on failure, once: a half-built disk gives it up first."""
    try:
        st = os.fstat(fd)
        disk = _open_fd(fd, path, writable, misplaced_blocks=misplaced_blocks)
        if disk._differencing and want_parent:
            try:
                seen = seen | {(st.st_dev, st.st_ino)}
                disk.parent = _open_parent(disk, parent, policy, allow_mismatch, seen)
            except BaseException:
                disk._disown_fd()
                raise
        return disk
    except BaseException:
        os.close(fd)
        raise


def _read_layout(fd: int, path: str, fsize: int) -> tuple[Layout, vlog.ActiveSequence | None]:
    def pread(n: int, off: int) -> bytes:
        return read_upto(fd, n, off)

    if fsize < r.REGION_TABLE_OFFSETS[1] + r.REGION_TABLE_SIZE:
        raise CorruptImageError(f"a VHDX is at least 320 KiB; this file has {fsize} bytes")
    ident = r.FileIdentifier.parse(pread(520, 0))
    headers: list[r.Header | None] = []
    errors: list[str] = []
    for off in r.HEADER_OFFSETS:
        try:
            headers.append(r.Header.parse(pread(r.HEADER_SIZE, off)))
            errors.append("")
        except VHDError as exc:
            headers.append(None)
            errors.append(str(exc))
    valid = [(h.sequence_number, -i) for i, h in enumerate(headers) if h is not None]
    if not valid:
        raise CorruptImageError(f"both headers are invalid ({errors[0]}; {errors[1]})")
    current = -max(valid)[1]  # equal sequence numbers: the first copy
    head = headers[current]
    assert head is not None
    r.check_version(head)

    replay: vlog.ActiveSequence | None = None
    if head.log_guid != r.ZERO_GUID:
        lo, ll = head.log_offset, head.log_length
        if lo < MiB or lo % MiB or ll == 0 or ll % MiB:
            raise CorruptImageError(f"the log at {lo} ({ll} bytes) is not 1 MiB-aligned")
        if ll > _MAX_LOG:
            raise UnsupportedFeatureError(f"a log of {ll} bytes (vhdkit reads up to 1 GiB)")
        if lo + ll > fsize:
            raise CorruptImageError(f"the log [{lo}, {lo + ll}) lies past the end of the file")
        log = pread(ll, lo).ljust(ll, b"\0")
        replay = vlog.find_active_sequence(log, head.log_guid)
    tables: list[r.RegionTable | None] = []
    rerrors: list[str] = []
    return (
        Layout(
            creator=ident.creator,
            headers=headers,
            header_errors=errors,
            current=current,
            region_tables=tables,
            region_errors=rerrors,
            bat_region=r.Region(r.BAT_REGION, 0, 0, True),
            metadata_region=r.Region(r.METADATA_REGION, 0, 0, True),
            metadata=None,  # type: ignore[arg-type]
            replayed=replay,
        ),
        replay,
    )


def _read_tables(
    layout: Layout, read: Callable[[int, int], bytes], fsize: int, warnings: list[str]
) -> None:
    for off in r.REGION_TABLE_OFFSETS:
        try:
            layout.region_tables.append(r.RegionTable.parse(read(r.REGION_TABLE_SIZE, off)))
            layout.region_errors.append("")
        except VHDError as exc:
            layout.region_tables.append(None)
            layout.region_errors.append(str(exc))
    table = next((t for t in layout.region_tables if t is not None), None)
    if table is None:
        raise CorruptImageError(
            f"both region tables are invalid ({layout.region_errors[0]}; {layout.region_errors[1]})"
        )
    if layout.region_tables[0] is None:
        warnings.append(f"region table 1 is invalid ({layout.region_errors[0]}); using copy 2")
    seen: set[AnyGuid] = set()
    for reg in table.entries:
        if reg.guid in seen:
            raise CorruptImageError(f"region {reg.guid} appears twice in the region table")
        seen.add(reg.guid)
        if reg.guid not in (r.BAT_REGION, r.METADATA_REGION) and reg.required:
            raise UnsupportedFeatureError(f"unknown required region {reg.guid}")
        if reg.file_offset < MiB or reg.file_offset % MiB or reg.length % MiB or not reg.length:
            raise CorruptImageError(
                f"region {reg.name} at {reg.file_offset} ({reg.length} bytes) is not 1 MiB-aligned"
            )
        if reg.guid in (r.BAT_REGION, r.METADATA_REGION) and reg.file_offset + reg.length > fsize:
            # Both are written in full when a file is made: past the end means damage (and
            # reading it would let a forged length decide how much memory an open takes).
            raise CorruptImageError(
                f"region {reg.name} [{reg.file_offset}, {reg.file_offset + reg.length}) lies "
                f"past the end of the file ({fsize} bytes)"
            )
    bat = table.find(r.BAT_REGION)
    meta = table.find(r.METADATA_REGION)
    if bat is None or meta is None:
        raise CorruptImageError("the region table lacks the BAT or the metadata region")
    a, b = sorted((bat, meta), key=lambda x: x.file_offset)
    if a.file_offset + a.length > b.file_offset:
        raise CorruptImageError("the BAT and metadata regions overlap")
    h = layout.headers[layout.current]
    assert h is not None
    for reg in (bat, meta):
        if h.log_length and not (
            reg.file_offset + reg.length <= h.log_offset
            or h.log_offset + h.log_length <= reg.file_offset
        ):
            raise CorruptImageError(f"the {reg.name} region overlaps the log")
    layout.bat_region = bat
    layout.metadata_region = meta
    layout.metadata = _read_metadata(read, meta)


def _read_metadata(read: Callable[[int, int], bytes], region: r.Region) -> Metadata:
    if region.length < r.METADATA_TABLE_SIZE:
        raise CorruptImageError("the metadata region is smaller than its 64 KiB table")
    entries = r.parse_metadata_table(read(r.METADATA_TABLE_SIZE, region.file_offset))
    items: dict[AnyGuid, bytes] = {}
    spans: list[tuple[int, int]] = []
    for e in entries:
        if e.item_id in items:
            raise CorruptImageError(f"metadata item {e.item_id} appears twice")
        if e.item_id not in r.KNOWN_ITEMS and e.is_required:
            raise UnsupportedFeatureError(f"unknown required metadata item {e.item_id}")
        if e.length == 0:
            items[e.item_id] = b""
            continue
        if (
            e.offset < r.METADATA_TABLE_SIZE
            or e.length > r.MAX_METADATA_ITEM
            or e.offset + e.length > region.length
        ):
            raise CorruptImageError(
                f"metadata item {e.name} at {e.offset} ({e.length} bytes) lies outside the "
                "metadata region"
            )
        spans.append((e.offset, e.offset + e.length))
        items[e.item_id] = read(e.length, region.file_offset + e.offset)
    spans.sort()
    for (_, z), (a, _) in itertools.pairwise(spans):
        if a < z:
            raise CorruptImageError("metadata items overlap")

    def item(which: AnyGuid, size: int) -> bytes:
        raw = items.get(which)
        if raw is None:
            raise CorruptImageError(f"the required metadata item {r.KNOWN_ITEMS[which]} is missing")
        if len(raw) < size:
            raise CorruptImageError(f"metadata item {r.KNOWN_ITEMS[which]} is too short")
        return raw

    fp = r.FILE_PARAMETERS_STRUCT.parse(item(r.FILE_PARAMETERS, 8))
    block_size = fp.block_size
    if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
        raise CorruptImageError(f"block size {block_size} (a power of 2, 1 MiB to 256 MiB)")
    size = int.from_bytes(item(r.VIRTUAL_DISK_SIZE, 8)[:8], "little")
    lss = int.from_bytes(item(r.LOGICAL_SECTOR_SIZE, 4)[:4], "little")
    pss = int.from_bytes(item(r.PHYSICAL_SECTOR_SIZE, 4)[:4], "little")
    disk_id = r.guid(item(r.VIRTUAL_DISK_ID, 16)[:16])
    if lss not in (512, 4096):
        raise CorruptImageError(f"logical sector size {lss} (512 or 4096)")
    if pss not in (512, 4096):
        raise CorruptImageError(f"physical sector size {pss} (512 or 4096)")
    if size == 0 or size % lss or size > r.MAX_VIRTUAL_SIZE:
        raise CorruptImageError(
            f"virtual disk size {size} (a multiple of the {lss}-byte sector, at most 64 TiB)"
        )
    has_parent = bool(fp.flags & r.HAS_PARENT)
    locator = None
    if has_parent:
        raw = items.get(r.PARENT_LOCATOR)
        if raw is None:
            raise CorruptImageError("HasParent is set but there is no parent locator")
        locator = r.ParentLocator.parse(raw)
    return Metadata(
        entries=entries,
        block_size=block_size,
        leave_blocks_allocated=bool(fp.flags & r.LEAVE_BLOCKS_ALLOCATED) and not has_parent,
        has_parent=has_parent,
        virtual_size=size,
        virtual_disk_id=disk_id,
        logical_sector_size=lss,
        physical_sector_size=pss,
        parent_locator=locator,
        raw_items=items,
    )


def _open_fd(fd: int, path: str, writable: bool, *, misplaced_blocks: bool = False) -> VHDXDisk:
    try:
        return _open_checked(fd, path, writable, misplaced_blocks)
    except VHDError as exc:
        if exc.path is None:
            raise type(exc)(str(exc), path=path) from exc
        raise


def _open_checked(fd: int, path: str, writable: bool, misplaced_blocks: bool) -> VHDXDisk:
    fsize = file_size(fd)
    if read_upto(fd, 8, 0) != r.SIGNATURE:
        raise NotAVHDError("not a VHDX (no 'vhdxfile' identifier at offset 0)")
    layout, replay = _read_layout(fd, path, fsize)
    warnings: list[str] = []
    overlay: vlog.Overlay | None = None
    head = layout.headers[layout.current]
    assert head is not None
    if head.log_guid != r.ZERO_GUID:
        if replay is None:
            # The spec calls this corrupt; qemu opens it.  Nothing valid to replay means nothing
            # was promised by the log, so the image opens with a warning.
            warnings.append("the header names a log but the log holds no valid entry sequence")
        else:
            if fsize < replay.head.flushed_file_offset:
                raise CorruptImageError(
                    f"the file is truncated: {fsize} bytes, the log says at least "
                    f"{replay.head.flushed_file_offset}"
                )
            limit = max(replay.head.last_file_offset, replay.head.flushed_file_offset, fsize)
            if limit > fsize + _MAX_GROWTH:
                # A replay may extend the file a little (an expansion the crash cut short); a
                # forged offset must not make it create a sparse file of terabytes.
                raise CorruptImageError(
                    f"the log's LastFileOffset {limit} is far past the end of the file ({fsize})"
                )
            vlog.check_descriptors(replay, limit)
            if writable:
                _replay_in_file(fd, replay)
                fsize = file_size(fd)
            else:
                overlay = vlog.Overlay(replay.writes)
                warnings.append("the log was replayed in memory (the file is open read-only)")

    def read(n: int, off: int) -> bytes:
        return vlog.read_with(lambda k, o: read_upto(fd, k, o), overlay, n, off)

    _read_tables(layout, read, fsize, warnings)
    md = layout.metadata
    count = bat_entries(md.virtual_size, md.block_size, md.logical_sector_size, md.has_parent)
    nbytes = -(-count * 8 // LOG_SECTOR) * LOG_SECTOR
    if nbytes > layout.bat_region.length:
        raise CorruptImageError(
            f"the BAT region ({layout.bat_region.length} bytes) is smaller than the "
            f"{count} entries the disk size needs"
        )
    bat = _read_bat(fd, nbytes, layout.bat_region.file_offset, overlay)
    if not misplaced_blocks:
        _refuse_misplaced(bat, layout, head, md)
    disk = VHDXDisk(
        path=path,
        fd=fd,
        writable=writable,
        layout=layout,
        bat=bat,
        fsize=fsize,
        overlay=overlay,
        warnings=warnings,
    )
    if writable and head.log_guid != r.ZERO_GUID:
        # Replayed (or nothing to replay): the log is done with, say so in both headers.
        disk._write_header(True, log_guid=r.ZERO_GUID)
        disk._write_header(True)
    return disk


def _read_bat(fd: int, nbytes: int, offset: int, overlay: vlog.Overlay | None) -> array[int]:
    """The table read straight into its ``array('Q')``: a 64 TiB disk of 1 MiB blocks has a
    512 MiB BAT, and a ``bytes`` of it on the way would double what the open holds.  Past the
    end of the file (only a replayed log can name such space) reads as zeros."""
    # (nbytes is whole 4 KiB pages; array repeat copies its operand once per repetition, so
    # a page of zeros, not one entry, keeps it to 128 Ki copies for 64 Mi entries)
    bat = array("Q", bytes(LOG_SECTOR)) * (nbytes // LOG_SECTOR)
    with memoryview(bat) as view, view.cast("B") as dest:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [dest[done:]], offset + done)
            if n == 0:
                break
            done += n
        if overlay:
            overlay.apply(dest, offset)
    if sys.byteorder != "little":  # pragma: no cover - the format is little-endian
        bat.byteswap()
    return bat


def _refuse_misplaced(bat: array[int], layout: Layout, head: r.Header, md: Metadata) -> None:
    """Read-only opens too (as for VHD): a block over metadata reads it as data, and the next
    writer of the image (or of a copy) would write over it."""
    bat_region, meta = layout.bat_region, layout.metadata_region
    regions = [
        (bat_region.file_offset, bat_region.file_offset + bat_region.length, "BAT region"),
        (meta.file_offset, meta.file_offset + meta.length, "metadata region"),
    ]
    if head.log_length:
        regions.append((head.log_offset, head.log_offset + head.log_length, "log"))
    ratio = chunk_ratio(md.block_size, md.logical_sector_size)
    bad = first_misplaced(bat, chunk_ratio=ratio, block_size=md.block_size, regions=regions)
    if bad is not None:
        index, entry, name = bad
        what = (
            "sector bitmap block"
            if index % (ratio + 1) == ratio
            else f"block {index - index // (ratio + 1)}"
        )
        raise CorruptImageError(
            f"{what} (BAT entry {index}, file offset {entry & r.OFFSET_MASK:#x}) lies over the "
            f"{name}: the BAT is damaged ('vhd check' lists every bad entry)"
        )


def _replay_in_file(fd: int, seq: vlog.ActiveSequence) -> None:
    for w in seq.writes:
        if w.data is not None:
            write_all(fd, w.data, w.offset)
        else:
            end = w.offset + w.zero_length
            if end > file_size(fd):
                os.ftruncate(fd, end)
            punch_hole(fd, w.offset, w.zero_length)
    last = seq.head.last_file_offset
    if file_size(fd) < last:
        os.ftruncate(fd, last)
    os.fsync(fd)


# -- parents ------------------------------------------------------------------------------------


_DRIVE_PREFIX = re.compile(r"^[A-Za-z]:")


def _windows_name(value: str) -> str:
    return value.replace("\\", "/").rsplit("/", 1)[-1]


def parent_candidates(disk: VHDXDisk, parent_dirs: Sequence[str]) -> list[tuple[str, str]]:
    """``(locator key, path)`` where the parent may be, in the spec's order (2.6.2.6.3):
    relative_path, then absolute_win32_path (``C:\\x`` as ``/mnt/c/x``), then the file names
    of all three beside the child and in ``parent_dirs``; before any policy is applied."""
    loc = disk.metadata.parent_locator
    assert loc is not None
    here = os.path.dirname(os.path.abspath(disk.path))
    out: list[tuple[str, str]] = []
    names: list[tuple[str, str]] = []
    rel = loc.entries.get("relative_path")
    if rel:
        parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
        out.append(("relative_path", os.path.normpath(os.path.join(here, *parts))))
        names.append(("relative_path", rel))
    absolute = loc.entries.get("absolute_win32_path")
    if absolute:
        text = absolute
        if text.startswith("\\\\?\\"):
            text = text[4:]
            # vhdkit writes a Linux path as "\\?\tmp\x" (no drive): rooted, as Linux sees it
            if not _DRIVE_PREFIX.match(text):
                text = "\\" + text
        # A UNC or volume path ("\\\\server", "Volume{...}") names no Linux file.
        if not text.startswith("\\\\") and not text.startswith("\\Volume{"):
            out += [("absolute_win32_path", p) for p in windows_to_posix(text, here)]
    for key in ("volume_path", "absolute_win32_path"):
        value = loc.entries.get(key)
        if value:
            names.append((key, value))
    for key, value in names:
        name = _windows_name(value)
        if name in ("", ".", ".."):
            continue
        for d in (here, *parent_dirs):
            out.append((key, os.path.join(os.path.abspath(d), name)))
    seen: set[str] = set()
    return [(k, p) for k, p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


def parent_linkages(disk: VHDXDisk) -> set[str]:
    loc = disk.metadata.parent_locator
    assert loc is not None
    return {
        v.strip().strip("{}").lower()
        for k, v in loc.entries.items()
        if k in ("parent_linkage", "parent_linkage2")
    }


def parent_identity(parent: Disk) -> str | None:
    """What a child's parent_linkage names: a VHDX parent's DataWriteGuid, a VHD's unique id."""
    if isinstance(parent, VHDXDisk):
        return str(parent.current_header.data_write_guid)
    footer = getattr(parent, "footer", None)
    uid = getattr(footer, "unique_id", None)  # a VHD: its footer's unique id
    return str(Guid.from_bytes(uid)) if uid is not None else None


def _identity_at(path: str, *, devices: bool) -> tuple[tuple[int, int], str] | None:
    """(file identity, what a parent_linkage would name) of the image at ``path``, from its
    headers or footer alone (not its chain); None when it is not a readable VHDX or VHD."""
    from ..image import locate_footer

    def key(fd: int, size: int) -> str | None:
        if read_upto(fd, 8, 0) == r.SIGNATURE:
            guid = data_write_guid_at(fd)
            return None if guid is None else str(guid)
        return str(Guid.from_bytes(locate_footer(fd, size, path).footer.unique_id))

    return read_candidate(path, devices=devices, read=key)


def data_write_guid_at(fd: int) -> AnyGuid | None:
    """The DataWriteGuid of the VHDX open on ``fd`` (what a child's parent_linkage names), from
    its current header alone; None when neither header is valid."""
    heads = []
    for off in r.HEADER_OFFSETS:
        with contextlib.suppress(VHDError):
            heads.append(r.Header.parse(read_upto(fd, r.HEADER_SIZE, off)))
    if not heads:
        return None
    # the current header, as _read_layout picks it (equal numbers: the first copy)
    return max(heads, key=lambda h: h.sequence_number).data_write_guid


def _open_parent(
    disk: VHDXDisk,
    parent: Disk | str | os.PathLike[str] | None,
    policy: ParentPolicy,
    allow_mismatch: bool,
    seen: frozenset[tuple[int, int]],
) -> Disk:
    """The parent of a differencing VHDX, searched under ``policy`` as :mod:`vhd.chain` does
    for VHD: candidates outside the child's folder and the policy's folders are refused unless
    it allows absolute parents, only regular files qualify, each candidate's linkage is compared
    from its headers before its chain is opened, and errors name no id of a file found."""
    loc = disk.metadata.parent_locator
    assert loc is not None
    if loc.locator_type != r.VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedFeatureError(f"parent locator type {loc.locator_type}", path=disk.path)
    if "parent_linkage" not in loc.entries:
        raise CorruptImageError("the parent locator has no parent_linkage", path=disk.path)
    if len(seen) >= MAX_CHAIN_DEPTH:
        raise ChainLoopError(f"the chain is deeper than {MAX_CHAIN_DEPTH} disks", path=disk.path)
    want = parent_linkages(disk)
    if isinstance(parent, Disk):
        opened = parent
    else:
        opened = _search_parent(disk, parent, policy, allow_mismatch, seen, want)
    try:
        ident = parent_identity(opened)
        if not allow_mismatch and ident is not None and ident not in want:
            raise ParentMismatchError(
                f"the parent {_show(opened.path)} is not this child's parent (its identity is "
                f"not the child's parent_linkage {loc.entries.get('parent_linkage')})",
                path=disk.path,
            )
        if opened.size < disk.size:
            disk.warnings.append(f"the parent is smaller ({opened.size} bytes) than the child")
        # (A VHD parent has 512-byte sectors.)
        if getattr(opened, "logical_sector_size", 512) != disk.logical_sector_size:
            raise ParentMismatchError(
                "parent and child have different logical sector sizes", path=disk.path
            )
    except BaseException:
        if not isinstance(parent, Disk):
            opened.close()
        raise
    return opened


def _search_parent(
    disk: VHDXDisk,
    parent: str | os.PathLike[str] | None,
    policy: ParentPolicy,
    allow_mismatch: bool,
    seen: frozenset[tuple[int, int]],
    want: set[str],
) -> Disk:
    from ..image import open as open_image

    explicit = parent is not None
    if parent is not None:
        candidates = [("explicit parent", os.fspath(parent))]
    else:
        candidates = parent_candidates(disk, policy.dirs)
    found = search_candidates(
        disk.path,
        candidates,
        policy=policy,
        explicit=explicit,
        allow_mismatch=allow_mismatch,
        seen=seen,
        identify=_identity_at,
        matches=lambda linkage: linkage in want,
        missing="not found or not a VHDX or VHD",
    )
    if found.chosen is None:
        linkage_text = disk.metadata.parent_locator.entries.get("parent_linkage", "")  # type: ignore[union-attr]
        where = _tried_text(found.tried)
        if found.first_other is not None:
            raise ParentMismatchError(
                f"parent {_show(linkage_text)} was not found: the files found are not this "
                f"child's parent ({where})",
                path=disk.path,
            )
        raise ParentNotFoundError(
            f"parent image {_show(linkage_text)} not found; tried: {where}. {found.hint}",
            path=disk.path,
        )
    path, ident = found.chosen
    # _expect: the file must still be the one whose headers were read.
    opened = open_chosen(
        lambda: open_image(
            path,
            "r",
            parent_policy=policy,
            allow_parent_mismatch=allow_mismatch,
            _seen=seen,
            _expect=ident,
        ),
        path,
        disk.path,
    )
    if found.mismatch_used:
        disk.warnings.append(f"parent {path} is not the one the child records; used anyway")
    return opened
