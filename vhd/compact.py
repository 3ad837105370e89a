"""Compaction (``vhd compact``; Hyper-V's Optimize-VHD, ``VBoxManage modifymedium --compact``).

Spec parts: "Block Allocation Table and Data Blocks" and the sector bitmap.  Blocks that hold
nothing are unallocated: in a dynamic disk a block with no bitmap bit set or whose data is all
zeros; in a differencing child only a block with no bit set (its zeros hide the parent's data).
The remaining blocks are moved down, in file order, to close the gaps (their data stays 4 KiB-
aligned, as Hyper-V lays blocks out); then the trailing footer is written after the last block and
the file is cut there.

Crash safety: the BAT entries of empty blocks are unallocated first (synced), which changes no
guest byte.  A block is copied only into space that no on-disk BAT entry references; after a
batch of copies is synced, the BAT entries are switched to the copies and synced, and only then is
the old space reused as a target.  So at every moment each on-disk BAT entry points at a complete
copy of its block.  The footer is written at its new place before the file is cut; a crash before
the cut leaves orphan space that ``vhd check --repair`` removes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from . import bitmap as bm
from .bat import UNUSED
from .disk import SparseDisk, first_data_byte
from .errors import CorruptImageError, InvalidArgumentError
from .fileio import read_exact
from .footer import DiskType
from .image import open as open_image
from .metadata import MetadataWriter, metadata_end
from .newfile import naming
from .record import FrozenRecord, fill
from .vhdx import probe_vhdx

SECTOR = 512
PAGE = 4096

Progress = Callable[[int, int], None]


class CompactResult(FrozenRecord):
    _fields = ("path", "size_before", "size_after", "blocks_freed", "blocks_moved")
    __slots__ = _fields
    path: str
    size_before: int
    size_after: int
    blocks_freed: int
    blocks_moved: int

    def __init__(
        self, path: str, size_before: int, size_after: int, blocks_freed: int, blocks_moved: int
    ) -> None:
        fill(self, path, size_before, size_after, blocks_freed, blocks_moved)

    @property
    def reclaimed(self) -> int:
        return self.size_before - self.size_after


def compact(path: str | os.PathLike[str], *, progress: Progress | None = None) -> CompactResult:
    spath = os.fspath(path)
    with naming(spath):
        if probe_vhdx(spath):  # the VHDX layout is compacted by vhd.vhdx.ops
            from .vhdx.ops import compact as compact_vhdx

            return CompactResult(spath, *compact_vhdx(spath, progress))
        return _compact(spath, progress)


def _compact(spath: str, progress: Progress | None) -> CompactResult:
    disk = open_image(spath, "r+", open_parent=False)
    try:
        if not isinstance(disk, SparseDisk):
            raise InvalidArgumentError(
                f"{spath} is a fixed disk: only dynamic and differencing disks can be compacted"
            )
        before = os.fstat(disk.fd).st_size
        freed = _free_empty_blocks(disk, progress)
        moved, end = _pack(disk)
        if end < disk.footer_offset:
            MetadataWriter(disk).cut(end)
        after = os.fstat(disk.fd).st_size
        return CompactResult(spath, before, after, freed, moved)
    finally:
        disk.close()


def _free_empty_blocks(disk: SparseDisk, progress: Progress | None) -> int:
    header = disk.header
    assert header is not None
    bs = header.block_size
    spb = bs // SECTOR
    used_bytes = (spb + 7) // 8
    differencing = disk.type == DiskType.DIFFERENCING
    allocated = list(disk.bat.allocated())
    empty: dict[int, int] = {}
    for n, (block, entry) in enumerate(allocated):
        needed = min(bs, disk.size - block * bs)
        bits = read_exact(disk.fd, used_bytes, entry * SECTOR, path=disk.path)
        sectors = -(-needed // SECTOR)
        nothing = not bm.any_set(bits, sectors)
        if nothing or (
            not differencing and first_data_byte(disk, block * bs, block * bs + needed) is None
        ):
            empty[block] = UNUSED
        if progress is not None:
            progress(n + 1, len(allocated))
    MetadataWriter(disk).set_bat_entries(empty)
    return len(empty)


def _pack(disk: SparseDisk) -> tuple[int, int]:
    """Move blocks down over free space; returns (blocks moved, end of the last block)."""
    header = disk.header
    assert header is not None
    bs, bmb = header.block_size, header.bitmap_bytes
    align = PAGE if bs >= PAGE else SECTOR
    limit = disk.footer_offset
    blocks = sorted((entry * SECTOR, block) for block, entry in disk.bat.allocated())
    pos = metadata_end(disk.footer, header)
    writer = MetadataWriter(disk)
    pending: list[tuple[int, int, int, int]] = []  # (block, src, dst, length)
    moved = 0

    def commit_batch() -> None:
        if not pending:
            return
        writer.set_bat_entries({b: dst // SECTOR for b, _s, dst, _n in pending}, data_first=True)
        pending.clear()

    for src, block in blocks:
        length = min(bmb + bs, limit - src)
        if length <= bmb:
            raise CorruptImageError(
                f"block {block} lies outside the data area; run 'vhd check --repair'",
                path=disk.path,
            )
        dst = -(-(pos + bmb) // align) * align - bmb
        if dst + length > src:
            # No room below without overlapping the block itself: leave it where it is.
            pos = max(pos, src + length)
            continue
        if any(dst < s + n and dst + length > s for _b, s, _d, n in pending):
            commit_batch()
        writer.copy(src, dst, length)
        pending.append((block, src, dst, length))
        moved += 1
        pos = dst + length
    commit_batch()
    end = pos
    for _src, block in blocks:
        entry = disk.bat[block]
        end = max(end, entry * SECTOR + min(bmb + bs, limit - entry * SECTOR))
    return moved, -(-end // SECTOR) * SECTOR
