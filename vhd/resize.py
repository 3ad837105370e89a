"""Resizing images (``vhd resize``; Hyper-V's Resize-VHD): grow fixed, dynamic and differencing
disks, and shrink them when no data lies past the new end (or when forced).

The footer's *current size* changes, with the geometry and checksums; the *original size* stays
what it was at creation, as the spec defines it (note: libvhdi sizes disks from the original
size, so it keeps showing the old size).  The geometry is recomputed as :func:`vhd.create` does.

Order of the writes, and why no flushed write can be lost (each numbered step is synced before
the next; "consistent" means ``vhd check`` finds nothing worse than notes and repairable
warnings, and every guest byte reads as before):

**Fixed, grow.**  1. a footer that still gives the old size is written at the new end (the file
grows; the new space is a hole that reads as zeros); 2. the old footer, now in that space, is
zeroed; 3. the footer at the new end gets the new size.  After 1 or 2 the image is the old disk
with stray bytes before its footer (``vhd check --repair`` cuts them); after 3 it is the new disk,
whose new space reads as zeros.

**Fixed, shrink.**  1. the new footer is written at the new end (over data verified to be zero,
or given up with ``force``); 2. the file is cut after it.  Until 2 the old footer still ends the
file, so a crash leaves the old, valid image.

**Dynamic/differencing, grow.**  When the BAT must grow past the space before the first item
after it, that item (data blocks, locator payloads) is relocated to the end of the file first, as
Hyper-V does: 1. the trailing footer moves to the new end of file; 2. the blocks' bitmaps and data
(and the locator payloads) are copied there and synced; 3. only then do the BAT entries (and the
header's locator entries) point at the copies.  A crash before 3 leaves the old copies in use
and orphan space that ``vhd check --repair`` cuts.  Then 4. the new BAT entries are written as
unallocated; 5. the header gets the new table size; 6. the trailing footer gets the new size;
7. the footer copy at offset 0.  Before 6 the image has its old size (a BAT larger than needed is
only a note); between 6 and 7 the two footers differ, which ``vhd check --repair`` mends.

**Dynamic/differencing, shrink.**  1. both footers get the new size (entries past it are
then ignored by every reader); 2. those entries are unallocated, 3. the header gets the new table
size, 4. the bitmap bits past the new end are cleared, 5. unreferenced space at the end of the
file is cut (the footer is written at its new place before the cut).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from . import bitmap as bm
from .bat import MAX_ENTRIES, UNUSED
from .chain import ParentPolicy
from .children import find_parent
from .disk import Disk, FixedDisk, SparseDisk, first_data_byte
from .errors import CorruptImageError, InvalidArgumentError, UnsupportedFeatureError
from .fileio import punch_hole, read_exact
from .footer import (
    CREATOR_APP,
    CREATOR_VERSION,
    QEMU_CURRENT_SIZE_CREATORS,
    DiskType,
    Footer,
)
from .geometry import geometry_for_create
from .header import HEADER_SIZE
from .image import open as open_image
from .layout import MAX_SIZE, locator_extent, table_end
from .metadata import MetadataWriter, metadata_end
from .newfile import naming
from .record import FrozenRecord, fill
from .vhdx import probe_vhdx

SECTOR = 512
PAGE = 4096
_COPY_CHUNK = 4 * 1024 * 1024


class ResizeResult(FrozenRecord):
    _fields = ("path", "old_size", "new_size", "relocated_blocks", "dropped_blocks")
    __slots__ = _fields
    path: str
    old_size: int
    new_size: int
    relocated_blocks: int
    dropped_blocks: int

    def __init__(
        self, path: str, old_size: int, new_size: int, relocated_blocks: int, dropped_blocks: int
    ) -> None:
        fill(self, path, old_size, new_size, relocated_blocks, dropped_blocks)


def resize(
    path: str | os.PathLike[str],
    new_size: int,
    *,
    shrink: bool = False,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    parent_dirs: Sequence[str] = (),
    parent_policy: ParentPolicy | None = None,
) -> ResizeResult:
    """Change the guest size of the image at ``path`` to ``new_size`` bytes.  ``progress(done,
    total)`` follows the bytes of the blocks a growing dynamic disk moves out of the BAT's way.

    Growing a differencing disk opens its parent (read-only, found as :func:`vhd.open` finds
    it under ``parent_policy``, also in ``parent_dirs``): where the parent holds data in the new
    range, the child must hide it."""
    policy = (parent_policy or ParentPolicy()).with_dirs(parent_dirs)
    spath = os.fspath(path)
    with naming(spath):
        if probe_vhdx(spath):  # the VHDX layout is resized by vhd.vhdx.ops
            from .vhdx.ops import resize as resize_vhdx

            old, dropped = resize_vhdx(
                spath,
                new_size,
                shrink=shrink,
                force=force,
                parent_dirs=parent_dirs,
                parent_policy=policy,
            )
            return ResizeResult(spath, old, new_size, 0, dropped)
        return _resize(spath, new_size, shrink, force, progress, policy)


def _resize(
    spath: str,
    new_size: int,
    shrink: bool,
    force: bool,
    progress: Callable[[int, int], None] | None,
    policy: ParentPolicy,
) -> ResizeResult:
    if new_size <= 0 or new_size % SECTOR:
        raise InvalidArgumentError(f"the new size {new_size} is not a positive multiple of 512")
    if new_size > MAX_SIZE:
        raise InvalidArgumentError(f"{new_size} bytes is larger than the VHD maximum of 2040 GiB")
    disk = open_image(spath, "r+", open_parent=False)
    try:
        old = disk.size
        if new_size < old and not shrink:
            raise InvalidArgumentError(
                f"{new_size} is smaller than the current size {old}: pass --shrink to shrink"
            )
        if new_size == old:
            return ResizeResult(spath, old, old, 0, 0)
        footer = disk.footer.replace(current_size=new_size)
        geo = geometry_for_create(new_size)
        footer = footer.replace(cylinders=geo.cylinders, heads=geo.heads, sectors=geo.sectors)
        if footer.creator_app not in QEMU_CURRENT_SIZE_CREATORS:
            # qemu would size this creator's disk by the new C*H*S, a little short of new_size:
            # the resized disk gets vhdkit's creator, which qemu sizes by the current size.
            footer = footer.replace(creator_app=CREATOR_APP, creator_version=CREATOR_VERSION)
        if isinstance(disk, FixedDisk):
            _resize_fixed(disk, spath, old, new_size, footer, force)
            return ResizeResult(spath, old, new_size, 0, 0)
        assert isinstance(disk, SparseDisk)
        assert disk.header is not None
        if -(-new_size // disk.header.block_size) > MAX_ENTRIES:
            # vhd.open refuses tables past this bound: growing past it would lock the user out.
            raise InvalidArgumentError(
                f"a {new_size}-byte disk of {disk.header.block_size}-byte blocks needs more than "
                f"{MAX_ENTRIES} blocks, the most vhdkit opens"
            )
        if new_size > old:
            hide: list[tuple[int, int]] = []
            if disk.type == DiskType.DIFFERENCING:
                hide = _parent_data(disk, old, new_size, policy)
            moved = _grow_sparse(disk, new_size, footer, hide, progress)
            return ResizeResult(spath, old, new_size, moved, 0)
        dropped = _shrink_sparse(disk, new_size, footer, force)
        return ResizeResult(spath, old, new_size, 0, dropped)
    finally:
        disk.close()


# -- fixed ---------------------------------------------------------------------------------


def _resize_fixed(
    disk: FixedDisk, path: str, old: int, new: int, footer: Footer, force: bool
) -> None:
    writer = MetadataWriter(disk)
    if new > old:
        # 1. A footer still saying the old size goes to the new end: the bytes between are not
        # guest data yet, so the old footer there can be zeroed (2) before the size changes (3).
        geo = geometry_for_create(old)  # a geometry within the old size, as check wants it
        with_old_size = footer.replace(
            current_size=old, cylinders=geo.cylinders, heads=geo.heads, sectors=geo.sectors
        )
        writer.move_footer(new, footer=with_old_size)
        writer.write_footers(footer, new)  # (a fixed disk: the trailing footer only)
        return
    if not force:
        at = _first_nonzero(disk.fd, new, old)
        if at is not None:
            raise InvalidArgumentError(
                f"data lies past the new end (first non-zero byte at {at:#x}); pass --force to "
                "drop it",
                path=path,
            )
    writer.cut(new, footer)


def _first_nonzero(fd: int, start: int, end: int) -> int | None:
    """First non-zero byte of the file in [start, end), skipping holes."""
    pos = start
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return None
        if pos >= end:
            return None
        hole = min(end, os.lseek(fd, pos, os.SEEK_HOLE))
        while pos < hole:
            n = min(_COPY_CHUNK, hole - pos)
            chunk = os.pread(fd, n, pos)
            stripped = chunk.lstrip(b"\0")
            if stripped:
                return pos + len(chunk) - len(stripped)
            pos += n
    return None


# -- sparse: shared helpers ----------------------------------------------------------------


# -- sparse: grow --------------------------------------------------------------------------


def _grow_sparse(
    disk: SparseDisk,
    new_size: int,
    footer: Footer,
    hide: list[tuple[int, int]],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    header = disk.header
    assert header is not None
    bs = header.block_size
    bmb = header.bitmap_bytes
    old_count = len(disk.bat)
    new_count = -(-new_size // bs)
    table = header.table_offset
    if disk.footer.data_offset > table:
        raise UnsupportedFeatureError(
            "the dynamic header lies after the BAT; vhdkit cannot grow this layout", path=disk.path
        )
    need_end = table_end(header.replace(max_table_entries=new_count))
    moved = 0
    writer = MetadataWriter(disk)
    footer_at = disk.footer_offset
    # What lies in the space the larger BAT needs: blocks and locator payloads move to the end.
    blocks = [
        (block, entry)
        for block, entry in disk.bat.allocated()
        if entry * SECTOR < need_end and entry * SECTOR + bmb + bs > table
    ]
    # (A locator's payload is the region vhd check and compact see: locator_extent.)
    locators = [
        (slot, loc, extent)
        for slot, loc in enumerate(header.locators)
        if (extent := locator_extent(loc))
        and loc.data_offset < need_end
        and loc.data_offset + extent > table
    ]
    if blocks or locators:
        align = PAGE if bs >= PAGE else SECTOR
        pos = -(-footer_at // SECTOR) * SECTOR
        plan_blocks: list[tuple[int, int, int]] = []  # (block, old start, new start)
        for block, entry in blocks:
            data = -(-(pos + bmb) // align) * align
            plan_blocks.append((block, entry * SECTOR, data - bmb))
            pos = data + bs
        plan_locs: list[tuple[int, int]] = []  # (slot, new offset)
        for slot, _loc, extent in locators:
            plan_locs.append((slot, pos))
            pos += -(-extent // SECTOR) * SECTOR
        # 1. The trailing footer (old size still) moves to the new end first; the old one, now
        # inside the relocated area, is zeroed so no scan mistakes it.
        writer.move_footer(pos)
        footer_at = pos
        # 2. Copies, synced.
        for done, (_block, src, dst) in enumerate(plan_blocks, 1):
            writer.copy(src, dst, bmb + bs)
            if progress is not None:
                progress(done * (bmb + bs), len(plan_blocks) * (bmb + bs))
        new_locs = list(header.locators)
        for slot, dst in plan_locs:
            loc = header.locators[slot]
            if loc.data_len:
                writer.copy(loc.data_offset, dst, loc.data_len)
            new_locs[slot] = loc.__class__(
                code=loc.code,
                data_space=loc.data_space,
                data_len=loc.data_len,
                reserved=loc.reserved,
                data_offset=dst,
            )
        os.fsync(disk.fd)
        # 3. Point at the copies.
        writer.set_bat_entries({b: dst // SECTOR for b, _src, dst in plan_blocks})
        if plan_locs:
            header = header.replace(locators=tuple(new_locs))
            writer.write_header(header)
        moved = len(plan_blocks)
    # Any other thing still in the way (the trailing footer of a disk with no blocks)?
    if footer_at < need_end:
        # (The old footer lies where the new entries go: step 4 overwrites it.)
        writer.move_footer(need_end, clear_old=False)
        footer_at = need_end
    _check_room(disk, table, need_end)
    # 4. New entries, unallocated.
    writer.unallocate_entries(old_count, need_end)
    # 4b. The new range must read as zeros (below).  Still at the old size: nothing shows yet.
    footer_at = _zero_new_range(disk, disk.size, new_size, hide, footer_at)
    # 5. Header, 6-7. footers.
    writer.write_header(header.replace(max_table_entries=new_count))
    writer.write_footers(footer, footer_at)
    return moved


def _parent_data(
    disk: SparseDisk, old: int, new: int, policy: ParentPolicy
) -> list[tuple[int, int]]:
    """The ranges of [old, new) where the parent chain of ``disk`` holds data."""
    with find_parent(disk, policy) as parent:
        end = min(new, parent.size)
        if end <= old:
            return []
        return [(e.offset, e.end) for e in parent.extents(old, end - old) if e.layer is not None]


def _zero_new_range(
    disk: SparseDisk, old: int, new: int, hide: list[tuple[int, int]], footer_at: int
) -> int:
    """Make guest bytes [old, new) read as zeros; returns the trailing footer's offset.

    A disk shrunk earlier (by vhdkit or another tool) may keep old data past its end in its
    last block, and a differencing disk reads its parent wherever a bitmap bit is clear: after
    a shrink and a grow, that would bring old data back (QEMU reads zeros there).  So:

    * the last old block, if allocated, has its data past ``old`` punched out (zeros), and for
      a differencing disk its bits there set (zeros, not the parent);
    * a differencing disk gets new blocks, bits set, data left as file holes, wherever the
      parent holds data in ``hide``: the usual way a VHD says "zeros, not the parent", which
      every reader understands.  Blocks are placed as the core allocates them: the trailing
      footer moves first, then the bitmaps are written, then the BAT entries point at them.
    """
    writer = MetadataWriter(disk)
    header = disk.header
    assert header is not None
    bs, bmb = header.block_size, header.bitmap_bytes
    spb = bs // SECTOR
    differencing = disk.type == DiskType.DIFFERENCING
    # block -> (first sector, end sector) to mark, within the block
    marks: dict[int, tuple[int, int]] = {}
    last = (old - 1) // bs
    if old % bs and disk.bat[last] != UNUSED:
        entry = disk.bat[last]
        full_end = entry * SECTOR + bmb + bs
        if full_end > footer_at:
            # Some creators give the last block only the space the old size needs; it now
            # needs all of it, so the trailing footer moves out of its way first.
            if any(
                b != last and footer_at <= e * SECTOR < full_end for b, e in disk.bat.allocated()
            ):
                raise UnsupportedFeatureError(
                    f"the last block ({last}) is cut short by the block after it; vhdkit cannot "
                    "grow this layout",
                    path=disk.path,
                )
            new_at = -(-full_end // SECTOR) * SECTOR
            writer.move_footer(new_at)
            footer_at = new_at
        first = (old - last * bs) // SECTOR
        end = min(spb, -(-(new - last * bs) // SECTOR))
        punch_hole(disk.fd, entry * SECTOR + bmb + first * SECTOR, (end - first) * SECTOR)
        if differencing:
            marks[last] = (first, end)
    for start, stop in hide:
        for block in range(start // bs, -(-stop // bs)):
            a = max(start, block * bs) - block * bs
            z = min(stop, (block + 1) * bs) - block * bs
            lo, hi = a // SECTOR, -(-z // SECTOR)
            if block in marks:
                lo, hi = min(lo, marks[block][0]), max(hi, marks[block][1])
            marks[block] = (lo, hi)
    if not marks:
        os.fsync(disk.fd)
        return footer_at
    existing = {b: r for b, r in marks.items() if b < len(disk.bat) and disk.bat[b] != UNUSED}
    fresh = sorted(b for b in marks if b not in existing)
    bitmaps: list[tuple[int, bytes]] = []
    for block, (lo, hi) in existing.items():
        raw = bytearray(read_exact(disk.fd, bmb, disk.bat[block] * SECTOR))
        bm.set_range(raw, lo, hi)
        bitmaps.append((disk.bat[block] * SECTOR, bytes(raw)))
    writer.write_bitmaps(bitmaps, sync=False)
    # New blocks after the trailing footer, data aligned as the core aligns it.
    align = PAGE if bs >= PAGE else SECTOR
    pos = -(-footer_at // SECTOR) * SECTOR
    placed: dict[int, int] = {}
    for block in fresh:
        data = -(-(pos + bmb) // align) * align
        placed[block] = data - bmb
        pos = data + bs
    if placed:
        writer.move_footer(pos)  # the file always ends in a footer
        fresh_bits: list[tuple[int, bytes]] = []
        for block, at in placed.items():
            bits = bytearray(bmb)
            bm.set_range(bits, *marks[block])
            fresh_bits.append((at, bytes(bits)))
        writer.write_bitmaps(fresh_bits, sync=False)
    os.fsync(disk.fd)
    if placed:
        writer.set_bat_entries({b: at // SECTOR for b, at in placed.items()})
        footer_at = pos
    return footer_at


def _check_room(disk: SparseDisk, table: int, need_end: int) -> None:
    header = disk.header
    assert header is not None
    bmb, bs = header.bitmap_bytes, header.block_size
    for block, entry in disk.bat.allocated():
        if entry * SECTOR < need_end and entry * SECTOR + bmb + bs > table:
            raise CorruptImageError(f"block {block} is still in the BAT's way", path=disk.path)
    if table < disk.footer.data_offset + HEADER_SIZE and need_end > disk.footer.data_offset:
        raise CorruptImageError("the BAT would overlap the header", path=disk.path)


# -- sparse: shrink ------------------------------------------------------------------------


def _shrink_sparse(disk: SparseDisk, new_size: int, footer: Footer, force: bool) -> int:
    header = disk.header
    assert header is not None
    bs = header.block_size
    bmb = header.bitmap_bytes
    new_count = -(-new_size // bs)
    if not force:
        refuse_data_past(disk, new_size)
    writer = MetadataWriter(disk)
    dropped = {b: UNUSED for b, _ in disk.bat.allocated() if b >= new_count}
    # 1. Both footers get the new size.
    writer.write_footers(footer, disk.footer_offset)
    # 2. Entries past the new end are unallocated.
    writer.set_bat_entries(dropped)
    # 3. Header.
    writer.write_header(header.replace(max_table_entries=new_count))
    # 4. Bits past the new end in the last block.
    last = new_count - 1
    entry = disk.bat[last]
    spb = bs // SECTOR
    keep = -(-(new_size - last * bs) // SECTOR)
    if entry != UNUSED and keep < spb:
        raw = bytearray(read_exact(disk.fd, bmb, entry * SECTOR))
        if bm.set_range(raw, keep, spb, False):
            writer.write_bitmaps([(entry * SECTOR, bytes(raw))])
    # 5. Cut unreferenced space at the end.
    end = metadata_end(disk.footer, header, table_entries=new_count)
    for block, entry in disk.bat.allocated():
        if block < new_count:
            end = max(end, entry * SECTOR + bmb + bs)
    end = -(-end // SECTOR) * SECTOR
    if end < disk.footer_offset:
        writer.cut(end)
    return len(dropped)


def refuse_data_past(disk: Disk, new_size: int) -> None:
    """Refuse a shrink (without ``force``) that would drop data the disk itself holds past
    ``new_size`` (VHD and VHDX)."""
    at = first_data_byte(disk, new_size, disk.size)
    if at is not None:
        raise InvalidArgumentError(
            f"data lies past the new end (non-zero data at guest offset {at:#x}); "
            "pass --force to drop it",
            path=disk.path,
        )
