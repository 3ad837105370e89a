"""The NBD export's limits: memory in flight, connections, timeouts (admission control).

The NBD protocol document leaves a server free to bound its resources ("the server MAY ...
close the connection", "Terminating the transmission phase"); these are the bounds, so that no
client -- slow, silent or hostile -- can grow our memory or take every slot.

Memory is bounded per connection and for the whole server: a request is only read off the
socket once the bytes of the connection's requests in flight (read buffers and write payloads)
fit in :data:`MAX_INFLIGHT_BYTES`, fewer than :data:`MAX_INFLIGHT_REQUESTS` are pending, and
the bytes in flight on all connections fit in :data:`MAX_PENDING_BYTES` (:class:`Budget`, drawn
from the server's :class:`Pending`); until then the client's requests wait in the socket and TCP
(or the unix socket) pushes back.  A connection with nothing in flight may always start one
request, so clients that never read their replies (whose bytes stay pending) slow the others
down to one request at a time at worst, and stall only themselves.

Connections are bounded too (:data:`MAX_CONNECTIONS`): negotiation must finish within
:data:`HANDSHAKE_TIMEOUT` seconds in all, an optional idle timeout drops clients that send no
request (or read no reply) for that long, and when every slot is taken a new client takes the
slot of a connection still negotiating (the oldest) or, failing that, of the one idle longest
(nothing in flight for :data:`EVICT_IDLE_AFTER` seconds: :func:`choose_eviction`); only if
there is none is it refused.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol, TypeVar

MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
MAX_INFLIGHT_REQUESTS = 128
# Bytes in flight on all connections together (beyond one request per connection).
MAX_PENDING_BYTES = 256 * 1024 * 1024
# Each client costs a thread (plus its workers): at most this many at once.
MAX_CONNECTIONS = 128
# Negotiation must be over within this many seconds in all (qemu-nbd's --handshake-limit).
HANDSHAKE_TIMEOUT = 10.0
NEGOTIATION_TIMEOUT = HANDSHAKE_TIMEOUT  # its earlier name
# Kernel clients may sit idle for hours: no idle timeout unless the admin sets one.
IDLE_TIMEOUT = 0.0
# When all slots are taken, a connection idle this long may give its slot to a new client.
EVICT_IDLE_AFTER = 10.0


class Pending:
    """Bytes in flight on all of a server's connections (the server-wide memory bound)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.cond = threading.Condition()
        self.waiting = 0


class Budget:
    """Bytes and requests in flight on one connection, drawn from the server's total."""

    def __init__(self, pending: Pending, max_bytes: int, max_requests: int) -> None:
        self.pending = pending
        self.max_bytes = max_bytes
        self.max_requests = max_requests
        self.bytes = 0
        self.requests = 0

    def acquire(self, n: int) -> None:
        pending = self.pending
        with pending.cond:
            # A request always runs when the connection has nothing else in flight, so clients
            # that pin the server's total (by never reading their replies) cannot stall others.
            while self.requests and (
                self.requests >= self.max_requests
                or self.bytes + n > self.max_bytes
                or pending.bytes + n > pending.max_bytes
            ):
                pending.waiting += 1
                try:
                    pending.cond.wait()
                finally:
                    pending.waiting -= 1
            self.bytes += n
            self.requests += 1
            pending.bytes += n

    def release(self, n: int) -> None:
        pending = self.pending
        with pending.cond:
            self.bytes -= n
            self.requests -= 1
            pending.bytes -= n
            if pending.waiting:
                # Waiters may be on any connection (the total), so all of them look again.
                pending.cond.notify_all()


class Slot(Protocol):
    """What eviction looks at in a connection."""

    @property
    def negotiating(self) -> bool: ...

    @property
    def last_active(self) -> float: ...

    @property
    def in_flight(self) -> int: ...


S = TypeVar("S", bound=Slot)


def choose_eviction(live: Sequence[S], now: float, evict_idle_after: float) -> S | None:
    """The connection to give up its slot for a new client when all are taken: one still
    negotiating (the oldest: a good client needs milliseconds), else the one idle longest if it
    has had nothing in flight for ``evict_idle_after`` seconds; None if there is none."""
    negotiating = [c for c in live if c.negotiating]
    if negotiating:
        return min(negotiating, key=lambda c: c.last_active)
    idle = [c for c in live if not c.in_flight and now - c.last_active >= evict_idle_after]
    if not idle:
        return None
    return min(idle, key=lambda c: c.last_active)
