"""The values of the NBD protocol document (``doc/proto.md`` of NetworkBlockDevice/nbd, "Values"
and the structures of "Protocol phases"): magic numbers, flags, option, reply and command codes,
the wire structs, the errno values the wire carries, and the records both phases share (an
:class:`Export` and the :class:`Session` negotiation agrees on).  Import them through
:mod:`blockback.nbd.protocol`.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass, field

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
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")


def wire_errno(err: int) -> int:
    """The NBD error value for a host errno (the protocol defines a few, all Linux numbers)."""
    return _WIRE_ERRNOS.get(err, 5)


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
