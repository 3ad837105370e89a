"""The filesystem a VHD mount shows: a directory with ``disk`` and one file per partition.

Binding-free: this module knows nothing of libfuse or mfusepy.  The adapter
(:mod:`vhdfuse.adapter`) turns kernel requests into calls on :class:`DiskFilesystem`, whose
operations take paths and file handles and raise :class:`FilesystemError` (an ``OSError`` with
an errno) on failure.  :func:`errno_boundary` is the *one* place where library errors
(``vhd.VHDError``), host ``OSError``s and bugs become an errno; every public operation goes
through it, so the kernel never sees a traceback, only ``EIO``/``EROFS``/... with the reason in
the log.

Files (see issue 4):

* ``/disk`` is the guest-visible disk: a raw file of exactly ``Disk.size`` bytes.
* ``/pN`` is partition *N* (Linux numbering, :mod:`vhdfuse.partitions`): a window onto its
  byte range of the disk.  I/O is clipped at the window's end; writing at or past the end fails
  with ``ENOSPC`` as on a block device.
* Sizes are fixed: ``truncate`` to the current size succeeds (``open(O_TRUNC)`` and
  ``truncate -s`` to the same size stay usable), any other size fails with ``EINVAL``.
* ``fsync`` and the ``flush`` at ``close`` of a handle that wrote map to ``Disk.flush()``;
  ``fallocate`` with ``PUNCH_HOLE`` or ``ZERO_RANGE`` maps to ``Disk.write_zeroes()`` (both
  promise zeros afterwards; ``Disk.discard()`` would not on a differencing disk); plain
  allocation is not offered (``EOPNOTSUPP``).
* A read-only filesystem refuses writes with ``EROFS`` (``open`` for writing included).
* Sparseness shows as it does for a sparse file: ``st_blocks`` counts the 512-byte units where
  some layer of the chain holds data (``Disk.extents()``), so ``du`` shows what the disk holds,
  and ``lseek`` with ``SEEK_DATA``/``SEEK_HOLE`` finds those extents (a hole is a range no layer
  holds, which reads as zeros), so ``cp --sparse``, ``tar -S`` and friends skip the holes.

Several files view the same bytes; how the adapter keeps the kernel's page caches of those
files coherent is explained in :mod:`vhdfuse.adapter`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import vhd

from .partitions import Partition

log = logging.getLogger("vhdfuse")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# st_blksize steers how much ``cat``/``cp`` ask per read(2) (coreutils use max(st_blksize,
# 128 KiB)); 1 MiB matches the largest FUSE request the kernel sends (256 pages).
PREFERRED_IO_SIZE = 1024 * 1024

_P = ParamSpec("_P")
_R = TypeVar("_R")


# What the filesystem needs of a :class:`vhd.Disk` (tests use an in-memory fake).
DiskLike = vhd.BlockDevice


class FilesystemError(OSError):
    """A failed filesystem operation; ``errno`` is what the kernel is told."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason or os.strerror(code))


def errno_of(exc: BaseException) -> int:
    """The errno a library or host error stands for (the mapping of the one boundary)."""
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return exc.errno
    if isinstance(exc, vhd.ReadOnlyError):
        return errno.EROFS
    if isinstance(exc, vhd.InvalidArgumentError):
        return errno.EINVAL
    if isinstance(exc, vhd.UnsupportedFeatureError):
        return errno.EOPNOTSUPP
    if isinstance(exc, MemoryError):
        return errno.ENOMEM
    # Corrupt blocks, checksum failures, broken parents and bugs: the data cannot be served.
    return errno.EIO


def errno_boundary(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a filesystem operation; anything it raises leaves as a :class:`FilesystemError`."""

    name = method.__name__

    @functools.wraps(method)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except FilesystemError:
            raise
        except vhd.VHDError as exc:
            code = errno_of(exc)
            # A corrupt block is worth a line in the log: the kernel only hears "EIO".
            log.error("%s failed (%s): %s", name, errno.errorcode.get(code, code), exc)
            raise FilesystemError(code, str(exc)) from exc
        except OSError as exc:
            code = errno_of(exc)
            log.error("%s failed: %s", name, exc)
            raise FilesystemError(code, str(exc)) from exc
        except Exception as exc:
            # A bug: keep the traceback for the log, give the kernel a plain EIO.
            log.exception("%s failed with an unexpected error", name)
            raise FilesystemError(errno_of(exc), f"internal error: {exc}") from exc

    return guarded


@dataclass(frozen=True, slots=True)
class Node:
    """A regular file of the mount: a byte window ``[start, start + length)`` of the disk."""

    name: str
    inode: int
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(slots=True)
class Handle:
    node: Node
    writable: bool
    dirty: bool = False  # wrote since the last flush: close() must make it durable


@dataclass(frozen=True, slots=True)
class Attributes:
    """What ``stat`` reports (the adapter copies these into ``struct stat``)."""

    mode: int
    nlink: int
    size: int
    inode: int
    uid: int
    gid: int
    mtime_ns: int
    blksize: int
    blocks: int

    def as_dict(self) -> dict[str, int]:
        return {
            "st_mode": self.mode,
            "st_nlink": self.nlink,
            "st_size": self.size,
            "st_ino": self.inode,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_atime": self.mtime_ns,
            "st_mtime": self.mtime_ns,
            "st_ctime": self.mtime_ns,
            "st_blksize": self.blksize,
            "st_blocks": self.blocks,
        }


class DiskFilesystem:
    """The mount's files over one open disk (a whole chain for a differencing disk)."""

    def __init__(
        self,
        disk: DiskLike,
        partitions: Sequence[Partition] = (),
        *,
        read_only: bool | None = None,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        self.disk = disk
        self.read_only = disk.read_only if read_only is None else read_only or disk.read_only
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self._mtime_ns = time.time_ns() if mtime_ns is None else mtime_ns
        self.nodes: dict[str, Node] = {"disk": Node("disk", 2, 0, disk.size)}
        for number, part in enumerate(partitions, start=3):
            self.nodes[part.name] = Node(part.name, number, part.start, part.length)
        self._handles: dict[int, Handle] = {}
        self._next_handle = 1
        self._lock = threading.Lock()
        self._closed = False
        # st_blocks per node, with the write generation it was counted at: counting walks the
        # BAT and bitmaps, so it is redone only after a write or zeroing.
        self._generation = 0
        self._blocks: dict[str, tuple[int, int]] = {}

    # -- helpers -------------------------------------------------------------------------

    def _node(self, path: str) -> Node:
        node = self.nodes.get(path.lstrip("/")) if path.count("/") <= 1 else None
        if node is None:
            raise FilesystemError(errno.ENOENT)
        return node

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FilesystemError(errno.EBADF)
        return handle

    def _window(self, node: Node, offset: int, length: int) -> int:
        """Clip ``length`` bytes at ``offset`` of ``node`` to its end."""
        if offset < 0 or length < 0:
            raise FilesystemError(errno.EINVAL)
        return max(0, min(length, node.length - offset))

    # -- metadata -----------------------------------------------------------------------

    @errno_boundary
    def getattr(self, path: str, fh: int | None = None) -> Attributes:
        if path == "/":
            return Attributes(
                mode=stat.S_IFDIR | (0o555 if self.read_only else 0o755),
                nlink=2,
                size=0,
                inode=1,
                uid=self.uid,
                gid=self.gid,
                mtime_ns=self._mtime_ns,
                blksize=PREFERRED_IO_SIZE,
                blocks=0,
            )
        node = self._handle(fh).node if fh is not None else self._node(path)
        return Attributes(
            mode=stat.S_IFREG | (0o444 if self.read_only else 0o644),
            nlink=1,
            size=node.length,
            inode=node.inode,
            uid=self.uid,
            gid=self.gid,
            mtime_ns=self._mtime_ns,
            blksize=PREFERRED_IO_SIZE,
            blocks=self._allocated_blocks(node),
        )

    def _allocated_blocks(self, node: Node) -> int:
        """512-byte units of ``node`` where some layer holds data (what ``du`` shows)."""
        generation = self._generation
        cached = self._blocks.get(node.name)
        if cached is not None and cached[0] == generation:
            return cached[1]
        try:
            extents = self.disk.extents(node.start, node.length)
            held = sum(e.length for e in extents if e.layer is not None)
        except (vhd.VHDError, OSError) as exc:
            # A damaged block must not make the file unreachable (everything calls stat):
            # count it all as allocated; reading the damaged range still fails with EIO.
            log.warning(
                "%s: cannot count allocated space, showing the full size: %s", node.name, exc
            )
            held = node.length
        blocks = (held + 511) // 512
        self._blocks[node.name] = (generation, blocks)
        return blocks

    @errno_boundary
    def readdir(self, path: str) -> list[str]:
        if path != "/":
            raise FilesystemError(errno.ENOTDIR if path.lstrip("/") in self.nodes else errno.ENOENT)
        return [".", "..", *self.nodes]

    @errno_boundary
    def statfs(self) -> dict[str, int]:
        # The image file's host file system is what can fill up: report its free space.
        blocks = (self.disk.size + 4095) // 4096
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": len(self.nodes) + 1,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    @errno_boundary
    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        node = self._handle(fh).node if fh is not None else self._node(path)
        if self.read_only:
            raise FilesystemError(errno.EROFS)
        if length != node.length:
            # A disk does not change size under a mounted view (use ``vhd resize``).
            raise FilesystemError(errno.EINVAL, "the file's size is the disk's size")

    @errno_boundary
    def utimens(self, path: str, times_ns: tuple[int, int] | None = None) -> None:
        if path != "/":
            self._node(path)
        if self.read_only:
            raise FilesystemError(errno.EROFS)
        self._mtime_ns = times_ns[1] if times_ns is not None else time.time_ns()

    @errno_boundary
    def chmod(self, path: str, mode: int) -> None:
        if path != "/":
            self._node(path)
        # Permissions follow the mount (read-only or not); they are not stored anywhere.
        raise FilesystemError(errno.EROFS if self.read_only else errno.EPERM)

    @errno_boundary
    def chown(self, path: str, uid: int, gid: int) -> None:
        if path != "/":
            self._node(path)
        raise FilesystemError(errno.EROFS if self.read_only else errno.EPERM)

    # -- handles ------------------------------------------------------------------------

    @errno_boundary
    def open(self, path: str, flags: int) -> int:
        node = self._node(path)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and self.read_only:
            raise FilesystemError(errno.EROFS)
        with self._lock:
            if self._closed:
                raise FilesystemError(errno.ENODEV)
            fh = self._next_handle
            self._next_handle += 1
            self._handles[fh] = Handle(node, writable)
        return fh

    @errno_boundary
    def release(self, fh: int) -> None:
        with self._lock:
            self._handles.pop(fh, None)

    @errno_boundary
    def flush(self, fh: int) -> None:
        """``close()`` (every copy of the descriptor): make what this handle wrote durable."""
        handle = self._handle(fh)
        if handle.dirty:
            handle.dirty = False
            self.disk.flush()

    @errno_boundary
    def fsync(self, fh: int, datasync: bool = False) -> None:
        handle = self._handle(fh)
        handle.dirty = False
        if not self.read_only:
            self.disk.flush()

    # -- data ---------------------------------------------------------------------------

    @errno_boundary
    def readinto(self, fh: int, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` from ``offset`` of the handle's file; returns the bytes filled."""
        node = self._handle(fh).node
        count = self._window(node, offset, len(buffer))
        if count == 0:
            return 0
        view = buffer if count == len(buffer) else buffer[:count]
        return self.disk.preadinto(view, node.start + offset)

    @errno_boundary
    def read(self, fh: int, size: int, offset: int) -> bytes:
        buffer = bytearray(size)
        count = self.readinto(fh, memoryview(buffer), offset)
        return bytes(buffer[:count]) if count < size else bytes(buffer)

    @errno_boundary
    def write(self, fh: int, data: Any, offset: int) -> int:
        handle = self._handle(fh)
        if not handle.writable or self.read_only:
            raise FilesystemError(errno.EROFS if self.read_only else errno.EBADF)
        node = handle.node
        view = memoryview(data).cast("B")
        count = self._window(node, offset, len(view))
        if count == 0:
            if len(view) == 0:
                return 0
            raise FilesystemError(errno.ENOSPC)  # at or past the end, like a block device
        handle.dirty = True
        self._generation += 1
        written: int = self.disk.pwrite(
            view if count == len(view) else view[:count], node.start + offset
        )
        return written

    @errno_boundary
    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        handle = self._handle(fh)
        if self.read_only:
            raise FilesystemError(errno.EROFS)
        if not handle.writable:
            raise FilesystemError(errno.EBADF)
        node = handle.node
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) == 0:
            # Real preallocation cannot be promised for a dynamic image.
            raise FilesystemError(errno.EOPNOTSUPP)
        if mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
            raise FilesystemError(errno.EOPNOTSUPP)
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise FilesystemError(errno.EOPNOTSUPP)  # the kernel's rule for punch-hole
        count = self._window(node, offset, length)
        if count == 0:
            return
        handle.dirty = True
        self._generation += 1
        # Both modes promise zeros: write_zeroes (a plain discard may show a parent's data).
        self.disk.write_zeroes(node.start + offset, count)

    @errno_boundary
    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """``SEEK_DATA``/``SEEK_HOLE`` (the only whences the kernel asks the file system for),
        answered from ``Disk.extents()`` over the handle's window; the end of the file counts
        as a hole, and ``ENXIO`` means no data at or after ``offset``, as lseek(2) says."""
        node = self._handle(fh).node
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FilesystemError(errno.EINVAL)
        if offset < 0 or offset >= node.length:
            raise FilesystemError(errno.ENXIO if offset >= 0 else errno.EINVAL)
        want_data = whence == os.SEEK_DATA
        for ext in self.disk.extents(node.start + offset, node.length - offset):
            if (ext.layer is not None) == want_data:
                return max(ext.offset - node.start, offset)
        if want_data:
            raise FilesystemError(errno.ENXIO)
        return node.length

    # -- lifetime -----------------------------------------------------------------------

    @errno_boundary
    def close(self) -> None:
        """Flush and close the disk (unmount, SIGTERM); later operations fail with ENODEV."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._handles.clear()
        try:
            if not self.read_only:
                self.disk.flush()
        finally:
            self.disk.close()
