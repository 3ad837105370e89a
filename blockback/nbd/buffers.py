"""The NBD export's buffers: each connection's receive buffer and buffer pool, the server's
reply arenas.  They are what bounds an idle or a busy connection's memory (``limits.py``
bounds what is in flight).

* Receive buffer (:class:`ReceiveBuffer`): 256 KiB of anonymous memory per connection, made
  once negotiation is over and resident only as far as requests have filled it (a client that
  negotiates and then idles costs a page).  Request headers are decoded straight out of it; a
  write's payload goes from it, then from the socket, into the payload buffer.
* Buffer pool (:class:`BufferPool`): read replies (header + data) and write payloads by size,
  kept for reuse -- a fresh buffer costs page faults -- at most :data:`FREE_BUFFERS` per size
  and :data:`FREE_BYTES` in all per connection, none larger than :data:`REUSE_LIMIT`.
* Reply arenas (:class:`ArenaPool`): the inline read path (``connection.py``) packs small read
  replies one after another into a 4 MiB arena and sends them in one go; arenas are the
  server's, borrowed by a connection only while it has replies to pack, and at most
  :data:`FREE_ARENAS` are kept.
"""

from __future__ import annotations

import mmap
import socket
import threading
import time
from collections.abc import Callable

RECV_SIZE = 256 * 1024
DISCARD_CHUNK = 1024 * 1024
ARENA_SIZE = 4 * 1024 * 1024
# Reply arenas kept for reuse by the server (each ARENA_SIZE bytes).
FREE_ARENAS = 8
# Free buffers kept per size, the largest size worth keeping, and the bytes kept in all.
FREE_BUFFERS = 8
REUSE_LIMIT = 4 * 1024 * 1024
FREE_BYTES = 16 * 1024 * 1024


class Disconnect(Exception):
    """The client went away, or broke the protocol; the connection ends."""


class ReceiveBuffer:
    """The bytes received from one client and not yet consumed (``view[pos:end]``)."""

    def __init__(self, sock: socket.socket, on_timeout: Callable[[], None]) -> None:
        self.sock = sock
        # Allocated once negotiation is over (a negotiating client costs no buffer).
        self.view = memoryview(b"")
        self.pos = 0
        self.end = 0
        # When bytes last came in: the idle timeout and the choice of a slot to give up.
        self.last_active = time.monotonic()
        self._on_timeout = on_timeout  # a receive timed out (raises to hang up)

    def allocate(self, rest: bytes) -> None:
        """Make the buffer, holding ``rest`` (bytes the client sent after negotiation)."""
        # Anonymous memory, not a bytearray: its pages become resident only as requests fill
        # them, so a client that negotiates and then idles costs a page, not 256 KiB.
        self.view = memoryview(mmap.mmap(-1, max(RECV_SIZE, len(rest))))
        self.view[: len(rest)] = rest
        self.pos, self.end = 0, len(rest)

    def fill(self, n: int) -> memoryview:
        """Return the next ``n`` buffered bytes (n <= RECV_SIZE), receiving more as needed."""
        avail = self.end - self.pos
        if avail < n:
            if self.pos:
                # Compact: move the partial message to the front of the buffer.
                self.view[:avail] = self.view[self.pos : self.end]
                self.pos, self.end = 0, avail
            while self.end - self.pos < n:
                try:
                    got = self.sock.recv_into(self.view[self.end :])
                except TimeoutError:
                    self._on_timeout()
                    continue
                if not got:
                    raise Disconnect("the client closed the connection")
                self.end += got
                self.last_active = time.monotonic()
        start = self.pos
        self.pos += n
        return self.view[start : start + n]

    def recv_into(self, target: memoryview) -> None:
        """Fill ``target`` with the next bytes of the stream (buffered ones first)."""
        avail = min(self.end - self.pos, len(target))
        if avail:
            target[:avail] = self.view[self.pos : self.pos + avail]
            self.pos += avail
        pos = avail
        while pos < len(target):
            got = self.sock.recv_into(target[pos:])
            if not got:
                raise Disconnect("the client closed the connection mid-request")
            pos += got

    def close(self) -> None:
        """Drop the buffer (its memory goes back at once) and the connection's callback."""
        self.view = memoryview(b"")
        self.pos = self.end = 0
        self._on_timeout = _no_timeout

    def skip(self, n: int) -> None:
        """Consume and drop the next ``n`` bytes (the payload of a refused write)."""
        scratch = memoryview(bytearray(min(n, DISCARD_CHUNK)))
        while n:
            k = min(n, len(scratch))
            self.recv_into(scratch[:k])
            n -= k


def _no_timeout() -> None:
    pass


class BufferPool:
    """One connection's read and write buffers by size, kept for reuse (bounded)."""

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bytearray:
        """A buffer of ``n`` bytes, reused if one is free (fresh ones cost page faults)."""
        with self._lock:
            free = self._free.get(n)
            if free:
                self._bytes -= n
                return free.pop()
        return bytearray(n)

    def give(self, buf: bytearray) -> None:
        n = len(buf)
        if n > REUSE_LIMIT:
            return
        with self._lock:
            # Bounded in count per size and in bytes overall, whatever sizes a client uses.
            free = self._free.setdefault(n, [])
            if len(free) < FREE_BUFFERS and self._bytes + n <= FREE_BYTES:
                free.append(buf)
                self._bytes += n


class ArenaPool:
    """The server's reply arenas for the inline read path (at most FREE_ARENAS kept)."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self) -> bytearray:
        """A reply arena (a kept one if free)."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(ARENA_SIZE)

    def give(self, arena: bytearray) -> None:
        with self._lock:
            if len(self._free) < FREE_ARENAS:
                self._free.append(arena)
