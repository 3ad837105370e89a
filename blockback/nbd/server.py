"""The NBD export: one disk on any number of listening sockets (the NBD protocol document's
server side, "Connection", "Terminating the transmission phase").

One thread accepts connections on each listening socket (unix or TCP) and starts a
:class:`~blockback.nbd.connection.Connection` thread per client (negotiation, then the
transmission phase).  The parts, each in its own module:

* ``protocol.py`` (with ``values.py``, ``negotiation.py``): what the bytes mean, sans-IO;
* ``connection.py``: one client's thread, the transmission loop and the inline read path;
* ``limits.py``: memory in flight, connection slots, timeouts and eviction (admission);
* ``buffers.py``: receive buffers, buffer pools and the shared reply arenas;
* ``block_status.py``: BLOCK_STATUS with bounded work.

All connections share one ``Disk``: a flush on any connection makes every earlier write durable,
which is why the export advertises ``NBD_FLAG_CAN_MULTI_CONN``.  :meth:`NBDServer.stop` lets
each client's requests in flight finish, hangs up and flushes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import time
import urllib.parse

import vhd
from blockback.executor import BlockDisk, sector_sizes
from blockback.nbd import protocol as p

from .block_status import STATUS_BLOCKS, STATUS_EXAMINED, status_range
from .buffers import ArenaPool
from .connection import Connection
from .limits import (
    EVICT_IDLE_AFTER,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_INFLIGHT_BYTES,
    MAX_INFLIGHT_REQUESTS,
    MAX_PENDING_BYTES,
    NEGOTIATION_TIMEOUT,
    Pending,
    choose_eviction,
)

# The limits are the server's options: importable from here, where they are used.
__all__ = [
    "DEFAULT_PORT",
    "EVICT_IDLE_AFTER",
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_INFLIGHT_BYTES",
    "MAX_INFLIGHT_REQUESTS",
    "MAX_PENDING_BYTES",
    "NEGOTIATION_TIMEOUT",
    "STATUS_BLOCKS",
    "STATUS_EXAMINED",
    "Connection",
    "NBDServer",
]

log = logging.getLogger("blockback.nbd")

DEFAULT_PORT = 10809
# A client counts as busy (block status yields to it) with requests in flight or bytes
# received in the last BUSY_WINDOW seconds.
BUSY_WINDOW = 0.05
# Send and receive buffer asked for on each client socket (see _tune).
SOCKET_BUFFER = 4 * 1024 * 1024


class NBDServer:
    """Serves one disk as one NBD export on any number of listening sockets."""

    def __init__(
        self,
        disk: BlockDisk,
        *,
        export_name: str = "",
        read_only: bool = False,
        workers: int = 4,
        description: str = "",
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
        max_inflight_requests: int = MAX_INFLIGHT_REQUESTS,
        max_connections: int = MAX_CONNECTIONS,
        negotiation_timeout: float = HANDSHAKE_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        evict_idle_after: float = EVICT_IDLE_AFTER,
    ) -> None:
        self.disk = disk
        self.read_only = bool(read_only or disk.read_only)
        self.workers = workers
        self.max_inflight_bytes = max(max_inflight_bytes, p.MAX_BLOCK)
        self.max_inflight_requests = max(1, max_inflight_requests)
        self.max_connections = max(1, max_connections)
        self.negotiation_timeout = negotiation_timeout
        self.idle_timeout = max(0.0, idle_timeout)
        self.evict_idle_after = evict_idle_after
        self.pending = Pending(max(0, max_pending_bytes))
        self.status_range = status_range(disk)
        self.arenas = ArenaPool()
        # A 4K-native disk says so (NBD_INFO_BLOCK_SIZE minimum = its logical sector); a 512-byte
        # one keeps minimum 1: the disk merges partial sectors itself, any alignment works.
        logical, _ = sector_sizes(disk)
        self.export = p.Export(
            name=export_name,
            size=disk.size,
            read_only=self.read_only,
            description=description,
            min_block=logical if logical > 512 else p.MIN_BLOCK,
            preferred_block=max(p.PREFERRED_BLOCK, logical),
        )
        self.extents_lock = threading.Lock()
        self.stopping = False
        self.urls: list[str] = []
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._threads: list[threading.Thread] = []
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()

    # -- listening -----------------------------------------------------------------------

    def listen_unix(self, path: str) -> str:
        with contextlib.suppress(FileNotFoundError):
            # A socket left behind by an earlier run is replaced; one that a live server still
            # listens on is not (its clients would silently lose it); anything else is an error.
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                if _unix_socket_live(path):
                    raise OSError(
                        errno.EADDRINUSE, "another server is listening on this socket", path
                    )
                os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, exc.strerror, path) from None
        self._listeners.append(sock)
        self._unix_paths.append(path)
        where = urllib.parse.quote(os.path.abspath(path), safe="/")
        url = f"nbd+unix:///{urllib.parse.quote(self.export.name)}?socket={where}"
        self.urls.append(url)
        return url

    def listen_tcp(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> str:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            hint = " (another server? choose one with --listen HOST:PORT)"
            raise OSError(
                exc.errno,
                (exc.strerror or "cannot listen") + (hint if exc.errno == errno.EADDRINUSE else ""),
                where,
            ) from None
        self._listeners.append(sock)
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        url = f"nbd://{shown}:{bound}/{urllib.parse.quote(self.export.name)}"
        self.urls.append(url)
        return url

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Start accepting on every listening socket (in background threads)."""
        for sock in self._listeners:
            thread = threading.Thread(
                target=self._accept, args=(sock,), name="nbd-accept", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while not self.stopping:
            try:
                sock, addr = listener.accept()
            except OSError as exc:
                if self.stopping:
                    return
                # Out of file descriptors, say: wait a little rather than spin.
                log.error("accept failed: %s", exc)
                time.sleep(0.1)
                continue
            if self.stopping:
                sock.close()
                return
            if not self._make_room():
                log.warning("refusing a client: %d connections already", self.max_connections)
                sock.close()
                continue
            self._tune(sock)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix client"
            conn = Connection(self, sock, peer)
            thread = threading.Thread(target=conn.run, name="nbd-conn", daemon=True)
            with self._lock:
                self._connections.add(conn)
            thread.start()

    def _make_room(self) -> bool:
        """Is there a slot for one more client?  When all are taken, free one if the policy
        allows: a connection still negotiating (the oldest: a good client needs milliseconds),
        else the one idle longest if it has had nothing in flight for ``evict_idle_after``."""
        with self._lock:
            live = [c for c in self._connections if not c.evicted]
        if len(live) < self.max_connections:
            return True
        now = time.monotonic()
        victim = choose_eviction(live, now, self.evict_idle_after)
        if victim is None:
            return False
        log.warning(
            "%s: full (%d connections): closing it (idle %.0f s) for a new client",
            victim.peer,
            self.max_connections,
            now - victim.last_active,
        )
        victim.evict()
        return True

    def others_busy(self, conn: Connection) -> bool:
        """Is any client but ``conn`` waiting for us (requests in flight, or just sent some)?"""
        now = time.monotonic()
        with self._lock:
            others = [c for c in self._connections if c is not conn]
        return any(
            c.in_flight or now - c.last_active < BUSY_WINDOW for c in others if not c.negotiating
        )

    @property
    def pending_bytes(self) -> int:
        """Bytes of requests in flight on all connections (buffers for reads and writes)."""
        return self.pending.bytes

    @staticmethod
    def _tune(sock: socket.socket) -> None:
        # Big buffers let a whole 32 MiB reply or a queue of requests move without waits.
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def forget(self, conn: Connection) -> None:
        """``conn`` is closed: its slot is free."""
        with self._lock:
            self._connections.discard(conn)

    @property
    def connections(self) -> int:
        """Connections open (those closing for a new client included, until they are gone)."""
        with self._lock:
            return len(self._connections)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let each client's requests in flight finish, hang up, flush."""
        self.stopping = True
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            # Wakes the connection's reader; it drains its executor and closes.
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + timeout
        grace = time.monotonic() + min(timeout / 2, 5.0)
        while self.connections and time.monotonic() < grace:
            time.sleep(0.02)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            # A client that does not read its replies holds a sender in sendall(): cut it off.
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        while self.connections and time.monotonic() < deadline:
            time.sleep(0.02)
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if not self.read_only:
            try:
                self.disk.flush()
            except (vhd.VHDError, OSError) as exc:
                log.error("final flush failed: %s", exc)

    def __enter__(self) -> NBDServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _unix_socket_live(path: str) -> bool:
    """Whether a server accepts connections on the unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False  # ECONNREFUSED: left behind by a server that is gone
    finally:
        probe.close()
    return True
