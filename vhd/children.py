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
import stat
from collections.abc import Sequence

from .chain import ParentPolicy, parent_candidates, read_locators, resolve_parent
from .disk import Disk
from .errors import VHDError
from .fileio import read_upto
from .footer import COOKIE, FOOTER_SIZE, DiskType, Footer
from .header import HEADER_SIZE, DynamicHeader

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
    """The dynamic header of ``path`` if it is a differencing disk recording ``want``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
            return None
        if st.st_size < FOOTER_SIZE + HEADER_SIZE:
            return None
        raw = read_upto(fd, FOOTER_SIZE, st.st_size - FOOTER_SIZE)
        if raw[:8] != COOKIE:
            raw = read_upto(fd, FOOTER_SIZE, 0)  # a damaged tail: the copy at offset 0
            if raw[:8] != COOKIE:
                return None
        footer = Footer.parse(raw)
        if footer.disk_type != DiskType.DIFFERENCING:
            return None
        raw = read_upto(fd, HEADER_SIZE, footer.data_offset)
        if len(raw) < HEADER_SIZE:
            return None
        header = DynamicHeader.parse(raw)
        return header if header.cookie_ok and header.parent_unique_id == want else None
    except (OSError, ValueError, VHDError):
        return None
    finally:
        os.close(fd)


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
            if _unique_id(candidate) == header.parent_unique_id:
                return False  # another file with the parent's id comes first
    return False


def _unique_id(path: str) -> bytes | None:
    from .lineage import identity_of_file

    if _is_vhdx(path):
        found = identity_of_file(path)  # a VHDX parent: its DataWriteGuid
        return None if found is None else found.bytes
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < FOOTER_SIZE:
            return None
        for at in (st.st_size - FOOTER_SIZE, 0):
            raw = read_upto(fd, FOOTER_SIZE, at)
            if raw[:8] == COOKIE:
                return Footer.parse(raw).unique_id
        return None
    finally:
        os.close(fd)


def _is_vhdx(path: str) -> bool:
    from .vhdx import probe_vhdx

    return probe_vhdx(path)
