"""The libfuse binding: runs a :class:`vhdfuse.fs.DiskFilesystem` under mfusepy.

The only module that imports ``mfusepy``.  Choices, each measured (see ``benchmarks/fuse.py``
and the report of issue 4):

* **libfuse 3.** mfusepy loads libfuse 2 whenever both are installed unless
  ``FUSE_LIBRARY_PATH`` names another library; we point it at ``libfuse3.so.3`` when present
  (``VHDFUSE_LIBFUSE=2`` forces libfuse 2 for comparisons).  libfuse 3 negotiates 1 MiB
  requests (``max_pages`` = 256) where libfuse 2 stops at 128 KiB.
* **Zero copy.** mfusepy's own read callback returns ``bytes`` that it then copies into the
  kernel's buffer, and its write callback copies the buffer into ``bytes``.  :class:`_FUSE`
  replaces both: reads fill libfuse's buffer straight from the image (``Disk.preadinto`` on a
  ``memoryview`` of the C buffer), writes hand the C buffer to ``Disk.pwrite`` as a view.
* **Single-threaded loop.** Measured on this 2-vCPU machine with fio 4 KiB psync random reads
  through a direct-I/O mount: libfuse's multi-threaded loop reached 7-14k IOPS with one job and
  14-24k with four, the single-threaded loop 24-38k with one and 38-70k with four (a trivial
  in-memory file system showed the same 2-3x gap).  Every libfuse worker thread entering Python
  through a ctypes callback pays for a thread state and a GIL hand-over; the image I/O itself
  (host page cache) takes a few microseconds.  Requests are therefore served one at a time,
  which also makes concurrent access trivially consistent.  ``VHDFUSE_THREADS=1`` brings the
  multi-threaded loop back for comparisons.
* **Direct I/O by default; the kernel page cache on request** (``cache="kernel"``).  Measured
  side by side (1 GiB half-data image, warm host cache, 4 interleaved runs): a first ``cat``
  took 0.30-0.38 s with direct I/O (1 MiB requests: ``st_blksize`` is 1 MiB) against
  0.54-1.55 s through the page cache (128 KiB readahead requests; raising the bdi's
  ``read_ahead_kb`` to 1-4 MiB gave 0.54-1.13 s), and fio 4 KiB random reads were alike
  (22-63k against 25-60k IOPS; qemu-storage-daemon 14-28k).  Direct I/O also keeps the disk's
  bytes out of a second cache and stays coherent between ``disk`` and ``pN``, which alias the
  same bytes in separate page caches.  ``cache="kernel"`` (repeated reads served by the kernel,
  shared ``mmap``) is used only where it is safe: a read-only mount (files keep their pages
  across opens; nothing can change) or a writable mount showing only ``disk`` (the kernel's
  write-through cache is coherent by itself).  A writable mount with partitions stays direct:
  invalidating the aliases from inside a write would need the single server thread that the
  pending reads wait for.
* **Our own stop signals.**  libfuse's handlers for SIGINT, SIGTERM and SIGHUP end the loop,
  but ``fuse_main`` then reports the signal as a failure (status 8), which made a clean stop of
  a foreground mount (Ctrl-C, ``systemctl stop``) exit 2.  :class:`_Stopper` blocks those
  signals, takes them with ``sigtimedwait`` on a thread, and ends the loop the way
  ``fuse_exit`` does (then a ``statfs`` wakes the loop from its read); libfuse unmounts and
  calls ``destroy`` (flush, close) as before, and ``fuse_main`` returns 0.
* **Long attribute timeouts** and ``nullpath_ok``: sizes and names never change while mounted,
  so the kernel need not ask again, and libfuse need not build paths for I/O requests.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import importlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from .fs import DiskFilesystem, FilesystemError


def _select_library() -> str:
    """Point mfusepy at libfuse 3 unless the user chose a library."""
    explicit = os.environ.get("FUSE_LIBRARY_PATH")
    if explicit:
        return explicit
    wanted = os.environ.get("VHDFUSE_LIBFUSE", "3")
    names = ["fuse3", "fuse"] if wanted != "2" else ["fuse", "fuse3"]
    for name in names:
        path = ctypes.util.find_library(name)
        if path:
            return path
    raise OSError(errno.ENOENT, "libfuse is not installed (apt-get install libfuse3-3)")


def _load_mfusepy(library: str) -> Any:
    """Import mfusepy bound to ``library``: it reads FUSE_LIBRARY_PATH once, at its import.
    The variable is set for that import only and restored after, so importing this module
    leaves the process environment as it found it."""
    saved = os.environ.get("FUSE_LIBRARY_PATH")
    os.environ["FUSE_LIBRARY_PATH"] = library
    try:
        return importlib.import_module("mfusepy")
    finally:
        if saved is None:
            del os.environ["FUSE_LIBRARY_PATH"]
        else:
            os.environ["FUSE_LIBRARY_PATH"] = saved


LIBRARY_PATH = _select_library()
mfusepy = _load_mfusepy(LIBRARY_PATH)

log = logging.getLogger("vhdfuse")

LIBFUSE_MAJOR: int = mfusepy.fuse_version_major
# The largest request libfuse 3 and the kernel agree on (256 pages); libfuse 2 caps at 128 KiB.
MAX_IO = 1024 * 1024 if LIBFUSE_MAJOR >= 3 else 128 * 1024
CACHE_MODES = ("direct", "kernel")
DEFAULT_CACHE = "direct"
# Measurement knob only (see the module docstring): 1 = libfuse's multi-threaded loop.
DEFAULT_THREADS = os.environ.get("VHDFUSE_THREADS", "0") == "1"
_TIMEOUT = 86400.0  # the mount's names and sizes never change


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


class _Stopper:
    """Ends the FUSE loop on SIGINT/SIGTERM/SIGHUP as a clean stop (see the module docstring).

    Active only on the main thread (where the process's signals can be blocked for all threads
    that libfuse starts); elsewhere libfuse's own handlers stay in charge.
    """

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        self.received: int | None = None
        self._fuse: int | None = None  # libfuse's ``struct fuse *``, known from init on
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_mask: set[int | signal.Signals] | None = None

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # Blocked before libfuse (and its worker threads) exist: every thread inherits it.
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        self._thread = threading.Thread(target=self._watch, name="vhdfuse-signals", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None or self._old_mask is None:
            return
        self._done.set()
        self._thread.join()
        # A signal that came while libfuse was closing: taken here, not left to kill us later.
        while (late := signal.sigtimedwait(STOP_SIGNALS, 0)) is not None:
            self.received = self.received or late.si_signo
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    def attach(self) -> None:
        """From libfuse's ``init`` callback: remember the session; a stop may be pending."""
        pointer = mfusepy._libfuse.fuse_get_context().contents.fuse
        with self._lock:
            self._fuse = pointer
            stop = self.received is not None
        if stop:
            self._exit()

    def _watch(self) -> None:
        while not self._done.is_set():
            info = signal.sigtimedwait(STOP_SIGNALS, 0.25)
            if info is None or self.received is not None:
                continue
            log.info("%s: stopping (%s)", self.mountpoint, signal.Signals(info.si_signo).name)
            with self._lock:
                self.received = info.si_signo
                attached = self._fuse is not None
            if attached:
                self._exit()
                # The loop notices the flag after its next request: send a harmless one.
                with contextlib.suppress(OSError):
                    os.statvfs(self.mountpoint)

    def _exit(self) -> None:
        mfusepy._libfuse.fuse_exit(ctypes.c_void_p(self._fuse))


def _fsname_option(text: str) -> str:
    # Commas separate -o options and backslash escapes in libfuse's option parser.
    return text.replace("\\", "\\\\").replace(",", "\\,")


class _Operations(mfusepy.Operations):  # type: ignore[misc,name-defined]
    """mfusepy callbacks, each a thin call into the filesystem core."""

    use_ns = True

    def __init__(
        self,
        fs: DiskFilesystem,
        *,
        cache: str,
        on_ready: Callable[[], None] | None,
        stopper: _Stopper | None = None,
    ) -> None:
        self.fs = fs
        self.stopper = stopper
        # Aliasing page caches (disk and pN) could go stale on a writable mount: no cache there.
        self.direct = cache != "kernel" or (not fs.read_only and len(fs.nodes) > 1)
        self.on_ready = on_ready

    # -- lifetime -------------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None and LIBFUSE_MAJOR >= 3:
            config.use_ino = 1
            config.attr_timeout = _TIMEOUT
            config.entry_timeout = _TIMEOUT
            config.negative_timeout = _TIMEOUT
            config.nullpath_ok = 1  # I/O callbacks use the file handle, not the path
        if conn is not None:
            if LIBFUSE_MAJOR >= 3:
                conn.max_read = 0  # no limit beyond max_pages
            log.info(
                "libfuse %d.%d (%s): max_write=%d max_readahead=%d proto=%d.%d %s",
                mfusepy.fuse_version_major,
                mfusepy.fuse_version_minor,
                LIBRARY_PATH,
                conn.max_write,
                conn.max_readahead,
                conn.proto_major,
                conn.proto_minor,
                "direct I/O" if self.direct else "kernel page cache",
            )
        if self.stopper is not None:
            self.stopper.attach()
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path: str) -> None:
        try:
            self.fs.close()
        except FilesystemError as exc:
            log.error("closing the image failed: %s", exc)

    # -- metadata -------------------------------------------------------------------------

    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        if path is None:  # fstat with nullpath_ok: only the handle is known
            return self.fs.getattr("", fh.fh).as_dict()
        return self.fs.getattr(path).as_dict()

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        path = "/" if path is None else path  # nullpath_ok: the only directory is the root
        # With use_ino, a name without an inode number would read as inode 0, which readdir(3)
        # skips: hand libfuse each entry's mode and inode.
        entries = []
        for name in self.fs.readdir(path):
            target = "/" if name in (".", "..") else "/" + name
            attrs = self.fs.getattr(target)
            entries.append((name, {"st_mode": attrs.mode, "st_ino": attrs.inode}, 0))
        return entries

    def statfs(self, path: str) -> dict[str, int]:
        return self.fs.statfs()

    def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
        # ftruncate under nullpath_ok names only the handle (an int from _FUSE, a struct from
        # mfusepy's libfuse 2 ftruncate).
        handle = fh if fh is None or isinstance(fh, int) else fh.fh
        self.fs.truncate(path or "", length, handle)
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        self.fs.utimens(path or "/", times)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        self.fs.chmod(path, mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self.fs.chown(path, uid, gid)
        return 0

    # -- handles and data -----------------------------------------------------------------

    def open(self, path: str, fi: Any) -> int:
        fi.fh = self.fs.open(path, fi.flags)
        if self.direct:
            fi.direct_io = 1
        else:
            # Only this mount changes these bytes, through this very inode (write-through),
            # so cached pages stay valid across opens.
            fi.keep_cache = 1
        return 0

    def release(self, path: str, fi: Any) -> int:
        self.fs.release(fi.fh)
        return 0

    def flush(self, path: str, fi: Any) -> int:
        self.fs.flush(fi.fh)
        return 0

    def fsync(self, path: str, datasync: int, fi: Any) -> int:
        self.fs.fsync(fi.fh, bool(datasync))
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fi: Any) -> int:
        self.fs.fallocate(fi.fh, mode, offset, size)
        return 0

    def lseek(self, path: str | None, offset: int, whence: int, fh: Any) -> int:
        return self.fs.lseek(fh, offset, whence)

    # Present so that mfusepy registers the callbacks; _FUSE routes them without copies.
    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        raise FilesystemError(errno.ENOSYS)  # pragma: no cover

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        raise FilesystemError(errno.ENOSYS)  # pragma: no cover


class _FUSE(mfusepy.FUSE):  # type: ignore[misc,name-defined]
    """mfusepy's dispatcher with copy-free read and write callbacks."""

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        # mfusepy drops the file handle here, which ftruncate under nullpath_ok needs.
        fh = fip.contents.fh if fip else None
        name = None if path is None else path.decode(self.encoding, self.errors)
        result: int = self.operations.truncate(name, length, fh)
        return result

    def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
        # libfuse 3 only (mfusepy has no wrapper for it): SEEK_DATA/SEEK_HOLE.
        result: int = self.operations.lseek(None, offset, whence, fip.contents.fh)
        return result

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        count: int = self.operations.fs.readinto(fip.contents.fh, _view(buf, size), offset)
        return count

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        count: int = self.operations.fs.write(fip.contents.fh, _view(buf, size), offset)
        return count


@functools.lru_cache(maxsize=64)
def _array(size: int) -> Any:
    """The ctypes array type viewing a request buffer."""
    return ctypes.c_ubyte * size


def _view(buf: Any, size: int) -> memoryview:
    """A ``'B'`` memoryview of libfuse's request buffer, without a copy.

    ctypes exports its arrays with the format ``'<B'``; cast to the native ``'B'`` that the
    disk's single-``preadv`` fast path (and every ``bytes``-like consumer) expects.
    """
    return memoryview(_array(size).from_address(ctypes.addressof(buf.contents))).cast("B")


def run(
    fs: DiskFilesystem,
    mountpoint: str,
    *,
    fsname: str,
    subtype: str = "vhd",
    allow_other: bool = False,
    cache: str = DEFAULT_CACHE,
    debug: bool = False,
    threads: bool | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount ``fs`` on ``mountpoint`` and serve it until unmounted (or SIGTERM/SIGINT/SIGHUP).

    Blocks; ``on_ready`` runs once the kernel has initialised the connection.  A stop signal
    ends the loop (:class:`_Stopper`), then libfuse unmounts and calls ``destroy``, which
    flushes and closes the disk; either way this returns normally.  Raises ``RuntimeError``
    (libfuse's status) when the mount fails.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}")
    options: dict[str, Any] = {
        "foreground": True,
        "debug": debug,
        "nothreads": not (DEFAULT_THREADS if threads is None else threads),
        "fsname": _fsname_option(fsname),
        "subtype": subtype,
        "default_permissions": True,
        "attr_timeout": _TIMEOUT,
        "entry_timeout": _TIMEOUT,
        "negative_timeout": _TIMEOUT,
        "use_ino": True,
    }
    if fs.read_only:
        options["ro"] = True
    if allow_other:
        options["allow_other"] = True
    if LIBFUSE_MAJOR == 2:
        options.update(big_writes=True, max_write=MAX_IO, max_read=MAX_IO, max_readahead=MAX_IO)
    stopper = _Stopper(mountpoint)
    operations = _Operations(fs, cache=cache, on_ready=on_ready, stopper=stopper)
    stopper.start()
    try:
        _FUSE(operations, mountpoint, raw_fi=True, **options)
    finally:
        stopper.stop()
