"""The hard disk footer (spec: "Hard Disk Footer Format"): 512 bytes at the end of every image,
and a copy at offset 0 of dynamic and differencing images.

Declared once as a (field, ``struct`` format) table and exposed as the immutable :class:`Footer`.  Parsing never
rejects a record: validity (cookie, checksum, version) is for the caller to judge, so that damaged
images can still be inspected and repaired.  Images made before Virtual PC 2004 may end in a
511-byte footer (the last reserved byte cut off); :func:`Footer.parse` accepts 511 bytes.
"""

from __future__ import annotations

import os
import struct
import time
from enum import IntEnum

from .checksum import vhd_checksum
from .geometry import Geometry
from .record import FrozenRecord, fill

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    # (only for annotations: the uuid module, with platform behind it, costs every command ~3 ms)
    import uuid
    from typing import Any

FOOTER_SIZE = 512
COOKIE = b"conectix"
VERSION = 0x00010000
FEATURE_TEMPORARY = 0x1
FEATURE_RESERVED = 0x2  # "must always be set"
FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
CHECKSUM_OFFSET = 64
# VHD timestamps count seconds from 2000-01-01 00:00:00 UTC.
EPOCH_2000 = 946684800

# Windows' creator code: the one layout every reader agrees on (geometry = the spec's CHS, which
# blktap's check requires; qemu <= 9 sizes 'win ' disks by the current size, unknown creators by
# C*H*S).  vhdkit's own images were 'vhdk' before 2026-11; they are told apart from Windows' by
# the creator version, vhdkit's (0.x; Windows writes 5.x-10.x), see VHDKIT_CREATOR_VERSIONS.
CREATOR_APP = b"win "
CREATOR_VERSION = 0x00000001
# creator versions that Windows never wrote: with 'win ', such a footer is vhdkit's
VHDKIT_CREATOR_VERSIONS = range(0x00000000, 0x00010000)
CREATOR_HOST = b"Wi2k"
# Creators whose disks qemu <= 9 sizes by the current size (vpc.c); any other creator by C*H*S,
# unless the geometry is the maximum.
QEMU_CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


class DiskType(IntEnum):
    NONE = 0
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    def __str__(self) -> str:
        # print(disk.type) and f"{disk.type}" say "dynamic", not "3" (IntEnum's default);
        # the value is still an int for comparisons, struct packing and int(disk.type)
        return self.label

    def __format__(self, spec: str) -> str:
        return format(self.label, spec)


# The record, declared once: (field, ``struct`` format) in on-disk order, big-endian.  (Plain
# ``struct``: a parser library would cost every command its import at start-up.)
FOOTER_FIELDS = (
    ("cookie", "8s"),
    ("features", "I"),
    ("version", "I"),
    ("data_offset", "Q"),
    ("timestamp", "I"),
    ("creator_app", "4s"),
    ("creator_version", "I"),
    ("creator_host", "4s"),
    ("original_size", "Q"),
    ("current_size", "Q"),
    ("cylinders", "H"),
    ("heads", "B"),
    ("sectors", "B"),
    ("disk_type", "I"),
    ("checksum", "I"),
    ("unique_id", "16s"),
    ("saved_state", "B"),
    ("reserved", "427s"),
)
FOOTER_STRUCT = struct.Struct(">" + "".join(fmt for _, fmt in FOOTER_FIELDS))
assert FOOTER_STRUCT.size == FOOTER_SIZE


class Footer(FrozenRecord):
    _fields = tuple(name for name, _ in FOOTER_FIELDS)
    __slots__ = _fields
    cookie: bytes
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_host: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int
    reserved: bytes

    def __init__(
        self,
        cookie: bytes,
        features: int,
        version: int,
        data_offset: int,
        timestamp: int,
        creator_app: bytes,
        creator_version: int,
        creator_host: bytes,
        original_size: int,
        current_size: int,
        cylinders: int,
        heads: int,
        sectors: int,
        disk_type: int,
        checksum: int,
        unique_id: bytes,
        saved_state: int,
        reserved: bytes,
    ) -> None:
        fill(
            self,
            cookie,
            features,
            version,
            data_offset,
            timestamp,
            creator_app,
            creator_version,
            creator_host,
            original_size,
            current_size,
            cylinders,
            heads,
            sectors,
            disk_type,
            checksum,
            unique_id,
            saved_state,
            reserved,
        )

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview) -> Footer:
        data = bytes(raw)
        if len(data) == FOOTER_SIZE - 1:
            data += b"\0"
        if len(data) != FOOTER_SIZE:
            raise ValueError(f"a footer is 512 bytes, got {len(data)}")
        values = FOOTER_STRUCT.unpack(data)
        return cls(*values)

    def build(self) -> bytes:
        """The 512 on-disk bytes, with the checksum computed afresh."""
        fields = self._asdict()
        fields["checksum"] = 0
        raw = bytearray(FOOTER_STRUCT.pack(*(_exact(fields, f) for f in FOOTER_FIELDS)))
        raw[CHECKSUM_OFFSET : CHECKSUM_OFFSET + 4] = vhd_checksum(raw, CHECKSUM_OFFSET).to_bytes(
            4, "big"
        )
        return bytes(raw)

    @property
    def cookie_ok(self) -> bool:
        return self.cookie == COOKIE

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cylinders, self.heads, self.sectors)

    @property
    def type(self) -> DiskType | None:
        try:
            return DiskType(self.disk_type)
        except ValueError:
            return None

    @property
    def uuid(self) -> uuid.UUID:
        import uuid

        return uuid.UUID(bytes=self.unique_id)

    @property
    def hidden(self) -> bool:
        """blktap's "hidden" flag (footer byte 85, the first reserved byte)."""
        return bool(self.reserved[:1] != b"\0")


def uuid_text(raw: bytes) -> str:
    """A 16-byte unique id as ``str(uuid.UUID(bytes=raw))`` writes it, without importing uuid."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def checksum_ok(raw: bytes | bytearray | memoryview) -> bool:
    """Whether a footer's stored checksum matches its contents."""
    data = bytes(raw)
    if len(data) == FOOTER_SIZE - 1:
        data += b"\0"
    stored = int.from_bytes(data[CHECKSUM_OFFSET : CHECKSUM_OFFSET + 4], "big")
    return stored == vhd_checksum(data, CHECKSUM_OFFSET)


def vhd_timestamp(unix_time: float | None = None) -> int:
    """Seconds since 2000-01-01 UTC, clamped to the u32 field."""
    now = time.time() if unix_time is None else unix_time
    return max(0, min(0xFFFFFFFF, int(now) - EPOCH_2000))


def unix_time(vhd_time: int) -> int:
    return vhd_time + EPOCH_2000


def new_footer(
    *, size: int, disk_type: DiskType, geometry: Geometry, unique_id: bytes | None = None
) -> Footer:
    """A footer for a disk vhdkit creates now."""
    return Footer(
        cookie=COOKIE,
        features=FEATURE_RESERVED,
        version=VERSION,
        data_offset=FIXED_DATA_OFFSET if disk_type == DiskType.FIXED else FOOTER_SIZE,
        timestamp=vhd_timestamp(),
        creator_app=CREATOR_APP,
        creator_version=CREATOR_VERSION,
        creator_host=CREATOR_HOST,
        original_size=size,
        current_size=size,
        cylinders=geometry.cylinders,
        heads=geometry.heads,
        sectors=geometry.sectors,
        disk_type=int(disk_type),
        checksum=0,
        # a random (version 4) UUID, as uuid.uuid4() makes it, without importing uuid
        unique_id=unique_id if unique_id is not None else _uuid4_bytes(),
        saved_state=0,
        reserved=bytes(427),
    )


def _uuid4_bytes() -> bytes:
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return bytes(raw)


def _exact(fields: dict[str, Any], field: tuple[str, str]) -> Any:
    """A field's value for packing; a byte string must have its field's length (``struct``
    would pad or cut it silently)."""
    name, fmt = field
    value = fields[name]
    if fmt.endswith("s") and len(value) != int(fmt[:-1]):
        raise ValueError(f"{name} is {len(value)} bytes, not {fmt[:-1]}")
    return value
