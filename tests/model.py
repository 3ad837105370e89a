"""A spec model of VHD images, used by the tests as an oracle.

An independent, deliberately simple reader (and record encoder) written from Microsoft's "Virtual
Hard Disk Image Format Specification" as restated in docs/vhd-format.md: hard disk footer,
dynamic disk header, BAT, MSB-first sector bitmaps and the parent chain.  It imports nothing
from ``vhd``: it reads a whole image into memory and resolves every 512-byte sector on its own,
so the library is checked against a second reading of the spec, not against itself.

Parents are passed explicitly (``ModelImage(child, parent=ModelImage(parent))``): the model does
not resolve locators, it only checks that the child's parent unique id names the parent given.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
UNUSED = 0xFFFFFFFF
FOOTER_FMT = ">8sIIQI4sI4sQQHBBII16sB427s"
HEADER_FMT = ">8sQQIIII16sII512s"
LOCATOR_FMT = ">IIIIQ"
EPOCH_2000 = 946684800
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4


class ModelError(Exception):
    """The model found the image invalid by the spec."""


def checksum(record: bytes, at: int) -> int:
    """~(byte sum with the 4-byte field at ``at`` zeroed), mod 2**32."""
    zeroed = record[:at] + b"\0\0\0\0" + record[at + 4 :]
    return ~sum(zeroed) & 0xFFFFFFFF


def _put_checksum(record: bytearray, at: int) -> bytes:
    record[at : at + 4] = b"\0\0\0\0"
    record[at : at + 4] = struct.pack(">I", checksum(bytes(record), at))
    return bytes(record)


def bitmap_bytes(block_size: int) -> int:
    """The sector bitmap in front of a block: one bit per sector, padded to whole sectors."""
    bits = block_size // SECTOR
    used = -(-bits // 8)
    return -(-used // SECTOR) * SECTOR


def bit_set(bitmap: bytes, sector: int) -> bool:
    """MSB-first: sector i is bit 0x80 >> (i % 8) of byte i // 8."""
    return bool(bitmap[sector // 8] & (0x80 >> (sector % 8)))


def spec_chs(size: int) -> tuple[int, int, int]:
    """The VHD spec appendix "CHS calculation", transcribed line by line (totalSectors, then
    cylinderTimesHeads): the geometry a footer for ``size`` bytes should hold."""
    total_sectors = size // SECTOR
    if total_sectors > 65535 * 16 * 255:
        total_sectors = 65535 * 16 * 255
    if total_sectors >= 65535 * 16 * 63:
        sectors_per_track = 255
        heads = 16
        cylinder_times_heads = total_sectors // sectors_per_track
    else:
        sectors_per_track = 17
        cylinder_times_heads = total_sectors // sectors_per_track
        heads = (cylinder_times_heads + 1023) // 1024
        if heads < 4:
            heads = 4
        if cylinder_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track = 31
            heads = 16
            cylinder_times_heads = total_sectors // sectors_per_track
        if cylinder_times_heads >= heads * 1024:
            sectors_per_track = 63
            heads = 16
            cylinder_times_heads = total_sectors // sectors_per_track
    cylinders = cylinder_times_heads // heads
    return (cylinders, heads, sectors_per_track)


def build_footer(
    *,
    size: int,
    disk_type: int,
    unique_id: bytes,
    data_offset: int | None = None,
    original_size: int | None = None,
    creator: bytes = b"win ",
    creator_version: int = 0x000A0000,
    geometry: tuple[int, int, int] = (65535, 16, 255),
    timestamp: int = 0,
) -> bytes:
    """A 512-byte hard disk footer with a valid checksum."""
    if data_offset is None:
        data_offset = 0xFFFFFFFFFFFFFFFF if disk_type == FIXED else SECTOR
    raw = bytearray(
        struct.pack(
            FOOTER_FMT,
            b"conectix",
            2,
            0x00010000,
            data_offset,
            timestamp,
            creator,
            creator_version,
            b"Wi2k",
            size if original_size is None else original_size,
            size,
            geometry[0],
            geometry[1],
            geometry[2],
            disk_type,
            0,
            unique_id,
            0,
            bytes(427),
        )
    )
    return _put_checksum(raw, 64)


def build_header(
    *,
    table_offset: int,
    entries: int,
    block_size: int,
    parent_id: bytes = bytes(16),
    parent_timestamp: int = 0,
    parent_name: str = "",
    locators: list[tuple[int, int, int, int]] = (),  # type: ignore[assignment]
) -> bytes:
    """A 1024-byte dynamic disk header; ``locators`` are (code, space, length, offset)."""
    name = parent_name.encode("utf-16-be", "surrogatepass").ljust(512, b"\0")
    raw = bytearray(
        struct.pack(
            HEADER_FMT,
            b"cxsparse",
            0xFFFFFFFFFFFFFFFF,
            table_offset,
            0x00010000,
            entries,
            block_size,
            0,
            parent_id,
            parent_timestamp,
            0,
            name,
        )
    )
    slots = list(locators) + [(0, 0, 0, 0)] * (8 - len(locators))
    for code, space, length, offset in slots:
        raw += struct.pack(LOCATOR_FMT, code, space, length, 0, offset)
    raw += bytes(256)
    assert len(raw) == 1024
    return _put_checksum(raw, 36)


@dataclass
class Footer:
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
    checksum_valid: bool

    @classmethod
    def decode(cls, raw: bytes) -> Footer:
        f = struct.unpack(FOOTER_FMT, raw)
        return cls(
            cookie=f[0],
            features=f[1],
            version=f[2],
            data_offset=f[3],
            timestamp=f[4],
            creator_app=f[5],
            creator_version=f[6],
            creator_host=f[7],
            original_size=f[8],
            current_size=f[9],
            cylinders=f[10],
            heads=f[11],
            sectors=f[12],
            disk_type=f[13],
            checksum=f[14],
            unique_id=f[15],
            saved_state=f[16],
            checksum_valid=checksum(raw, 64) == f[14],
        )


@dataclass
class Header:
    cookie: bytes
    table_offset: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_id: bytes
    parent_timestamp: int
    parent_name: str
    locators: list[tuple[int, int, int, int]]
    checksum_valid: bool

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        f = struct.unpack(HEADER_FMT, raw[:576])
        locators = []
        for i in range(8):
            code, space, length, _, offset = struct.unpack(
                LOCATOR_FMT, raw[576 + 24 * i : 600 + 24 * i]
            )
            locators.append((code, space, length, offset))
        name = f[10]
        units = [name[i : i + 2] for i in range(0, 512, 2)]
        if b"\0\0" in units:
            units = units[: units.index(b"\0\0")]
        return cls(
            cookie=f[0],
            table_offset=f[2],
            max_table_entries=f[4],
            block_size=f[5],
            checksum=f[6],
            parent_id=f[7],
            parent_timestamp=f[8],
            parent_name=b"".join(units).decode("utf-16-be", "replace"),
            locators=locators,
            checksum_valid=checksum(raw, 36) == f[6],
        )


class ModelImage:
    """A whole VHD image in memory, read by the spec one sector at a time."""

    def __init__(
        self, path: str | Path, *, parent: ModelImage | None = None, strict: bool = True
    ) -> None:
        self.path = str(path)
        self.raw = Path(path).read_bytes()
        if len(self.raw) < SECTOR:
            raise ModelError("shorter than a footer")
        self.footer = Footer.decode(self.raw[-SECTOR:])
        if self.footer.cookie != b"conectix":
            raise ModelError("no footer cookie at the end of the file")
        if strict and not self.footer.checksum_valid:
            raise ModelError("footer checksum mismatch")
        self.size = self.footer.current_size
        self.type = self.footer.disk_type
        self.parent = parent
        self.header: Header | None = None
        self.bat: list[int] = []
        if self.type == FIXED:
            if len(self.raw) - SECTOR < self.size:
                raise ModelError("fixed image shorter than its size")
            return
        if self.type not in (DYNAMIC, DIFFERENCING):
            raise ModelError(f"disk type {self.type}")
        at = self.footer.data_offset
        header = Header.decode(self.raw[at : at + 1024])
        if header.cookie != b"cxsparse":
            raise ModelError("no dynamic header cookie")
        if strict and not header.checksum_valid:
            raise ModelError("header checksum mismatch")
        self.header = header
        self.block_size = header.block_size
        count = -(-self.size // header.block_size)
        if header.max_table_entries < count:
            raise ModelError("BAT too small for the size")
        table = self.raw[header.table_offset : header.table_offset + 4 * count]
        self.bat = list(struct.unpack(f">{count}I", table))
        if self.type == DIFFERENCING:
            if parent is None:
                raise ModelError("a differencing image needs its parent")
            if header.parent_id != parent.footer.unique_id:
                raise ModelError("the parent's unique id is not the one the child records")

    # -- reading -------------------------------------------------------------------------

    def _sector(self, s: int) -> bytes | None:
        """Sector ``s`` as stored in this file, or None when this file does not hold it."""
        if self.type == FIXED:
            return self.raw[s * SECTOR : (s + 1) * SECTOR]
        assert self.header is not None
        spb = self.block_size // SECTOR
        block, inner = divmod(s, spb)
        entry = self.bat[block]
        if entry == UNUSED:
            return None
        base = entry * SECTOR
        if not bit_set(self.raw[base : base + bitmap_bytes(self.block_size)], inner):
            return None
        at = base + bitmap_bytes(self.block_size) + inner * SECTOR
        data = self.raw[at : at + SECTOR]
        if len(data) != SECTOR:
            raise ModelError(f"sector {s} lies past the end of the file")
        return data

    def sector(self, s: int) -> bytes:
        """What the guest sees at sector ``s`` (the parent chain resolved)."""
        if s * SECTOR >= self.size:
            return bytes(SECTOR)
        own = self._sector(s)
        if own is not None:
            return own
        if self.type == DIFFERENCING:
            assert self.parent is not None
            return self.parent.sector(s)
        return bytes(SECTOR)

    def layer(self, s: int) -> int | None:
        """0 if this file holds sector ``s``, k for the k-th ancestor, None if no layer does."""
        if self._sector(s) is not None:
            return 0
        if self.type == DIFFERENCING and self.parent is not None:
            below = self.parent.layer(s) if s * SECTOR < self.parent.size else None
            return None if below is None else below + 1
        return None

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        if end <= offset:
            return b""
        first, last = offset // SECTOR, (end - 1) // SECTOR
        blob = b"".join(self.sector(s) for s in range(first, last + 1))
        skip = offset - first * SECTOR
        return blob[skip : skip + end - offset]

    def read_all(self) -> bytes:
        return self.read(0, self.size)

    def allocated_blocks(self) -> list[tuple[int, int]]:
        """(block, sector) pairs of allocated BAT entries."""
        return [(i, e) for i, e in enumerate(self.bat) if e != UNUSED]


def model_chain(paths: Sequence[str | Path], *, strict: bool = True) -> ModelImage:
    """Model of ``paths`` given base first, leaf last."""
    image: ModelImage | None = None
    for path in paths:
        image = ModelImage(path, parent=image, strict=strict)
    assert image is not None
    return image
