"""Merging a differencing child into its parent (``vhd commit``; Hyper-V's Merge-VHD, blktap's
coalesce).

Every range the child holds itself (bitmap bit set; layer 0 of :meth:`Disk.extents`) is copied
into the parent with the parent's ordinary :meth:`Disk.pwrite`, so the parent may be fixed,
dynamic or itself differencing, laid out by any creator.  Then the parent is flushed and only then
is the child removed (or, with ``keep``, told the parent's new timestamp).

Crash safety, and why no flushed write is lost:

* Every disk that changes is locked exclusively first (:mod:`vhd.lock`): the child (it is
  deleted at the end), the parent, and the child's own children (relinked to the parent).  A
  mounted or served one refuses the commit before anything is copied.
* The child is not written until the very end.  Its view of the disk
  hides the parent wherever the child holds data, and the commit writes the parent *only* there;
  so at every moment of the commit the chain child → parent reads exactly what it read before.
* Each parent write follows the core's allocation order (new trailing footer first, then data,
  then bitmap; BAT entries reach the file at a flush, after an ``fdatasync`` of the data), so an
  interrupted commit leaves a consistent parent, at worst with orphan space after its last
  block that ``vhd check --repair`` reclaims.
* Rerunning the commit copies the child's ranges again and finishes the job; the child is deleted
  only after the parent's final ``flush()`` (``fsync``) has returned and its children point at
  the parent (a child relinked already reads the same through the parent; one not yet relinked
  still reads through the child).

Other children of the same parent see the merged data afterwards, as with every tool that merges.

VHD and VHDX alike (the format-specific parts are in :mod:`vhd.lineage`): a VHDX parent gets a
new DataWriteGuid (MS-VHDX 2.2.2), chosen before its first write and recorded in the child first
(:func:`vhd.lineage.prepare_commit`), so an interrupted commit still leaves a chain that opens;
its other children then refuse it, as Hyper-V's do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from . import lineage
from .chain import ParentPolicy
from .children import open_children
from .disk import Disk
from .errors import InvalidArgumentError
from .footer import DiskType
from .image import open as open_image
from .newfile import naming
from .record import FrozenRecord, fill

CHUNK = 4 * 1024 * 1024

Progress = Callable[[int, int], None]


class CommitResult(FrozenRecord):
    _fields = ("child", "parent", "bytes_copied", "child_removed", "relinked")
    __slots__ = _fields
    child: str
    parent: str
    bytes_copied: int
    child_removed: bool
    relinked: list[str]  # the child's children, now the parent's

    def __init__(
        self,
        child: str,
        parent: str,
        bytes_copied: int,
        child_removed: bool,
        relinked: list[str] | None = None,
    ) -> None:
        fill(self, child, parent, bytes_copied, child_removed, [] if relinked is None else relinked)


def commit(
    child_path: str | os.PathLike[str],
    *,
    keep: bool = False,
    parent_dirs: Sequence[str] = (),
    progress: Progress | None = None,
    parent_policy: ParentPolicy | None = None,
) -> CommitResult:
    """Merge the child at ``child_path`` into its parent; remove the child unless ``keep``.

    Every disk the commit changes is locked exclusively before anything is copied, so a child
    (or parent) that is mounted, served or open elsewhere refuses the commit up front: the
    child is about to be deleted, and writes a mount made into it afterwards would be lost.
    The child's own children (found by :func:`vhd.children.find_children`) are relinked to the
    parent before the child is deleted, so the chain below stays whole."""
    spath = os.fspath(child_path)
    with naming(spath):
        return _commit(spath, keep, parent_dirs, progress, parent_policy)


def _commit(
    spath: str,
    keep: bool,
    parent_dirs: Sequence[str],
    progress: Progress | None,
    parent_policy: ParentPolicy | None,
) -> CommitResult:
    policy = (parent_policy or ParentPolicy()).with_dirs(parent_dirs)
    # Read through this handle (its own ranges only, layer 0): the parent is opened apart.
    child = open_image(spath, "r+", open_parent=False)
    try:
        if child.type != DiskType.DIFFERENCING:
            raise InvalidArgumentError(
                f"{spath} is a {child.type.label} disk; only a differencing disk can be committed"
            )
        parent_path = _parent_path(child, policy)
        parent = open_image(parent_path, "r+", parent_dirs=parent_dirs, parent_policy=parent_policy)
        grandchildren: list[Disk] = []
        try:
            grandchildren = open_children(child, parent_dirs)
            copied = _copy_own_ranges(
                child,
                parent,
                progress,
                lambda: lineage.prepare_commit(child, parent, grandchildren),
            )
            with naming(parent_path):
                parent.flush()
            # (A VHDX parent's identity is its DataWriteGuid, new since the copy wrote to it.)
            parent_id = lineage.identity(parent)
            # Closed before its modification time is recorded anywhere: nothing changes it now.
            with naming(parent_path):
                parent.close()
            if keep:
                # The kept child records the parent's new time; that rewrite changes the
                # child's own time, which its children record in turn.
                lineage.record_parent_change(child, parent_path)
                for grandchild in grandchildren:
                    lineage.record_parent_change(grandchild, spath)
            else:
                # Each reads the same through the parent, which now holds the child's data
                # wherever the child had its own: relink it, and only then drop the child.
                for grandchild in grandchildren:
                    lineage.retarget(grandchild, parent_path, parent_id)
        finally:
            # Under the parent's name: after a failed write or flush its close fails the same
            # way, and that error (which replaces the first) must name the parent, not the child.
            with naming(parent_path):
                parent.close()
            for grandchild in grandchildren:
                with naming(grandchild.path):
                    grandchild.close()
        if not keep:
            os.unlink(spath)
    finally:
        child.close()
    relinked = [] if keep else [g.path for g in grandchildren]
    return CommitResult(spath, parent_path, copied, not keep, relinked)


def _parent_path(child: Disk, policy: ParentPolicy) -> str:
    """Where the child's parent is (opened read-only and closed again: it is reopened for
    writing, which this process's own shared lock would refuse)."""
    with lineage.find_parent(child, policy) as parent:
        return parent.path


def _copy_own_ranges(
    child: Disk, parent: Disk, progress: Progress | None, before_writing: Callable[[], None]
) -> int:
    # The child is open without its parent, so a range no layer holds (None) is one the child
    # itself makes read as zeros (a VHDX ZERO block, a hole in a present block): the parent
    # must read zeros there too.
    extents = list(child.extents())
    ranges = [(e.offset, e.length) for e in extents if e.layer == 0]
    zeros = [(e.offset, e.length) for e in extents if e.layer is None and e.offset < parent.size]
    total = sum(n for _, n in ranges)
    for offset, length in ranges:
        if offset + length > parent.size:
            raise InvalidArgumentError(
                f"the child holds data at {offset:#x}+{length:#x}, past the parent's end "
                f"({parent.size} bytes); grow the parent first (vhd resize)",
                path=child.path,
            )
    if ranges or zeros:
        # (A VHDX parent's new identity is recorded in the child before the parent changes.)
        before_writing()
    for offset, length in zeros:
        with naming(parent.path):
            parent.write_zeroes(offset, min(length, parent.size - offset))
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
            with naming(child.path):
                got = child.preadinto(view[:n], pos)
            with naming(parent.path):
                parent.pwrite(view[:got], pos)
            pos += n
            done += n
            if progress is not None:
                progress(done, total)
    return done
