"""The one writer of VHD metadata: BAT entries, the dynamic header, the footers and where the
file ends (spec: "Hard Disk Footer", "Dynamic Disk Header", "Block Allocation Table").

Every operation that changes metadata of an image — block allocation in :class:`~vhd.disk.Disk`,
``compact``, ``resize``, ``commit``, ``set-parent`` and the plans of ``check --repair`` — goes
through here, so the on-disk bytes are built one way and an open :class:`Disk` is kept in step
with what is on disk (nothing else assigns to a Disk's footer, header or BAT behind its back).

Crash-ordering rules (each a write followed by a sync before the next step depends on it):

1. **The file always ends in a valid footer.**  Before anything is placed past the trailing
   footer, the footer is first written at the new end (:meth:`MetadataWriter.move_footer`); an
   old footer left inside the new space is zeroed, so no scan mistakes it for the image's.  A
   crash leaves at worst unreferenced space before the footer (orphan space, which
   ``vhd check --repair`` cuts).
2. **A BAT entry never points at bytes that are not durable.**  A block's data, then its sector
   bitmap, are written and synced before the BAT sector that references them
   (:meth:`MetadataWriter.flush_bat` and :meth:`MetadataWriter.set_bat_entries` sync first when
   asked).  Unflushed allocations can be lost; the space they took shows up as orphan blocks.
3. **Space is freed only after nothing references it.**  Entries are unallocated (synced) before
   the space they held is reused or cut; a cut (:meth:`MetadataWriter.cut`) writes the footer at
   its new place before the file is shortened.
4. **The trailing footer before the copy at offset 0.**  Between the two writes the footers
   differ, which ``vhd check --repair`` mends from the trailing one.

BAT sectors are read-modify-written a 512-byte sector at a time (:func:`bat_sector_writes`), so
entries past the in-memory table (a header that claims fewer entries than the file holds) are
kept as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

from .bat import ENTRIES_PER_SECTOR
from .fileio import read_exact, write_all, write_zeros
from .footer import FOOTER_SIZE, DiskType, Footer
from .header import DynamicHeader
from .layout import metadata_regions

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from .bat import BlockAllocationTable
    from .disk import Disk

SECTOR = 512
_COPY_CHUNK = 4 * 1024 * 1024


def bat_sector_writes(
    read_sector: Callable[[int], bytes], table_offset: int, entries: Mapping[int, int]
) -> list[tuple[int, bytes]]:
    """The ``(file offset, 512 bytes)`` writes that set ``{index: value}`` in an on-disk BAT at
    ``table_offset``, in file order.  ``read_sector(offset)`` gives the sector's current bytes
    (short reads are padded with 0xFF, "unallocated"), so the other entries are kept."""
    sectors: dict[int, bytearray] = {}
    for index, value in entries.items():
        sector = index // ENTRIES_PER_SECTOR
        raw = sectors.get(sector)
        if raw is None:
            at = table_offset + sector * SECTOR
            raw = sectors[sector] = bytearray(read_sector(at).ljust(SECTOR, b"\xff"))
        pos = (index % ENTRIES_PER_SECTOR) * 4
        raw[pos : pos + 4] = value.to_bytes(4, "big")
    return [(table_offset + s * SECTOR, bytes(raw)) for s, raw in sorted(sectors.items())]


def metadata_end(footer: Footer, header: DynamicHeader, *, table_entries: int | None = None) -> int:
    """Where blocks may start: the sector-rounded end of the metadata regions
    (:func:`vhd.layout.metadata_regions`, the rule ``vhd check`` and :func:`vhd.open` apply), with
    a BAT of ``table_entries`` entries (the header's count by default)."""
    if table_entries is not None:
        header = header.replace(max_table_entries=table_entries)
    end = max(stop for _start, stop, _label in metadata_regions(footer.data_offset, header))
    return -(-end // SECTOR) * SECTOR


class MetadataWriter:
    """Metadata writes to the file of an open :class:`~vhd.disk.Disk`, each keeping the Disk's
    in-memory footer, header and BAT equal to what is on disk."""

    __slots__ = ("_disk", "_fd")

    def __init__(self, disk: Disk) -> None:
        self._disk = disk
        self._fd = disk.fd

    @classmethod
    def for_repair(cls, fd: int) -> MetadataWriter:
        """A writer on a file no :class:`Disk` can open yet (``vhd check --repair`` mends it so
        that one can): only the positioned writes, syncs and cuts, in the same rules."""
        writer = cls.__new__(cls)
        writer._fd = fd
        return writer

    @property
    def fd(self) -> int:
        return self._fd

    def _sync(self) -> None:
        os.fsync(self._fd)

    def _bat(self) -> BlockAllocationTable:
        from .disk import SparseDisk  # (vhd.disk imports this module)

        assert isinstance(self._disk, SparseDisk), "a fixed disk has no BAT"
        return self._disk.bat

    # -- BAT ---------------------------------------------------------------------------

    def set_bat_entries(self, entries: Mapping[int, int], *, data_first: bool = False) -> None:
        """Write ``{block: sector}`` into the on-disk BAT and sync, then adopt them in memory
        (clean: close() has nothing left to write).  ``data_first`` syncs the data the entries
        will point at before the BAT is touched (rule 2)."""
        if not entries:
            return
        disk = self._disk
        header = disk.header
        assert header is not None
        if data_first:
            os.fdatasync(disk.fd)
        for at, raw in bat_sector_writes(
            lambda at: os.pread(disk.fd, SECTOR, at), header.table_offset, entries
        ):
            write_all(disk.fd, raw, at)
        self._sync()
        bat = self._bat()
        count = len(bat)
        for block, value in entries.items():
            if block < count:
                bat.entries[block] = value
        # The Disk caches bitmaps by entry: a moved block's old place may now hold another's.
        self._disk._forget_bitmaps()

    def flush_bat(self, *, durable: bool) -> None:
        """Write the BAT sectors that the Disk changed in memory (its allocations and discards):
        the data and bitmaps first, synced, then the sectors (rule 2)."""
        disk = self._disk
        if durable:
            os.fdatasync(disk.fd)
        bat = self._bat()
        if not bat.dirty:
            return
        header = disk.header
        assert header is not None
        sectors = bat.take_dirty()
        try:
            for sector in sectors:
                write_all(disk.fd, bat.sector_bytes(sector), header.table_offset + sector * SECTOR)
            if durable:
                os.fdatasync(disk.fd)
        except BaseException:
            bat.mark_dirty(sectors)
            raise

    # -- header and footers ------------------------------------------------------------

    def write_header(self, header: DynamicHeader, *, sync: bool = True) -> None:
        """The dynamic header in place (at the footer's data offset)."""
        disk = self._disk
        write_all(disk.fd, header.build(), disk.footer.data_offset)
        if sync:
            self._sync()
        disk._adopt_metadata(header=header)

    def write_footers(self, footer: Footer, at: int) -> None:
        """The trailing footer at ``at``, then the copy at offset 0 (rule 4; a fixed disk has no
        copy: its offset 0 is guest data).  The in-memory BAT follows a changed disk size (its
        new entries must be unallocated on disk already)."""
        disk = self._disk
        raw = footer.build()
        write_all(disk.fd, raw, at)
        self._sync()
        if disk.type != DiskType.FIXED:
            write_all(disk.fd, raw, 0)
            self._sync()
        disk._adopt_metadata(footer=footer, footer_offset=at)

    def write_footer_copy(self) -> None:
        """The footer copy at offset 0 from the current footer."""
        write_all(self._disk.fd, self._disk.footer.build(), 0)
        self._sync()

    def move_footer(self, at: int, *, clear_old: bool = True, footer: Footer | None = None) -> None:
        """The trailing footer (the current one, or ``footer``) written at ``at`` (past the old
        one) and synced; the old one, now inside the file, is zeroed and synced (rule 1: the
        zeros are durable before anything is placed over them)."""
        disk = self._disk
        old = disk.footer_offset
        write_all(disk.fd, (disk.footer if footer is None else footer).build(), at)
        self._sync()
        if clear_old and old < at:
            write_zeros(disk.fd, old, min(FOOTER_SIZE, at - old))
            self._sync()
        disk._adopt_metadata(footer=footer, footer_offset=at)

    def cut(self, end: int, footer: Footer | None = None) -> None:
        """The trailing footer written at ``end``, synced, then the file cut after it (rule 3)."""
        disk = self._disk
        footer = disk.footer if footer is None else footer
        write_all(disk.fd, footer.build(), end)
        self._sync()
        os.ftruncate(disk.fd, end + FOOTER_SIZE)
        self._sync()
        disk._adopt_metadata(footer=footer, footer_offset=end, file_size=end + FOOTER_SIZE)

    # -- block placement ---------------------------------------------------------------

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy ``length`` file bytes from ``src`` to ``dst`` (unsynced: the caller syncs the
        copies before pointing at them, rule 2)."""
        fd = self._disk.fd
        pos = 0
        while pos < length:
            n = min(_COPY_CHUNK, length - pos)
            write_all(fd, read_exact(fd, n, src + pos), dst + pos)
            pos += n

    def unallocate_entries(self, first: int, end: int) -> None:
        """Write the on-disk BAT entries from index ``first`` to the table's byte offset ``end``
        as unallocated (0xFF), synced: the entries a larger table adds before any reader may
        count them (the in-memory table takes them with the new size, :meth:`write_footers`)."""
        header = self._disk.header
        assert header is not None
        start = header.table_offset + first * 4
        if end > start:
            self.write_raw([(start, b"\xff" * (end - start))])

    def write_bitmaps(self, writes: Iterable[tuple[int, bytes]], *, sync: bool = True) -> None:
        """Positioned writes of sector bitmaps (a sync after them when ``sync``); the Disk drops
        the bitmaps it cached, so it reads what is now on disk."""
        self.write_raw(writes, sync=sync)
        self._disk._forget_bitmaps()

    def write_raw(self, writes: Iterable[tuple[int, bytes]], *, sync: bool = True) -> None:
        """Positioned writes of metadata payloads (locator data, bitmaps, and the records of a
        repair plan), then a sync."""
        for at, data in writes:
            write_all(self._fd, data, at)
        if sync:
            self._sync()

    def truncate(self, end: int) -> None:
        """Cut the file at ``end`` and sync; the caller has written the footer that ends it
        there and synced it first (rule 3: :meth:`cut` does both for an open Disk)."""
        os.ftruncate(self._fd, end)
        self._sync()
