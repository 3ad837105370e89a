"""Writing a whole new image file so that no reader ever sees it half-made (``vhd create``,
``vhd convert``; the spec's "Creating a hard disk image" says nothing about interruptions).

The image is written under a temporary name in the folder of its final name,
``NAME.vhdkit-partial-XXXXXXXX``, and renamed to ``NAME`` only when it is complete: an
interrupted or failed command (Ctrl-C, SIGTERM, ``ENOSPC``, a crash) never leaves a partial image
under the final name, and never touches the file that was there.  On failure the temporary is
removed; only a process killed outright (``SIGKILL``, power loss) can leave one behind, and its
name says what it is.

With ``overwrite``, an existing file at the final name is locked exclusively (:mod:`vhd.lock`)
before anything else happens and stays locked until the rename replaces it, so an image that is
mounted, served or open in QEMU is refused up front and left intact.  Its permissions (and owner,
where allowed) carry over to the new file.  A block device (or other non-regular file) cannot be
replaced by a rename: it is written in place, locked the same way.

Durability, when asked for: the file is ``fsync``\\ ed before the rename and the folder after it,
so that after a crash the final name holds either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from . import lock

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Protocol, TypeVar

    class _Closable(Protocol):
        def close(self) -> None: ...

    Opened = TypeVar("Opened", bound=_Closable)

PARTIAL = ".vhdkit-partial-"


class NewFile:
    """A new file at ``path``: write through :attr:`fd` (or open :attr:`path`), then
    :meth:`publish`.  Used as a context manager, leaving without publishing removes it."""

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        given = os.fspath(path)
        # A symlink stays: its target is replaced, as qemu-img writes through it.
        self.final = os.path.realpath(given) if os.path.islink(given) else given
        self.overwrite = overwrite
        self.in_place = False
        self.published = False
        self.path = ""  # the temporary (or, in place, the final) name, once there is one
        self._old_fd = -1
        self._old_stat: os.stat_result | None = None
        self.fd = -1
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        try:
            st = os.stat(self.final)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not self.overwrite:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), self.final)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.final)
            if not stat.S_ISREG(st.st_mode):
                self.in_place = True
                self.path = self.final
                self.fd = os.open(self.final, os.O_RDWR | os.O_CLOEXEC)
                lock.acquire(self.fd, self.final, exclusive=True)
                return
            # Locked before anything is written: a mounted or served image is refused here.
            self._old_fd = os.open(self.final, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            lock.acquire(self._old_fd, self.final, exclusive=True)
            self._old_stat = os.fstat(self._old_fd)
        folder, name = os.path.split(self.final)
        for _ in range(100):
            # (os.urandom, not secrets: importing secrets costs every command start-up time)
            candidate = os.path.join(folder, f"{name}{PARTIAL}{os.urandom(4).hex()}")
            try:
                self.fd = os.open(
                    candidate, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
                )
            except FileExistsError:
                continue
            except OSError as exc:
                # Named after the file the user asked for, not our temporary.
                raise type(exc)(exc.errno, exc.strerror, self.final) from exc
            self.path = candidate
            break
        else:  # pragma: no cover - 100 random collisions
            raise FileExistsError(errno.EEXIST, "no free temporary name", self.final)
        lock.acquire(self.fd, self.final, exclusive=True)
        if self._old_stat is not None:
            with contextlib.suppress(OSError):
                os.fchown(self.fd, self._old_stat.st_uid, self._old_stat.st_gid)
            os.fchmod(self.fd, stat.S_IMODE(self._old_stat.st_mode))

    def publish(self, *, durable: bool = True) -> None:
        """Give the complete file its final name (the old file, if any, is replaced)."""
        if durable:
            os.fsync(self.fd)
        if not self.in_place:
            if self.overwrite:
                os.rename(self.path, self.final)
            else:
                self._link_no_replace()
            self.published = True
            if durable:
                _sync_folder(self.final)
        self.published = True
        if self._old_fd >= 0:
            os.close(self._old_fd)
            self._old_fd = -1

    def publish_open(self, disk: Opened) -> Opened:
        """:meth:`publish` (durably) an image that is open as ``disk`` and hand the disk over:
        the caller of a create gets it; it is closed when publishing fails."""
        try:
            self.publish(durable=True)
        except BaseException:
            disk.close()
            raise
        return disk

    def _link_no_replace(self) -> None:
        """Rename without replacing a file that appeared meanwhile (``link`` fails with
        ``EEXIST``; where the file system has no hard links, a plain rename)."""
        try:
            os.link(self.path, self.final)
        except FileExistsError:
            # Someone made it while we wrote ours: theirs stays (overwrite was not asked for).
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), self.final) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                raise
            os.rename(self.path, self.final)
            return
        os.unlink(self.path)

    def close(self) -> None:
        """Close; an unpublished temporary is removed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.published and not self.in_place and self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.published = True  # nothing left to remove
        if self._old_fd >= 0:
            os.close(self._old_fd)
            self._old_fd = -1

    def __enter__(self) -> NewFile:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        self.close()
        if isinstance(exc, OSError) and exc.filename is None:
            # ENOSPC and friends come from pwrite/fsync without a name: the user needs one.
            raise named(exc, self.final) from exc


def named(exc: OSError, path: str) -> OSError:
    """``exc`` with ``path`` as its file name (an error of the same class), or ``exc`` itself
    if it already names one."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno or 0), path)


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """OS errors raised inside without a file name (``pwrite``'s ``ENOSPC``, ``fsync``'s
    ``EIO``) get ``path`` as theirs, so the user sees which file failed."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise named(exc, path) from exc


def _sync_folder(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
