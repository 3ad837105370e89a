"""The NBD export's transport: sockets and threads around the sans-IO protocol engine.

:mod:`blockback.nbd.protocol` decides what the bytes mean; this module moves them.  One thread
accepts connections on each listening socket (unix or TCP); each client gets a connection
thread that negotiates, then reads request headers and hands the work to its own
:class:`~blockback.executor.RequestExecutor` (so a client that stops reading its replies can only
stall its own workers, never another client's).  Workers send their reply as soon as their
request is done, so replies leave in completion order, not request order, as the protocol allows.

All connections share one ``Disk``: a flush on any connection makes every earlier write durable,
which is why the export advertises ``NBD_FLAG_CAN_MULTI_CONN``.

Memory is bounded per connection and for the whole server: a request is only read off the
socket once the bytes of the connection's requests in flight (read buffers and write payloads)
fit in :data:`MAX_INFLIGHT_BYTES`, fewer than :data:`MAX_INFLIGHT_REQUESTS` are pending, and
the bytes in flight on all connections fit in :data:`MAX_PENDING_BYTES`; until then the
client's requests wait in the socket and TCP (or the unix socket) pushes back.  A connection
with nothing in flight may always start one request, so clients that never read their replies
(whose bytes stay pending) slow the others down to one request at a time at worst, and stall
only themselves.  Add a 256 KiB receive buffer (anonymous memory, resident only as far as
requests have filled it) and at most 16 MiB of buffers kept for reuse per connection; the 4 MiB
reply arenas of the inline path are shared (a connection holds one only while it has replies to
pack), so an idle connection costs little more than its thread.

Connections are bounded too (:data:`MAX_CONNECTIONS`): negotiation must finish within
:data:`HANDSHAKE_TIMEOUT` seconds in all, an optional idle timeout drops clients that send no
request (or read no reply) for that long, and when every slot is taken a new client takes the
slot of a connection still negotiating (the oldest) or, failing that, of the one idle longest
(nothing in flight for :data:`EVICT_IDLE_AFTER` seconds); only if there is none is it refused.

BLOCK_STATUS work is bounded per request (:data:`STATUS_BLOCKS` blocks, :data:`STATUS_EXAMINED`
runs of ``Disk.extents()``; the reply covers less than asked, as proto.md allows) and yields to
busy neighbours, so a client looping on the map of a costly disk cannot starve the others.

Reads are zero-copy on our side: each read reply is one buffer holding the reply header followed
by the data, which ``Disk.preadinto`` fills in place before a single ``sendall``.  Reads of up to
1 MiB that come from the page cache are not worth a hand-off to a worker (the hand-off costs
more than the read): the connection thread does them itself, packing header+data replies one
after another into its arena and sending them in one go when no further request is already
buffered.  When such a read turns out slow (it went to the device), the next reads go to the
workers again so the device sees them in parallel.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import mmap
import os
import socket
import stat
import threading
import time
import urllib.parse

import vhd
from blockback.executor import BlockDisk, BlockOp, BlockRequest, RequestExecutor
from blockback.nbd import protocol as p

__all__ = ["DEFAULT_PORT", "NBDServer"]

log = logging.getLogger("blockback.nbd")

DEFAULT_PORT = 10809
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
# Reply arenas kept for reuse by the server (each _ARENA_SIZE bytes).
_FREE_ARENAS = 8
# One BLOCK_STATUS request looks at no more than this many blocks of the disk (of the smallest
# block size in its chain; a fixed disk is one run whatever the size) and this many runs of
# Disk.extents(): about a millisecond of work, where a whole 4 GiB map could take a second.
STATUS_BLOCKS = 256
STATUS_EXAMINED = 512
# Block status that took longer than this yields as long again to busy neighbours; a client
# counts as busy with requests in flight or bytes received in the last _BUSY_WINDOW seconds.
_STATUS_YIELD = 0.0002
_BUSY_WINDOW = 0.05
_RECV_SIZE = 256 * 1024
_SOCKET_BUFFER = 4 * 1024 * 1024
_DISCARD_CHUNK = 1024 * 1024
# Reads up to this size are done by the connection's own thread while they come from the page
# cache: a hand-off to a worker costs more than the read.  Their replies are gathered in an
# arena of _ARENA_SIZE bytes and leave in one send.
_INLINE_READ = 1024 * 1024
_ARENA_SIZE = 4 * 1024 * 1024
# An inline read slower than 0.5 ms plus 1 ms per 2 MB went to the device; the next
# _POOL_STRETCH reads then go to the workers so the device sees them in parallel.
_SLOW_READ = 0.0005
_SLOW_READ_PER_BYTE = 1 / 2e9
_POOL_STRETCH = 64
# Free buffers kept per size, the largest size worth keeping, and the bytes kept in all.
_FREE_BUFFERS = 8
_REUSE_LIMIT = 4 * 1024 * 1024
_FREE_BYTES = 16 * 1024 * 1024


class _Disconnect(Exception):
    """The client went away, or broke the protocol; the connection ends."""


class _Pending:
    """Bytes in flight on all of a server's connections (the server-wide memory bound)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.cond = threading.Condition()
        self.waiting = 0


class _Budget:
    """Bytes and requests in flight on one connection, drawn from the server's total."""

    def __init__(self, pending: _Pending, max_bytes: int, max_requests: int) -> None:
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


class Connection:
    """One client: negotiation, then the transmission phase."""

    def __init__(self, server: NBDServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.session: p.Session | None = None
        self._send_lock = threading.Lock()
        self._dead = False
        self._budget = _Budget(
            server.pending, server.max_inflight_bytes, server.max_inflight_requests
        )
        # Allocated once negotiation is over (a negotiating client costs no buffer).
        self._rview = memoryview(b"")
        self._rpos = 0
        self._rend = 0
        # For the idle timeout and the choice of a connection to give up its slot.
        self.last_active = time.monotonic()
        self.negotiating = True
        self.evicted = False
        self.executor: RequestExecutor | None = None
        # The server's reply arena while this connection borrows one (see _transmit).
        self._arena: bytearray | None = None
        # Read and write buffers by size, kept for reuse.
        self._free_buffers: dict[int, list[bytearray]] = {}
        self._free_bytes = 0
        self._free_lock = threading.Lock()

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

    def _fill(self, n: int) -> memoryview:
        """Return the next ``n`` buffered bytes (n <= _RECV_SIZE), receiving more as needed."""
        avail = self._rend - self._rpos
        if avail < n:
            if self._rpos:
                # Compact: move the partial message to the front of the buffer.
                self._rview[:avail] = self._rview[self._rpos : self._rend]
                self._rpos, self._rend = 0, avail
            while self._rend - self._rpos < n:
                try:
                    got = self.sock.recv_into(self._rview[self._rend :])
                except TimeoutError:
                    self._check_idle()
                    continue
                if not got:
                    raise _Disconnect("the client closed the connection")
                self._rend += got
                self.last_active = time.monotonic()
        start = self._rpos
        self._rpos += n
        return self._rview[start : start + n]

    def _recv_into(self, target: memoryview) -> None:
        """Fill ``target`` with the next bytes of the stream (buffered ones first)."""
        avail = min(self._rend - self._rpos, len(target))
        if avail:
            target[:avail] = self._rview[self._rpos : self._rpos + avail]
            self._rpos += avail
        pos = avail
        while pos < len(target):
            got = self.sock.recv_into(target[pos:])
            if not got:
                raise _Disconnect("the client closed the connection mid-request")
            pos += got

    def _check_idle(self) -> None:
        """A receive timed out: hang up if the client has been idle past the idle timeout."""
        if self._budget.requests:
            # It is waiting for replies, not idle (a reply it does not read times the send out).
            return
        if time.monotonic() - self.last_active >= self.server.idle_timeout:
            raise _Disconnect(f"idle for {self.server.idle_timeout:g} s")

    def evict(self) -> None:
        """Give up this connection's slot (the server is full): hang up on the client."""
        self.evicted = True
        self._dead = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, _DISCARD_CHUNK)))
        while n:
            k = min(n, len(scratch))
            self._recv_into(scratch[:k])
            n -= k

    # -- phases --------------------------------------------------------------------------

    def run(self) -> None:
        hang_up = True
        try:
            if self._negotiate():
                self._transmit()
            hang_up = False
        except _Disconnect as exc:
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
            if self._arena is not None:
                self.server.give_arena(self._arena)
                self._arena = None
            self.server._forget(self)

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
                    raise _Disconnect("the client closed the connection during negotiation")
                engine.receive_data(data)
        except TimeoutError as exc:
            raise _Disconnect("negotiation timed out") from exc
        # With an idle timeout, receives (and sends: a reply the client does not read) wake up
        # to check it; without one the socket blocks, as the fast path likes best.
        self.sock.settimeout(self.server.idle_timeout or None)
        self.last_active = time.monotonic()
        self.negotiating = False
        if engine.state is p.NegotiationState.CLOSED:
            log.info("%s: negotiation ended: %s", self.peer, engine.close_reason)
            return False
        self.session = engine.session
        rest = engine.unused_data()
        # Anonymous memory, not a bytearray: its pages become resident only as requests fill
        # them, so a client that negotiates and then idles costs a page, not 256 KiB.
        self._rview = memoryview(mmap.mmap(-1, max(_RECV_SIZE, len(rest))))
        self._rview[: len(rest)] = rest
        self._rend = len(rest)
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
        while not server.stopping:
            if self._dead:
                raise _Disconnect("the client stopped receiving")
            if arena is not None and self._rend - self._rpos < header_bytes:
                # About to wait for the client: send the replies we have first.
                if used:
                    self._send(aview[:used])
                    used = 0
                server.give_arena(arena)
                arena = self._arena = None
            # Decoded and validated once, here at the protocol edge, for every request: the
            # inline read path below and _dispatch act on this verdict.
            req = decode(self._fill(header_bytes))
            err, why = check(session, req)
            if not err and req.type == 0 and req.length <= _INLINE_READ and not pool_reads:
                handle, offset, length = req.handle, req.offset, req.length
                need = header_size + length
                if arena is None:
                    arena = self._arena = server.take_arena()
                    aview = memoryview(arena)
                if used + need > _ARENA_SIZE:
                    self._send(aview[:used])
                    used = 0
                started = perf()
                err = executor.execute(
                    BlockRequest(
                        BlockOp.READ, offset, length, (aview[used + header_size : used + need],)
                    )
                )
                if perf() - started > _SLOW_READ + length * _SLOW_READ_PER_BYTE:
                    # The data came from the device, not the page cache: let the next reads
                    # run in parallel on the workers, where the device can overlap them.
                    pool_reads = _POOL_STRETCH
                if err:
                    reply = p.error_reply(session, handle, err, os.strerror(err))
                    if used + len(reply) > _ARENA_SIZE:
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
        header_size = p.read_reply_header_size(session)
        Cmd = p.Cmd
        kind = req.type
        if err:
            if req.payload_length:
                self._skip(req.payload_length)
            log.info("%s: refusing %s: %s", self.peer, kind, why)
            self._send(p.error_reply(session, req.handle, err, why))
            return True
        if kind == Cmd.READ:
            n = req.length
            self._budget.acquire(n)
            buf = self._take_buffer(header_size + n)
            view = memoryview(buf)
            executor.submit(
                BlockRequest(BlockOp.READ, req.offset, n, (view[header_size:],), tag=(req, buf)),
                self._read_done,
            )
        elif kind == Cmd.WRITE:
            n = req.length
            self._budget.acquire(n)
            payload = self._take_buffer(n)
            try:
                self._recv_into(memoryview(payload))
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
                    tag=req,
                ),
                self._done,
            )
        elif kind == Cmd.FLUSH:
            self._submit(BlockRequest(BlockOp.FLUSH, tag=req))
        elif kind == Cmd.TRIM:
            self._submit(
                BlockRequest(
                    BlockOp.DISCARD,
                    req.offset,
                    req.length,
                    fua=bool(req.flags & p.CmdFlag.FUA),
                    tag=req,
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
                    tag=req,
                )
            )
        elif kind == Cmd.BLOCK_STATUS:
            self._send(self._block_status(session, req))
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
        req: p.Request = breq.tag  # type: ignore[assignment]
        session = self.session
        assert session is not None
        try:
            if err:
                self._send(p.error_reply(session, req.handle, err, os.strerror(err)))
            else:
                self._send(p.ok_reply(session, req.handle))
        finally:
            if breq.op is BlockOp.WRITE:
                payload = breq.buffers[0].obj
                assert isinstance(payload, bytearray)
                self._give_buffer(payload)
                self._budget.release(breq.length)
            else:
                self._budget.release(0)

    def _read_done(self, breq: BlockRequest, err: int) -> None:
        tag: tuple[p.Request, bytearray] = breq.tag  # type: ignore[assignment]
        req, buf = tag
        session = self.session
        assert session is not None
        try:
            if err:
                self._send(p.error_reply(session, req.handle, err, os.strerror(err)))
            else:
                p.pack_read_reply_header(session, buf, req.handle, req.offset, req.length)
                self._send(buf)
        finally:
            self._give_buffer(buf)
            self._budget.release(req.length)

    def _take_buffer(self, n: int) -> bytearray:
        """A buffer of ``n`` bytes, reused if one is free (fresh ones cost page faults)."""
        with self._free_lock:
            free = self._free_buffers.get(n)
            if free:
                self._free_bytes -= n
                return free.pop()
        return bytearray(n)

    def _give_buffer(self, buf: bytearray) -> None:
        n = len(buf)
        if n > _REUSE_LIMIT:
            return
        with self._free_lock:
            # Bounded in count per size and in bytes overall, whatever sizes a client uses.
            free = self._free_buffers.setdefault(n, [])
            if len(free) < _FREE_BUFFERS and self._free_bytes + n <= _FREE_BYTES:
                free.append(buf)
                self._free_bytes += n

    def _block_status(self, session: p.Session, req: p.Request) -> bytes:
        """Answer BLOCK_STATUS with bounded work: at most ``server.status_range`` bytes and
        :data:`STATUS_EXAMINED` runs of the disk are looked at (proto.md lets the reply cover
        less than asked; clients ask again from where it ends), and while other clients are
        busy the connection then waits as long as the work took, so a client looping on block
        status gets at most half the server's time."""
        server = self.server
        one = bool(req.flags & p.CmdFlag.REQ_ONE)
        length = min(req.length, server.status_range)
        started = time.perf_counter()
        try:
            with server.extents_lock:
                runs = server.disk.extents(req.offset, length)
                extents = p.clip_extents(
                    (
                        (e.offset, e.length, e.layer)
                        for e in itertools.islice(runs, STATUS_EXAMINED)
                    ),
                    req.offset,
                    length,
                    one=one,
                )
        except (vhd.VHDError, OSError) as exc:
            log.error("%s: block status failed: %s", self.peer, exc)
            return p.error_reply(session, req.handle, errno.EIO, str(exc))
        if not extents:
            # The disk reported nothing for the start of the range: call it data, which is
            # always a correct (if unhelpful) answer.
            extents = [(length, 0)]
        spent = time.perf_counter() - started
        if spent > _STATUS_YIELD and server.others_busy(self):
            time.sleep(spent)
        return p.block_status_reply(req.handle, p.BASE_ALLOCATION_ID, extents)


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
        self.pending = _Pending(max(0, max_pending_bytes))
        self.status_range = _status_range(disk)
        self._free_arenas: list[bytearray] = []
        self._arena_lock = threading.Lock()
        self.export = p.Export(
            name=export_name, size=disk.size, read_only=self.read_only, description=description
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
        negotiating = [c for c in live if c.negotiating]
        if negotiating:
            victim = min(negotiating, key=lambda c: c.last_active)
        else:
            idle = [
                c
                for c in live
                if not c._budget.requests and now - c.last_active >= self.evict_idle_after
            ]
            if not idle:
                return False
            victim = min(idle, key=lambda c: c.last_active)
        log.warning(
            "%s: full (%d connections): closing it (idle %.0f s) for a new client",
            victim.peer,
            self.max_connections,
            now - victim.last_active,
        )
        victim.evict()
        return True

    def take_arena(self) -> bytearray:
        """A reply arena for the inline read path (a kept one if free)."""
        with self._arena_lock:
            if self._free_arenas:
                return self._free_arenas.pop()
        return bytearray(_ARENA_SIZE)

    def give_arena(self, arena: bytearray) -> None:
        with self._arena_lock:
            if len(self._free_arenas) < _FREE_ARENAS:
                self._free_arenas.append(arena)

    def others_busy(self, conn: Connection) -> bool:
        """Is any client but ``conn`` waiting for us (requests in flight, or just sent some)?"""
        now = time.monotonic()
        with self._lock:
            others = [c for c in self._connections if c is not conn]
        return any(
            c._budget.requests or now - c.last_active < _BUSY_WINDOW
            for c in others
            if not c.negotiating
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
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _forget(self, conn: Connection) -> None:
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


def _status_range(disk: BlockDisk) -> int:
    """Bytes one BLOCK_STATUS request may look at: STATUS_BLOCKS of the smallest block size in
    the disk's chain, a multiple of 512 (the protocol's largest length is 4 GiB - 1)."""
    sizes = [
        size
        for layer in getattr(disk, "chain", None) or [disk]
        if (size := getattr(layer, "block_size", None))
    ]
    limit = STATUS_BLOCKS * min(sizes) if sizes else 0xFFFFFFFF
    return max(512, min(limit, 0xFFFFFFFF) // 512 * 512)


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
