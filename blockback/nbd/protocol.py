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

This module is the front end's one import: the protocol's values live in
:mod:`~blockback.nbd.values`, the negotiation engine in :mod:`~blockback.nbd.negotiation`, and
both are re-exported here; the transmission phase is below.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable
from typing import NamedTuple

from blockback.errors import RemoteProtocolError

from .negotiation import (
    NegotiationState,
    ServerNegotiation,
)
from .values import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    DATA_CHUNK_HEADER,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    GREETING,
    IHAVEOPT,
    MAX_BLOCK,
    MAX_EXTENTS,
    MAX_OPTION_DATA,
    MAX_STRING,
    MIN_BLOCK,
    NBD_MAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    PREFERRED_BLOCK,
    REPLY_FLAG_DONE,
    REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_HEADER,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    Cmd,
    CmdFlag,
    Export,
    Info,
    Opt,
    Rep,
    ReplyType,
    Session,
    TransmissionFlag,
    wire_errno,
)

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
        raise RemoteProtocolError(f"bad request magic {magic:#x}")
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
    body = bytearray(U32.pack(context_id))
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


# The protocol module is the one import of the NBD front end: the values and the negotiation
# engine are re-exported from here.
__all__ = [
    "BASE_ALLOCATION",
    "BASE_ALLOCATION_ID",
    "DATA_CHUNK_HEADER",
    "FLAG_C_FIXED_NEWSTYLE",
    "FLAG_C_NO_ZEROES",
    "FLAG_FIXED_NEWSTYLE",
    "FLAG_NO_ZEROES",
    "GREETING",
    "IHAVEOPT",
    "MAX_BLOCK",
    "MAX_EXTENTS",
    "MAX_OPTION_DATA",
    "MAX_STRING",
    "MIN_BLOCK",
    "NBD_MAGIC",
    "OPTION_HEADER",
    "OPTION_REPLY_HEADER",
    "PREFERRED_BLOCK",
    "REPLY_FLAG_DONE",
    "REPLY_MAGIC",
    "REQUEST",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY",
    "SIMPLE_REPLY_MAGIC",
    "STATE_HOLE",
    "STATE_ZERO",
    "STRUCTURED_HEADER",
    "STRUCTURED_REPLY_MAGIC",
    "U16",
    "U32",
    "Cmd",
    "CmdFlag",
    "Export",
    "Info",
    "NegotiationState",
    "Opt",
    "RemoteProtocolError",
    "Rep",
    "ReplyType",
    "Request",
    "ServerNegotiation",
    "Session",
    "TransmissionFlag",
    "allocation_flags",
    "block_status_reply",
    "check_request",
    "clip_extents",
    "decode_request",
    "error_reply",
    "ok_reply",
    "pack_read_reply_header",
    "read_reply_header_size",
    "simple_reply",
    "structured_error",
    "structured_none",
    "wire_errno",
]
