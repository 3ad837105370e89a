"""Retargeting a differencing child at a moved parent (``vhd set-parent``; Hyper-V's
``Set-VHD -ParentPath``, blktap's ``vhd-util modify -p``).

Rewritten (spec: "Dynamic Disk Header", "Parent Locator Entry"): the header's parent unicode name
(UTF-16BE, the file name as :func:`vhd.create` writes it), the parent timestamp (the parent's
modification time) and every locator kind: W2ku (absolute path, UTF-16LE), W2ru (``.\\``-relative
to the child, UTF-16LE) and MacX (``file://`` URL, UTF-8) are written, into the slots that held
them or free ones; deprecated Wi2k/Wi2r slots are rewritten with ANSI text; ``Mac `` alias slots
(which cannot be made on Linux, and would point at the old place) are cleared.  The parent's
unique id must match the one the child records, unless ``force``: then the child records the new
parent's id, with a warning.

A payload that fits the space its slot reserves is rewritten in place (the old path is stale
anyway, so a torn write loses nothing); otherwise it goes to new space at the end of the file,
where the trailing footer was: the footer moves first, then payloads are written and synced, and
only then does the header point at them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .children import open_children
from .disk import Disk
from .errors import InvalidArgumentError, ParentMismatchError
from .footer import DiskType, vhd_timestamp
from .header import ParentLocator, encode_parent_name
from .image import open as open_image
from .layout import locator_extent
from .locator import (
    CODE_MAC,
    CODE_MACX,
    CODE_W2KU,
    CODE_W2RU,
    CODE_WI2K,
    CODE_WI2R,
    absolute_windows_path,
    encode_payload,
    posix_to_macx,
    relative_windows_path,
)
from .metadata import MetadataWriter
from .newfile import naming
from .record import Record, fill

SECTOR = 512


class SetParentResult(Record):
    _fields = ("child", "parent", "warnings", "grew_by")
    __slots__ = _fields
    child: str
    parent: str
    warnings: list[str]
    grew_by: int

    def __init__(
        self, child: str, parent: str, warnings: list[str] | None = None, grew_by: int = 0
    ) -> None:
        fill(self, child, parent, [] if warnings is None else warnings, grew_by)


def set_parent(
    child_path: str | os.PathLike[str],
    parent_path: str | os.PathLike[str],
    *,
    force: bool = False,
    search_dirs: Sequence[str] = (),
) -> SetParentResult:
    """Point the differencing disk at ``child_path`` to ``parent_path``.

    Rewriting the child changes its modification time, which its own children (found next to
    it and in ``search_dirs``, see :func:`vhd.children.find_children`) record: theirs is
    brought up to date too, so that a middle disk's retarget leaves the rest of the chain
    checking clean."""
    cpath, ppath = os.fspath(child_path), os.path.abspath(os.fspath(parent_path))
    with naming(cpath):
        return _set_parent(cpath, ppath, force, search_dirs)


def _set_parent(cpath: str, ppath: str, force: bool, search_dirs: Sequence[str]) -> SetParentResult:
    result = SetParentResult(cpath, ppath)
    if os.path.exists(cpath) and os.path.samefile(cpath, ppath):
        raise InvalidArgumentError("a disk cannot be its own parent")
    from . import lineage

    with open_image(ppath, "r", open_parent=False) as parent:
        # What the child must record (vhd.lineage): a VHD's unique id, a VHDX's DataWriteGuid.
        parent_id = lineage.identity(parent)
        parent_size = parent.size
        parent_lss = getattr(parent, "logical_sector_size", 512)
    child = open_image(cpath, "r+", open_parent=False)
    try:
        if child.type != DiskType.DIFFERENCING:
            raise InvalidArgumentError(
                f"{cpath} is a {child.type.label} disk, not a differencing disk"
            )
        if parent_lss != getattr(child, "logical_sector_size", 512):
            raise ParentMismatchError(
                f"{ppath} has {parent_lss}-byte logical sectors, the child "
                f"{getattr(child, 'logical_sector_size', 512)}",
                path=cpath,
            )
        recorded = lineage.recorded_parents(child)
        if parent_id not in recorded:
            made_from = ", ".join(sorted(str(u) for u in recorded)) or "(none)"
            message = f"{ppath} has unique id {parent_id}, but the child was made from {made_from}"
            if not force:
                raise ParentMismatchError(message + "; pass --force to use it anyway", path=cpath)
            result.warnings.append(message + "; recorded the new id (--force)")
        if parent_size != child.size:
            result.warnings.append(
                f"the parent is {parent_size} bytes, the child {child.size}: reads past the "
                "parent's end return zeros"
            )
        # Its children are locked (refused if in use) before the child changes.
        unwritable: list[str] = []
        grandchildren = open_children(child, search_dirs, unwritable=unwritable)
        for path in unwritable:
            result.warnings.append(
                f"{path} (a child of {cpath}) cannot be written: its recorded parent timestamp "
                "goes stale ('vhd check --repair' on it mends that)"
            )
        try:
            result.grew_by, lost = lineage.retarget(child, ppath, parent_id)
            result.warnings += lost
            for grandchild in grandchildren:
                lineage.record_parent_change(grandchild, cpath)
        finally:
            for grandchild in grandchildren:
                grandchild.close()
    finally:
        child.close()
    return result


def retarget(child: Disk, ppath: str, parent_id: bytes) -> tuple[int, list[str]]:
    """Rewrite the header of ``child`` (open ``"r+"``) to name ``ppath``, whose unique id is
    ``parent_id``: name, timestamp, unique id and locators.  Returns how many bytes the file
    grew by and warnings."""
    warnings: list[str] = []
    header = child.header
    assert header is not None
    grew_by = 0
    child_dir = os.path.dirname(os.path.abspath(child.path))
    texts = {
        CODE_W2KU: absolute_windows_path(ppath),
        CODE_W2RU: relative_windows_path(ppath, child_dir),
        CODE_MACX: posix_to_macx(ppath),
        CODE_WI2K: absolute_windows_path(ppath),
        CODE_WI2R: relative_windows_path(ppath, child_dir),
    }
    slots = list(header.locators)
    wanted = [CODE_W2KU, CODE_W2RU, CODE_MACX] + [
        code for code in (CODE_WI2K, CODE_WI2R) if any(s.code == code for s in slots)
    ]
    for i, loc in enumerate(slots):
        if loc.code == CODE_MAC:
            slots[i] = ParentLocator()
    end = -(-child.footer_offset // SECTOR) * SECTOR
    new_end = end
    writes: list[tuple[int, bytes]] = []
    for code in wanted:
        data = encode_payload(code, texts[code])
        index = next((i for i, s in enumerate(slots) if s.code == code), None)
        if index is None:
            index = next((i for i, s in enumerate(slots) if not s.in_use), None)
            if index is None:
                warnings.append(f"no free locator slot for kind {code:#x}")
                continue
        old = slots[index]
        # In place only within the payload's region as vhd check sees it (a claimed data_space
        # past the 64 KiB cap may cover blocks).
        if old.in_use and locator_extent(old) >= len(data) and old.data_offset >= SECTOR:
            at, space = old.data_offset, old.data_space
        else:
            at = new_end
            size = max(SECTOR, -(-len(data) // SECTOR) * SECTOR)
            space = size
            new_end += size
            data = data.ljust(size, b"\0")  # padding overwrites the old footer there
        slots[index] = ParentLocator(
            code=code,
            data_space=space,
            data_len=len(encode_payload(code, texts[code])),
            data_offset=at,
        )
        writes.append((at, data))
    writer = MetadataWriter(child)
    if new_end > end:
        # The trailing footer moves first, so the file always ends in a valid footer (the
        # payloads' padding overwrites the old one).
        writer.move_footer(new_end, clear_old=False)
        grew_by = new_end - end
    writer.write_raw(writes)
    new_header = header.replace(
        parent_unique_id=parent_id,
        parent_timestamp=vhd_timestamp(os.stat(ppath).st_mtime),
        parent_name_raw=encode_parent_name(os.path.basename(ppath)),
        locators=tuple(slots),
    )
    writer.write_header(new_header)
    return grew_by, warnings


def record_parent_time(child: Disk, parent_path: str) -> None:
    """Record the modification time of ``parent_path`` in ``child`` (open ``"r+"``) as its
    parent timestamp, after the parent changed (a commit into it, a retarget of it)."""
    header = child.header
    assert header is not None
    stamp = vhd_timestamp(os.stat(parent_path).st_mtime)
    if header.parent_timestamp in (0, stamp):
        # 0 is what Windows 10 diskpart writes: it means "not recorded", so it stays.
        return
    MetadataWriter(child).write_header(header.replace(parent_timestamp=stamp))
