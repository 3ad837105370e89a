"""A thread-safe XenStore client over the xenstored unix socket.

It speaks the protocol of ``wire.py`` (``xs_wire.h``) to the real ``xenstored`` on a dom0 or to
our own ``server.py``, over a :class:`~blockback.xenstore.channel.Channel` (the daemon's socket
or the xenbus device, found as ``libxenstore``'s ``xs_open(0)`` finds it).

Threading: any thread may call any method. A reader thread demultiplexes replies (matched by
``req_id``) from ``WATCH_EVENT`` messages, which go to a bounded queue; callers take them with
:meth:`XenStoreClient.read_watch`, or wait on :meth:`event_fileno` in a ``select``/``poll`` loop,
or pass ``on_watch=`` to have a dispatcher thread call it (never the reader thread, so the
callback may itself call the client).

Watch events, XSA-349: a frontend rewriting nodes under a watched path at high rate must not
grow our memory; events wait in a bounded, coalescing queue (``events.py``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeVar

from .channel import DEFAULT_SOCKET, Channel, default_socket_path, find_xenstore
from .events import WatchEvent, WatchQueue
from .wire import (
    HEADER,
    HEADER_SIZE,
    PAYLOAD_MAX,
    Message,
    MessageDecoder,
    WireProtocolError,
    XenStoreError,
    XsType,
    join_strings,
    split_strings,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Message | None = None


def _encode_value(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class XenStoreClient:
    """One connection to xenstored. ``tx`` arguments take a transaction id (0 = none)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 30.0,
        max_events: int = 1024,
        on_watch: Callable[[WatchEvent], None] | None = None,
        _channel: Channel | None = None,
    ) -> None:
        self.path = os.fspath(path) if path is not None else find_xenstore()
        self.timeout = timeout
        if _channel is not None:
            self._chan = _channel
        else:
            try:
                self._chan = Channel(self.path)
            except OSError as exc:
                raise XenStoreError("EIO", f"cannot connect to {self.path}: {exc}") from exc
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._req_ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._closed = False
        self._close_reason = "connection closed"
        # Watch events wait in a bounded queue; our watches are its "rescan" events.
        self._events = WatchQueue(max_events)
        self._watches: dict[tuple[str, str], None] = {}
        self._reader = threading.Thread(target=self._read_loop, name="xenstore-reader", daemon=True)
        self._reader.start()
        self._dispatcher: threading.Thread | None = None
        if on_watch is not None:
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop, args=(on_watch,), name="xenstore-watch", daemon=True
            )
            self._dispatcher.start()

    # -- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self._chan.close()
        if self._reader is not threading.current_thread():
            self._reader.join(5)
            self._chan.release()
        self._fail_all("connection closed")
        self._events.close(self._close_reason)
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join(5)
        self._events.release()

    def __enter__(self) -> XenStoreClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- requests ------------------------------------------------------------------------------

    def request(self, mtype: int, payload: bytes, tx: int = 0) -> bytes:
        """Send one request and wait for its reply payload; an ERROR reply raises."""
        if len(payload) > PAYLOAD_MAX:
            raise XenStoreError("E2BIG", f"request of {len(payload)} bytes")
        pending = _Pending()
        with self._state_lock:
            if self._closed:
                raise XenStoreError("EIO", self._close_reason)
            req_id = next(self._req_ids) & 0xFFFFFFFF
            self._pending[req_id] = pending
        data = HEADER.pack(mtype, req_id, tx, len(payload)) + payload
        try:
            with self._send_lock:
                self._chan.send(data)
        except OSError as exc:
            with self._state_lock:
                self._pending.pop(req_id, None)
            raise XenStoreError("EIO", f"send failed: {exc}") from exc
        if not pending.done.wait(self.timeout):
            with self._state_lock:
                self._pending.pop(req_id, None)
            raise XenStoreError("EIO", f"no reply within {self.timeout} s")
        reply = pending.reply
        if reply is None:
            raise XenStoreError("EIO", self._close_reason)
        name = reply.error_name()
        if name is not None:
            raise XenStoreError(name, f"{XsType(mtype).name} failed")
        return reply.payload

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.request(XsType.READ, join_strings(path), tx)

    def read_text(self, path: str, tx: int = 0) -> str:
        return self.read(path, tx).decode("utf-8", "replace")

    def try_read(self, path: str, tx: int = 0) -> bytes | None:
        """The value, or None if the node does not exist."""
        try:
            return self.read(path, tx)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def exists(self, path: str, tx: int = 0) -> bool:
        return self.try_read(path, tx) is not None

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        self.request(XsType.WRITE, path.encode() + b"\0" + _encode_value(value), tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(XsType.MKDIR, join_strings(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self.request(XsType.RM, join_strings(path), tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        """The children's names; big directories are fetched with DIRECTORY_PART."""
        try:
            return split_strings(self.request(XsType.DIRECTORY, join_strings(path), tx))
        except XenStoreError as exc:
            if exc.errno != errno.E2BIG:
                raise
        return self._directory_parts(path, tx)

    def _directory_parts(self, path: str, tx: int) -> list[str]:
        for _attempt in range(16):
            names: list[str] = []
            offset = 0
            gen: bytes | None = None
            while True:
                reply = self.request(XsType.DIRECTORY_PART, join_strings(path, str(offset)), tx)
                this_gen, _, body = reply.partition(b"\0")
                if gen is not None and this_gen != gen:
                    break  # changed under us: start again, as libxenstore does
                gen = this_gen
                last = body.endswith(b"\0\0") or body == b"\0"
                if last:
                    body = body[:-1]
                names.extend(split_strings(body))
                offset += len(body)
                if last:
                    return names
        raise XenStoreError("EAGAIN", f"directory {path} kept changing")

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return split_strings(self.request(XsType.GET_PERMS, join_strings(path), tx))

    def set_perms(self, path: str, perms: Sequence[str], tx: int = 0) -> None:
        """``perms`` like ``["n0", "r5"]``: owner/default first, then per-domain entries."""
        self.request(XsType.SET_PERMS, join_strings(path, *perms), tx)

    def get_domain_path(self, domid: int) -> str:
        parts = split_strings(self.request(XsType.GET_DOMAIN_PATH, join_strings(str(domid))))
        if not parts:
            raise XenStoreError("EINVAL", "empty GET_DOMAIN_PATH reply")
        return parts[0]

    def introduce_domain(self, domid: int, mfn: int, port: int) -> None:
        self.request(XsType.INTRODUCE, join_strings(str(domid), str(mfn), str(port)))

    def release_domain(self, domid: int) -> None:
        self.request(XsType.RELEASE, join_strings(str(domid)))

    def is_domain_introduced(self, domid: int) -> bool:
        return split_strings(
            self.request(XsType.IS_DOMAIN_INTRODUCED, join_strings(str(domid)))
        ) == ["T"]

    def reset_watches(self) -> None:
        self.request(XsType.RESET_WATCHES, b"")
        self._watches.clear()

    # -- transactions --------------------------------------------------------------------------

    def transaction_start(self) -> int:
        parts = split_strings(self.request(XsType.TRANSACTION_START, b"\0"))
        if not parts or not parts[0].isdigit():
            raise XenStoreError("EINVAL", "bad TRANSACTION_START reply")
        return int(parts[0])

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        """End a transaction; False if the commit lost a race (EAGAIN: retry it)."""
        try:
            self.request(XsType.TRANSACTION_END, join_strings("T" if commit else "F"), tx)
        except XenStoreError as exc:
            if commit and exc.errno == errno.EAGAIN:
                return False
            raise
        return True

    def run_transaction(self, body: Callable[[Transaction], T], attempts: int = 32) -> T:
        """Run ``body(tx)`` in a transaction, retrying it from scratch on EAGAIN.

        ``body`` must only act through ``tx`` (it may run several times). An exception from it
        aborts the transaction and propagates.
        """
        for _attempt in range(attempts):
            tx = Transaction(self, self.transaction_start())
            try:
                result = body(tx)
            except BaseException:
                with contextlib.suppress(XenStoreError):
                    self.transaction_end(tx.id, commit=False)
                raise
            if self.transaction_end(tx.id, commit=True):
                return result
        raise XenStoreError("EAGAIN", f"transaction still conflicting after {attempts} tries")

    # -- watches -------------------------------------------------------------------------------

    def watch(self, path: str, token: str) -> None:
        """Watch ``path`` and below; xenstored fires it once at once, as a WatchEvent(path)."""
        self._watches[(path, token)] = None
        try:
            self.request(XsType.WATCH, join_strings(path, token))
        except XenStoreError:
            self._watches.pop((path, token), None)
            raise

    def unwatch(self, path: str, token: str) -> None:
        self._watches.pop((path, token), None)
        self.request(XsType.UNWATCH, join_strings(path, token))

    def read_watch(self, timeout: float | None = None) -> WatchEvent | None:
        """The next watch event; None after ``timeout`` seconds (None = wait for ever)."""
        return self._events.get(timeout)

    def pending_events(self) -> int:
        return len(self._events)

    def event_fileno(self) -> int:
        """A descriptor that polls readable while watch events are queued."""
        return self._events.fileno()

    @property
    def events_coalesced(self) -> int:
        """Events dropped because the same one was still queued."""
        return self._events.coalesced

    @property
    def events_collapsed(self) -> int:
        """Times the queue overflowed and became one rescan event per watch."""
        return self._events.collapsed

    def _dispatch_loop(self, callback: Callable[[WatchEvent], None]) -> None:
        while True:
            try:
                event = self.read_watch()
            except XenStoreError:
                return
            if event is None or self._closed:
                continue
            try:
                callback(event)
            except Exception:
                # A failing callback must not end event delivery for the others.
                if self._closed:
                    return
                log.exception("xenstore watch callback failed on %s", event)

    # -- the reader ----------------------------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = MessageDecoder()
        reason = "connection closed by xenstored"
        try:
            while True:
                data = self._chan.recv()
                if not data:
                    break
                decoder.feed(data)
                for msg in decoder.messages():
                    if msg.type == XsType.WATCH_EVENT:
                        parts = split_strings(msg.payload)
                        if len(parts) >= 2:
                            self._events.push(WatchEvent(parts[0], parts[1]), self._watches)
                        continue
                    with self._state_lock:
                        pending = self._pending.pop(msg.req_id, None)
                    if pending is not None:
                        pending.reply = msg
                        pending.done.set()
        except WireProtocolError as exc:
            reason = f"bad message from xenstored: {exc}"
        except OSError as exc:
            reason = f"connection lost: {exc}"
        with self._state_lock:
            self._closed = True
            self._close_reason = reason
        self._fail_all(reason)
        self._events.close(reason)

    def _fail_all(self, reason: str) -> None:
        with self._state_lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            p.done.set()


class Transaction:
    """The client's operations bound to one transaction id (see ``run_transaction``)."""

    def __init__(self, client: XenStoreClient, tx_id: int) -> None:
        self.client = client
        self.id = tx_id

    def read(self, path: str) -> bytes:
        return self.client.read(path, self.id)

    def read_text(self, path: str) -> str:
        return self.client.read_text(path, self.id)

    def try_read(self, path: str) -> bytes | None:
        return self.client.try_read(path, self.id)

    def exists(self, path: str) -> bool:
        return self.client.exists(path, self.id)

    def write(self, path: str, value: bytes | str) -> None:
        self.client.write(path, value, self.id)

    def mkdir(self, path: str) -> None:
        self.client.mkdir(path, self.id)

    def rm(self, path: str) -> None:
        self.client.rm(path, self.id)

    def directory(self, path: str) -> list[str]:
        return self.client.directory(path, self.id)

    def get_perms(self, path: str) -> list[str]:
        return self.client.get_perms(path, self.id)

    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        self.client.set_perms(path, perms, self.id)


__all__ = [
    "DEFAULT_SOCKET",
    "HEADER_SIZE",
    "Transaction",
    "WatchEvent",
    "XenStoreClient",
    "XenStoreError",
    "default_socket_path",
    "find_xenstore",
]
