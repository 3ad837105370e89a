"""Maintenance of VHDX files (MS-VHDX 1.0): ``vhd compact``, ``vhd resize``, ``vhd set-parent``
and the relinking ``vhd commit`` does.  Spec parts: 2.2.2 header update (FileWriteGuid,
DataWriteGuid), 2.2.3 region table, 2.3 log, 2.5 BAT, 2.6.2.2 virtual disk size, 2.6.2.6 parent
locator.

Every metadata change (BAT entries, sector bitmaps, the virtual disk size, the parent locator and
the metadata table, the region tables) goes through the log as one transaction of 4 KiB pages
(:meth:`VHDXDisk._log_pages`, the same steps as :meth:`VHDXDisk.flush`: data synced, entries
written and synced, header names the log, pages written in place and synced, log cleared), so a
crash at any point leaves either the old or the new metadata.  The open disk takes each change
in through its own methods (this module assigns none of its state).  Data that a transaction will name (a moved block,
a relocated BAT) is written to space no on-disk entry names and synced before the transaction.

GUIDs: an operation that leaves the guest-visible data as it was (a compaction, a retarget)
changes the FileWriteGuid only, so children of the disk still accept it as their parent
(parent_linkage names the DataWriteGuid); a resize changes the disk (its size), so it gets a new
DataWriteGuid too, as any write does.
"""

from __future__ import annotations

import contextlib
import errno
import ntpath
import os
from collections.abc import Callable, Sequence

from ..chain import ParentPolicy
from ..disk import Disk, first_data_byte
from ..errors import CorruptImageError, InvalidArgumentError, VHDError
from ..fileio import punch_hole, read_upto, write_all
from ..footer import DiskType
from ..guid import Guid
from . import placement
from . import records as r
from .disk import VHDXDisk, bat_entries, open_vhdx, parent_candidates, parent_linkages

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (vhd.record)
if TYPE_CHECKING:
    from ..guid import AnyGuid

MiB = r.MiB
PAGE = r.LOG_SECTOR
_CHUNK = 4 * MiB

Progress = Callable[[int, int], None]


# -- sessions and log transactions ---------------------------------------------------------


def metadata_session(disk: VHDXDisk) -> None:
    """Before a change that keeps the guest-visible data (2.2.2): a new FileWriteGuid in both
    header copies, the DataWriteGuid kept, so the disk's children still accept it."""
    disk._begin_session(keep_data=True)


def data_session(disk: VHDXDisk, data_write_guid: AnyGuid) -> None:
    """Begin the disk's write session (2.2.2) with the DataWriteGuid the caller chose, so that
    a child can be told the new identity before the parent's data changes (a commit)."""
    disk._begin_session(data_write_guid)


class Pages:
    """4 KiB pages of the file being changed for one transaction: read once, edited in memory."""

    def __init__(self, disk: VHDXDisk) -> None:
        self._fd = disk.fd
        self._pages: dict[int, bytearray] = {}
        self._old: dict[int, bytes] = {}

    def put(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            at = offset + pos
            base = at - at % PAGE
            page = self._pages.get(base)
            if page is None:
                old = read_upto(self._fd, PAGE, base).ljust(PAGE, b"\0")
                self._old[base] = old
                page = self._pages[base] = bytearray(old)
            n = min(len(data) - pos, base + PAGE - at)
            page[at - base : at - base + n] = data[pos : pos + n]
            pos += n

    def changed(self) -> list[tuple[int, bytes]]:
        return [(o, bytes(p)) for o, p in sorted(self._pages.items()) if p != self._old[o]]


def _metadata_entry(disk: VHDXDisk, item: AnyGuid) -> r.MetadataEntry:
    for e in disk.metadata.entries:
        if e.item_id == item:
            return e
    raise CorruptImageError(f"the metadata item {r.KNOWN_ITEMS.get(item, item)} is missing")


# -- parents and children ------------------------------------------------------------------


def linkages(disk: VHDXDisk) -> set[AnyGuid]:
    out: set[AnyGuid] = set()
    for text in parent_linkages(disk):
        with contextlib.suppress(ValueError):
            out.add(Guid.parse(text))
    return out


def find_parent(child: VHDXDisk, policy: ParentPolicy) -> Disk:
    """The parent of ``child`` (opened without it), read-only, found as an open finds it."""
    from .disk import _open_parent

    st = os.fstat(child.fd)
    return _open_parent(child, None, policy, False, frozenset({(st.st_dev, st.st_ino)}))


def is_child_of(path: str, want: AnyGuid, me: os.stat_result, search_dirs: Sequence[str]) -> bool:
    """Whether the VHDX at ``path`` is a differencing disk whose parent is the file ``me``
    (identity ``want``): it records ``want`` and its first candidate with that identity is
    ``me``, as an open would pick it."""
    from ..lineage import identity_of_file
    from .disk import probe_vhdx

    if not probe_vhdx(path):
        return False
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino) or st.st_size < 4 * MiB:
            return False
        with open_vhdx(path, "r", open_parent=False, force_share=True) as child:
            if child.type != DiskType.DIFFERENCING or want not in linkages(child):
                return False
            for _key, candidate in parent_candidates(child, search_dirs):
                with contextlib.suppress(OSError):
                    cst = os.stat(candidate)
                    if (cst.st_dev, cst.st_ino) == (me.st_dev, me.st_ino):
                        return True
                    if identity_of_file(candidate) == want:
                        return False  # another file with the parent's identity comes first
    except (OSError, VHDError):
        return False
    return False


def locator_for(child_path: str, parent_path: str, ident: AnyGuid) -> r.ParentLocator:
    """parent_linkage and the three paths, in Hyper-V's forms (2.6.2.6.3)."""
    here = os.path.dirname(os.path.abspath(child_path))
    target = os.path.abspath(parent_path)
    rel = os.path.relpath(target, here).replace("/", "\\")
    if not rel.startswith("."):
        rel = ".\\" + rel
    # Linux paths have no drive letter or volume GUID; the absolute path is kept in Win32 form
    # under a drive-less "\\?\" prefix so Windows tools see a well-formed (if foreign) path.
    win = ntpath.normpath(target.replace("/", "\\"))
    return r.ParentLocator(
        r.VHDX_PARENT_LOCATOR_TYPE,
        {
            "parent_linkage": "{" + str(ident).lower() + "}",
            "relative_path": rel,
            "volume_path": "\\\\?\\" + win.lstrip("\\"),
            "absolute_win32_path": "\\\\?\\" + win.lstrip("\\"),
        },
    )


def _write_locator(child: VHDXDisk, locator: r.ParentLocator) -> None:
    """Replace the parent locator item (and its metadata table entry) in one log transaction:
    in place when it fits the old item's space, else after the last item of the region."""
    md = child.metadata
    region = child.layout.metadata_region
    old = _metadata_entry(child, r.PARENT_LOCATOR)
    blob = locator.build()
    at = old.offset
    if len(blob) > old.length:
        at = max(e.offset + e.length for e in md.entries)
        at += -at % 8
        if at + len(blob) > region.length:
            raise InvalidArgumentError(
                "the new parent locator does not fit the metadata region", path=child.path
            )
    new = r.MetadataEntry(
        old.item_id, at, len(blob), old.is_user, old.is_virtual_disk, old.is_required
    )
    entries = [new if e is old else e for e in md.entries]
    pages = Pages(child)
    pages.put(region.file_offset + at, blob)
    pages.put(region.file_offset, r.build_metadata_table(entries))
    metadata_session(child)
    child._log_pages(pages.changed())
    child._adopt_parent_locator(tuple(entries), locator, blob)


def retarget(child: VHDXDisk, parent_path: str, ident: AnyGuid) -> list[str]:
    """Point the differencing ``child`` (open ``"r+"``) at ``parent_path``, whose identity is
    ``ident``: a new parent_linkage and all three paths (parent_linkage2, which would name the
    old parent, is dropped; other keys are kept)."""
    loc = child.metadata.parent_locator
    assert loc is not None
    new = locator_for(child.path, parent_path, ident)
    keep = {
        k: v
        for k, v in loc.entries.items()
        if k not in new.entries and k not in ("parent_linkage2",)
    }
    _write_locator(child, r.ParentLocator(loc.locator_type, {**new.entries, **keep}))
    return []


def accept_next_identity(child: VHDXDisk, current: AnyGuid, upcoming: AnyGuid) -> None:
    """Before a commit writes into the child's parent: parent_linkage names the parent's
    ``current`` DataWriteGuid and parent_linkage2 the ``upcoming`` one (2.6.2.6.3: the
    alternate linkage), in one transaction, so the child opens with its parent whether or not
    an interrupted commit changed the parent's identity."""
    loc = child.metadata.parent_locator
    assert loc is not None
    entries = dict(loc.entries)
    entries["parent_linkage"] = "{" + str(current).lower() + "}"
    entries["parent_linkage2"] = "{" + str(upcoming).lower() + "}"
    _write_locator(child, r.ParentLocator(loc.locator_type, entries))


def record_parent_identity(child: VHDXDisk, parent_path: str) -> None:
    """After the parent changed under a child that still reads the same through it (a commit
    into the parent with ``--keep``): parent_linkage names the parent's DataWriteGuid now, and
    the alternate linkage a commit added is dropped."""
    from ..lineage import identity_of_file

    ident = identity_of_file(parent_path)
    loc = child.metadata.parent_locator
    if ident is None or loc is None:
        return
    linkage = "{" + str(ident).lower() + "}"
    if loc.entries.get("parent_linkage", "").lower() == linkage and (
        "parent_linkage2" not in loc.entries
    ):
        return
    entries = {k: v for k, v in loc.entries.items() if k != "parent_linkage2"}
    entries["parent_linkage"] = linkage
    _write_locator(child, r.ParentLocator(loc.locator_type, entries))


# -- space ---------------------------------------------------------------------------------


def _reserved(disk: VHDXDisk) -> list[tuple[int, int]]:
    """[start, end) of the headers, the log and every region (1 MiB-aligned), in file order:
    space no block may be moved into (a BAT a resize moved to the end of the file included)."""
    h = disk.current_header
    spans = [(0, MiB), (h.log_offset, h.log_offset + h.log_length)]
    for table in disk.layout.region_tables:
        if table is not None:
            spans += [(reg.file_offset, reg.file_offset + reg.length) for reg in table.entries]
    return sorted((a - a % MiB, -(-z // MiB) * MiB) for a, z in spans)


def _reserved_end(disk: VHDXDisk) -> int:
    return max(z for _a, z in _reserved(disk))


def _free_from(pos: int, length: int, reserved: list[tuple[int, int]]) -> int:
    """The first offset from ``pos`` where ``length`` bytes overlap nothing reserved."""
    moved = True
    while moved:
        moved = False
        for a, z in reserved:
            if pos < z and pos + length > a:
                pos, moved = z, True
    return pos


# Low bytes whose state is 6 (FULLY_PRESENT / PRESENT) or 7 (PARTIALLY_PRESENT).
_WITH_SPACE = bytes(0xFF if b & r.STATE_MASK in (6, 7) else 0 for b in range(256))


def _blocks_in_file(disk: VHDXDisk) -> list[tuple[int, int, int]]:
    """(file offset, length, BAT index) of every payload and sector bitmap block with space."""
    ratio = disk._ratio
    count = bat_entries(disk.size, disk._bs, disk.logical_sector_size, disk._differencing)
    out = []
    # States 6 and 7 only (C-level passes, placement.flagged): Python steps per block with
    # space, not per entry (an empty 64 TiB disk of 1 MiB blocks has 64 Mi entries).
    for idx in placement.flagged(disk.bat, 0, min(count, len(disk.bat)), _WITH_SPACE):
        e = disk.bat[idx]
        state = e & r.STATE_MASK
        if idx % (ratio + 1) == ratio:
            if state == r.BitmapState.PRESENT:
                out.append((e & r.OFFSET_MASK, r.SECTOR_BITMAP_BLOCK_SIZE, idx))
        elif state in (r.PayloadState.FULLY_PRESENT, r.PayloadState.PARTIALLY_PRESENT):
            out.append((e & r.OFFSET_MASK, disk._bs, idx))
    out.sort()
    return out


def _cut(disk: VHDXDisk) -> None:
    """Cut the file after the last thing an entry or region names (1 MiB-aligned): called only
    once the entries that stopped naming the tail are durable."""
    end = _reserved_end(disk)
    for off, length, _idx in _blocks_in_file(disk):
        end = max(end, off + length)
    end = -(-end // MiB) * MiB
    if end < os.fstat(disk.fd).st_size:
        disk._truncate(end)


def _copy(fd: int, src: int, dst: int, length: int) -> None:
    """Copy [src, src+length) to dst (below it, not overlapping), holes kept as holes."""
    punch_hole(fd, dst, length)  # an old block there must not show through the holes
    pos = 0
    while pos < length:
        try:
            data = os.lseek(fd, src + pos, os.SEEK_DATA) - src
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                data = pos  # no SEEK_DATA: copy it all
            else:
                return
        if data >= length:
            return
        hole = min(os.lseek(fd, src + data, os.SEEK_HOLE) - src, length)
        if hole <= data:
            hole = length
        at = data
        while at < hole:
            n = min(_CHUNK, hole - at)
            write_all(fd, os.pread(fd, n, src + at), dst + at)
            at += n
        pos = hole


# -- compact -------------------------------------------------------------------------------


def compact(path: str, progress: Progress | None = None) -> tuple[int, int, int, int]:
    """Free the blocks that hold nothing, pack the rest down, cut the file.  Returns (size
    before, size after, blocks freed, blocks moved).

    Freed: a dynamic disk's FULLY_PRESENT blocks whose data is all zeros (NOT_PRESENT reads as
    zeros); a differencing disk's PARTIALLY_PRESENT blocks with no sector bit set (NOT_PRESENT
    reads the parent, as they did); sector bitmap blocks are kept (see below).  Moves: each block is copied into space no on-disk entry names and synced, then a
    log transaction points its entry there; space a move leaves is reused only after that."""
    disk = open_vhdx(path, "r+", open_parent=False)
    try:
        if disk.type == DiskType.FIXED:
            raise InvalidArgumentError(
                f"{path} is a fixed disk: only dynamic and differencing disks can be compacted"
            )
        before = os.fstat(disk.fd).st_size
        metadata_session(disk)
        freed_space = _free_empty(disk, progress)
        disk._log_pages()
        for off, length in freed_space:  # their entries are durable: give the space back
            punch_hole(disk.fd, off, length)
        moved = _pack(disk)
        _cut(disk)
        return before, os.fstat(disk.fd).st_size, len(freed_space), moved
    finally:
        disk.close()


def _free_empty(disk: VHDXDisk, progress: Progress | None) -> list[tuple[int, int]]:
    bs, ratio = disk._bs, disk._ratio
    blocks = -(-disk.size // bs)
    stride = ratio + 1
    freed: list[tuple[int, int]] = []
    # Only the blocks that can be empty are visited (placement.flagged: C-level passes over
    # the table's states), not every block: an empty 64 TiB disk of 1 MiB blocks has 64 Mi.
    state = r.PayloadState.PARTIALLY_PRESENT if disk._differencing else r.PayloadState.FULLY_PRESENT
    table = bytes(0xFF if b & r.STATE_MASK == state else 0 for b in range(256))
    stop = min(len(disk.bat), blocks + (blocks - 1) // ratio + 1 if blocks else 0)
    for idx in placement.flagged(disk.bat, 0, stop, table):
        if idx % stride == ratio:
            continue  # a sector bitmap entry (PRESENT has FULLY_PRESENT's value)
        b = idx - idx // stride
        e = disk.bat[idx]
        n = min(bs, disk.size - b * bs)
        if disk._differencing:
            empty = disk._block_bits(b) == 0
        else:
            empty = first_data_byte(disk, b * bs, b * bs + n) is None
        if empty:
            freed.append((e & r.OFFSET_MASK, bs))
            disk._set_entry(idx, int(r.PayloadState.NOT_PRESENT))
        if progress is not None:
            progress(b + 1, blocks)
    if progress is not None:
        progress(blocks, blocks)
    # Sector bitmap blocks stay, even for chunks left with no present block: libvhdi
    # (20210425) reads garbage for a differencing chunk whose bitmap block is NOT_PRESENT.
    return freed


def _pack(disk: VHDXDisk) -> int:
    """Move blocks down over free space, in file order; returns how many moved."""
    ratio = disk._ratio
    reserved = _reserved(disk)
    pos = 0
    pending: list[tuple[int, int, int, int]] = []  # (BAT index, src, dst, length)
    moved = 0

    def commit_batch() -> None:
        if not pending:
            return
        for idx, src, dst, _n in pending:
            e = disk.bat[idx]
            disk._set_entry(idx, dst | (e & ~r.OFFSET_MASK & 0xFFFFFFFFFFFFFFFF))
            if idx % (ratio + 1) == ratio:
                disk._forget_bitmap_block(src)
        disk._log_pages()  # syncs the copies first, then points the entries at them
        pending.clear()

    for src, length, idx in _blocks_in_file(disk):
        dst = _free_from(pos, length, reserved)
        if src < dst:
            pos = max(pos, src + length)  # nothing free below it: it stays
            continue
        if dst + length > src:
            pos = src + length  # no room below without overlapping itself: stays
            continue
        if any(dst < s + n and dst + length > s for _i, s, _d, n in pending):
            commit_batch()  # the space is still named by a durable entry until then
        _copy(disk.fd, src, dst, length)
        pending.append((idx, src, dst, length))
        moved += 1
        pos = dst + length
    commit_batch()
    return moved


# -- resize --------------------------------------------------------------------------------


def resize(
    path: str,
    new_size: int,
    *,
    shrink: bool,
    force: bool,
    parent_dirs: Sequence[str],
    parent_policy: ParentPolicy | None = None,
) -> tuple[int, int]:
    """Change the virtual size of the VHDX at ``path``; returns (old size, blocks dropped).

    Growing: the old last block's bytes past the old end are made to read as zeros (holes
    punched; in a differencing disk, zeros written with their sector bits set where the parent
    has data); new blocks are NOT_PRESENT, or in a differencing disk FULLY_PRESENT over file
    holes where the parent holds data (zeros that hide it; libvhdi 20210425 reads a ZERO
    block of a differencing disk from the parent), and every block of a fixed disk is
    allocated.  If the BAT region is too small, a larger one is written at the end of the file
    and synced first.  Then one log transaction changes the entries, the region tables and the
    size together.  Shrinking: entries past the new end become NOT_PRESENT and the size
    changes in one transaction; the space is then given back."""
    disk = open_vhdx(path, "r+", open_parent=False)
    try:
        lss = disk.logical_sector_size
        if new_size <= 0 or new_size % lss:
            raise InvalidArgumentError(
                f"the new size {new_size} is not a positive multiple of the {lss}-byte sector"
            )
        if new_size > r.MAX_VIRTUAL_SIZE:
            raise InvalidArgumentError(f"{new_size} bytes is larger than the VHDX maximum (64 TiB)")
        old = disk.size
        if new_size < old and not shrink:
            raise InvalidArgumentError(
                f"{new_size} is smaller than the current size {old}: pass --shrink to shrink"
            )
        if new_size == old:
            return old, 0
        _refuse_children(disk, parent_dirs)
        if new_size > old:
            _grow(disk, new_size, parent_policy or ParentPolicy().with_dirs(parent_dirs))
            return old, 0
        return old, _shrink(disk, new_size, force)
    finally:
        disk.close()


def _refuse_children(disk: VHDXDisk, search_dirs: Sequence[str]) -> None:
    """A resize changes the disk's DataWriteGuid (2.2.2): its children would refuse it."""
    from ..children import find_children

    children = find_children(disk, search_dirs)
    if children:
        raise InvalidArgumentError(
            f"{disk.path} is the parent of {', '.join(children)}: a resize gives it a new "
            "DataWriteGuid, which they would refuse (commit or remove them first)",
            path=disk.path,
        )


def _size_page(disk: VHDXDisk, pages: Pages, size: int) -> None:
    entry = _metadata_entry(disk, r.VIRTUAL_DISK_SIZE)
    pages.put(disk.layout.metadata_region.file_offset + entry.offset, size.to_bytes(8, "little"))


def _parent_data(disk: VHDXDisk, old: int, new: int, policy: ParentPolicy) -> list[range]:
    if not disk._differencing:
        return []
    with find_parent(disk, policy) as parent:
        end = min(new, parent.size)
        if end <= old:
            return []
        return [
            range(e.offset, e.end) for e in parent.extents(old, end - old) if e.layer is not None
        ]


def _grow(disk: VHDXDisk, new: int, policy: ParentPolicy) -> None:
    bs, ratio = disk._bs, disk._ratio
    old = disk.size
    hide = _parent_data(disk, old, new, policy)
    disk._begin_session()

    def hidden(a: int, z: int) -> bool:
        return any(h.start < z and a < h.stop for h in hide)

    # 1. The old last block: its bytes past the old end read as zeros from now on.
    nb_old = -(-old // bs)
    if old % bs:
        last = old // bs
        e = disk._entry(last)
        state = e & r.STATE_MASK
        inner = old - last * bs
        n = min(bs, new - last * bs) - inner
        if state == r.PayloadState.FULLY_PRESENT:
            punch_hole(disk.fd, disk._block_offset(last, e) + inner, n)
        elif disk._differencing and (
            state == r.PayloadState.PARTIALLY_PRESENT
            or (state == r.PayloadState.NOT_PRESENT and hidden(old, old + n))
        ):
            disk._write_block(last, inner, memoryview(bytes(n)))
    # 2. The new entries.
    count = bat_entries(new, bs, disk.logical_sector_size, disk._differencing)
    old_count = bat_entries(old, bs, disk.logical_sector_size, disk._differencing)
    disk._grow_table(old_count, count)
    nb_new = -(-new // bs)
    fixed = disk.type == DiskType.FIXED
    # Entries the old table did not hold are 0 (NOT_PRESENT, bitmaps too), set in one slice by
    # _grow_table, their pages dirty; Python steps are taken only for the new
    # blocks in the old table's last chunk (a differencing table holds whole chunks) and for
    # blocks that get space: every block of a fixed disk, and those over the parent's data.
    # (An empty 32 -> 64 TiB grow of 1 MiB blocks went through 32 Mi blocks one by one: 55 s.)

    def entry(b: int) -> int:
        if fixed or hidden(b * bs, (b + 1) * bs):
            return disk._grow(bs) | r.PayloadState.FULLY_PRESENT  # data: a hole, zeros
        return 0

    # The new blocks the old table's last chunk holds (their entries may hold anything), then
    # the blocks past it that get space, ascending: the file offsets _grow hands out ascend.
    tail = range(nb_old, min(nb_new, -(-nb_old // ratio) * ratio))
    given: Sequence[int]
    if fixed:
        given = range(tail.stop, nb_new)
    else:
        given = sorted(
            {
                b
                for h in hide
                for b in range(max(tail.stop, h.start // bs), min(nb_new, -(-h.stop // bs)))
            }
        )
    for b in tail:
        idx = b + b // ratio
        value = entry(b)
        if idx < old_count or value:
            disk._set_entry(idx, value)
    for b in given:
        disk._set_entry(b + b // ratio, entry(b))
    pages = Pages(disk)
    # 3. A BAT region too small for the new entries: a new one at the end, written whole and
    # synced before the region tables name it (in the transaction below).
    region = disk.layout.bat_region
    if count * 8 > region.length:
        length = -(-count * 8 // MiB) * MiB
        at = disk._grow(length)
        disk._relocate_bat(at, length)
        new_region = r.Region(region.guid, at, length, region.required)
        current = next(t for t in disk.layout.region_tables if t is not None)
        table_new = r.RegionTable(
            tuple(new_region if g.guid == r.BAT_REGION else g for g in current.entries)
        )
        for off in r.REGION_TABLE_OFFSETS:
            pages.put(off, table_new.build())
        disk._adopt_region_table(table_new)
    _size_page(disk, pages, new)
    disk._log_pages(pages.changed())
    disk._adopt_size(new)


def _shrink(disk: VHDXDisk, new: int, force: bool) -> int:
    bs, ratio = disk._bs, disk._ratio
    old = disk.size
    if not force:
        from ..resize import refuse_data_past  # (vhd.resize imports this package)

        refuse_data_past(disk, new)
    disk._begin_session()
    count = bat_entries(new, bs, disk.logical_sector_size, disk._differencing)
    old_count = bat_entries(old, bs, disk.logical_sector_size, disk._differencing)
    nb_new = -(-new // bs)
    dropped: list[tuple[int, int]] = []
    # Entries before the first dropped block are all kept; after it, only windows of the table
    # holding a non-zero entry are walked (an empty 64 TiB disk of 1 MiB blocks: 18 s -> 1 s).
    first = min(count, nb_new + nb_new // ratio)
    stop = min(old_count, len(disk.bat))
    for idx in placement.nonzero_entries(disk.bat, first, stop):
        is_bitmap = idx % (ratio + 1) == ratio
        block = idx - idx // (ratio + 1)
        if idx < count and (is_bitmap or block < nb_new):
            continue
        e = disk.bat[idx]
        state = e & r.STATE_MASK
        if is_bitmap and state == r.BitmapState.PRESENT:
            dropped.append((e & r.OFFSET_MASK, r.SECTOR_BITMAP_BLOCK_SIZE))
            disk._forget_bitmap_block(e & r.OFFSET_MASK)
        elif not is_bitmap and state in (
            r.PayloadState.FULLY_PRESENT,
            r.PayloadState.PARTIALLY_PRESENT,
        ):
            dropped.append((e & r.OFFSET_MASK, bs))
        if e:
            disk._set_entry(idx, 0)
    pages = Pages(disk)
    _size_page(disk, pages, new)
    disk._log_pages(pages.changed())
    disk._adopt_size(new)
    for off, length in dropped:
        punch_hole(disk.fd, off, length)
    _cut(disk)
    return sum(1 for _o, n in dropped if n == bs)
