"""A sans-IO engine for the server side of the NBD protocol (fixed newstyle negotiation).

It implements the handshake and option haggling of the NBD protocol document
(``doc/proto.md`` of NetworkBlockDevice/nbd): the greeting, client flags, ``NBD_OPT_GO``,
``INFO``, ``LIST``, ``ABORT``, ``EXPORT_NAME``, ``STRUCTURED_REPLY``, ``LIST_META_CONTEXT`` and
``SET_META_CONTEXT`` (the ``base:allocation`` context), and the codecs of the transmission
phase: the 28-byte request header, simple replies and structured reply chunks (data, error,
none, block status).  Nothing here touches a socket: bytes go in, bytes and decisions come out,
so the same engine runs under threads, asyncio or a fuzzer.

Theory of operation
-------------------
:class:`ServerNegotiation` is fed whatever bytes arrive (:meth:`~ServerNegotiation.receive_data`)
and queues the bytes to answer with (:meth:`~ServerNegotiation.data_to_send`).  Its
:attr:`~ServerNegotiation.state` moves from ``CLIENT_FLAGS`` to ``OPTIONS`` and ends in either
``TRANSMISSION`` (a :class:`Session` describes what was agreed; :meth:`unused_data` returns any
bytes the client already sent past the handshake) or ``CLOSED`` (the client aborted, asked for an
export that does not exist with ``EXPORT_NAME``, or broke the protocol; ``close_reason`` says
which).  Memory stays bounded: option payloads larger than :data:`MAX_OPTION_DATA` are skipped
without being stored and answered with ``NBD_REP_ERR_TOO_BIG``.

In transmission, :func:`decode_request` parses a request header and :func:`check_request`
decides, before any I/O, whether the request is acceptable for the session (known command,
allowed flags, inside the export, not a write to a read-only export, size limits); the transport
runs accepted requests and encodes the replies with the ``*_reply`` helpers below.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from blockback.errors import RemoteProtocolError

# -- magic numbers and constants (proto.md "Values") ------------------------------------------

NBD_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle negotiation, and every option header
REPLY_MAGIC = 0x3E889045565A9  # option replies
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR | 1
    ERR_POLICY = _ERR | 2
    ERR_INVALID = _ERR | 3
    ERR_PLATFORM = _ERR | 4
    ERR_TLS_REQD = _ERR | 5
    ERR_UNKNOWN = _ERR | 6
    ERR_SHUTDOWN = _ERR | 7
    ERR_BLOCK_SIZE_REQD = _ERR | 8
    ERR_TOO_BIG = _ERR | 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


REPLY_FLAG_DONE = 1 << 0

# base:allocation status flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

BASE_ALLOCATION = "base:allocation"
# The id we give base:allocation when a client selects it (any value is allowed; 0 is avoided
# because LIST_META_CONTEXT replies use it as "reserved").
BASE_ALLOCATION_ID = 1

# Error values that may travel on the wire; anything else is reported as EIO.
_WIRE_ERRNOS = {
    errno.EPERM: 1,
    errno.EIO: 5,
    errno.ENOMEM: 12,
    errno.EINVAL: 22,
    errno.ENOSPC: 28,
    errno.EOVERFLOW: 75,
    errno.ENOTSUP: 95,
    errno.ESHUTDOWN: 108,
    errno.EROFS: 1,
    errno.EDQUOT: 28,
    errno.EFBIG: 28,
}

# Options carry names and queries of at most 4096 bytes each (NBD_MAX_STRING); a few of them fit
# well in 64 KiB.  Larger payloads are skipped unread and refused with ERR_TOO_BIG.
MAX_OPTION_DATA = 64 * 1024
MAX_STRING = 4096

# Block size constraints we advertise: any alignment works (the disk handles partial sectors),
# 4 KiB is what the page cache likes, and 32 MiB is the largest payload clients expect to send.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_BLOCK = 32 * 1024 * 1024

# A block status reply lists at most this many extents; the client asks again for the rest.
MAX_EXTENTS = 16384

GREETING = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_HEADER = struct.Struct(">IHHQI")
# A structured OFFSET_DATA chunk: the chunk header followed by the 64-bit offset.
DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def wire_errno(err: int) -> int:
    """The NBD error value for a host errno (the protocol defines a few, all Linux numbers)."""
    return _WIRE_ERRNOS.get(err, 5)


# The client broke the protocol in a way that leaves no choice but to hang up: the one
# remote-protocol error of the package, under the name the NBD code has always used.
ProtocolError = RemoteProtocolError


# -- exports and sessions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Export:
    """What the server offers under one name."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    min_block: int = MIN_BLOCK
    preferred_block: int = PREFERRED_BLOCK
    max_block: int = MAX_BLOCK
    # The effects of FLUSH and FUA are visible on every connection (one shared disk).
    multi_conn: bool = True

    def transmission_flags(self, structured: bool) -> int:
        flags = (
            TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_CACHE
        )
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= (
                TransmissionFlag.SEND_FUA
                | TransmissionFlag.SEND_TRIM
                | TransmissionFlag.SEND_WRITE_ZEROES
                | TransmissionFlag.SEND_FAST_ZERO
            )
        if structured:
            # Reads are always answered with one chunk, so DF ("do not fragment") is free.
            flags |= TransmissionFlag.SEND_DF
        if self.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        return int(flags)


@dataclass(slots=True)
class Session:
    """What negotiation agreed on, for the transmission phase."""

    export: Export
    structured: bool = False
    # Selected metadata contexts: id -> name.
    contexts: dict[int, str] = field(default_factory=dict)
    flags: int = 0


class NegotiationState(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class _Invalid(Exception):
    """An option's payload is malformed (answered with ERR_INVALID)."""


class _Reader:
    """Bounds-checked reads of an option payload."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Invalid("option payload is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def string(self, n: int) -> str:
        if n > MAX_STRING:
            raise _Invalid(f"string of {n} bytes is longer than {MAX_STRING}")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Invalid("string is not UTF-8") from exc

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _Invalid("option payload has trailing bytes")


class ServerNegotiation:
    """The server's side of fixed newstyle negotiation, as a state machine fed with bytes."""

    def __init__(self, exports: Sequence[Export]) -> None:
        if not exports:
            raise ValueError("at least one export is needed")
        self.exports = list(exports)
        self.state = NegotiationState.CLIENT_FLAGS
        self.session: Session | None = None
        self.close_reason = ""
        self.options_seen = 0
        self._in = bytearray()
        self._out = bytearray(
            GREETING.pack(NBD_MAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )
        self._no_zeroes = False
        self._structured = False
        self._contexts: dict[int, str] = {}
        self._contexts_for: str | None = None
        # An oversized option being skipped: (option, bytes left to skip).
        self._skip: tuple[int, int] | None = None

    # -- the sans-IO interface -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client; process every complete message in them."""
        if self.state in (NegotiationState.TRANSMISSION, NegotiationState.CLOSED):
            self._in += data
            return
        self._in += data
        while self.state in (NegotiationState.CLIENT_FLAGS, NegotiationState.OPTIONS):
            if not self._step():
                break

    def data_to_send(self) -> bytes:
        """Bytes queued for the client (and forget them)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def unused_data(self) -> bytes:
        """Bytes received past the end of negotiation (the first transmission requests)."""
        return bytes(self._in)

    @property
    def finished(self) -> bool:
        return self.state in (NegotiationState.TRANSMISSION, NegotiationState.CLOSED)

    # -- internals -----------------------------------------------------------------------

    def _close(self, reason: str) -> None:
        self.state = NegotiationState.CLOSED
        self.close_reason = reason

    def _step(self) -> bool:
        """Handle one message if it is complete; return False when more bytes are needed."""
        if self.state is NegotiationState.CLIENT_FLAGS:
            if len(self._in) < 4:
                return False
            (flags,) = _U32.unpack_from(self._in)
            del self._in[:4]
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                # proto.md: the server MUST drop the connection on an unknown client flag.
                self._close(f"unknown client flags {flags:#x}")
                return False
            self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self.state = NegotiationState.OPTIONS
            return True
        if self._skip is not None:
            option, left = self._skip
            n = min(left, len(self._in))
            del self._in[:n]
            left -= n
            if left:
                self._skip = (option, left)
                return False
            self._skip = None
            self._reply(option, Rep.ERR_TOO_BIG, b"option data is too large")
            return True
        if len(self._in) < OPTION_HEADER.size:
            return False
        magic, option, length = OPTION_HEADER.unpack_from(self._in)
        if magic != IHAVEOPT:
            self._close(f"bad option magic {magic:#x}")
            return False
        if length > MAX_OPTION_DATA:
            del self._in[: OPTION_HEADER.size]
            self.options_seen += 1
            if option == Opt.EXPORT_NAME:
                # EXPORT_NAME cannot be answered with an error: hang up.
                self._close("export name too long")
                return False
            self._skip = (option, length)
            return True
        if len(self._in) < OPTION_HEADER.size + length:
            return False
        data = bytes(self._in[OPTION_HEADER.size : OPTION_HEADER.size + length])
        del self._in[: OPTION_HEADER.size + length]
        self.options_seen += 1
        self._option(option, data)
        return True

    def _reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY_HEADER.pack(REPLY_MAGIC, option, rep, len(data))
        self._out += data

    def _find(self, name: str) -> Export | None:
        for export in self.exports:
            if export.name == name:
                return export
        # The empty name is the default export (proto.md, NBD_OPT_EXPORT_NAME).
        return self.exports[0] if name == "" else None

    def _option(self, option: int, data: bytes) -> None:
        try:
            if option == Opt.EXPORT_NAME:
                self._export_name(data)
            elif option == Opt.ABORT:
                self._reply(option, Rep.ACK)
                self._close("client aborted")
            elif option == Opt.LIST:
                if data:
                    raise _Invalid("NBD_OPT_LIST takes no data")
                for export in self.exports:
                    name = export.name.encode()
                    self._reply(option, Rep.SERVER, _U32.pack(len(name)) + name)
                self._reply(option, Rep.ACK)
            elif option in (Opt.INFO, Opt.GO):
                self._info_go(option, data)
            elif option == Opt.STRUCTURED_REPLY:
                if data:
                    raise _Invalid("NBD_OPT_STRUCTURED_REPLY takes no data")
                self._structured = True
                self._reply(option, Rep.ACK)
            elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                self._meta_context(option, data)
            elif option == Opt.STARTTLS:
                self._reply(option, Rep.ERR_POLICY, b"this server does not offer TLS")
            else:
                self._reply(option, Rep.ERR_UNSUP, f"option {option} is not supported".encode())
        except _Invalid as exc:
            self._reply(option, Rep.ERR_INVALID, str(exc).encode())

    def _export_name(self, data: bytes) -> None:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            self._close("export name is not UTF-8")
            return
        export = self._find(name)
        if export is None:
            # proto.md: an unknown export with EXPORT_NAME MUST end the session.
            self._close(f"no export named {name!r}")
            return
        session = self._start(export, name)
        self._out += struct.pack(">QH", export.size, session.flags)
        if not self._no_zeroes:
            self._out += bytes(124)

    def _start(self, export: Export, name: str) -> Session:
        contexts = self._contexts if self._contexts_for == name else {}
        session = Session(
            export=export,
            structured=self._structured,
            contexts=dict(contexts),
            flags=export.transmission_flags(self._structured),
        )
        self.session = session
        self.state = NegotiationState.TRANSMISSION
        return session

    def _info_go(self, option: int, data: bytes) -> None:
        r = _Reader(data)
        name = r.string(r.u32())
        count = r.u16()
        wanted = {r.u16() for _ in range(count)}
        r.end()
        export = self._find(name)
        if export is None:
            self._reply(option, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        flags = export.transmission_flags(self._structured)
        self._reply(option, Rep.INFO, struct.pack(">HQH", Info.EXPORT, export.size, flags))
        # Block sizes are sent whether asked for or not (proto.md allows it).
        self._reply(
            option,
            Rep.INFO,
            struct.pack(
                ">HIII", Info.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block
            ),
        )
        if Info.NAME in wanted:
            self._reply(option, Rep.INFO, _U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in wanted and export.description:
            self._reply(option, Rep.INFO, _U16.pack(Info.DESCRIPTION) + export.description.encode())
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            self._start(export, name)

    def _meta_context(self, option: int, data: bytes) -> None:
        r = _Reader(data)
        name = r.string(r.u32())
        count = r.u32()
        queries = [r.string(r.u32()) for _ in range(min(count, MAX_OPTION_DATA))]
        r.end()
        if len(queries) != count:
            raise _Invalid("too many queries")
        if not self._structured:
            # Block status needs structured replies (proto.md, NBD_OPT_SET_META_CONTEXT).
            raise _Invalid("negotiate NBD_OPT_STRUCTURED_REPLY first")
        if self._find(name) is None:
            self._reply(option, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        if option == Opt.LIST_META_CONTEXT:
            matched = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
            if matched:
                self._reply(option, Rep.META_CONTEXT, _U32.pack(0) + BASE_ALLOCATION.encode())
        else:
            self._contexts = {}
            self._contexts_for = name
            if BASE_ALLOCATION in queries:
                self._contexts[BASE_ALLOCATION_ID] = BASE_ALLOCATION
                self._reply(
                    option,
                    Rep.META_CONTEXT,
                    _U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode(),
                )
        self._reply(option, Rep.ACK)


# -- transmission phase ------------------------------------------------------------------------


class Request(NamedTuple):
    """One decoded request header (a tuple: decoded once per request, on the hot path)."""

    flags: int
    type: int
    handle: int
    offset: int
    length: int

    @property
    def payload_length(self) -> int:
        """Bytes of data that follow the header on the wire (only WRITE carries any)."""
        return self.length if self.type == Cmd.WRITE else 0


def decode_request(header: bytes | bytearray | memoryview) -> Request:
    """Parse a 28-byte request header; a wrong magic number means the stream is lost."""
    magic, flags, kind, handle, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, kind, handle, offset, length)


_ALLOWED_FLAGS = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag(0),
    Cmd.FLUSH: CmdFlag(0),
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag(0),
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}
_WRITING = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)


# Per command, as plain ints for the per-request path: (the command, the flags it may carry,
# whether it modifies the export, whether the maximum block size applies).
_RULES: dict[int, tuple[Cmd, int, bool, bool]] = {
    int(cmd): (cmd, int(allowed), cmd in _WRITING, cmd in (Cmd.READ, Cmd.WRITE))
    for cmd, allowed in _ALLOWED_FLAGS.items()
}
_DF = int(CmdFlag.DF)
_OK = (0, "")


def check_request(session: Session, req: Request) -> tuple[int, str]:
    """Decide whether a request may run: ``(0, "")`` or ``(errno, why)``.

    The one place a request is validated (the server's inline read path included): the checks
    of proto.md's "Request types" section.  Unknown commands and flags are ``EINVAL``, ranges must
    lie inside the export, payload-carrying and read requests must not exceed the maximum block
    size, writes to a read-only export are ``EPERM``, and block status needs a selected metadata
    context.  What passes here is in range for the executor, which only re-checks defensively.
    """
    rule = _RULES.get(req.type)
    if rule is None:
        try:
            return errno.EINVAL, f"command {Cmd(req.type).name} is not supported"
        except ValueError:
            return errno.EINVAL, f"unknown command {req.type}"
    cmd, allowed, writing, bounded = rule
    flags = req.flags
    if flags & ~allowed:
        return errno.EINVAL, f"flags {flags:#x} are not valid for {cmd.name}"
    if flags & _DF and not session.structured:
        return errno.EINVAL, "DF needs structured replies"
    if cmd is Cmd.FLUSH or cmd is Cmd.DISC:
        return _OK
    export = session.export
    if writing and export.read_only:
        return errno.EPERM, "the export is read-only"
    offset, length = req.offset, req.length
    if bounded and length > export.max_block:
        return errno.EINVAL, f"{length} bytes is more than the {export.max_block} maximum"
    if offset > export.size or length > export.size - offset:
        return errno.EINVAL, f"{offset}+{length} is past the end ({export.size})"
    if cmd is Cmd.BLOCK_STATUS:
        if not session.contexts:
            return errno.EINVAL, "no metadata context was selected"
        if length == 0:
            return errno.EINVAL, "block status of zero bytes"
    return _OK


def simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, wire_errno(error) if error else 0, handle)


def structured_none(handle: int) -> bytes:
    return STRUCTURED_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, handle, 0
    )


def structured_error(handle: int, error: int, message: str = "") -> bytes:
    text = message.encode()[:MAX_STRING]
    payload = struct.pack(">IH", wire_errno(error), len(text)) + text
    return (
        STRUCTURED_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, handle, len(payload)
        )
        + payload
    )


def error_reply(session: Session, handle: int, error: int, message: str = "") -> bytes:
    """An error reply in the form the session negotiated."""
    if session.structured:
        return structured_error(handle, error, message)
    return simple_reply(handle, error)


def ok_reply(session: Session, handle: int) -> bytes:
    """Success of a command without payload (a simple reply is always allowed for those)."""
    return simple_reply(handle, 0)


def read_reply_header_size(session: Session) -> int:
    """Bytes in front of the data of a successful read reply."""
    return DATA_CHUNK_HEADER.size if session.structured else SIMPLE_REPLY.size


def pack_read_reply_header(
    session: Session,
    buffer: bytearray | memoryview,
    handle: int,
    offset: int,
    length: int,
    at: int = 0,
) -> None:
    """Write the header of a successful read reply into ``buffer`` at ``at``.

    The transport reads the data straight behind it, so header and data leave in one send.
    """
    if session.structured:
        DATA_CHUNK_HEADER.pack_into(
            buffer,
            at,
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            ReplyType.OFFSET_DATA,
            handle,
            8 + length,
            offset,
        )
    else:
        SIMPLE_REPLY.pack_into(buffer, at, SIMPLE_REPLY_MAGIC, 0, handle)


def block_status_reply(handle: int, context_id: int, extents: Iterable[tuple[int, int]]) -> bytes:
    """A final BLOCK_STATUS chunk: ``extents`` are ``(length, flags)`` pairs (at least one)."""
    body = bytearray(_U32.pack(context_id))
    for length, flags in extents:
        body += struct.pack(">II", length, flags)
    return (
        STRUCTURED_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, handle, len(body)
        )
        + body
    )


def allocation_flags(layer: int | None) -> int:
    """base:allocation flags of a ``vhd.Extent`` layer: nothing allocated reads as zeros."""
    return STATE_HOLE | STATE_ZERO if layer is None else 0


def clip_extents(
    extents: Iterable[tuple[int, int, int | None]],
    offset: int,
    length: int,
    *,
    one: bool = False,
) -> list[tuple[int, int]]:
    """Turn ``(offset, length, layer)`` extents into ``(length, flags)`` descriptors.

    Descriptors start exactly at ``offset``, stay inside ``offset + length`` (proto.md: extent
    lengths MUST NOT exceed the request), merge neighbours with equal flags, are capped at
    :data:`MAX_EXTENTS` (or one with ``REQ_ONE``), and each fits in 32 bits.
    """
    end = offset + length
    out: list[tuple[int, int]] = []
    pos = offset
    limit = 1 if one else MAX_EXTENTS
    for ext_offset, ext_length, layer in extents:
        start = max(pos, ext_offset)
        stop = min(end, ext_offset + ext_length)
        if stop <= start:
            continue
        if start != pos:
            # A gap in what the disk reported: do not guess, stop here.
            break
        flags = allocation_flags(layer)
        if out and out[-1][1] == flags and out[-1][0] + (stop - start) <= 0xFFFFFFFF:
            out[-1] = (out[-1][0] + stop - start, flags)
        else:
            if len(out) >= limit:
                break
            out.append((stop - start, flags))
        pos = stop
        if pos >= end:
            break
    return out
