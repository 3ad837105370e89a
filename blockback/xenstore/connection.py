"""One XenStore client connection as the store sees it: its domain, watches, open transactions
and its bounded outgoing queue (pure, no I/O).

Outgoing queues are bounded (XSA-349: a guest churning watched nodes must not grow dom0's memory
without bound), following C xenstored (Xen 4.17 ``tools/xenstore/xenstored_watch.c``,
``xenstored_core.c``): an event identical to one still queued is coalesced; once a connection's
queue passes its limit further events are not queued but remembered per watch (bounded by the
watch quota), and a single event for the watch's own path is sent when the queue drains, so a
watcher never misses that *something* changed.

The I/O layer (``server.py``) takes whole messages from :meth:`ConnState.pop_out` and puts back
what a short write left (:meth:`ConnState.unpop_out`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .quotas import EVENT_QUEUE_BYTES
from .wire import Message, watch_event

if TYPE_CHECKING:
    from .transactions import Transaction
    from .watches import Watch


@dataclass(eq=False)
class ConnState:
    """What the store knows about one client connection, including its outgoing queue."""

    domid: int = 0
    privileged: bool = True
    event_limit: int = EVENT_QUEUE_BYTES
    watches: list[Watch] = field(default_factory=list)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    out: deque[tuple[bytes, tuple[str, str] | None]] = field(default_factory=deque)
    out_bytes: int = 0
    queued_events: set[tuple[str, str]] = field(default_factory=set)
    overflowed: dict[tuple[str, str], None] = field(default_factory=dict)  # (watch path, token)
    events_dropped: int = 0
    events_coalesced: int = 0

    @property
    def home(self) -> str:
        return f"/local/domain/{self.domid}"

    def push_reply(self, msg: Message) -> None:
        data = msg.encode()
        self.out.append((data, None))
        self.out_bytes += len(data)

    def push_event(self, watch: Watch, path: str) -> None:
        key = (watch.reported(path), watch.token)
        if key in self.queued_events:
            self.events_coalesced += 1
            return
        if self.out_bytes >= self.event_limit:
            self.events_dropped += 1
            self.overflowed[(watch.reported(watch.path), watch.token)] = None
            return
        data = watch_event(*key).encode()
        self.out.append((data, key))
        self.out_bytes += len(data)
        self.queued_events.add(key)

    def pop_out(self) -> bytes | None:
        """The next queued message to send (the I/O layer sends it whole or puts it back)."""
        if not self.out:
            self._refill_overflowed()
            if not self.out:
                return None
        data, key = self.out.popleft()
        self.out_bytes -= len(data)
        if key is not None:
            self.queued_events.discard(key)
        return data

    def unpop_out(self, data: bytes) -> None:
        """Put back the unsent tail of a message (a short socket write)."""
        self.out.appendleft((data, None))
        self.out_bytes += len(data)

    def _refill_overflowed(self) -> None:
        while self.overflowed and self.out_bytes < self.event_limit:
            (path, token), _ = self.overflowed.popitem()
            data = watch_event(path, token).encode()
            self.out.append((data, (path, token)))
            self.out_bytes += len(data)
            self.queued_events.add((path, token))
