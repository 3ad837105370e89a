"""A simulated hypervisor for blkif: guest memory, grant table and event channels without Xen.

Used by the tests, the benchmarks and ``vhd serve IMAGE --sim DIR``.  Everything lives in DIR so a
frontend in another process (the C test frontend, ``tests/blockback/frontend.c``) can join:

``DIR/memory``
    The guest's memory: ``pages`` frames of 4 KiB.  **Grant reference = page index.**  Both sides
    ``mmap`` it shared; the backend moves data with ``preadinto``/``pwrite`` straight between the
    image file and slices of this mapping (zero copy, like a grant *map*).
``DIR/grants``
    The grant table: one byte per page, written by the frontend: 0 = not granted (or revoked),
    1 = granted read-write, 2 = granted read-only.  Checked at map time, as Xen does.
``DIR/evtchn.sock``
    Event channels.  A frontend "allocates an unbound port" by connecting: the hypervisor answers
    with the port number (u32 little endian), which the frontend writes to XenStore as
    ``event-channel``.  The backend binds that port (``bind_interdomain``) and gets the other end
    of the connection.  ``notify`` = send one byte; the receiver drains all pending bytes at once
    (one wake-up per burst: a storm costs one read, XSA-332).

The backend-side objects satisfy the protocols of :mod:`blockback.backend` (``GrantMapper`` and
``EventChannel``); :class:`SimFrontendMemory` and :func:`alloc_unbound_port` are the guest side.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blockback.abi import PAGE_SIZE
from blockback.errors import GrantError
from blockback.ring import PagedRingMemory, RingMemory, ViewRingMemory
from blockback.transport import coalesced_views

GRANT_NONE = 0
GRANT_RW = 1
GRANT_RO = 2
DEFAULT_PAGES = 16384  # 64 MiB of guest memory
_NOTIFY_READ = 65536  # bytes drained per ack: bounded work however fast the peer kicks us


class SimMemory:
    """The shared guest memory and grant table files of DIR (either side may open them)."""

    def __init__(self, directory: str | os.PathLike[str], pages: int | None = None) -> None:
        self.directory = Path(directory)
        mem_path = self.directory / "memory"
        grant_path = self.directory / "grants"
        if pages is not None:  # create (the hypervisor side)
            self.directory.mkdir(parents=True, exist_ok=True)
            for path, size in ((mem_path, pages * PAGE_SIZE), (grant_path, pages)):
                with open(path, "wb") as f:
                    f.truncate(size)  # sparse: untouched guest pages cost nothing
        self.pages = os.path.getsize(grant_path)
        with open(mem_path, "r+b") as f:
            self._mem = mmap.mmap(f.fileno(), self.pages * PAGE_SIZE)
        with open(grant_path, "r+b") as f:
            self._grants = mmap.mmap(f.fileno(), self.pages)
        self.view = memoryview(self._mem)
        self.grant_flags = memoryview(self._grants)

    def page(self, index: int) -> memoryview:
        if not 0 <= index < self.pages:
            raise GrantError(f"grant reference {index} is outside guest memory")
        return self.view[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]

    def close(self) -> None:
        self.view.release()
        self.grant_flags.release()
        try:
            self._mem.close()
            self._grants.close()
        except BufferError:
            pass  # a mapping is still in use somewhere: leave it to the garbage collector


class SimMapping:
    """Buffers granted for one request; ``release()`` before answering it."""

    __slots__ = ("_table", "buffers")

    def __init__(self, table: SimGrantTable, buffers: list[memoryview]) -> None:
        self._table = table
        self.buffers = buffers

    def release(self) -> None:
        if self.buffers:
            for b in self.buffers:
                b.release()
            self.buffers = []
            self._table._unmapped()


class SimGrantTable:
    """Backend access to a frontend's granted pages (grant map for data, grant copy for
    indirect descriptor pages)."""

    copies_data = False  # data is mapped: nothing to do between completion and release

    def __init__(self, memory: SimMemory) -> None:
        self.memory = memory
        self.mapped = 0  # live mappings: must be 0 whenever no request is in flight
        self._lock = threading.Lock()

    def _check(self, gref: int, writable: bool) -> None:
        if not 0 <= gref < self.memory.pages:
            raise GrantError(f"grant reference {gref} is outside guest memory")
        flag = self.memory.grant_flags[gref]
        if flag == GRANT_NONE:
            raise GrantError(f"grant reference {gref} is not granted")
        if writable and flag != GRANT_RW:
            raise GrantError(f"grant reference {gref} is read-only")

    def map_segments(self, segments: Sequence[tuple[int, int, int]], writable: bool) -> SimMapping:
        """Map ``(gref, offset, length)`` segments: checked first, all or nothing, and coalesced
        where one segment ends a page and the next starts the following page."""
        for gref, _, _ in segments:
            self._check(gref, writable)
        buffers = coalesced_views(
            self.memory.view, ((g * PAGE_SIZE + off, n) for g, off, n in segments)
        )
        with self._lock:
            self.mapped += 1
        return SimMapping(self, buffers)

    def _unmapped(self) -> None:
        with self._lock:
            self.mapped -= 1

    def finish_mappings(self, items: Sequence[tuple[Any, bool]]) -> list[bool]:
        return [True] * len(items)  # mapped pages already hold the data (not called: copies_data)

    def copy_pages(self, grefs: Sequence[int]) -> list[bytes]:
        """Grant copy: private copies of whole pages (read once)."""
        out = []
        for gref in grefs:
            self._check(gref, False)
            out.append(self.memory.page(gref).tobytes())
        return out

    def map_ring(self, refs: Sequence[int]) -> RingMemory:
        for gref in refs:
            self._check(gref, True)
        if all(b == a + 1 for a, b in itertools.pairwise(refs)):
            first = refs[0] * PAGE_SIZE
            return ViewRingMemory(self.memory.view[first : first + len(refs) * PAGE_SIZE])
        return PagedRingMemory([self.memory.page(g) for g in refs])


class SimEventChannel:
    """One end of an interdomain event channel (a connected stream socket)."""

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock = sock
        self.port = port
        self.notifications_sent = 0
        self.peer_closed = False
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def notify(self) -> None:
        self.notifications_sent += 1
        try:
            self.sock.send(b"\x01")
        except (BlockingIOError, InterruptedError):
            pass  # a full buffer means the peer has unread kicks already: nothing is lost
        except OSError:
            self.peer_closed = True

    def ack(self) -> int:
        """Consume pending notifications (bounded), re-enabling the port; returns how many."""
        try:
            data = self.sock.recv(_NOTIFY_READ)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self.peer_closed = True
            return 0
        if not data:
            self.peer_closed = True
        return len(data)

    def close(self) -> None:
        self.sock.close()


class SimEventHub:
    """The hypervisor's event-channel table: ``DIR/evtchn.sock`` hands out ports."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = str(Path(directory) / "evtchn.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(64)
        self._unbound: dict[int, socket.socket] = {}
        self._next_port = 1
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="sim-evtchn", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._cv:
                if self._closed:
                    conn.close()
                    return
                port = self._next_port
                self._next_port += 1
                # Forget unbound ports of frontends that went away (no leak across 1000 cycles).
                for stale in [p for p, s in self._unbound.items() if _peer_gone(s)]:
                    self._unbound.pop(stale).close()
                self._unbound[port] = conn
                self._cv.notify_all()
            with contextlib.suppress(OSError):
                conn.sendall(struct.pack("<I", port))

    def bind_interdomain(
        self, remote_domid: int, remote_port: int, timeout: float = 5.0
    ) -> SimEventChannel:
        """Bind to a frontend's unbound port (EVTCHNOP_bind_interdomain)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while remote_port not in self._unbound:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise OSError(errno.EINVAL, f"event channel port {remote_port} is not unbound")
                self._cv.wait(left)
            sock = self._unbound.pop(remote_port)
        return SimEventChannel(sock, remote_port)

    @property
    def unbound(self) -> int:
        with self._cv:
            return len(self._unbound)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for s in self._unbound.values():
                s.close()
            self._unbound.clear()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _peer_gone(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class SimXen:
    """The whole simulated hypervisor of one DIR: memory, grants, event channels."""

    def __init__(self, directory: str | os.PathLike[str], pages: int = DEFAULT_PAGES) -> None:
        self.directory = Path(directory)
        self.memory = SimMemory(directory, pages)
        self.grants = SimGrantTable(self.memory)
        self.events = SimEventHub(directory)

    # The blockback.backend.Transport protocol (one frontend per DIR: domids are not checked).
    def map_ring(self, domid: int, refs: Sequence[int]) -> RingMemory:
        return self.grants.map_ring(refs)

    def unmap_ring(self, memory: RingMemory) -> None:
        if isinstance(memory, ViewRingMemory):
            memory.view.release()

    def grant_mapper(self, domid: int) -> SimGrantTable:
        return self.grants

    def bind_interdomain(self, domid: int, port: int) -> SimEventChannel:
        return self.events.bind_interdomain(domid, port)

    def close(self) -> None:
        self.events.close()
        self.memory.close()


# --- the guest's side ----------------------------------------------------------------------------


class SimFrontendMemory(SimMemory):
    """A frontend's view of DIR: grant and revoke pages."""

    def grant(self, page: int, read_only: bool = False) -> int:
        self.grant_flags[page] = GRANT_RO if read_only else GRANT_RW
        return page  # grant reference = page index

    def revoke(self, page: int) -> None:
        self.grant_flags[page] = GRANT_NONE


def alloc_unbound_port(directory: str | os.PathLike[str]) -> SimEventChannel:
    """EVTCHNOP_alloc_unbound for a frontend: returns its end, ``.port`` to publish."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(Path(directory) / "evtchn.sock"))
    sock.settimeout(5)
    data = b""
    while len(data) < 4:
        chunk = sock.recv(4 - len(data))
        if not chunk:
            sock.close()
            raise OSError(errno.ECONNRESET, "the simulated hypervisor closed the port")
        data += chunk
    return SimEventChannel(sock, struct.unpack("<I", data)[0])
