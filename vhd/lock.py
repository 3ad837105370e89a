"""Image locks: who may read and write an image file at the same time.

The VHD spec says nothing about sharing; this module implements the two conventions Linux tools
actually follow, on the open file description of the image, before anything reads or writes it:

* ``flock``: a shared lock for readers, an exclusive one for writers (what vhdkit always did, and
  what ``flock(1)`` and udev understand);
* QEMU's permission bytes (``block/file-posix.c``, ``raw_apply_lock_bytes`` and
  ``raw_check_lock_bytes``): open-file-description byte-range locks (``F_OFD_SETLK``), all of
  them read locks, on byte ``100 + n`` for "I hold permission n" and ``200 + n`` for "I do not
  let others hold permission n", with permission bits consistent-read 0, write 1,
  write-unchanged 2, resize 3, graph-mod 4 (``BLK_PERM_*``).  A taker first sets its bytes, then
  tests (``F_OFD_GETLK`` for a write lock) the ``200 + n`` byte of every permission it wants and
  the ``100 + n`` byte of every permission it does not share; a lock found there is a conflict.

vhdkit takes what ``qemu-img``/``qemu-nbd`` take for the same use, so each side sees the other:

======================  ========================  ===============================
use                     holds                     does not share
======================  ========================  ===============================
reader                  consistent-read           write, resize
writer                  consistent-read, write,   write, resize
                        resize
force-share (``-U``)    nothing (no lock at all)  nothing
======================  ========================  ===============================

So readers coexist, a writer excludes readers and writers, and ``-U`` inspection is never
refused and never blocks anyone (it may then see an image in the middle of a change).

Locks belong to the open file description: they are dropped when its last descriptor is closed
(:meth:`vhd.Disk.close`), survive a rename of the file, and are not inherited by ``exec``.  Where
a file system cannot lock at all (``ENOLCK``, ``EOPNOTSUPP``...), the open goes ahead unlocked,
as QEMU's ``locking=auto`` does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import sys

from .errors import VHDError

PERM_BASE = 100  # RAW_LOCK_PERM_BASE
SHARED_BASE = 200  # RAW_LOCK_SHARED_BASE

CONSISTENT_READ = 1 << 0
WRITE = 1 << 1
WRITE_UNCHANGED = 1 << 2
RESIZE = 1 << 3
GRAPH_MOD = 1 << 4

# (held, not shared) for each use, as qemu-img/qemu-nbd take them (see the module docstring).
READER = (CONSISTENT_READ, WRITE | RESIZE)
WRITER = (CONSISTENT_READ | WRITE | RESIZE, WRITE | RESIZE)

# Errors that mean "this file system does not do locks", not "someone holds it".
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (native alignment pads it to 32 bytes).
_FLOCK = struct.Struct("@hhqqi4x")
_OFD = (
    sys.platform.startswith("linux")
    and sys.maxsize > 2**32
    and hasattr(fcntl, "F_OFD_SETLK")
    and _FLOCK.size == 32
)


class InUseError(VHDError):
    """The image is locked by another process (or another open in this one)."""


def acquire(fd: int, path: str, *, exclusive: bool) -> None:
    """Lock ``fd`` for reading (shared) or writing (``exclusive``), or raise :class:`InUseError`
    and leave ``fd`` unlocked."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InUseError(_message(_flock_holder(fd), exclusive), path=path) from None
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    if not _OFD:
        return
    held, unshared = WRITER if exclusive else READER
    try:
        conflict = _qemu_lock(fd, held, unshared)
    except OSError as exc:
        release(fd)
        if exc.errno not in _UNSUPPORTED:
            raise
        # No byte-range locks here: keep the flock (taken again; release() dropped it).
        with contextlib.suppress(OSError):
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return
    if conflict:
        release(fd)
        raise InUseError(_message(_qemu_holder(fd), exclusive), path=path)


def release(fd: int) -> None:
    """Drop every lock this module put on ``fd`` (closing the last descriptor does it too)."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    if _OFD:
        with contextlib.suppress(OSError):
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, PERM_BASE, SHARED_BASE + 5 - PERM_BASE)


def holder(path: str) -> str | None:
    """``"read-write"`` or ``"read-only"`` when some process holds ``path``, else ``None``;
    takes no lock (for messages and tests)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return _flock_holder(fd) or (_qemu_holder(fd) if _OFD else None)
    finally:
        os.close(fd)


# -- internals -----------------------------------------------------------------------------


def _qemu_lock(fd: int, held: int, unshared: int) -> bool:
    """Set the permission bytes, then look for others' (``raw_apply_lock_bytes`` then
    ``raw_check_lock_bytes``); True on a conflict.  Two takers racing may both see the other
    and both give up, never both go ahead."""
    for bit in range(5):
        if held & (1 << bit):
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + bit)
        if unshared & (1 << bit):
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + bit)
    for bit in range(5):
        # Someone refuses to share a permission we need, or holds one we refuse to share.
        if held & (1 << bit) and _held_by_others(fd, SHARED_BASE + bit):
            return True
        if unshared & (1 << bit) and _held_by_others(fd, PERM_BASE + bit):
            return True
    return False


def _qemu_holder(fd: int) -> str | None:
    """What others hold, from the permission bytes: write permission means a writer."""
    if _held_by_others(fd, PERM_BASE + 1):
        return "read-write"
    if any(
        _held_by_others(fd, base + bit) for base in (PERM_BASE, SHARED_BASE) for bit in range(5)
    ):
        return "read-only"
    return None


def _held_by_others(fd: int, byte: int) -> bool:
    """``F_OFD_GETLK`` for a write lock on ``byte``: locks of this open file description never
    conflict with it, so anything reported belongs to someone else."""
    return _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def _ofd(fd: int, cmd: int, kind: int, start: int, length: int = 1) -> int:
    out = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    return int(_FLOCK.unpack(out)[0])


def _flock_holder(fd: int) -> str | None:
    """What an ``flock`` conflict is, probed on ``fd`` (which holds no lock): an exclusive
    holder (a writer) refuses even a shared lock; shared holders (readers) refuse only an
    exclusive one."""
    # (The shared lock, once taken, is converted to the exclusive probe, then dropped.)
    try:
        for mode, holder in ((fcntl.LOCK_SH, "read-write"), (fcntl.LOCK_EX, "read-only")):
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                return holder
            except OSError:
                return None
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
    return None


def _message(what: str | None, exclusive: bool) -> str:
    message = f"in use by another process ({what or 'read-only'})"
    if not exclusive:
        # Readers are refused only by a writer; qemu-img's -U is the way to look anyway.
        message += "; -U/--force-share reads it anyway (it may be changing)"
    return message
