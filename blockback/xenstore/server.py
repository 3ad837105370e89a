"""A small XenStore daemon over unix sockets, for tests and the simulated hypervisor.

It speaks the xenstored socket protocol (``wire.py``) with the database of ``store.py``, so
Debian's ``xenstore-*`` tools and ``libxenstore`` (``xs_open()`` honours ``$XENSTORED_PATH``) talk
to it as to the real daemon. One selector loop serves every connection; the store is guarded by
one lock so in-process callers (a simulated toolstack) may touch it from other threads.

Robustness against hostile clients:

* a header announcing more than ``XENSTORE_PAYLOAD_MAX`` bytes gets an ``EINVAL`` error and the
  connection is closed (C xenstored drops such a client too); other malformed requests get an
  ERROR reply and the connection stays;
* a connection whose outgoing queue is above ``reply_limit`` is not read from until it drains
  (flow control, so a client that never reads cannot grow our memory with replies), and watch
  events are bounded per connection by ``store.ConnState`` (coalesced, then collapsed per watch);
* exceptions while serving one connection close that connection only;
* unprivileged domains have C xenstored's quotas (``store.Quotas``; ``--quota-*`` options).

Run it standalone with ``python -m blockback.xenstore.server SOCKETPATH`` (:func:`serve`; the
command line is ``vhdtools.xenstored``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import socket
import stat
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

from .store import EVENT_QUEUE_BYTES, ConnState, Quotas, Store
from .wire import MessageDecoder, WireProtocolError, error_message

REPLY_LIMIT = 64 * 1024  # stop reading requests while this much output is queued
HARD_LIMIT = 16 * 1024 * 1024  # a connection queueing more than this is dropped
MESSAGES_PER_WAKEUP = 256  # fairness between connections
T = TypeVar("T")
_tmp_ids = itertools.count()


class _Client:
    def __init__(self, sock: socket.socket, state: ConnState) -> None:
        self.sock = sock
        self.state = state
        self.decoder = MessageDecoder()
        self.mask = 0
        self.closing = False


class XenStoreServer:
    """A threaded xenstored. ``listen()`` more sockets to accept connections as other domains.

    Use as a context manager (``with XenStoreServer(path) as srv:``) or ``start()``/``stop()``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reply_limit: int = REPLY_LIMIT,
        event_limit: int = EVENT_QUEUE_BYTES,
        quotas: Quotas | None = None,
    ) -> None:
        self.store = Store(quotas)
        self.event_limit = event_limit
        self.lock = threading.RLock()
        self.path = os.fspath(path)
        self.reply_limit = reply_limit
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._listeners: list[tuple[socket.socket, str]] = []
        self._clients: dict[int, _Client] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.listen(self.path, domid=0)

    # -- set-up --------------------------------------------------------------------------------

    def listen(self, path: str | os.PathLike[str], domid: int = 0) -> None:
        """Accept connections on ``path`` as domain ``domid`` (0 = privileged dom0)."""
        path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        # Bind under a temporary name and rename: a client that sees the path can connect.
        # (The temporary name is short: AF_UNIX paths are limited to 107 bytes.)
        tmp = os.path.join(os.path.dirname(path) or ".", f".xs{os.getpid()}-{next(_tmp_ids)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(tmp)
        sock.listen(64)
        os.rename(tmp, path)
        sock.setblocking(False)
        with self.lock:
            self._listeners.append((sock, path))
            self._sel.register(sock, selectors.EVENT_READ, domid)
        self._wake()

    def start(self) -> XenStoreServer:
        self._thread = threading.Thread(target=self.serve_forever, name="xenstored", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        else:
            self._close_all()

    def __enter__(self) -> XenStoreServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- in-process access (a simulated toolstack) ---------------------------------------------

    def call(self, fn: Callable[[Store], T]) -> T:
        """Run ``fn(store)`` under the lock, then send whatever events it queued."""
        with self.lock:
            result = fn(self.store)
        self._wake()
        return result

    def introduce_domain(self, domid: int) -> None:
        """What the toolstack does when a domain starts: fire ``@introduceDomain``."""
        self.call(lambda s: s.introduce_domain(domid))

    def release_domain(self, domid: int) -> None:
        """What happens when a domain dies: fire ``@releaseDomain``."""
        self.call(lambda s: s.release_domain(domid))

    def connection_stats(self) -> list[dict[str, int]]:
        """Per-connection queue sizes and event counters (tests check memory stays bounded)."""
        with self.lock:
            return [
                {
                    "domid": c.state.domid,
                    "out_bytes": c.state.out_bytes,
                    "out_messages": len(c.state.out),
                    "events_dropped": c.state.events_dropped,
                    "events_coalesced": c.state.events_coalesced,
                    "decoder_bytes": c.decoder.buffered,
                    "watches": len(c.state.watches),
                }
                for c in self._clients.values()
            ]

    # -- the loop ------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._sel.select(timeout=1.0):
                    if key.fileobj == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    elif isinstance(key.data, _Client):
                        self._service(key.data, mask)
                    else:
                        self._accept(key.fileobj, key.data)  # type: ignore[arg-type]
                self._update_masks()
        finally:
            self._close_all()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _accept(self, listener: socket.socket, domid: int) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        with self.lock:
            client = _Client(sock, self.store.connect(domid, event_limit=self.event_limit))
            self._clients[sock.fileno()] = client
            client.mask = selectors.EVENT_READ
            self._sel.register(sock, client.mask, client)

    def _service(self, client: _Client, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._send(client)
            if mask & selectors.EVENT_READ and not client.closing:
                self._receive(client)
            if not client.closing:
                self._process(client)
        except (ConnectionError, OSError):
            self._drop(client)

    def _receive(self, client: _Client) -> None:
        if client.state.out_bytes >= self.reply_limit:
            return
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self._drop(client)
            return
        client.decoder.feed(data)

    def _process(self, client: _Client) -> None:
        with self.lock:
            for _ in range(MESSAGES_PER_WAKEUP):
                if client.state.out_bytes >= self.reply_limit:
                    break
                try:
                    msg = client.decoder.next_message()
                except WireProtocolError:
                    # Unframeable input: say so, then hang up (we cannot resynchronise).
                    client.state.push_reply(error_message("EINVAL"))
                    client.closing = True
                    break
                if msg is None:
                    break
                self.store.handle(client.state, msg)
            if client.state.out_bytes > HARD_LIMIT:
                self._drop(client)
                return
        self._send(client)

    def _send(self, client: _Client) -> None:
        for _ in range(MESSAGES_PER_WAKEUP):
            with self.lock:
                data = client.state.pop_out()
            if data is None:
                break
            try:
                sent = client.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent < len(data):
                with self.lock:
                    client.state.unpop_out(data[sent:])
                break
        if client.closing and not client.state.out:
            self._drop(client)

    def _update_masks(self) -> None:
        with self.lock:
            for client in list(self._clients.values()):
                if client.state.out or client.state.overflowed:
                    # Events queued by other connections' requests: try at once, then wait.
                    try:
                        self._send(client)
                    except OSError:
                        self._drop(client)
                        continue
                    if client.sock.fileno() < 0:
                        continue
                want = 0
                if not client.closing and client.state.out_bytes < self.reply_limit:
                    want |= selectors.EVENT_READ
                    if client.decoder.buffered:
                        # Requests held back by flow control can run now.
                        self._process(client)
                        if client.sock.fileno() < 0:
                            continue
                if client.state.out:
                    want |= selectors.EVENT_WRITE
                if want != client.mask:
                    if want:
                        self._sel.modify(client.sock, want, client)
                    else:
                        self._sel.modify(client.sock, selectors.EVENT_WRITE, client)
                    client.mask = want

    def _drop(self, client: _Client) -> None:
        with self.lock:
            fd = client.sock.fileno()
            if fd < 0:
                return
            self._clients.pop(fd, None)
            self.store.disconnect(client.state)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(client.sock)
            client.sock.close()
            client.closing = True

    def _close_all(self) -> None:
        with self.lock:
            for client in list(self._clients.values()):
                self._drop(client)
            for sock, path in self._listeners:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self._listeners.clear()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._sel.close()


@dataclass(frozen=True)
class XenStoredOptions:
    """What the standalone daemon is told: its dom0 socket, the unprivileged domains' sockets
    (domid -> path) and the quotas of unprivileged domains."""

    path: str
    domains: Mapping[int, str] = field(default_factory=dict)
    quotas: Quotas = field(default_factory=Quotas)


def serve(options: XenStoredOptions, stop: threading.Event) -> None:
    """Serve xenstore until ``stop`` is set; every socket is removed afterwards.

    Raises ``OSError`` if a socket cannot be made.  Signals are the caller's business (the
    ``xenstored`` command in ``vhdtools`` sets ``stop`` on SIGTERM/SIGINT).
    """
    server = XenStoreServer(options.path, quotas=options.quotas)
    try:
        for domid, dpath in options.domains.items():
            server.listen(dpath, domid)
        server.start()
        while not stop.wait(3600):
            pass
    finally:
        server.stop()


if __name__ == "__main__":
    # The command line lives in vhdtools (blockback parses no arguments); this keeps the
    # documented ``python -m blockback.xenstore.server`` working.
    from vhdtools.xenstored import main

    sys.exit(main(prog="python -m blockback.xenstore.server"))
