"""The server's side of fixed newstyle negotiation (NBD protocol document, "Handshake" and
"Option types"), sans-IO: see :mod:`blockback.nbd.protocol` for the theory of operation.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence

from .values import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    GREETING,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_STRING,
    NBD_MAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    REPLY_MAGIC,
    U16,
    U32,
    Export,
    Info,
    Opt,
    Rep,
    Session,
)


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
        value: int = U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = U32.unpack(self.take(4))[0]
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
            (flags,) = U32.unpack_from(self._in)
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
                    self._reply(option, Rep.SERVER, U32.pack(len(name)) + name)
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
            self._reply(option, Rep.INFO, U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in wanted and export.description:
            self._reply(option, Rep.INFO, U16.pack(Info.DESCRIPTION) + export.description.encode())
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
                self._reply(option, Rep.META_CONTEXT, U32.pack(0) + BASE_ALLOCATION.encode())
        else:
            self._contexts = {}
            self._contexts_for = name
            if BASE_ALLOCATION in queries:
                self._contexts[BASE_ALLOCATION_ID] = BASE_ALLOCATION
                self._reply(
                    option,
                    Rep.META_CONTEXT,
                    U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode(),
                )
        self._reply(option, Rep.ACK)
