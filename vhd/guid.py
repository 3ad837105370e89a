"""GUIDs as the formats store them: MS-VHDX 1.0 section 2 ("GUID" fields: the headers' FileWriteGuid,
DataWriteGuid and LogGuid, region and metadata item ids, the parent locator type and the
parent_linkage value in 2.6.2.6.3), in Microsoft's binary layout ([MS-DTYP] 2.3.4.2: Data1,
Data2 and Data3 little-endian, Data4 as is), and VHD's footer unique id, in RFC 4122 order.

:class:`Guid` is the value the VHDX package holds them as, instead of ``uuid.UUID``: importing
``uuid`` imports ``platform`` (with its regular expressions compiled at import), about 2-3 ms of
every VHDX command's start-up.  It offers the part of ``uuid.UUID`` we use (``int``, ``bytes``,
``bytes_le``, ``str``, parsing the canonical form with or without braces) and interoperates with
it: a :class:`Guid` and a ``uuid.UUID`` of the same value compare equal either way round and hash
equal (``hash(int)``, as ``uuid.UUID`` does), so sets and dicts mix them, and code that reads
GUIDs by those attributes takes either (:data:`AnyGuid`).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (vhd.record)
if TYPE_CHECKING:
    import uuid
    from typing import NoReturn, TypeAlias

    AnyGuid: TypeAlias = "Guid | uuid.UUID"

__all__ = ["ZERO_GUID", "Guid"]

_MAX = 1 << 128
# The builtins, for annotations in Guid, whose `int` and `bytes` (named as uuid.UUID's) hide them
_Int = int
_Bytes = bytes


class Guid:
    """A 128-bit GUID, immutable; ``int`` is its value as ``uuid.UUID.int`` holds it."""

    __slots__ = ("int",)
    int: _Int

    def __init__(self, value: _Int) -> None:
        if not 0 <= value < _MAX:
            raise ValueError("a GUID is a 128-bit value")
        object.__setattr__(self, "int", value)

    # -- from and to bytes and text ------------------------------------------------------

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> Guid:
        """From 16 bytes in RFC 4122 order (``uuid.UUID(bytes=raw)``; a VHD footer's unique id)."""
        if len(raw) != 16:
            raise ValueError("a GUID is 16 bytes")
        return cls(int.from_bytes(raw, "big"))

    @classmethod
    def from_bytes_le(cls, raw: bytes | bytearray | memoryview) -> Guid:
        """From 16 bytes in Microsoft's layout (``uuid.UUID(bytes_le=raw)``; every VHDX GUID)."""
        if len(raw) != 16:
            raise ValueError("a GUID is 16 bytes")
        b = bytes(raw)
        return cls(int.from_bytes(b[3::-1] + b[5:3:-1] + b[7:5:-1] + b[8:], "big"))

    @classmethod
    def parse(cls, text: str) -> Guid:
        """From text, by ``uuid.UUID(text)``'s rules (so a parent_linkage that parsed before
        parses the same): an optional ``urn:uuid:`` prefix and braces, hyphens anywhere, 32
        hexadecimal digits as ``int(..., 16)`` reads them; ValueError otherwise."""
        digits = text.replace("urn:", "").replace("uuid:", "").strip("{}").replace("-", "")
        if len(digits) != 32:
            raise ValueError("badly formed hexadecimal UUID string")
        return cls(int(digits, 16))

    @classmethod
    def random(cls) -> Guid:
        """A random (version 4, RFC 4122 variant) GUID, as ``uuid.uuid4()`` makes it."""
        value = int.from_bytes(os.urandom(16), "big")
        value = value & ~(0xF000 << 64) | (4 << 76)  # version 4
        value = value & ~(0xC000 << 48) | (0x8000 << 48)  # variant 10xx
        return cls(value)

    @property
    def bytes(self) -> bytes:
        """The 16 bytes in RFC 4122 order (``uuid.UUID.bytes``)."""
        return self.int.to_bytes(16, "big")

    @property
    def bytes_le(self) -> _Bytes:
        """The 16 bytes in Microsoft's layout, as VHDX stores them (``uuid.UUID.bytes_le``)."""
        b = self.int.to_bytes(16, "big")
        return b[3::-1] + b[5:3:-1] + b[7:5:-1] + b[8:]

    @property
    def hex(self) -> str:
        return f"{self.int:032x}"

    def __str__(self) -> str:
        h = f"{self.int:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def __repr__(self) -> str:
        return f"Guid('{self}')"

    # -- value semantics, shared with uuid.UUID ------------------------------------------

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Guid):
            return self.int == other.int
        # A uuid.UUID can only exist once uuid is imported: look for it, never import it.
        # (uuid.UUID.__eq__ returns NotImplemented for a Guid, so Python asks this one.)
        uuid_module = sys.modules.get("uuid")
        if uuid_module is not None and isinstance(other, uuid_module.UUID):
            return bool(self.int == other.int)
        return NotImplemented

    def __hash__(self) -> _Int:
        return hash(self.int)  # as uuid.UUID's, so equal values of either type hash alike

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("a Guid is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("a Guid is immutable")

    def __reduce__(self) -> tuple[type[Guid], tuple[_Int]]:
        # copy and pickle rebuild through __init__ (setattr is refused)
        return Guid, (self.int,)


ZERO_GUID = Guid(0)
