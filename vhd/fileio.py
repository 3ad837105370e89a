"""Positional file I/O helpers: exact reads and writes with ``os.preadv``/``os.pwritev`` straight
between the file and the caller's buffer, and hole punching.

Short transfers are retried until complete; a read that meets end-of-file inside a region the
metadata says exists means the image is truncated, which is reported as corruption.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .errors import CorruptImageError

Buffer = bytes | bytearray | memoryview

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

# The C library is already loaded into the process: dlopen(NULL) finds fallocate without
# ctypes.util.find_library, which would spawn ldconfig at import time.
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

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
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    write_zeros(fd, offset, length)


def file_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
