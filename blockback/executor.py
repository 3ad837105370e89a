"""The block-request executor shared by the NBD export and the Xen blkif backend.

Both protocol front ends decode their wire format into
:class:`~blockback.request.BlockRequest` objects (the one request vocabulary of
:mod:`blockback.request`) and hand them to one :class:`RequestExecutor`, which validates them against the disk and runs them on a
:class:`vhd` ``Disk``.  The executor speaks errno, the common currency of both protocols: NBD
sends errno values on the wire (EPERM, EIO, EINVAL, ENOSPC, ENOTSUP) and blkif collapses every
failure to ``BLKIF_RSP_ERROR``.

Theory of operation
-------------------
* :meth:`RequestExecutor.execute` is synchronous and never raises for an I/O problem or a bad
  request: it returns ``0`` or a positive errno, and logs why (logger ``"blockback"``).  Only a
  misuse of the executor itself (submitting after :meth:`~RequestExecutor.close`) raises.
* Reads go straight from the image file into the caller's buffers with ``Disk.preadinto`` so a
  transport can hand over a slice of a preallocated reply buffer (or a granted page) and send it
  without another copy.
* :meth:`RequestExecutor.submit` queues a request on a small pool of worker threads (the
  ``Disk`` is thread-safe) and calls the caller's callback from the worker that finished it.
  Completions come in any order; protocols that tag requests (NBD handles, blkif ids) match
  replies with :attr:`BlockRequest.tag`.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable

import vhd
from blockback.request import BlockOp, BlockRequest

__all__ = [
    "BlockDisk",
    "BlockOp",
    "BlockRequest",
    "Completion",
    "RequestExecutor",
    "sector_sizes",
]

log = logging.getLogger("blockback")

# Zeroes are written in pieces of this size when a range cannot simply be discarded, so a huge
# WRITE_ZEROES never allocates a buffer as large as the request.
_ZERO_CHUNK = 1024 * 1024
_ZEROS = bytes(_ZERO_CHUNK)


# What the executor needs from a disk: the positional I/O of ``vhd.Disk``.
BlockDisk = vhd.BlockDevice


Completion = Callable[[BlockRequest, int], None]


def sector_sizes(disk: BlockDisk) -> tuple[int, int]:
    """The disk's (logical, physical) sector sizes, as the front ends advertise them.

    A VHDX records both in its metadata (MS-VHDX 2.6.2.4/2.6.2.5: 512 or 4096); a VHD, raw image
    or test double has no such attributes and is 512/512.  The physical size is never reported
    below the logical one."""
    logical = int(getattr(disk, "logical_sector_size", 512))
    physical = int(getattr(disk, "physical_sector_size", logical))
    return logical, max(logical, physical)


def _nbytes(buffer: memoryview) -> int:
    return buffer.nbytes


class RequestExecutor:
    """Validates block requests and runs them on a disk, inline or on a worker pool."""

    def __init__(self, disk: BlockDisk, *, read_only: bool = False, workers: int = 4) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.disk = disk
        self.size: int = disk.size
        # A disk opened read-only makes the export read-only whatever the caller asked.
        self.read_only: bool = bool(read_only or disk.read_only)
        self._workers = workers
        self._queue: queue.SimpleQueue[tuple[BlockRequest, Completion] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._closed = False

    # -- synchronous path ------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet completed."""
        return self._in_flight

    def execute(self, req: BlockRequest) -> int:
        """Run one request now; return 0 or a positive errno (never raises for I/O problems)."""
        try:
            problem = self._validate(req)
            if problem:
                return problem
            op = req.op
            if op is BlockOp.READ:
                return self._read(req)
            if op is BlockOp.WRITE:
                return self._write(req)
            if op is BlockOp.FLUSH:
                if not self.read_only:
                    self.disk.flush()
                return 0
            if op is BlockOp.DISCARD:
                if req.length:
                    self.disk.discard(req.offset, req.length)
                if req.fua:
                    self.disk.flush()
                return 0
            return self._write_zeroes(req)
        except vhd.ReadOnlyError as exc:
            log.warning("%s refused: %s", req.op.value, exc)
            return errno.EPERM
        except vhd.InvalidArgumentError as exc:
            log.warning("%s refused: %s", req.op.value, exc)
            return errno.EINVAL
        except vhd.VHDError as exc:
            log.error("%s at %d+%d failed: %s", req.op.value, req.offset, req.length, exc)
            return errno.EIO
        except OSError as exc:
            log.error("%s at %d+%d failed: %s", req.op.value, req.offset, req.length, exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return errno.ENOSPC
            return errno.EIO
        except Exception:
            # A bug below us must not take a whole connection (or a guest's disk) down.
            log.exception("%s at %d+%d failed unexpectedly", req.op.value, req.offset, req.length)
            return errno.EIO

    def _validate(self, req: BlockRequest) -> int:
        offset, length = req.offset, req.length
        if offset < 0 or length < 0 or offset > self.size or length > self.size - offset:
            log.warning(
                "%s at %d+%d is outside the disk (%d bytes)",
                req.op.value,
                offset,
                length,
                self.size,
            )
            return errno.EINVAL
        op = req.op
        if op is BlockOp.READ or op is BlockOp.WRITE:
            if sum(_nbytes(b) for b in req.buffers) != length:
                log.warning("%s: buffers do not add up to %d bytes", op.value, length)
                return errno.EINVAL
            if op is BlockOp.READ and any(b.readonly for b in req.buffers):
                log.warning("read into a read-only buffer")
                return errno.EINVAL
        if op is not BlockOp.READ and op is not BlockOp.FLUSH and self.read_only:
            log.warning("%s refused: the export is read-only", op.value)
            return errno.EPERM
        return 0

    def _read(self, req: BlockRequest) -> int:
        offset = req.offset
        for buffer in req.buffers:
            want = buffer.nbytes
            if not want:
                continue
            if buffer.format != "B" or buffer.ndim != 1:
                buffer = buffer.cast("B")
            got = self.disk.preadinto(buffer, offset)
            if got != want:
                log.error("read at %d: the disk returned %d of %d bytes", offset, got, want)
                return errno.EIO
            offset += want
        return 0

    def _write(self, req: BlockRequest) -> int:
        offset = req.offset
        for buffer in req.buffers:
            if buffer.nbytes:
                self.disk.pwrite(buffer, offset)
                offset += buffer.nbytes
        if req.fua:
            self.disk.flush()
        return 0

    def _write_zeroes(self, req: BlockRequest) -> int:
        if req.length:
            if not req.no_hole:
                # Reads back zeros, freeing space where that keeps the zeros (TRIM, above, is
                # Disk.discard: unspecified contents, never allocates).
                self.disk.write_zeroes(req.offset, req.length)
            elif req.fast_zero:
                # Real zeros cost as much as a write: the client asked us to refuse.
                return errno.ENOTSUP
            else:
                end = req.offset + req.length
                pos = req.offset
                while pos < end:
                    n = min(_ZERO_CHUNK, end - pos)
                    self.disk.pwrite(memoryview(_ZEROS)[:n], pos)
                    pos += n
        if req.fua:
            self.disk.flush()
        return 0

    # -- asynchronous path -----------------------------------------------------------------

    def submit(self, req: BlockRequest, callback: Completion) -> None:
        """Queue a request; ``callback(req, errno)`` runs on a worker thread when it is done.

        Callbacks may submit follow-up requests (a write then its flush), even while
        :meth:`close` is draining: the drain waits for those too.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("submit() on a closed RequestExecutor")
            self._in_flight += 1
            if len(self._threads) < self._workers and self._in_flight > len(self._threads):
                self._start_worker()
        self._queue.put((req, callback))

    def _start_worker(self) -> None:
        # Called with the lock held; workers start lazily so an idle export costs no threads.
        thread = threading.Thread(
            target=self._work, name=f"blockback-io-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            req, callback = item
            result = self.execute(req)
            try:
                callback(req, result)
            except Exception:
                log.exception("completion callback for %s failed", req.op.value)
            finally:
                with self._lock:
                    self._in_flight -= 1
                    if not self._in_flight:
                        self._idle.notify_all()

    def drain(self) -> None:
        """Block until every submitted request has completed (its callback has returned)."""
        with self._lock:
            while self._in_flight:
                self._idle.wait()

    def close(self) -> None:
        """Drain, then stop the worker threads.  The disk stays open (it is the caller's).

        Not from a completion callback (the drain would wait for that callback itself).
        """
        with self._lock:
            # Drain and mark closed in one critical section: a callback may still submit a
            # follow-up while we wait, and nothing may slip in between the drain and the stop.
            while self._in_flight:
                self._idle.wait()
            self._closed = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    def __enter__(self) -> RequestExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
