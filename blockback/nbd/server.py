"""The NBD export's transport: sockets and threads around the sans-IO protocol engine.

:mod:`blockback.nbd.protocol` decides what the bytes mean; this module moves them.  One thread
accepts connections on each listening socket (unix or TCP); each client gets a connection
thread that negotiates, then reads request headers and hands the work to its own
:class:`~blockback.executor.RequestExecutor` (so a client that stops reading its replies can only
stall its own workers, never another client's).  Workers send their reply as soon as their
request is done, so replies leave in completion order, not request order, as the protocol allows.

All connections share one ``Disk``: a flush on any connection makes every earlier write durable,
which is why the export advertises ``NBD_FLAG_CAN_MULTI_CONN``.

Memory per connection is bounded: a request is only read off the socket once the bytes of the
requests in flight (read buffers and write payloads) fit in :data:`MAX_INFLIGHT_BYTES` and fewer
than :data:`MAX_INFLIGHT_REQUESTS` are pending; until then the client's requests wait in the
socket and TCP (or the unix socket) pushes back.  Add a fixed 4 MiB reply arena, a 256 KiB
receive buffer and at most 16 MiB of buffers kept for reuse.

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
import logging
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
# Each client costs a thread (plus its workers): refuse more than this many at once.
MAX_CONNECTIONS = 256
# Clients that connect and say nothing useful are dropped after this long in negotiation.
NEGOTIATION_TIMEOUT = 30.0
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


class _Budget:
    """Bytes and requests in flight on one connection (the per-connection memory bound)."""

    def __init__(self, max_bytes: int, max_requests: int) -> None:
        self.max_bytes = max_bytes
        self.max_requests = max_requests
        self.bytes = 0
        self.requests = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            # A single request larger than the budget still runs, alone.
            while self.requests and (
                self.requests >= self.max_requests or self.bytes + n > self.max_bytes
            ):
                self._cond.wait()
            self.bytes += n
            self.requests += 1

    def release(self, n: int) -> None:
        with self._cond:
            self.bytes -= n
            self.requests -= 1
            self._cond.notify()


class Connection:
    """One client: negotiation, then the transmission phase."""

    def __init__(self, server: NBDServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.session: p.Session | None = None
        self._send_lock = threading.Lock()
        self._dead = False
        self._budget = _Budget(server.max_inflight_bytes, server.max_inflight_requests)
        self._rbuf = bytearray(_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self.executor: RequestExecutor | None = None
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
                self._rbuf[:avail] = self._rview[self._rpos : self._rend]
                self._rpos, self._rend = 0, avail
            while self._rend - self._rpos < n:
                got = self.sock.recv_into(self._rview[self._rend :])
                if not got:
                    raise _Disconnect("the client closed the connection")
                self._rend += got
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
        except p.ProtocolError as exc:
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
            self.server._forget(self)

    def _negotiate(self) -> bool:
        engine = p.ServerNegotiation([self.server.export])
        self.sock.settimeout(self.server.negotiation_timeout)
        try:
            while True:
                out = engine.data_to_send()
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
        self.sock.settimeout(None)
        if engine.state is p.NegotiationState.CLOSED:
            log.info("%s: negotiation ended: %s", self.peer, engine.close_reason)
            return False
        self.session = engine.session
        rest = engine.unused_data()
        self._rbuf[: len(rest)] = rest
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
        # Small reads run inline, their replies packed one after another into the arena and
        # sent in one go once no further request is waiting in the receive buffer.
        arena = bytearray(_ARENA_SIZE)
        aview = memoryview(arena)
        used = 0
        pool_reads = 0
        perf = time.perf_counter
        while not server.stopping:
            if self._dead:
                raise _Disconnect("the client stopped receiving")
            if used and self._rend - self._rpos < header_bytes:
                # About to wait for the client: send the replies we have first.
                self._send(aview[:used])
                used = 0
            # Decoded and validated once, here at the protocol edge, for every request: the
            # inline read path below and _dispatch act on this verdict.
            req = decode(self._fill(header_bytes))
            err, why = check(session, req)
            if not err and req.type == 0 and req.length <= _INLINE_READ and not pool_reads:
                handle, offset, length = req.handle, req.offset, req.length
                need = header_size + length
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
        one = bool(req.flags & p.CmdFlag.REQ_ONE)
        try:
            with self.server.extents_lock:
                extents = p.clip_extents(
                    (
                        (e.offset, e.length, e.layer)
                        for e in self.server.disk.extents(req.offset, req.length)
                    ),
                    req.offset,
                    req.length,
                    one=one,
                )
        except (vhd.VHDError, OSError) as exc:
            log.error("%s: block status failed: %s", self.peer, exc)
            return p.error_reply(session, req.handle, errno.EIO, str(exc))
        if not extents:
            # The disk reported nothing for the start of the range: call it data, which is
            # always a correct (if unhelpful) answer.
            extents = [(req.length, 0)]
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
        negotiation_timeout: float = NEGOTIATION_TIMEOUT,
    ) -> None:
        self.disk = disk
        self.read_only = bool(read_only or disk.read_only)
        self.workers = workers
        self.max_inflight_bytes = max(max_inflight_bytes, p.MAX_BLOCK)
        self.max_inflight_requests = max(1, max_inflight_requests)
        self.max_connections = max(1, max_connections)
        self.negotiation_timeout = negotiation_timeout
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
            if self.connections >= self.max_connections:
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
