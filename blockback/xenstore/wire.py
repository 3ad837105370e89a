"""The XenStore wire protocol: message framing and payload conventions (pure, no I/O).

Source: ``/usr/include/xen/io/xs_wire.h`` from Debian's ``libxen-dev`` (Xen 4.17), which defines
``struct xsd_sockmsg`` {u32 type, u32 req_id, u32 tx_id, u32 len} followed by ``len`` payload
bytes, the ``enum xsd_sockmsg_type`` numbering, the ``xsd_errors`` table (errors travel as the
errno *name*, e.g. ``"ENOENT\\0"``, for portability between OSes) and ``XENSTORE_PAYLOAD_MAX``.
The payload conventions per message type (which strings are NUL-terminated, what a reply holds)
follow Xen's ``docs/misc/xenstore.txt`` and what ``libxenstore`` (``tools/libs/store/xs.c``)
sends and expects; they are listed in :data:`PAYLOADS`.

The header is in the host's byte order (xenstored and its clients always share a machine or,
over the shared ring, an architecture), so it is packed with ``=`` (native order, standard
sizes).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum

from blockback.errors import ProtocolError

HEADER = struct.Struct("=IIII")
HEADER_SIZE = HEADER.size  # 16

PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX: "violating this is very bad"
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048  # XENSTORE_REL_PATH_MAX

WRITE_NONE = "NONE"
WRITE_CREATE = "CREATE"
WRITE_CREATE_EXCL = "CREATE|EXCL"


class XsType(IntEnum):
    """``enum xsd_sockmsg_type``: the message type in the header."""

    CONTROL = 0  # alias XS_DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


XS_INVALID = 0xFFFF  # "guaranteed to remain an invalid type"

# What each request carries and what its reply holds ("s\0" = NUL-terminated string).
PAYLOADS: dict[XsType, tuple[str, str]] = {
    XsType.DIRECTORY: ("path\0", "child\0 for each child"),
    XsType.READ: ("path\0", "value (not terminated)"),
    XsType.GET_PERMS: ("path\0", "perm\0 for each perm"),
    XsType.WATCH: ("path\0token\0", "OK\0, then a WATCH_EVENT for path"),
    XsType.UNWATCH: ("path\0token\0", "OK\0"),
    XsType.TRANSACTION_START: ("\0", "txid\0 (decimal)"),
    XsType.TRANSACTION_END: ("T\0 (commit) or F\0 (abort)", "OK\0 or ERROR EAGAIN"),
    XsType.INTRODUCE: ("domid\0mfn\0evtchn\0", "OK\0"),
    XsType.RELEASE: ("domid\0", "OK\0"),
    XsType.GET_DOMAIN_PATH: ("domid\0", "/local/domain/<domid>\0"),
    XsType.WRITE: ("path\0value (not terminated)", "OK\0"),
    XsType.MKDIR: ("path\0", "OK\0"),
    XsType.RM: ("path\0", "OK\0"),
    XsType.SET_PERMS: ("path\0perm\0perm\0...", "OK\0"),
    XsType.WATCH_EVENT: ("(server to client only)", "path\0token\0"),
    XsType.ERROR: ("(server to client only)", "ERRNAME\0"),
    XsType.IS_DOMAIN_INTRODUCED: ("domid\0", "T\0 or F\0"),
    XsType.RESUME: ("domid\0", "OK\0"),
    XsType.SET_TARGET: ("domid\0target\0", "OK\0"),
    XsType.RESET_WATCHES: ("(empty)", "OK\0"),
    XsType.DIRECTORY_PART: ("path\0offset\0", "gen\0child\0...[\0 at the end]"),
}

# ``xsd_errors[]`` in table order ("new errors should be added at the end").
XSD_ERRORS: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)

OK = b"OK\0"


def xs_error(name: str) -> int:
    """The local errno value of an xenstore error name (``"ENOENT"`` -> ``errno.ENOENT``).

    Unknown names map to EINVAL, as libxenstore's ``get_error()`` does.
    """
    if name in XSD_ERRORS:
        return int(getattr(errno, name))
    return errno.EINVAL


def xs_error_name(code: int) -> str:
    """The wire name of a local errno value; errors outside the table travel as EINVAL."""
    name = errno.errorcode.get(code, "EINVAL")
    return name if name in XSD_ERRORS else "EINVAL"


class XenStoreError(ProtocolError):
    """An xenstore operation failed: the daemon answered ERROR, or the connection broke.

    ``errno`` is the local errno value, ``name`` the wire name (``"ENOENT"``).  A protocol error
    (``blockback.errors``), not a ``vhd.VHDError``: it is about xenstored, not an image.
    """

    def __init__(self, name: str, message: str = "") -> None:
        self.name = name
        self.errno = xs_error(name) if name in XSD_ERRORS else errno.EIO
        super().__init__(f"xenstore: {name}{': ' + message if message else ''}")


class WireProtocolError(XenStoreError):
    """The peer sent bytes that are not a valid xenstore message (bad length, bad type)."""

    def __init__(self, message: str) -> None:
        super().__init__("EINVAL", message)


@dataclass(frozen=True, slots=True)
class Message:
    """One xenstore message: the header fields and the raw payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        if len(self.payload) > PAYLOAD_MAX:
            raise WireProtocolError(f"payload of {len(self.payload)} bytes > {PAYLOAD_MAX}")
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    def strings(self) -> list[str]:
        """The payload as NUL-separated strings (see :func:`split_strings`)."""
        return split_strings(self.payload)

    def error_name(self) -> str | None:
        """For an ERROR message, the errno name it carries; None otherwise."""
        if self.type != XsType.ERROR:
            return None
        return self.payload.split(b"\0", 1)[0].decode("ascii", "replace") or "EINVAL"


class MessageDecoder:
    """Incremental framing: feed bytes as they arrive, take out complete messages.

    A header announcing more than ``max_payload`` bytes raises :class:`WireProtocolError`
    at once (before the payload is buffered), so a hostile peer cannot make us allocate.
    """

    def __init__(self, max_payload: int = PAYLOAD_MAX) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_message(self) -> Message | None:
        """The next complete message, or None if more bytes are needed."""
        if len(self._buf) < HEADER_SIZE:
            return None
        mtype, req_id, tx_id, length = HEADER.unpack_from(self._buf, 0)
        if length > self._max:
            raise WireProtocolError(f"message announces {length} payload bytes > {self._max}")
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return Message(mtype, req_id, tx_id, payload)

    def messages(self) -> list[Message]:
        out: list[Message] = []
        while (msg := self.next_message()) is not None:
            out.append(msg)
        return out


def split_strings(payload: bytes) -> list[str]:
    """Split a payload of NUL-terminated strings; a trailing unterminated part is kept.

    ``b"a\\0b\\0"`` -> ``["a", "b"]``; ``b"a\\0b"`` -> ``["a", "b"]``; ``b""`` -> ``[]``.
    Bytes that are not UTF-8 raise :class:`WireProtocolError`.
    """
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    try:
        return [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError as exc:
        raise WireProtocolError("payload is not UTF-8") from exc


def join_strings(*parts: str | bytes) -> bytes:
    """Each part NUL-terminated, concatenated (the usual request and reply shape)."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


def error_message(name: str, req_id: int = 0, tx_id: int = 0) -> Message:
    """An ERROR reply carrying ``name`` (which must be in the ``xsd_errors`` table)."""
    if name not in XSD_ERRORS:
        name = "EINVAL"
    return Message(XsType.ERROR, req_id, tx_id, join_strings(name))


def watch_event(path: str, token: str) -> Message:
    """A WATCH_EVENT: req_id and tx_id are 0, payload ``path\\0token\\0``."""
    return Message(XsType.WATCH_EVENT, 0, 0, join_strings(path, token))
