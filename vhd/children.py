"""Finding the differencing children of an image (the reverse of "Parent Locator Entry").

(And :func:`find_parent`, for an operation that holds the child open on its own.)  A VHD names
its parent, never its children, so a tool that changes or removes a disk in the
middle of a chain must look for them: ``vhd commit MID`` relinks MID's children to MID's parent
before it deletes MID (as Hyper-V's Merge-VHD does), and ``vhd set-parent MID ...`` records MID's
new modification time in them.  The search covers the image's own folder and the folders the
caller names (``--parent-dir``): every regular file there whose footer says "differencing" and
whose header records the image's unique id, and whose parent, resolved the way :func:`vhd.open`
resolves it, is this very file (a copy of the image elsewhere, with the same id, has its own
children).  Children elsewhere cannot be found; the README says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence

from .chain import (
    ParentPolicy,
    footer_identity,
    parent_candidates,
    read_candidate,
    read_locators,
    resolve_parent,
)
from .disk import Disk
from .errors import VHDError
from .fileio import read_upto
from .footer import FOOTER_SIZE, DiskType
from .header import HEADER_SIZE, DynamicHeader
from .layout import locate_footer

# Files read per folder are bounded by the folder; each costs two small reads.


def find_children(disk: Disk, search_dirs: Sequence[str] = ()) -> list[str]:
    """Paths of the images (VHD or VHDX, whatever ``disk`` is: see :mod:`vhd.lineage`) whose
    parent is ``disk``'s file."""
    from .lineage import identity
    from .vhdx.ops import is_child_of

    me = os.stat(disk.fd)
    ident = identity(disk)
    want = ident.bytes
    folders = [os.path.dirname(os.path.abspath(disk.path))]
    folders += [os.path.abspath(d) for d in search_dirs if os.path.abspath(d) not in folders]
    found: list[str] = []
    for folder in folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            header = _child_header(path, want, me)
            child = (
                _resolves_to(path, header, me, search_dirs)
                if header is not None
                else is_child_of(path, ident, me, search_dirs)
            )
            if child and not any(os.path.samefile(path, f) for f in found):
                found.append(path)
    return found


def find_parent(child: Disk, policy: ParentPolicy | None = None) -> Disk:
    """The parent of ``child`` (opened with ``open_parent=False``), opened read-only as
    :func:`vhd.open` would find it: for operations that need the child locked exclusively and
    so cannot open the chain from the child again."""
    from .image import open as open_image

    header = child.header
    assert header is not None
    st = os.fstat(child.fd)
    parent: Disk = resolve_parent(  # type: ignore[assignment]
        child.path,
        header,
        read_locators(child.fd, child.file_size, header),
        opener=open_image,
        policy=policy or ParentPolicy(),
        allow_mismatch=False,
        strict=True,
        seen=frozenset({(st.st_dev, st.st_ino)}),
    )
    return parent


def open_children(
    disk: Disk, search_dirs: Sequence[str] = (), *, unwritable: list[str] | None = None
) -> list[Disk]:
    """:func:`find_children`, each opened ``"r+"`` without its parent: locked exclusively, so
    a child that is in use refuses the operation before anything changes.  With
    ``unwritable``, a child this user may not write (permissions, a read-only file system) is
    listed there instead of failing the operation."""
    from .image import open as open_image

    opened: list[Disk] = []
    try:
        for path in find_children(disk, search_dirs):
            try:
                opened.append(open_image(path, "r+", open_parent=False))
            except OSError as exc:
                if unwritable is None or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                unwritable.append(path)
    except BaseException:
        for child in opened:
            child.close()
        raise
    return opened


def _child_header(path: str, want: bytes, me: os.stat_result) -> DynamicHeader | None:
    """The dynamic header of ``path`` if it is a differencing disk recording ``want``, read as
    the parent search reads a candidate (:func:`vhd.chain.read_candidate`; the footer chosen by
    :func:`vhd.layout.locate_footer`); None for ``me`` itself."""

    def header_of(fd: int, size: int) -> DynamicHeader | None:
        if size < FOOTER_SIZE + HEADER_SIZE:
            return None
        footer = locate_footer(fd, size, path).footer
        if footer.disk_type != DiskType.DIFFERENCING:
            return None
        raw = read_upto(fd, HEADER_SIZE, footer.data_offset)
        if len(raw) < HEADER_SIZE:
            return None
        header = DynamicHeader.parse(raw)
        return header if header.cookie_ok and header.parent_unique_id == want else None

    found = read_candidate(path, devices=False, read=header_of)
    if found is None or found[0] == (me.st_dev, me.st_ino):
        return None
    return found[1]


def _resolves_to(
    path: str, header: DynamicHeader, me: os.stat_result, search_dirs: Sequence[str]
) -> bool:
    """Whether the first existing parent candidate of ``path`` with the right unique id is
    ``me`` (what :func:`vhd.open` would pick)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        locators = read_locators(fd, os.fstat(fd).st_size, header)
    except (OSError, VHDError):
        return False
    finally:
        os.close(fd)
    for _source, candidate in parent_candidates(path, header, locators, search_dirs):
        with contextlib.suppress(OSError):
            st = os.stat(candidate)
            if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
                return True
            found = footer_identity(candidate, devices=False)  # (a VHDX: its DataWriteGuid)
            if found is not None and found[1] == header.parent_unique_id:
                return False  # another file with the parent's id comes first
    return False
