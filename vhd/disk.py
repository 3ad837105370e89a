"""Disks: positional I/O over fixed, dynamic and differencing images.

Implements the data path of the spec ("Hard Disk Footer", "Block Allocation Table and Data
Blocks", "Sector bitmap"):

* A **fixed** disk is its data followed by the footer.
* A **dynamic** disk maps guest block *b* through the BAT to a sector bitmap plus data; an
  unallocated block, or a clear bitmap bit, reads as zeros.
* A **differencing** disk is a dynamic disk whose unallocated blocks and clear bits read from its
  parent, itself a :class:`Disk`.

Reads and writes move data with ``os.preadv``/``os.pwritev`` straight between the file and the
caller's buffer; runs that a bitmap marks alike take one system call.

Crash safety: block allocation follows the ordering rules written once in :mod:`vhd.metadata`
(rules 1 and 2): the trailing footer moves to the new end of file first; the block's data, then
its sector bitmap, are written; the BAT entry changes in memory only, and :meth:`Disk.flush`
(through :meth:`vhd.metadata.MetadataWriter.flush_bat`) syncs the data before it writes the
dirty BAT sectors.  Every write acknowledged by a completed ``flush()`` survives a crash.

New blocks start where the trailing footer was, with their data aligned to 4 KiB (as Hyper-V
lays them out), and space is never reused while the file is open, so an on-disk BAT entry that
is stale (freed in memory by a discard, not yet written back) never aliases a new block.

Thread safety: reads take no lock; in-memory BAT entries and cached bitmaps are published only
after the data they describe is written.  Allocation, bitmap updates, discards and flushes are
serialised by one lock.  Cached bitmaps are never mutated in place: a writer builds a new one,
writes it to the file and then installs it.
"""

from __future__ import annotations

import collections
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from . import bitmap as bm
from .bat import UNUSED, BlockAllocationTable
from .errors import CorruptImageError, InvalidArgumentError, ParentError, ReadOnlyError
from .fileio import (
    punch_hole,
    read_exact,
    read_exact_into,
    write_all,
    write_zeros,
    zero_fill,
)
from .footer import FOOTER_SIZE, DiskType, Footer
from .header import DynamicHeader
from .metadata import MetadataWriter
from .record import FrozenRecord, fill

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import NamedTuple, Protocol

    class _Extent(NamedTuple):
        offset: int
        length: int
        layer: int | None
else:
    # At run time: BlockDevice is a plain class (only type checkers look at a protocol), and
    # Extent's fields come from collections.namedtuple, as typing.NamedTuple makes them.
    Protocol = object
    _Extent = collections.namedtuple("Extent", ("offset", "length", "layer"))

SECTOR = 512
DATA_ALIGNMENT = 4096
_BITMAP_CACHE_LIMIT = 16384
# A cached bitmap of this value means "every bit set": the block is read with one pread.
FULL: bytes = b""

Buffer = bytes | bytearray | memoryview
# memoryview formats of unsigned bytes ('<B' is what ctypes arrays export).
_BYTE_FORMATS = frozenset({"B", "<B", ">B", "=B", "@B"})


class BlockDevice(Protocol):
    """The positional I/O of a :class:`Disk`, as block-device front ends (the request executor
    shared by NBD and Xen blkif, the FUSE filesystem) use it; tests substitute in-memory fakes."""

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    def preadinto(self, buffer: Buffer, offset: int) -> int: ...

    def pwrite(self, data: Buffer, offset: int) -> int: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]: ...

    def close(self) -> None: ...


class Extent(_Extent):
    """A run of the guest address space (``offset``, ``length``, ``layer``): ``layer`` 0 is this
    file, k the k-th ancestor, and None means no layer holds data there (it reads as zeros)."""

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.offset + self.length


class FoundImage(FrozenRecord):
    """A VHD file as :func:`vhd.open` found it: what every kind of VHD :class:`Disk` starts from
    (the footer in use, where it lies, the file's size and the warnings of the open)."""

    _fields = ("path", "fd", "writable", "footer", "footer_offset", "file_size", "warnings")
    __slots__ = _fields
    path: str
    fd: int
    writable: bool
    footer: Footer
    footer_offset: int
    file_size: int
    warnings: list[str]

    def __init__(
        self,
        path: str,
        fd: int,
        writable: bool,
        footer: Footer,
        footer_offset: int,
        file_size: int,
        warnings: list[str],
    ) -> None:
        fill(self, path, fd, writable, footer, footer_offset, file_size, warnings)


class Disk:
    """A VHD opened for positional I/O.  Use :func:`vhd.open` or :func:`vhd.create`."""

    type: DiskType
    header: DynamicHeader | None = None
    block_size: int | None = None

    def __init__(self, found: FoundImage) -> None:
        self._init_file(found.path, found.fd, found.writable, found.file_size, found.warnings)
        self.footer = found.footer
        self.footer_offset = found.footer_offset
        self.size = found.footer.current_size
        self._footer_bytes = found.footer.build()

    def _init_file(
        self, path: str, fd: int, writable: bool, file_size: int, warnings: list[str]
    ) -> None:
        """What every kind of disk (VHD or VHDX) holds of its open file, set one way."""
        self.path = path
        self._fd = fd
        self.read_only = not writable
        self.file_size = file_size
        self.warnings = warnings
        self.parent: Disk | None = None
        self._lock = threading.RLock()
        self._closed = False

    # -- public API ------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def chain(self) -> list[Disk]:
        """This disk followed by its ancestors, nearest first."""
        out: list[Disk] = []
        disk: Disk | None = self
        while disk is not None:
            out.append(disk)
            disk = disk.parent
        return out

    def pread(self, n: int, offset: int) -> bytes:
        count = self._clip(n, offset)
        buf = bytearray(count)
        if count:
            self._readinto(memoryview(buf), offset)
        return bytes(buf)

    def preadinto(self, buffer: Buffer, offset: int) -> int:
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise InvalidArgumentError("preadinto needs a writable buffer")
        count = self._clip(len(view), offset)
        if count:
            self._readinto(view[:count], offset)
        return count

    def pwrite(self, data: Buffer, offset: int) -> int:
        self._check_writable()
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise InvalidArgumentError(
                f"write of {len(view)} bytes at offset {offset} is outside the disk "
                f"({self.size} bytes)",
                path=self.path,
            )
        if view:
            self._write(view, offset)
        return len(view)

    def discard(self, offset: int, length: int) -> None:
        """Give the range back (TRIM): afterwards its contents are unspecified.

        Never allocates.  What the range then reads as: zeros on a fixed or dynamic disk (whole
        blocks are freed, holes punched); on a differencing disk, every sector that the range
        covers entirely and that this file holds is released and reads from the parent again
        (whole blocks are freed), and the rest is left as it was.  Use :meth:`write_zeroes`
        when the range must read as zeros.
        """
        self._check_range("discard", offset, length)
        if length:
            self._discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros, giving space back where that keeps the zeros (fixed
        and dynamic disks: as :meth:`discard`; a differencing disk writes zeros over the range
        wherever some layer of the chain holds data)."""
        self._check_range("write_zeroes", offset, length)
        if length:
            self._write_zeroes(offset, length)

    def _check_range(self, what: str, offset: int, length: int) -> None:
        self._check_writable()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgumentError(
                f"{what} of {length} bytes at offset {offset} is outside the disk",
                path=self.path,
            )

    def flush(self, *, durable: bool = True) -> None:
        """Make every completed write durable (``fdatasync``), metadata included.

        ``durable=False`` only writes the in-memory metadata back, without syncing: for a caller
        that builds an image from scratch (``vhd convert``) and has no crash to survive midway.
        """
        if self.read_only or self._closed:
            return
        with self._lock:
            self._flush_locked(durable)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        end = self.size if length is None else min(self.size, offset + length)
        if offset < 0:
            raise InvalidArgumentError("negative offset")
        merged: Extent | None = None
        for ext in self._extents(offset, end):
            if ext.length <= 0:
                continue
            if merged is not None and merged.layer == ext.layer and merged.end == ext.offset:
                merged = Extent(merged.offset, merged.length + ext.length, merged.layer)
                continue
            if merged is not None:
                yield merged
            merged = ext
        if merged is not None:
            yield merged

    def close(self, *, durable: bool = True) -> None:
        if self._closed:
            return
        try:
            self.flush(durable=durable)
        finally:
            self._closed = True
            os.close(self._fd)
            if self.parent is not None:
                self.parent.close()

    def file(self) -> DiskFile:
        """A file-like (``io.RawIOBase``) view with its own cursor, over the positional I/O."""
        return DiskFile(self)

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} {self.type.label} {self.size} bytes>"

    # -- helpers for subclasses ----------------------------------------------------------

    def _clip(self, n: int, offset: int) -> int:
        if offset < 0 or n < 0:
            raise InvalidArgumentError("negative offset or length")
        return max(0, min(n, self.size - offset))

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("the disk is open read-only", path=self.path)
        if self._closed:
            raise InvalidArgumentError("the disk is closed", path=self.path)

    def _readinto(self, dest: memoryview, offset: int) -> None:
        raise NotImplementedError

    def _write(self, src: memoryview, offset: int) -> None:
        raise NotImplementedError

    def _discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._discard(offset, length)  # a fixed or dynamic disk's discard leaves zeros

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        raise NotImplementedError

    def _flush_locked(self, durable: bool) -> None:
        if durable:
            os.fdatasync(self._fd)

    def _adopt_metadata(
        self,
        *,
        footer: Footer | None = None,
        footer_offset: int | None = None,
        file_size: int | None = None,
        header: DynamicHeader | None = None,
    ) -> None:
        """Take metadata that :class:`vhd.metadata.MetadataWriter` has just written to the file
        (the one caller), so this Disk describes the file as it now is."""
        with self._lock:
            if footer is not None:
                self.footer = footer
                self.size = footer.current_size
                self._footer_bytes = footer.build()
            if footer_offset is not None:
                self.footer_offset = footer_offset
                self.file_size = max(self.file_size, footer_offset + FOOTER_SIZE)
            if file_size is not None:
                self.file_size = file_size
            if header is not None:
                self.header = header
            self._metadata_adopted(
                footer=footer is not None, footer_offset=footer_offset is not None
            )

    def _disown_fd(self) -> None:
        """Give up the descriptor without closing it: a Disk whose building failed, when the
        opener that made the descriptor closes it (closing this Disk then does nothing)."""
        self._closed = True

    def _read_parent(self, dest: memoryview, guest: int) -> None:
        """What a differencing disk (VHD or VHDX) shows where it holds nothing: the parent's
        data at ``guest``, zeros past the parent's end."""
        if self.parent is None:
            raise ParentError(
                "the parent image is not open, so its data cannot be read", path=self.path
            )
        got = self.parent.preadinto(dest, guest)
        if got < len(dest):
            zero_fill(dest[got:])

    def _forget_bitmaps(self) -> None:
        """Drop cached sector bitmaps (BAT entries were rewritten behind the Disk)."""

    def _metadata_adopted(self, *, footer: bool, footer_offset: bool) -> None:
        """What a kind of disk derives from its footer and the trailing footer's place."""


class FixedDisk(Disk):
    """Data at [0, size), the footer right after it."""

    type = DiskType.FIXED

    def _readinto(self, dest: memoryview, offset: int) -> None:
        read_exact_into(self._fd, dest, offset, path=self.path)

    def _write(self, src: memoryview, offset: int) -> None:
        write_all(self._fd, src, offset)

    def _discard(self, offset: int, length: int) -> None:
        punch_hole(self._fd, offset, length)

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        if end > start:
            yield Extent(start, end - start, 0)


class SparseDisk(Disk):
    """Dynamic and differencing disks: BAT, per-block sector bitmaps, optional parent."""

    def __init__(
        self,
        found: FoundImage,
        *,
        header: DynamicHeader,
        bat: BlockAllocationTable,
        parent: Disk | None,
        differencing: bool,
    ) -> None:
        super().__init__(found)
        self.type = DiskType.DIFFERENCING if differencing else DiskType.DYNAMIC
        self.header = header
        self.bat = bat
        self.parent = parent
        self.block_size = header.block_size
        self._bs = header.block_size
        self._spb = header.block_size // SECTOR
        self._bitmap_bytes = header.bitmap_bytes
        self._bitmap_used = (self._spb + 7) // 8
        self._full_pattern = _full_bitmap(self._spb)
        # FIFO of loaded bitmaps, keyed by BAT entry (the bitmap's place in the file): blocks
        # sharing an entry (a damaged table; writers refuse those) share one read.  An
        # OrderedDict evicts its oldest entry in O(1) (a dict's
        # next(iter()) scans the slots its evictions left empty: 50-170 us at this limit).
        self._bitmaps: OrderedDict[int, bytes | bytearray] = OrderedDict()
        # Bumped (under the lock) by every change a writer makes to a bitmap or to the cache.
        # A reader loads a bitmap without the lock; if this moved meanwhile, what it read may
        # already be stale, and caching it could outlive the writer's own (evicted) entry.
        self._bitmap_gen = 0
        self._differencing = differencing
        # Where the next block goes: the trailing footer's place (see the module docstring).
        self._next_free = -(-found.footer_offset // SECTOR) * SECTOR

    # -- lookups -------------------------------------------------------------------------

    def _needed(self, block: int) -> int:
        """Bytes of ``block`` inside the disk (the last block may be cut by the disk size)."""
        return min(self._bs, self.size - block * self._bs)

    def _bitmap(self, block: int, entry: int) -> bytes | bytearray:
        cached = self._bitmaps.get(entry)
        if cached is not None:
            return cached
        gen = self._bitmap_gen
        start = entry * SECTOR
        if start + self._bitmap_bytes + self._needed(block) > self.file_size:
            raise CorruptImageError(
                f"block {block} (BAT entry {entry:#x}) lies past the end of the file",
                path=self.path,
            )
        raw = read_exact(self._fd, self._bitmap_used, start, path=self.path)
        loaded: bytes | bytearray = FULL if raw == self._full_pattern else bytearray(raw)
        with self._lock:
            cached = self._bitmaps.get(entry)
            if cached is not None:
                return cached
            if gen != self._bitmap_gen:
                # A writer changed bitmaps while this one was read: use it for this read only
                # (it races with that write anyway), never cache it.
                return loaded
            if len(self._bitmaps) >= _BITMAP_CACHE_LIMIT:
                self._bitmaps.popitem(last=False)
            self._bitmaps[entry] = loaded
            return loaded

    def _data_offset(self, entry: int) -> int:
        return entry * SECTOR + self._bitmap_bytes

    # -- reads ---------------------------------------------------------------------------

    def preadinto(self, buffer: Buffer, offset: int) -> int:
        # Fast path for the common small read (NBD, blkif, FUSE): inside one block whose bitmap
        # is all ones, it is a single preadv with no further Python work.
        if type(buffer) is memoryview and buffer.format in _BYTE_FORMATS and not buffer.readonly:
            n = len(buffer)
            bs = self._bs
            block = offset // bs
            if offset >= 0 and offset + n <= self.size and n and (offset + n - 1) // bs == block:
                entry = self.bat[block]
                if entry != UNUSED and self._bitmaps.get(entry) is FULL:
                    at = entry * SECTOR + self._bitmap_bytes + offset - block * bs
                    if os.preadv(self._fd, [buffer], at) == n:
                        return n
        return super().preadinto(buffer, offset)

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """Split a guest range at block boundaries: (block, offset in block, position, length)."""
        bs = self._bs
        pos = 0
        while pos < length:
            block, inner = divmod(offset + pos, bs)
            n = min(length - pos, bs - inner)
            yield block, inner, pos, n
            pos += n

    def _readinto(self, dest: memoryview, offset: int) -> None:
        for block, inner, pos, n in self._pieces(offset, len(dest)):
            self._read_block(block, inner, dest[pos : pos + n])

    def _read_block(self, block: int, inner: int, dest: memoryview) -> None:
        entry = self.bat[block]
        guest = block * self._bs + inner
        if entry == UNUSED:
            self._read_absent(dest, guest)
            return
        bits = self._bitmap(block, entry)
        data = self._data_offset(entry)
        if bits is FULL:
            read_exact_into(self._fd, dest, data + inner, path=self.path)
            return
        first = inner // SECTOR
        last = (inner + len(dest) + SECTOR - 1) // SECTOR
        for run_start, run_end, present in bm.runs(bits, first, last):
            a = max(run_start * SECTOR, inner) - inner
            z = min(run_end * SECTOR, inner + len(dest)) - inner
            if present:
                read_exact_into(self._fd, dest[a:z], data + inner + a, path=self.path)
            else:
                self._read_absent(dest[a:z], guest + a)

    def _read_absent(self, dest: memoryview, guest: int) -> None:
        """Fill ``dest`` with what the guest sees where this file holds nothing."""
        if not self._differencing:
            zero_fill(dest)
            return
        self._read_parent(dest, guest)

    # -- writes --------------------------------------------------------------------------

    def _write(self, src: memoryview, offset: int) -> None:
        for block, inner, pos, n in self._pieces(offset, len(src)):
            self._write_block(block, inner, src[pos : pos + n])

    def _write_block(self, block: int, inner: int, src: memoryview) -> None:
        entry = self.bat[block]
        if entry != UNUSED and self._bitmap(block, entry) is FULL:
            # Every sector is present: nothing but the data changes, no lock needed.
            write_all(self._fd, src, self._data_offset(entry) + inner)
            return
        with self._lock:
            entry = self.bat[block]
            if entry == UNUSED:
                self._allocate(block, inner, src)
                return
            bits = self._bitmap(block, entry)
            if bits is FULL:
                write_all(self._fd, src, self._data_offset(entry) + inner)
                return
            self._write_sectors(block, self._data_offset(entry), bits, inner, src, fresh=False)
            new = bytearray(bits)
            first = inner // SECTOR
            last = (inner + len(src) + SECTOR - 1) // SECTOR
            if bm.set_range(new, first, last):
                self._store_bitmap(block, entry, new)

    def _store_bitmap(self, block: int, entry: int, bits: bytearray) -> None:
        """Write a block's bitmap (after its data), then publish it to readers."""
        write_all(self._fd, bits, entry * SECTOR)
        self._bitmap_gen += 1
        self._bitmaps[entry] = FULL if bytes(bits) == self._full_pattern else bits

    def _write_sectors(
        self,
        block: int,
        data: int,
        bits: bytes | bytearray | None,
        inner: int,
        src: memoryview,
        *,
        fresh: bool,
    ) -> None:
        """Write ``src`` at ``inner`` in a block whose data starts at file offset ``data``.

        A partially covered sector whose bit is clear gets its old guest-visible contents (zeros,
        or the parent's) around the new bytes.  A fresh dynamic block needs none of that: its
        file space reads as zeros already.
        """
        end = inner + len(src)
        first = inner // SECTOR
        last = (end - 1) // SECTOR
        front = back = 0

        def needs_merge(sector: int) -> bool:
            if fresh:
                return self._differencing
            return bits is None or not bm.bit(bits, sector)

        if inner % SECTOR and needs_merge(first):
            lo = inner - first * SECTOR
            hi = min(SECTOR, end - first * SECTOR)
            sector = self._absent_sector(block, first)
            sector[lo:hi] = src[: hi - lo]
            write_all(self._fd, sector, data + first * SECTOR)
            front = hi - lo
        if end % SECTOR and front < len(src) and needs_merge(last):
            hi = end - last * SECTOR
            sector = self._absent_sector(block, last)
            sector[:hi] = src[len(src) - hi :]
            write_all(self._fd, sector, data + last * SECTOR)
            back = hi
        middle = src[front : len(src) - back]
        if middle:
            write_all(self._fd, middle, data + inner + front)

    def _absent_sector(self, block: int, sector: int) -> bytearray:
        buf = bytearray(SECTOR)
        if self._differencing:
            self._read_absent(memoryview(buf), block * self._bs + sector * SECTOR)
        return buf

    def _allocate(self, block: int, inner: int, src: memoryview) -> None:
        """Give ``block`` file space where the trailing footer is, and write ``src`` into it."""
        old_footer = self._next_free
        data = -(-(old_footer + self._bitmap_bytes) // DATA_ALIGNMENT) * DATA_ALIGNMENT
        bitmap_at = data - self._bitmap_bytes
        new_end = data + self._bs
        # 1. The new trailing footer first: the file always ends in a valid footer.
        write_all(self._fd, self._footer_bytes, new_end)
        self.file_size = max(self.file_size, new_end + FOOTER_SIZE)
        self.footer_offset = new_end
        self._next_free = new_end
        if old_footer < bitmap_at:
            # The old footer now sits in alignment padding: clear it so no scan mistakes it
            # for the image's footer.
            write_zeros(self._fd, old_footer, min(FOOTER_SIZE, bitmap_at - old_footer))
        # 2. Data, then the bitmap.
        self._write_sectors(block, data, None, inner, src, fresh=True)
        if self._differencing:
            bits = bytearray(self._bitmap_bytes)
            bm.set_range(bits, inner // SECTOR, (inner + len(src) + SECTOR - 1) // SECTOR)
        else:
            # A new dynamic block's unwritten sectors are file holes and read as zeros, so all
            # bits are set (as qemu and blktap do): later reads need no bitmap walk.
            bits = bytearray(b"\xff" * self._bitmap_bytes)
        entry = bitmap_at // SECTOR
        write_all(self._fd, bits, bitmap_at)
        used = bits[: self._bitmap_used]
        self._bitmap_gen += 1
        self._bitmaps[entry] = FULL if bytes(used) == self._full_pattern else used
        # 3. The BAT entry: in memory now, on disk at the next flush (after the data is durable).
        self.bat[block] = entry

    # -- discard -------------------------------------------------------------------------

    def _discard(self, offset: int, length: int) -> None:
        # Only blocks this file holds are touched: a discard never allocates.
        bat = self.bat
        for block, inner, _pos, n in self._pieces(offset, length):
            if bat[block] != UNUSED:
                self._discard_block(block, inner, n)

    def _write_zeroes(self, offset: int, length: int) -> None:
        if not self._differencing:
            self._discard(offset, length)  # freed sectors and blocks read as zeros
            return
        # Zeros must hide the parent's data; where nothing is allocated anywhere the range
        # already reads as zeros.
        for ext in list(self.extents(offset, length)):
            if ext.layer is not None:
                self._write_zeros_range(ext.offset, ext.length)

    def _write_zeros_range(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, 1 << 20)))
        while length > 0:
            n = min(length, len(zeros))
            self._write(zeros[:n], offset)
            offset += n
            length -= n

    def _discard_block(self, block: int, inner: int, n: int) -> None:
        """Release the sectors of ``block`` that ``[inner, inner + n)`` covers entirely.

        Dynamic: partly covered edge sectors get zeros written, so the whole range reads as
        zeros.  Differencing: they are left alone (a discard must not allocate or read the
        parent), and released sectors read from the parent again.

        Crash ordering: on a differencing disk the bitmap is written (or the block freed in
        the in-memory BAT) before the data is punched, so a crash leaves each sector either as
        it was or released, never zeros that neither the child nor the parent held.  A freed
        block's on-disk BAT entry goes stale until the next flush; its bitmap is punched (all
        bits clear: the parent shows, as in memory) and its space is not reused while open.
        """
        with self._lock:
            entry = self.bat[block]
            if entry == UNUSED:
                return
            data = self._data_offset(entry)
            bits = self._bitmap(block, entry)
            new = bytearray(self._full_pattern if bits is FULL else bits)
            first = -(-inner // SECTOR)
            last = (inner + n) // SECTOR
            if not self._differencing:
                # Partly covered edge sectors keep their bit and get zeros written.
                if first * SECTOR > inner:
                    write_zeros(self._fd, data + inner, min(first * SECTOR, inner + n) - inner)
                if last * SECTOR < inner + n and last >= first:
                    write_zeros(self._fd, data + last * SECTOR, inner + n - last * SECTOR)
            if first >= last:
                return
            bm.set_range(new, first, last, False)
            emptied = not bm.any_set(new, -(-self._needed(block) // SECTOR))
            if not self._differencing:
                # Punch the data first: readers that ignore bitmaps (qemu) then also see zeros.
                punch_hole(self._fd, data + first * SECTOR, (last - first) * SECTOR)
            if emptied:
                self._bitmap_gen += 1
                self._bitmaps.pop(entry, None)
                self.bat[block] = UNUSED
                punch_hole(self._fd, entry * SECTOR, self._bitmap_bytes + self._bs)
            else:
                self._store_bitmap(block, entry, new)
                if self._differencing:
                    # The bits are clear (the parent shows) before the data goes.
                    punch_hole(self._fd, data + first * SECTOR, (last - first) * SECTOR)

    # -- metadata ------------------------------------------------------------------------

    def _forget_bitmaps(self) -> None:
        with self._lock:
            self._bitmap_gen += 1
            self._bitmaps.clear()

    def _metadata_adopted(self, *, footer: bool, footer_offset: bool) -> None:
        if footer:
            # The in-memory table holds the entries the disk size needs (see vhd.image).
            self.bat.resize(-(-self.size // self._bs))
            self._bitmaps.clear()
        if footer_offset:
            # New blocks go where the trailing footer now is (see the module docstring).
            self._next_free = -(-self.footer_offset // SECTOR) * SECTOR

    def _flush_locked(self, durable: bool) -> None:
        MetadataWriter(self).flush_bat(durable=durable)

    # -- extents -------------------------------------------------------------------------

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        bs = self._bs
        pos = start
        bat = self.bat
        while pos < end:
            block = pos // bs
            block_end = min((block + 1) * bs, end)
            entry = bat[block]
            if entry == UNUSED:
                run_end = min(bat.next_used(block + 1) * bs, end)
                yield from self._absent_extents(pos, run_end)
                pos = run_end
                continue
            bits = self._bitmap(block, entry)
            if block + 1 < len(bat) and bat[block + 1] == entry:
                # Blocks sharing one entry (a damaged table; an all-equal one has millions):
                # a bitmap that is all alike covers the whole run in one extent.
                run_end = min(bat.run_end(block) * bs, end)
                if bits is FULL:
                    yield Extent(pos, run_end - pos, 0)
                    pos = run_end
                    continue
                if not bm.any_set(bits, self._spb):
                    yield from self._absent_extents(pos, run_end)
                    pos = run_end
                    continue
            if bits is FULL:
                yield Extent(pos, block_end - pos, 0)
            else:
                base = block * bs
                first = (pos - base) // SECTOR
                last = (block_end - base + SECTOR - 1) // SECTOR
                runs = bm.runs(bits, first, last)
                yield from bitmap_extents(runs, base, SECTOR, pos, block_end, self._absent_extents)
            pos = block_end

    def _absent_extents(self, start: int, end: int) -> Iterator[Extent]:
        if not self._differencing:
            yield Extent(start, end - start, None)
            return
        yield from parent_extents(self.parent, start, end)


def bitmap_extents(
    runs: Iterable[tuple[int, int, bool]],
    base: int,
    unit: int,
    start: int,
    end: int,
    absent: Callable[[int, int], Iterator[Extent]],
) -> Iterator[Extent]:
    """The extents of a block from its bitmap's ``runs`` (``(first, end, set)`` in bits of
    ``unit`` bytes, the block at guest offset ``base``; VHD and VHDX alike), cut to
    ``[start, end)``: set bits are this file's (layer 0), clear ones what ``absent`` says."""
    for run_start, run_end, present in runs:
        a = max(base + run_start * unit, start)
        z = min(base + run_end * unit, end)
        if present:
            yield Extent(a, z - a, 0)
        else:
            yield from absent(a, z)


# Scans of guest data go in pieces of this size: memory stays bounded whatever the range.
_SCAN_CHUNK = 4 * 1024 * 1024


def first_data_byte(disk: Disk, start: int, end: int) -> int | None:
    """The guest offset of the first non-zero byte in ``[start, end)`` that ``disk`` itself
    holds (its layer-0 extents, not a parent's), or None: what compact asks of a block and a
    shrink of the range it drops, VHD and VHDX alike."""
    for ext in disk.extents(start, end - start):
        if ext.layer != 0:
            continue
        pos = ext.offset
        while pos < ext.end:
            n = min(_SCAN_CHUNK, ext.end - pos)
            chunk = disk.pread(n, pos)
            stripped = chunk.lstrip(b"\0")
            if stripped:
                return pos + len(chunk) - len(stripped)
            pos += n
    return None


def parent_extents(parent: BlockDevice | None, start: int, end: int) -> Iterator[Extent]:
    """The extents of ``[start, end)`` that a differencing disk does not hold, as its parent
    reports them one layer further down (layer 0 is the child itself)."""
    if parent is None:
        # Opened without its parent: the range is the parent's, whatever it holds there.
        yield Extent(start, end - start, 1)
        return
    covered = start
    for ext in parent.extents(start, end - start):
        covered = ext.end
        yield Extent(ext.offset, ext.length, None if ext.layer is None else ext.layer + 1)
    if covered < end:
        yield Extent(covered, end - covered, None)


def _full_bitmap(sectors: int) -> bytes:
    whole, rest = divmod(sectors, 8)
    tail = bytes([(0xFF << (8 - rest)) & 0xFF]) if rest else b""
    return b"\xff" * whole + tail


class DiskFile(io.RawIOBase):
    """``io.RawIOBase`` over a :class:`Disk`: read/write/seek/tell from the positional calls."""

    def __init__(self, disk: Disk) -> None:
        super().__init__()
        self._disk = disk
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self._disk.read_only

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:  # type: ignore[override]
        n = self._disk.preadinto(buffer, self._pos)
        self._pos += n
        return n

    def write(self, data: Buffer) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        n = min(len(view), max(0, self._disk.size - self._pos))
        if n < len(view) and n == 0:
            raise OSError(28, "No space left on device (end of disk)")
        self._disk.pwrite(view[:n], self._pos)
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._disk.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        if not self.closed:
            self._disk.flush()
