"""A guest-visible disk from either a VHD or a raw file, for operations (convert, compare) that
accept both.

A file is a VHD when it has a VHD footer at its end (fixed disks included: qemu-img probes those
as raw, we do not) or a dynamic/differencing footer copy at its start.  A file in another image
format (qcow2, VMDK, VHDX, ... see :mod:`vhd.probe`) is refused, unless the caller forces raw.  A raw file's zero ranges
come from ``SEEK_DATA``/``SEEK_HOLE``, and so do a fixed VHD's (spec: "Fixed Hard Disk Image": the
data is the disk, byte for byte, before the footer).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence

from . import lock
from .chain import ParentPolicy
from .disk import Disk, Extent, FixedDisk
from .errors import ForeignFormatError, InvalidArgumentError, NotAVHDError
from .fileio import read_exact_into
from .image import open as open_image
from .record import Record, fill


class Source(Record):
    """Read side of a disk: ``size``, ``preadinto``, ``extents`` and ``close``."""

    _fields = ("path", "size", "disk", "fd", "warnings")
    __slots__ = _fields
    path: str
    size: int
    disk: Disk | None
    fd: int
    warnings: list[str]

    def __init__(
        self,
        path: str,
        size: int,
        disk: Disk | None = None,
        fd: int = -1,
        warnings: list[str] | None = None,
    ) -> None:
        fill(self, path, size, disk, fd, [] if warnings is None else warnings)

    def preadinto(self, buffer: memoryview, offset: int) -> int:
        if self.disk is not None:
            return self.disk.preadinto(buffer, offset)
        n = max(0, min(len(buffer), self.size - offset))
        if n:
            read_exact_into(self.fd, buffer[:n], offset, path=self.path)
        return n

    def extents(self) -> Iterator[Extent]:
        if isinstance(self.disk, FixedDisk):
            # A fixed VHD is raw data before its footer: its file's holes are zero ranges, so
            # a sparse 2040 GiB disk is copied by reading its data only.  (Not a fixed VHDX:
            # its data sits in blocks after the headers, log, metadata and BAT.)
            yield from _raw_extents(self.disk.fd, self.size)
            return
        if self.disk is not None:
            yield from self.disk.extents()
            return
        yield from _raw_extents(self.fd, self.size)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
        elif self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(
    path: str,
    *,
    strict: bool = False,
    parent_dirs: Sequence[str] = (),
    allow_parent_mismatch: bool = False,
    force_raw: bool = False,
    force_share: bool = False,
    parent_policy: ParentPolicy | None = None,
) -> Source:
    """Open ``path`` as a VHD if it is one, else as a raw disk image; either way locked for
    reading (shared, see :mod:`vhd.lock`) unless ``force_share``."""
    if not force_raw:
        try:
            disk = open_image(
                path,
                "r",
                strict=strict,
                parent_dirs=parent_dirs,
                allow_parent_mismatch=allow_parent_mismatch,
                force_share=force_share,
                parent_policy=parent_policy,
            )
        except ForeignFormatError:
            raise  # a qcow2/VMDK/VHDX/... file: never copy the container's bytes as a disk
        except NotAVHDError:
            pass
        else:
            warnings = [f"{d.path}: {w}" for d in disk.chain for w in d.warnings]
            return Source(path=path, size=disk.size, disk=disk, warnings=warnings)
    # O_NONBLOCK: a FIFO must not block the open; it is refused just below
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not _seekable(os.fstat(fd).st_mode):
            raise InvalidArgumentError(
                "not a regular file or block device (a pipe?): vhdkit reads disks at random "
                "offsets; save it to a file first",
                path=path,
            )
        os.set_blocking(fd, True)
        if not force_share:
            lock.acquire(fd, path, exclusive=False)
        size = os.lseek(fd, 0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        raise
    return Source(path=path, size=size, fd=fd)


def _seekable(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _raw_extents(fd: int, size: int) -> Iterator[Extent]:
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                yield Extent(pos, size - pos, None)
                return
            yield Extent(pos, size - pos, 0)  # no SEEK_DATA support: all data
            return
        if data > pos:
            yield Extent(pos, min(data, size) - pos, None)
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield Extent(data, hole - data, 0)
        pos = hole
