"""The dynamic disk header (spec: "Dynamic Disk Header Format") and its eight parent locator
entries: 1024 bytes at the footer's data offset in dynamic and differencing images.

Declared once as (field, ``struct`` format) tables; exposed as the immutable :class:`DynamicHeader` holding a tuple
of :class:`ParentLocator`.  As with the footer, parsing judges nothing: the opener and the checker
decide what a bad cookie, checksum or field means.
"""

from __future__ import annotations

import struct

from .checksum import vhd_checksum
from .record import FrozenRecord, fill

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    import uuid  # for annotations only: its import (platform behind it) costs ~3 ms
    from typing import Any

HEADER_SIZE = 1024
COOKIE = b"cxsparse"
VERSION = 0x00010000
UNUSED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
CHECKSUM_OFFSET = 36
PARENT_NAME_BYTES = 512
LOCATOR_SLOTS = 8

# The records, declared once: (field, ``struct`` format) in on-disk order, big-endian.  (Plain
# ``struct``: a parser library would cost every command its import at start-up.)
LOCATOR_FIELDS = (
    ("code", "I"),
    ("data_space", "I"),
    ("data_len", "I"),
    ("reserved", "I"),
    ("data_offset", "Q"),
)
LOCATOR_STRUCT = struct.Struct(">" + "".join(fmt for _, fmt in LOCATOR_FIELDS))
HEADER_FIELDS = (
    ("cookie", "8s"),
    ("data_offset", "Q"),
    ("table_offset", "Q"),
    ("version", "I"),
    ("max_table_entries", "I"),
    ("block_size", "I"),
    ("checksum", "I"),
    ("parent_unique_id", "16s"),
    ("parent_timestamp", "I"),
    ("reserved1", "I"),
    ("parent_name_raw", f"{PARENT_NAME_BYTES}s"),
    ("locators", f"{LOCATOR_SLOTS * LOCATOR_STRUCT.size}s"),  # LOCATOR_SLOTS x LOCATOR_STRUCT
    ("reserved2", "256s"),
)
HEADER_STRUCT = struct.Struct(">" + "".join(fmt for _, fmt in HEADER_FIELDS))
assert HEADER_STRUCT.size == HEADER_SIZE


class ParentLocator(FrozenRecord):
    """One parent locator entry; ``code`` 0 marks an empty slot."""

    _fields = tuple(name for name, _ in LOCATOR_FIELDS)
    __slots__ = _fields
    code: int
    data_space: int
    data_len: int
    reserved: int
    data_offset: int

    def __init__(
        self,
        code: int = 0,
        data_space: int = 0,
        data_len: int = 0,
        reserved: int = 0,
        data_offset: int = 0,
    ) -> None:
        fill(self, code, data_space, data_len, reserved, data_offset)

    @property
    def in_use(self) -> bool:
        return self.code != 0

    @property
    def space_bytes(self) -> int:
        """The reserved space in bytes.

        The spec says sectors; Windows, blktap and VirtualBox store bytes.  Like blktap's reader,
        values below 512 are taken as sectors and anything else as bytes.
        """
        return self.data_space * 512 if self.data_space < 512 else self.data_space


class DynamicHeader(FrozenRecord):
    _fields = tuple(name for name, _ in HEADER_FIELDS)
    __slots__ = _fields
    cookie: bytes
    data_offset: int
    table_offset: int
    version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_unique_id: bytes
    parent_timestamp: int
    reserved1: int
    parent_name_raw: bytes
    locators: tuple[ParentLocator, ...]
    reserved2: bytes

    def __init__(
        self,
        cookie: bytes,
        data_offset: int,
        table_offset: int,
        version: int,
        max_table_entries: int,
        block_size: int,
        checksum: int,
        parent_unique_id: bytes,
        parent_timestamp: int,
        reserved1: int,
        parent_name_raw: bytes,
        locators: tuple[ParentLocator, ...],
        reserved2: bytes,
    ) -> None:
        fill(
            self,
            cookie,
            data_offset,
            table_offset,
            version,
            max_table_entries,
            block_size,
            checksum,
            parent_unique_id,
            parent_timestamp,
            reserved1,
            parent_name_raw,
            locators,
            reserved2,
        )

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview) -> DynamicHeader:
        data = bytes(raw)
        if len(data) != HEADER_SIZE:
            raise ValueError(f"a dynamic header is 1024 bytes, got {len(data)}")
        values = HEADER_STRUCT.unpack(data)
        fields: dict[str, Any] = {
            name: value for (name, _), value in zip(HEADER_FIELDS, values, strict=True)
        }
        fields["locators"] = tuple(
            ParentLocator(*values) for values in LOCATOR_STRUCT.iter_unpack(fields["locators"])
        )
        return cls(**fields)

    def build(self) -> bytes:
        if len(self.locators) != LOCATOR_SLOTS:
            raise ValueError(
                f"a header has {LOCATOR_SLOTS} locator slots, not {len(self.locators)}"
            )
        fields: dict[str, Any] = self._asdict()
        fields["locators"] = b"".join(
            LOCATOR_STRUCT.pack(
                loc.code, loc.data_space, loc.data_len, loc.reserved, loc.data_offset
            )
            for loc in self.locators
        )
        fields["checksum"] = 0
        for name, fmt in HEADER_FIELDS:
            if fmt.endswith("s") and len(fields[name]) != int(fmt[:-1]):
                raise ValueError(f"{name} is {len(fields[name])} bytes, not {fmt[:-1]}")
        raw = bytearray(HEADER_STRUCT.pack(*(fields[name] for name, _ in HEADER_FIELDS)))
        raw[CHECKSUM_OFFSET : CHECKSUM_OFFSET + 4] = vhd_checksum(raw, CHECKSUM_OFFSET).to_bytes(
            4, "big"
        )
        return bytes(raw)

    @property
    def cookie_ok(self) -> bool:
        return self.cookie == COOKIE

    @property
    def parent_name(self) -> str:
        """The parent's name, decoded from UTF-16BE up to the first NUL.

        Unpaired surrogates (seen in real files) and odd bytes are replaced, never fatal.
        """
        return decode_utf16(self.parent_name_raw, "be")

    @property
    def parent_uuid(self) -> uuid.UUID:
        import uuid

        return uuid.UUID(bytes=self.parent_unique_id)

    @property
    def bitmap_bytes(self) -> int:
        """Bytes of the sector bitmap in front of each block, padded to whole sectors."""
        return bitmap_size(self.block_size)


def bitmap_size(block_size: int) -> int:
    sectors_per_block = block_size // 512
    raw = (sectors_per_block + 7) // 8
    return (raw + 511) // 512 * 512


def decode_utf16(raw: bytes, order: str) -> str:
    """Decode UTF-16 text stored in a fixed-size field: stop at the first NUL code unit."""
    units = len(raw) // 2 * 2
    for i in range(0, units, 2):
        if raw[i] == 0 and raw[i + 1] == 0:
            units = i
            break
    codec = "utf-16-be" if order == "be" else "utf-16-le"
    return raw[:units].decode(codec, errors="replace")


def encode_parent_name(name: str) -> bytes:
    """The header's parent name field: UTF-16BE, NUL-padded to 512 bytes (at most 255 units)."""
    data = name.encode("utf-16-be", errors="surrogatepass")
    if len(data) > PARENT_NAME_BYTES - 2:
        raise ValueError("parent name is longer than 255 UTF-16 code units")
    return data.ljust(PARENT_NAME_BYTES, b"\0")


def new_header(
    *,
    table_offset: int,
    max_table_entries: int,
    block_size: int,
    parent_unique_id: bytes = bytes(16),
    parent_timestamp: int = 0,
    parent_name: str = "",
    locators: tuple[ParentLocator, ...] = (),
) -> DynamicHeader:
    slots = tuple(locators) + (ParentLocator(),) * (LOCATOR_SLOTS - len(locators))
    return DynamicHeader(
        cookie=COOKIE,
        data_offset=UNUSED_DATA_OFFSET,
        table_offset=table_offset,
        version=VERSION,
        max_table_entries=max_table_entries,
        block_size=block_size,
        checksum=0,
        parent_unique_id=parent_unique_id,
        parent_timestamp=parent_timestamp,
        reserved1=0,
        parent_name_raw=encode_parent_name(parent_name),
        locators=slots,
        reserved2=bytes(256),
    )


def checksum_ok(raw: bytes | bytearray | memoryview) -> bool:
    """Whether a dynamic header's stored checksum matches its contents."""
    data = bytes(raw)
    stored = int.from_bytes(data[CHECKSUM_OFFSET : CHECKSUM_OFFSET + 4], "big")
    return stored == vhd_checksum(data, CHECKSUM_OFFSET)
