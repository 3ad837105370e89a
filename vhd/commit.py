"""Merging a differencing child into its parent (``vhd commit``; Hyper-V's Merge-VHD, blktap's
coalesce).

Every range the child holds itself (bitmap bit set; layer 0 of :meth:`Disk.extents`) is copied
into the parent with the parent's ordinary :meth:`Disk.pwrite`, so the parent may be fixed,
dynamic or itself differencing, laid out by any creator.  Then the parent is flushed and only then
is the child removed (or, with ``keep``, told the parent's new timestamp).

Crash safety, and why no flushed write is lost:

* The child is opened read-only and is not changed until the very end.  Its view of the disk
  hides the parent wherever the child holds data, and the commit writes the parent *only* there;
  so at every moment of the commit the chain child → parent reads exactly what it read before.
* Each parent write follows the core's allocation order (new trailing footer first, then data,
  then bitmap; BAT entries reach the file at a flush, after an ``fdatasync`` of the data), so an
  interrupted commit leaves a consistent parent, at worst with orphan space after its last
  block that ``vhd check --repair`` reclaims.
* Rerunning the commit copies the child's ranges again and finishes the job; the child is deleted
  only after the parent's final ``flush()`` (``fsync``) has returned.

Other children of the same parent see the merged data afterwards, as with every tool that merges.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .chain import ParentPolicy
from .disk import Disk
from .errors import InvalidArgumentError
from .fileio import write_all
from .footer import DiskType, vhd_timestamp
from .image import open as open_image

CHUNK = 4 * 1024 * 1024

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class CommitResult:
    child: str
    parent: str
    bytes_copied: int
    child_removed: bool


def commit(
    child_path: str | os.PathLike[str],
    *,
    keep: bool = False,
    parent_dirs: Sequence[str] = (),
    progress: Progress | None = None,
    parent_policy: ParentPolicy | None = None,
) -> CommitResult:
    """Merge the child at ``child_path`` into its parent; remove the child unless ``keep``."""
    spath = os.fspath(child_path)
    with open_image(spath, "r", parent_dirs=parent_dirs, parent_policy=parent_policy) as probe:
        if probe.type != DiskType.DIFFERENCING or probe.parent is None:
            raise InvalidArgumentError(
                f"{spath} is a {probe.type.label} disk; only a differencing disk can be committed"
            )
        parent_path = probe.parent.path
    # The child without its parent: only its own ranges (layer 0) are read.
    child = open_image(spath, "r", open_parent=False)
    try:
        parent = open_image(parent_path, "r+", parent_dirs=parent_dirs, parent_policy=parent_policy)
        try:
            copied = _copy_own_ranges(child, parent, progress)
            parent.flush()
        finally:
            parent.close()
    finally:
        child.close()
    if keep:
        _record_parent_time(spath, parent_path)
    else:
        os.unlink(spath)
    return CommitResult(spath, parent_path, copied, not keep)


def _copy_own_ranges(child: Disk, parent: Disk, progress: Progress | None) -> int:
    ranges = [(e.offset, e.length) for e in child.extents() if e.layer == 0]
    total = sum(n for _, n in ranges)
    for offset, length in ranges:
        if offset + length > parent.size:
            raise InvalidArgumentError(
                f"the child holds data at {offset:#x}+{length:#x}, past the parent's end "
                f"({parent.size} bytes); grow the parent first (vhd resize)",
                path=child.path,
            )
    buf = bytearray(min(CHUNK, max(total, 1)))
    view = memoryview(buf)
    done = 0
    if progress is not None:
        progress(0, total)
    for offset, length in ranges:
        pos = offset
        end = offset + length
        while pos < end:
            n = min(len(buf), end - pos)
            got = child.preadinto(view[:n], pos)
            parent.pwrite(view[:got], pos)
            pos += n
            done += n
            if progress is not None:
                progress(done, total)
    return done


def _record_parent_time(child_path: str, parent_path: str) -> None:
    """After a commit with ``keep``, the child's recorded parent timestamp is made current again
    (the parent's modification time changed), so the kept chain checks clean."""
    with open_image(child_path, "r+", open_parent=False) as child:
        header = child.header
        assert header is not None
        stamp = vhd_timestamp(os.stat(parent_path).st_mtime)
        if header.parent_timestamp in (0, stamp):
            return
        new = header.replace(parent_timestamp=stamp)
        write_all(child.fd, new.build(), child.footer.data_offset)
        os.fsync(child.fd)
        child.header = new
