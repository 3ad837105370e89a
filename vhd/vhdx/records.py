"""VHDX records: bytes <-> typed objects (MS-VHDX 1.0, section 2.2 header section, 2.3.1 log
entry, 2.5.1 BAT entry, 2.6 metadata region).

Pure functions, no I/O.  Each record is declared once as a (field, ``struct`` format) table
(:class:`Record`, little-endian), as VHD's footer and header are: a parser library would cost every
VHDX command its import at start-up.  GUIDs are stored in Microsoft's binary form (the first three
fields little-endian), which is :meth:`vhd.guid.Guid.from_bytes_le` (``uuid.UUID(bytes_le=...)``,
without the ``uuid`` import).  Every parser checks the signature
and, where the record has one, the CRC-32C, and raises a :class:`vhd.VHDError` subclass otherwise.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import SimpleNamespace

from ..errors import ChecksumError, CorruptImageError, UnsupportedFeatureError
from ..guid import ZERO_GUID as ZERO_GUID  # (the VHDX modules name it r.ZERO_GUID)
from ..guid import Guid
from ..record import FrozenRecord, fill
from .crc import crc32c_with_zeroed_field

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (vhd.record)
if TYPE_CHECKING:
    from typing import Any

    from ..guid import AnyGuid

KiB = 1024
MiB = 1024 * KiB

FILE_IDENTIFIER_SIZE = 64 * KiB
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
SECTOR_BITMAP_BLOCK_SIZE = 1 * MiB
LOG_SECTOR = 4 * KiB
MAX_TABLE_ENTRIES = 2047
MAX_METADATA_ITEM = 1 * MiB
MAX_VIRTUAL_SIZE = 64 * 1024 * 1024 * MiB  # 64 TiB

SIGNATURE = b"vhdxfile"

BAT_REGION = Guid.parse("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = Guid.parse("8B7CA206-4790-4B9A-B8FE-575F050F886E")

FILE_PARAMETERS = Guid.parse("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = Guid.parse("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = Guid.parse("BECA12AB-B2E6-4523-93EF-C309E000C746")  # "page 83 data"
LOGICAL_SECTOR_SIZE = Guid.parse("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = Guid.parse("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = Guid.parse("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR_TYPE = Guid.parse("B04AEFB7-D19E-4A81-B789-25B8E9445913")

_REGION_NAMES: dict[AnyGuid, str] = {BAT_REGION: "bat", METADATA_REGION: "metadata"}
KNOWN_ITEMS: dict[AnyGuid, str] = {
    FILE_PARAMETERS: "file_parameters",
    VIRTUAL_DISK_SIZE: "virtual_disk_size",
    VIRTUAL_DISK_ID: "virtual_disk_id",
    LOGICAL_SECTOR_SIZE: "logical_sector_size",
    PHYSICAL_SECTOR_SIZE: "physical_sector_size",
    PARENT_LOCATOR: "parent_locator",
}


# The BAT states are plain int constants, not IntEnums: the two enum classes cost every VHDX
# command about 0.3 ms to create, and the hot paths mask and compare plain ints anyway.


class PayloadState:
    """Payload BAT entry states (2.5.1.1); 4 and 5 are reserved (:data:`PAYLOAD_STATE_NAMES`)."""

    NOT_PRESENT = 0
    UNDEFINED = 1
    ZERO = 2
    UNMAPPED = 3
    FULLY_PRESENT = 6
    PARTIALLY_PRESENT = 7


class BitmapState:
    """Sector bitmap BAT entry states (2.5.1.2)."""

    NOT_PRESENT = 0
    PRESENT = 6


PAYLOAD_STATE_NAMES: dict[int, str] = {
    value: name for name, value in vars(PayloadState).items() if not name.startswith("_")
}


STATE_MASK = 0x7
OFFSET_SHIFT = 20  # FileOffsetMB occupies bits 20..63: entry & ~0xFFFFF is the byte offset
OFFSET_MASK = ~((1 << OFFSET_SHIFT) - 1) & 0xFFFFFFFFFFFFFFFF


class Record:
    """A fixed-size little-endian record declared as (field, ``struct`` format) pairs.

    ``parse`` gives the fields as attributes (one ``unpack``); ``build`` packs a mapping of them.
    Fields named in ``signatures`` hold a constant: ``parse`` refuses other bytes there and
    ``build`` writes it.  A byte-string value must have its field's exact length (``struct``
    would pad or cut it silently).
    """

    __slots__ = ("_sizes", "names", "signatures", "size", "struct", "what")

    def __init__(
        self,
        what: str,
        fields: tuple[tuple[str, str], ...],
        signatures: Mapping[str, bytes] | None = None,
    ) -> None:
        self.what = what
        self.names = tuple(name for name, _ in fields)
        self.struct = struct.Struct("<" + "".join(fmt for _, fmt in fields))
        self.size = self.struct.size
        self.signatures = dict(signatures or {})
        self._sizes = {name: int(fmt[:-1]) for name, fmt in fields if fmt.endswith("s")}

    def parse(self, raw: bytes | bytearray | memoryview) -> Any:
        """The fields of the record at the start of ``raw`` (attributes of a namespace)."""
        if len(raw) < self.size:
            raise CorruptImageError(f"{self.what}: {len(raw)} bytes, shorter than {self.size}")
        values = dict(zip(self.names, self.struct.unpack_from(raw), strict=True))
        for name, constant in self.signatures.items():
            if values[name] != constant:
                raise CorruptImageError(f"{self.what}: bad signature (expected {constant!r})")
        return SimpleNamespace(**values)

    def build(self, values: Mapping[str, Any]) -> bytes:
        """The record's bytes; ``values`` names every field but the signatures."""
        out = []
        for name in self.names:
            value = self.signatures[name] if name in self.signatures else values[name]
            size = self._sizes.get(name)
            if size is not None and len(value) != size:
                raise ValueError(f"{self.what}: {name} is {len(value)} bytes, not {size}")
            out.append(value)
        return self.struct.pack(*out)


def guid(raw: bytes) -> Guid:
    return Guid.from_bytes_le(raw)


def _verify_crc(raw: bytes, field_offset: int, stored: int, what: str) -> None:
    if crc32c_with_zeroed_field(raw, field_offset) != stored:
        raise ChecksumError(f"{what}: CRC-32C mismatch")


# -- file type identifier (2.2.1) -------------------------------------------------------------

FILE_IDENTIFIER = Record("file identifier", (("signature", "8s"), ("creator", "512s")))


class FileIdentifier(FrozenRecord):
    _fields = ("creator",)
    __slots__ = _fields
    creator: str

    def __init__(self, creator: str) -> None:
        fill(self, creator)

    @classmethod
    def parse(cls, raw: bytes) -> FileIdentifier:
        if len(raw) < 520 or raw[:8] != SIGNATURE:
            raise CorruptImageError("no VHDX file identifier ('vhdxfile') at offset 0")
        c = FILE_IDENTIFIER.parse(raw)
        text = c.creator.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        return cls(text)

    def build(self) -> bytes:
        creator = self.creator.encode("utf-16-le")[:510]
        out: bytes = FILE_IDENTIFIER.build(
            {"signature": SIGNATURE, "creator": creator.ljust(512, b"\0")}
        )
        return out


# -- headers (2.2.2) --------------------------------------------------------------------------

HEADER = Record(
    "header",
    (
        ("signature", "4s"),
        ("checksum", "I"),
        ("sequence_number", "Q"),
        ("file_write_guid", "16s"),
        ("data_write_guid", "16s"),
        ("log_guid", "16s"),
        ("log_version", "H"),
        ("version", "H"),
        ("log_length", "I"),
        ("log_offset", "Q"),
    ),
    {"signature": b"head"},
)


class Header(FrozenRecord):
    _fields = (
        "sequence_number",
        "file_write_guid",
        "data_write_guid",
        "log_guid",
        "log_version",
        "version",
        "log_length",
        "log_offset",
        "checksum",
    )
    __slots__ = _fields
    sequence_number: int
    file_write_guid: AnyGuid
    data_write_guid: AnyGuid
    log_guid: AnyGuid
    log_version: int
    version: int
    log_length: int
    log_offset: int
    checksum: int

    def __init__(
        self,
        sequence_number: int,
        file_write_guid: AnyGuid,
        data_write_guid: AnyGuid,
        log_guid: AnyGuid,
        log_version: int,
        version: int,
        log_length: int,
        log_offset: int,
        checksum: int = 0,
    ) -> None:
        fill(
            self,
            sequence_number,
            file_write_guid,
            data_write_guid,
            log_guid,
            log_version,
            version,
            log_length,
            log_offset,
            checksum,
        )

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        """Parse and validate one 4 KiB header; ChecksumError/CorruptImageError when invalid."""
        if len(raw) < HEADER_SIZE or raw[:4] != b"head":
            raise CorruptImageError("header: bad signature (expected 'head')")
        raw = bytes(raw[:HEADER_SIZE])
        c = HEADER.parse(raw)
        _verify_crc(raw, 4, c.checksum, "header")
        return cls(
            c.sequence_number,
            guid(c.file_write_guid),
            guid(c.data_write_guid),
            guid(c.log_guid),
            c.log_version,
            c.version,
            c.log_length,
            c.log_offset,
            c.checksum,
        )

    def build(self) -> bytes:
        body: bytes = HEADER.build(
            {
                "checksum": 0,
                "sequence_number": self.sequence_number,
                "file_write_guid": self.file_write_guid.bytes_le,
                "data_write_guid": self.data_write_guid.bytes_le,
                "log_guid": self.log_guid.bytes_le,
                "log_version": self.log_version,
                "version": self.version,
                "log_length": self.log_length,
                "log_offset": self.log_offset,
            }
        ).ljust(HEADER_SIZE, b"\0")
        crc = crc32c_with_zeroed_field(body, 4)
        return body[:4] + crc.to_bytes(4, "little") + body[8:]


# -- region table (2.2.3) ---------------------------------------------------------------------

REGION_TABLE_HEADER = Record(
    "region table",
    (("signature", "4s"), ("checksum", "I"), ("entry_count", "I"), ("reserved", "I")),
    {"signature": b"regi"},
)
REGION_TABLE_ENTRY = Record(
    "region table entry",
    (("guid", "16s"), ("file_offset", "Q"), ("length", "I"), ("required", "I")),
)


class Region(FrozenRecord):
    _fields = ("guid", "file_offset", "length", "required")
    __slots__ = _fields
    guid: AnyGuid
    file_offset: int
    length: int
    required: bool

    def __init__(self, guid: AnyGuid, file_offset: int, length: int, required: bool) -> None:
        fill(self, guid, file_offset, length, required)

    @property
    def name(self) -> str:
        return _REGION_NAMES.get(self.guid, "unknown")


class RegionTable(FrozenRecord):
    _fields = ("entries", "checksum")
    __slots__ = _fields
    entries: tuple[Region, ...]
    checksum: int

    def __init__(self, entries: tuple[Region, ...], checksum: int = 0) -> None:
        fill(self, entries, checksum)

    @classmethod
    def parse(cls, raw: bytes) -> RegionTable:
        if len(raw) < REGION_TABLE_SIZE or raw[:4] != b"regi":
            raise CorruptImageError("region table: bad signature (expected 'regi')")
        raw = bytes(raw[:REGION_TABLE_SIZE])
        head = REGION_TABLE_HEADER.parse(raw)
        _verify_crc(raw, 4, head.checksum, "region table")
        if head.entry_count > MAX_TABLE_ENTRIES:
            raise CorruptImageError(f"region table: {head.entry_count} entries (at most 2047)")
        entries = []
        for i in range(head.entry_count):
            e = REGION_TABLE_ENTRY.parse(raw[16 + 32 * i : 48 + 32 * i])
            entries.append(Region(guid(e.guid), e.file_offset, e.length, bool(e.required & 1)))
        return cls(tuple(entries), head.checksum)

    def find(self, which: AnyGuid) -> Region | None:
        for r in self.entries:
            if r.guid == which:
                return r
        return None

    def build(self) -> bytes:
        out = bytearray(REGION_TABLE_SIZE)
        out[:16] = REGION_TABLE_HEADER.build(
            {"checksum": 0, "entry_count": len(self.entries), "reserved": 0}
        )
        for i, r in enumerate(self.entries):
            out[16 + 32 * i : 48 + 32 * i] = REGION_TABLE_ENTRY.build(
                {
                    "guid": r.guid.bytes_le,
                    "file_offset": r.file_offset,
                    "length": r.length,
                    "required": int(r.required),
                }
            )
        out[4:8] = crc32c_with_zeroed_field(out, 4).to_bytes(4, "little")
        return bytes(out)


# -- metadata table and items (2.6) -----------------------------------------------------------

METADATA_TABLE_HEADER = Record(
    "metadata table",
    (("signature", "8s"), ("reserved", "H"), ("entry_count", "H"), ("reserved2", "20s")),
    {"signature": b"metadata"},
)
METADATA_TABLE_ENTRY = Record(
    "metadata table entry",
    (("item_id", "16s"), ("offset", "I"), ("length", "I"), ("flags", "I"), ("reserved2", "I")),
)
IS_USER = 1
IS_VIRTUAL_DISK = 2
IS_REQUIRED = 4


class MetadataEntry(FrozenRecord):
    _fields = ("item_id", "offset", "length", "is_user", "is_virtual_disk", "is_required")
    __slots__ = _fields
    item_id: AnyGuid
    offset: int
    length: int
    is_user: bool
    is_virtual_disk: bool
    is_required: bool

    def __init__(
        self,
        item_id: AnyGuid,
        offset: int,
        length: int,
        is_user: bool,
        is_virtual_disk: bool,
        is_required: bool,
    ) -> None:
        fill(self, item_id, offset, length, is_user, is_virtual_disk, is_required)

    @property
    def name(self) -> str:
        return KNOWN_ITEMS.get(self.item_id, "unknown")

    @property
    def flags(self) -> int:
        return (
            (IS_USER if self.is_user else 0)
            | (IS_VIRTUAL_DISK if self.is_virtual_disk else 0)
            | (IS_REQUIRED if self.is_required else 0)
        )


def parse_metadata_table(raw: bytes) -> tuple[MetadataEntry, ...]:
    if len(raw) < METADATA_TABLE_SIZE or raw[:8] != b"metadata":
        raise CorruptImageError("metadata table: bad signature (expected 'metadata')")
    head = METADATA_TABLE_HEADER.parse(raw)
    if head.entry_count > MAX_TABLE_ENTRIES:
        raise CorruptImageError(f"metadata table: {head.entry_count} entries (at most 2047)")
    out = []
    for i in range(head.entry_count):
        e = METADATA_TABLE_ENTRY.parse(raw[32 + 32 * i : 64 + 32 * i])
        out.append(
            MetadataEntry(
                guid(e.item_id),
                e.offset,
                e.length,
                bool(e.flags & IS_USER),
                bool(e.flags & IS_VIRTUAL_DISK),
                bool(e.flags & IS_REQUIRED),
            )
        )
    return tuple(out)


def build_metadata_table(entries: list[MetadataEntry]) -> bytes:
    out = bytearray(METADATA_TABLE_SIZE)
    out[:32] = METADATA_TABLE_HEADER.build(
        {"reserved": 0, "entry_count": len(entries), "reserved2": bytes(20)}
    )
    for i, e in enumerate(entries):
        out[32 + 32 * i : 64 + 32 * i] = METADATA_TABLE_ENTRY.build(
            {
                "item_id": e.item_id.bytes_le,
                "offset": e.offset,
                "length": e.length,
                "flags": e.flags,
                "reserved2": 0,
            }
        )
    return bytes(out)


FILE_PARAMETERS_STRUCT = Record("file parameters", (("block_size", "I"), ("flags", "I")))
LEAVE_BLOCKS_ALLOCATED = 1
HAS_PARENT = 2


# -- parent locator (2.6.2.6) -----------------------------------------------------------------

PARENT_LOCATOR_HEADER = Record(
    "parent locator",
    (("locator_type", "16s"), ("reserved", "H"), ("key_value_count", "H")),
)
PARENT_LOCATOR_ENTRY = Record(
    "parent locator entry",
    (("key_offset", "I"), ("value_offset", "I"), ("key_length", "H"), ("value_length", "H")),
)


class ParentLocator(FrozenRecord):
    _fields = ("locator_type", "entries")
    __slots__ = _fields
    locator_type: AnyGuid
    entries: dict[str, str]

    def __init__(self, locator_type: AnyGuid, entries: dict[str, str] | None = None) -> None:
        fill(self, locator_type, {} if entries is None else entries)

    @classmethod
    def parse(cls, raw: bytes) -> ParentLocator:
        if len(raw) < 20:
            raise CorruptImageError("parent locator: shorter than its 20-byte header")
        head = PARENT_LOCATOR_HEADER.parse(raw)
        count = head.key_value_count
        if 20 + 12 * count > len(raw):
            raise CorruptImageError(f"parent locator: {count} entries do not fit the item")
        entries: dict[str, str] = {}
        for i in range(count):
            e = PARENT_LOCATOR_ENTRY.parse(raw[20 + 12 * i : 32 + 12 * i])
            for off, length in ((e.key_offset, e.key_length), (e.value_offset, e.value_length)):
                if off == 0 or length == 0 or off + length > len(raw) or length % 2:
                    raise CorruptImageError(f"parent locator: entry {i} is outside the item")
            key = raw[e.key_offset : e.key_offset + e.key_length].decode("utf-16-le", "replace")
            value = raw[e.value_offset : e.value_offset + e.value_length].decode(
                "utf-16-le", "replace"
            )
            if key in entries:
                raise CorruptImageError(f"parent locator: duplicate key {key!r}")
            entries[key] = value
        return cls(guid(head.locator_type), entries)

    def build(self) -> bytes:
        count = len(self.entries)
        table = bytearray(
            PARENT_LOCATOR_HEADER.build(
                {
                    "locator_type": self.locator_type.bytes_le,
                    "reserved": 0,
                    "key_value_count": count,
                }
            )
        )
        strings = bytearray()
        base = 20 + 12 * count
        for key, value in self.entries.items():
            k = key.encode("utf-16-le")
            v = value.encode("utf-16-le")
            koff = base + len(strings)
            strings += k
            voff = base + len(strings)
            strings += v
            table += PARENT_LOCATOR_ENTRY.build(
                {
                    "key_offset": koff,
                    "value_offset": voff,
                    "key_length": len(k),
                    "value_length": len(v),
                }
            )
        return bytes(table + strings)


# -- the log (2.3.1) --------------------------------------------------------------------------

LOG_ENTRY_HEADER = Record(
    "log entry",
    (
        ("signature", "4s"),
        ("checksum", "I"),
        ("entry_length", "I"),
        ("tail", "I"),
        ("sequence_number", "Q"),
        ("descriptor_count", "I"),
        ("reserved", "I"),
        ("log_guid", "16s"),
        ("flushed_file_offset", "Q"),
        ("last_file_offset", "Q"),
    ),
    {"signature": b"loge"},
)
LOG_ENTRY_HEADER_SIZE = 64
assert LOG_ENTRY_HEADER.size == LOG_ENTRY_HEADER_SIZE
DESCRIPTOR = Record(
    "log descriptor",
    (
        ("signature", "4s"),
        ("trailing", "4s"),  # "zero": Reserved; "desc": TrailingBytes
        ("leading", "8s"),  # "zero": ZeroLength; "desc": LeadingBytes
        ("file_offset", "Q"),
        ("sequence_number", "Q"),
    ),
)
DESCRIPTOR_SIZE = 32
assert DESCRIPTOR.size == DESCRIPTOR_SIZE
DESCRIPTORS_IN_FIRST_SECTOR = (LOG_SECTOR - LOG_ENTRY_HEADER_SIZE) // DESCRIPTOR_SIZE  # 126


def descriptor_sectors(count: int) -> int:
    """4 KiB sectors taken by the entry header and ``count`` descriptors."""
    if count <= DESCRIPTORS_IN_FIRST_SECTOR:
        return 1
    rest = count - DESCRIPTORS_IN_FIRST_SECTOR
    return 1 + (rest + 127) // 128


def check_version(header: Header) -> None:
    if header.version != 1:
        raise UnsupportedFeatureError(f"VHDX version {header.version} (only version 1 exists)")
    if header.log_version != 0 and header.log_guid != ZERO_GUID:
        raise UnsupportedFeatureError(f"log version {header.log_version} (only 0 exists)")
