"""Positional file I/O helpers: exact reads and writes with ``os.preadv``/``os.pwritev`` straight
between the file and the caller's buffer, and hole punching.

Short transfers are retried until complete; a read that meets end-of-file inside a region the
metadata says exists means the image is truncated, which is reported as corruption.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from collections.abc import Callable

from . import lock
from .errors import CorruptImageError, InvalidArgumentError, NotAVHDError, ParentNotFoundError

Buffer = bytes | bytearray | memoryview

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_fallocate: Callable[[int, int, int, int], int] | None = None

_ZEROS = bytes(1 << 20)
_ZERO_VIEW = memoryview(_ZEROS)


def read_exact_into(fd: int, dest: memoryview, offset: int, *, path: str | None = None) -> None:
    done = 0
    total = len(dest)
    while done < total:
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n == 0:
            raise CorruptImageError(
                f"unexpected end of file at offset {offset + done} (the image is truncated)",
                path=path,
            )
        done += n


def read_exact(fd: int, length: int, offset: int, *, path: str | None = None) -> bytes:
    buf = bytearray(length)
    read_exact_into(fd, memoryview(buf), offset, path=path)
    return bytes(buf)


def read_upto(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes (fewer at end of file)."""
    return os.pread(fd, length, offset)


def write_all(fd: int, data: Buffer, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    total = len(view)
    while done < total:
        n = os.pwritev(fd, [view[done:]], offset + done)
        if n <= 0:  # pragma: no cover - pwrite reports errors by raising
            raise OSError(errno.EIO, "short write")
        done += n


def write_zeros(fd: int, offset: int, length: int) -> None:
    while length > 0:
        n = min(length, len(_ZEROS))
        write_all(fd, memoryview(_ZEROS)[:n], offset)
        offset += n
        length -= n


def zero_fill(dest: memoryview) -> None:
    pos = 0
    total = len(dest)
    while pos < total:
        n = min(total - pos, len(_ZEROS))
        dest[pos : pos + n] = _ZERO_VIEW[:n]  # a view: no copy of the zeros first
        pos += n


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros and give its space back to the file system.

    Falls back to writing zeros where the file system cannot punch holes.
    """
    if length <= 0:
        return
    # ctypes is imported here, not at start-up: only the commands that free space punch holes,
    # and its import costs every other command about 4 ms.
    import ctypes

    global _fallocate
    if _fallocate is None:
        # The C library is already loaded into the process: dlopen(NULL) finds fallocate
        # without ctypes.util.find_library, which would spawn ldconfig.
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fallocate.restype = ctypes.c_int
        _fallocate = fallocate
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    write_zeros(fd, offset, length)


def file_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def open_image_file(
    path: str, *, writable: bool, force_share: bool = False, expect: tuple[int, int] | None = None
) -> tuple[int, os.stat_result]:
    """Open an image file (VHD or VHDX) and lock it before anything is read: shared for a
    reader, exclusive for a writer, as flock and as QEMU's lock bytes (:mod:`vhd.lock`), unless
    ``force_share``.  Only regular files and block devices are accepted; ``expect`` is the
    (st_dev, st_ino) a parent search vetted, so a file swapped in since is refused.  Returns
    the descriptor, which the caller owns, and its stat."""
    # O_NONBLOCK: opening a FIFO (say, a shell's <(...)) would otherwise wait for a writer
    # forever; it is refused just below, and the flag is cleared for files that are accepted.
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if expect is not None and (st.st_dev, st.st_ino) != expect:
            raise ParentNotFoundError("the parent changed while it was being opened", path=path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise NotAVHDError("not a regular file or block device", path=path)
        os.set_blocking(fd, True)
        if not force_share:
            # Before anything is read: a writer elsewhere could be halfway through a change.
            lock.acquire(fd, path, exclusive=writable)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


BLKGETSIZE64 = 0x80081272  # <linux/fs.h>: _IOR(0x12, 114, size_t)


def open_block_device(path: str, *, overwrite: bool) -> tuple[int, int]:
    """Open a block device to overwrite it (``vhd create``/``vhd convert`` onto ``/dev/X``):
    refused without ``overwrite`` (--force), when mounted or otherwise claimed, or when a VM or
    a server of ours has it open.  Returns the descriptor, which the caller owns, locked
    exclusively, and the device's size in bytes."""
    if not overwrite:
        raise InvalidArgumentError(
            "the block device exists: pass --force to overwrite its content", path=path
        )
    # O_EXCL on a block device: refuse one that is mounted or otherwise claimed (EBUSY).
    # Read-write, not write-only: QEMU's lock bytes are read locks, which need read access.
    try:
        fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise InvalidArgumentError(
                "the block device is in use (mounted, or part of a RAID/LVM/dm device)", path=path
            ) from None
        raise
    try:
        # A device a VM or a server of ours is using is refused before anything is written.
        lock.acquire(fd, path, exclusive=True)
        buf = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buf)
    except BaseException:
        os.close(fd)
        raise
    return fd, int.from_bytes(buf, sys.byteorder)
