"""One NBD client's connection: negotiation, then the transmission phase (the NBD protocol
document, "Transmission" and "Request types"), on a thread of its own.

:mod:`blockback.nbd.protocol` decides what the bytes mean; this module moves them.  After the
handshake (``negotiation.py``'s engine) the connection thread reads request headers, has each
decoded and validated once (``protocol.decode_request``/``check_request``) and hands the work to
its own :class:`~blockback.executor.RequestExecutor` (so a client that stops reading its replies
can only stall its own workers, never another client's).  Workers send their reply as soon as
their request is done, so replies leave in completion order, not request order, as the protocol
allows.  What a connection may hold in flight is its ``limits.Budget``.

Reads are zero-copy on our side: each read reply is one buffer holding the reply header followed
by the data, which ``Disk.preadinto`` fills in place before a single ``sendall``.  Reads of up to
1 MiB that come from the page cache are not worth a hand-off to a worker (the hand-off costs
more than the read): the connection thread does them itself, packing header+data replies one
after another into a reply arena (``buffers.py``) and sending them in one go when no further
request is already buffered.  When such a read turns out slow (it went to the device), the next
reads go to the workers again so the device sees them in parallel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from blockback.executor import BlockOp, BlockRequest, RequestExecutor
from blockback.nbd import protocol as p

from .block_status import block_status
from .buffers import ARENA_SIZE, BufferPool, Disconnect, ReceiveBuffer
from .limits import Budget

if TYPE_CHECKING:
    from .server import NBDServer

log = logging.getLogger("blockback.nbd")

# Reads up to this size are done by the connection's own thread while they come from the page
# cache: a hand-off to a worker costs more than the read.  Their replies are gathered in an
# arena of ARENA_SIZE bytes and leave in one send.
INLINE_READ = 1024 * 1024
# An inline read slower than 0.5 ms plus 1 ms per 2 MB went to the device; the next
# POOL_STRETCH reads then go to the workers so the device sees them in parallel.
SLOW_READ = 0.0005
SLOW_READ_PER_BYTE = 1 / 2e9
POOL_STRETCH = 64


class Connection:
    """One client: negotiation, then the transmission phase."""

    def __init__(self, server: NBDServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.session: p.Session | None = None
        self._send_lock = threading.Lock()
        self._dead = False
        self._budget = Budget(
            server.pending, server.max_inflight_bytes, server.max_inflight_requests
        )
        self._rbuf = ReceiveBuffer(sock, self._check_idle)
        # For the choice of a connection to give up its slot.
        self.negotiating = True
        self.evicted = False
        self.executor: RequestExecutor | None = None
        # The server's reply arena while this connection borrows one (see _transmit).
        self._arena: bytearray | None = None
        self._buffers = BufferPool()

    @property
    def last_active(self) -> float:
        """When the client last sent bytes (or finished negotiating)."""
        return self._rbuf.last_active

    @last_active.setter
    def last_active(self, when: float) -> None:
        self._rbuf.last_active = when

    @property
    def in_flight(self) -> int:
        """Requests of this client not answered yet."""
        return self._budget.requests

    # -- plumbing ------------------------------------------------------------------------

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        """Send one whole reply; replies from several workers never interleave."""
        with self._send_lock:
            if self._dead:
                return
            try:
                self.sock.sendall(data)
            except OSError as exc:
                # The client is gone; the reader will notice on its side too.
                self._dead = True
                log.info("%s: send failed: %s", self.peer, exc)

    def _check_idle(self) -> None:
        """A receive timed out: hang up if the client has been idle past the idle timeout."""
        if self._budget.requests:
            # It is waiting for replies, not idle (a reply it does not read times the send out).
            return
        if time.monotonic() - self.last_active >= self.server.idle_timeout:
            raise Disconnect(f"idle for {self.server.idle_timeout:g} s")

    def evict(self) -> None:
        """Give up this connection's slot (the server is full): hang up on the client."""
        self.evicted = True
        self._dead = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- phases --------------------------------------------------------------------------
    def run(self) -> None:
        hang_up = True
        try:
            if self._negotiate():
                self._transmit()
            hang_up = False
        except Disconnect as exc:
            # The client closed its side (it may still read the replies in flight).
            hang_up = False
            log.info("%s: %s", self.peer, exc)
        except p.RemoteProtocolError as exc:
            log.warning("%s: protocol error, hanging up: %s", self.peer, exc)
        except OSError as exc:
            log.info("%s: connection error: %s", self.peer, exc)
        except Exception:
            log.exception("%s: unexpected error, hanging up", self.peer)
        finally:
            if hang_up:
                # Cut the connection first, so workers stuck sending to a client that does
                # not read cannot keep the drain below waiting.
                self._dead = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
            if self.executor is not None:
                # Requests already running complete (and send their replies) before we close.
                self.executor.close()
            self._dead = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self._rbuf.close()
            if self._arena is not None:
                self.server.arenas.give(self._arena)
                self._arena = None
            self.server.forget(self)

    def _negotiate(self) -> bool:
        engine = p.ServerNegotiation([self.server.export])
        # One deadline for the whole handshake: a client trickling a byte at a time does not
        # get to hold its slot any longer than a silent one.
        deadline = time.monotonic() + self.server.negotiation_timeout
        try:
            while True:
                out = engine.data_to_send()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
                if engine.finished:
                    # Before the last reply goes out: the client may connect again at once,
                    # and must not find this connection counted as still negotiating.
                    self.negotiating = False
                    self.last_active = time.monotonic()
                if out:
                    self.sock.sendall(out)
                if engine.finished:
                    break
                data = self.sock.recv(65536)
                if not data:
                    raise Disconnect("the client closed the connection during negotiation")
                engine.receive_data(data)
        except TimeoutError as exc:
            raise Disconnect("negotiation timed out") from exc
        # With an idle timeout, receives (and sends: a reply the client does not read) wake up
        # to check it; without one the socket blocks, as the fast path likes best.
        self.sock.settimeout(self.server.idle_timeout or None)
        self.last_active = time.monotonic()
        self.negotiating = False
        if engine.state is p.NegotiationState.CLOSED:
            log.info("%s: negotiation ended: %s", self.peer, engine.close_reason)
            return False
        self.session = engine.session
        self._rbuf.allocate(engine.unused_data())
        log.info(
            "%s: connected (structured replies: %s)",
            self.peer,
            engine.session.structured if engine.session else None,
        )
        return True

    def _transmit(self) -> None:
        session = self.session
        assert session is not None
        server = self.server
        self.executor = executor = RequestExecutor(
            server.disk, read_only=server.read_only, workers=server.workers
        )
        header_size = p.read_reply_header_size(session)
        decode = p.decode_request
        check = p.check_request
        header_bytes = p.REQUEST.size
        # Small reads run inline, their replies packed one after another into an arena and
        # sent in one go once no further request is waiting in the receive buffer.  The arena
        # is the server's, borrowed while there are replies to pack: idle clients hold none.
        arena: bytearray | None = None
        aview = memoryview(b"")
        used = 0
        pool_reads = 0
        perf = time.perf_counter
        rbuf = self._rbuf
        fill = rbuf.fill
        arenas = server.arenas
        while not server.stopping:
            if self._dead:
                raise Disconnect("the client stopped receiving")
            if arena is not None and rbuf.end - rbuf.pos < header_bytes:
                # About to wait for the client: send the replies we have first.
                if used:
                    self._send(aview[:used])
                    used = 0
                arenas.give(arena)
                arena = self._arena = None
            # Decoded and validated once, here at the protocol edge, for every request: the
            # inline read path below and _dispatch act on this verdict.
            req = decode(fill(header_bytes))
            err, why = check(session, req)
            if not err and req.type == 0 and req.length <= INLINE_READ and not pool_reads:
                handle, offset, length = req.handle, req.offset, req.length
                need = header_size + length
                if arena is None:
                    arena = self._arena = arenas.take()
                    aview = memoryview(arena)
                if used + need > ARENA_SIZE:
                    self._send(aview[:used])
                    used = 0
                started = perf()
                err = executor.execute(
                    BlockRequest(
                        BlockOp.READ, offset, length, (aview[used + header_size : used + need],)
                    )
                )
                if perf() - started > SLOW_READ + length * SLOW_READ_PER_BYTE:
                    # The data came from the device, not the page cache: let the next reads
                    # run in parallel on the workers, where the device can overlap them.
                    pool_reads = POOL_STRETCH
                if err:
                    reply = p.error_reply(session, handle, err, os.strerror(err))
                    if used + len(reply) > ARENA_SIZE:
                        self._send(aview[:used])
                        used = 0
                    aview[used : used + len(reply)] = reply
                    used += len(reply)
                else:
                    p.pack_read_reply_header(session, arena, handle, offset, length, at=used)
                    used += need
                continue
            if used:
                self._send(aview[:used])
                used = 0
            if pool_reads:
                pool_reads -= 1
            if not self._dispatch(session, req, err, why):
                return

    def _dispatch(self, session: p.Session, req: p.Request, err: int, why: str) -> bool:
        """Start one request, or refuse it with the verdict of ``check_request`` (``err``,
        ``why``); False once the client said goodbye (DISC)."""
        executor = self.executor
        assert executor is not None
        server = self.server
        header_size = p.read_reply_header_size(session)
        Cmd = p.Cmd
        kind = req.type
        if err:
            if req.payload_length:
                self._rbuf.skip(req.payload_length)
            log.info("%s: refusing %s: %s", self.peer, kind, why)
            self._send(p.error_reply(session, req.handle, err, why))
            return True
        if kind == Cmd.READ:
            n = req.length
            self._budget.acquire(n)
            buf = self._buffers.take(header_size + n)
            view = memoryview(buf)
            executor.submit(
                BlockRequest(BlockOp.READ, req.offset, n, (view[header_size:],), tag=(req, buf)),
                self._done,
            )
        elif kind == Cmd.WRITE:
            n = req.length
            self._budget.acquire(n)
            payload = self._buffers.take(n)
            try:
                self._rbuf.recv_into(memoryview(payload))
            except BaseException:
                self._budget.release(n)
                raise
            executor.submit(
                BlockRequest(
                    BlockOp.WRITE,
                    req.offset,
                    n,
                    (memoryview(payload),),
                    fua=bool(req.flags & p.CmdFlag.FUA),
                    tag=(req, payload),
                ),
                self._done,
            )
        elif kind == Cmd.FLUSH:
            self._submit(BlockRequest(BlockOp.FLUSH, tag=(req, None)))
        elif kind == Cmd.TRIM:
            self._submit(
                BlockRequest(
                    BlockOp.DISCARD,
                    req.offset,
                    req.length,
                    fua=bool(req.flags & p.CmdFlag.FUA),
                    tag=(req, None),
                )
            )
        elif kind == Cmd.WRITE_ZEROES:
            flags = req.flags
            self._submit(
                BlockRequest(
                    BlockOp.WRITE_ZEROES,
                    req.offset,
                    req.length,
                    fua=bool(flags & p.CmdFlag.FUA),
                    no_hole=bool(flags & p.CmdFlag.NO_HOLE),
                    fast_zero=bool(flags & p.CmdFlag.FAST_ZERO),
                    tag=(req, None),
                )
            )
        elif kind == Cmd.BLOCK_STATUS:
            self._send(
                block_status(
                    server.disk,
                    server.extents_lock,
                    server.status_range,
                    session,
                    req,
                    others_busy=lambda: server.others_busy(self),
                    peer=self.peer,
                )
            )
        elif kind == Cmd.CACHE:
            # Advisory; the range is valid, and the page cache will do the rest.
            self._send(p.ok_reply(session, req.handle))
        elif kind == Cmd.DISC:
            log.info("%s: client disconnected", self.peer)
            return False
        return True

    def _submit(self, breq: BlockRequest) -> None:
        assert self.executor is not None
        self._budget.acquire(0)
        self.executor.submit(breq, self._done)

    def _done(self, breq: BlockRequest, err: int) -> None:
        """A worker finished ``breq``: reply, then give back its buffer (a read reply or a
        write payload) and its budget."""
        tag: tuple[p.Request, bytearray | None] = breq.tag  # type: ignore[assignment]
        req, buf = tag
        session = self.session
        assert session is not None
        try:
            if err:
                self._send(p.error_reply(session, req.handle, err, os.strerror(err)))
            elif buf is not None and breq.op is BlockOp.READ:
                p.pack_read_reply_header(session, buf, req.handle, req.offset, req.length)
                self._send(buf)
            else:
                self._send(p.ok_reply(session, req.handle))
        finally:
            if buf is None:
                self._budget.release(0)
            else:
                self._buffers.give(buf)
                self._budget.release(breq.length)
