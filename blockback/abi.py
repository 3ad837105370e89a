"""The Xen blkif wire ABI: ring geometry and the request/response codecs (``xen/io/blkif.h``).

Implements docs/blkif.md section 1 for the three ``protocol`` strings of ``xen/io/protocols.h``:

* ``x86_64-abi`` and ``arm-abi``: ``uint64_t`` aligned to 8, a read/write request is 112 bytes and a
  response 16;
* ``x86_32-abi``: ``uint64_t`` aligned to 4 (Linux blkback's ``blkif_x86_32_request``, packed),
  a request is 108 bytes and a response 12.

Only these offsets differ between the ABIs; everything else (segment layout, operation codes,
status values, ring header) is shared.  Decoding always works on a *private copy* of a ring slot
(``bytes``), never on shared memory, so a frontend cannot change a field between two reads (XSA-155).
The response encoder produces every byte of the response, padding included (XSA-216).
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, NamedTuple

PAGE_SIZE: Final = 4096  # Xen grants and ring pages are always 4 KiB
SECTOR_SIZE: Final = 512  # blkif sector_number and first/last_sect units
SECTORS_PER_PAGE: Final = PAGE_SIZE // SECTOR_SIZE
RING_HEADER_SIZE: Final = 64  # req_prod, req_event, rsp_prod, rsp_event, pvt[4], pad[44]
MAX_RING_PAGE_ORDER: Final = 4
MAX_SEGMENTS_PER_REQUEST: Final = 11
MAX_INDIRECT_PAGES_PER_REQUEST: Final = 8
SEGMENT_SIZE: Final = 8
SEGMENTS_PER_INDIRECT_PAGE: Final = PAGE_SIZE // SEGMENT_SIZE  # 512

# Offsets of the shared ring header fields (ring.h, struct __name##_sring).
REQ_PROD: Final = 0
REQ_EVENT: Final = 4
RSP_PROD: Final = 8
RSP_EVENT: Final = 12


class Op(IntEnum):
    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4
    DISCARD = 5
    INDIRECT = 6


class Status(IntEnum):
    OKAY = 0
    ERROR = -1
    EOPNOTSUPP = -2


DISCARD_SECURE: Final = 1  # bit 0 of the discard request's ``flag``
VDISK_CDROM: Final = 1
VDISK_REMOVABLE: Final = 2
VDISK_READONLY: Final = 4

# A segment as decoded from the private copy: (gref, first_sect, last_sect).
Segment = tuple[int, int, int]

_SEGMENT = struct.Struct("<IBB2x")


class Request(NamedTuple):
    """One decoded request (private copy).  Fields not used by ``operation`` are 0 / empty.

    ``segments`` holds the direct segments of READ/WRITE/BARRIER/FLUSH requests, and only when
    ``nr_segments`` fits the 11-slot array: a larger count is left for the engine to reject.
    A NamedTuple: immutable, and several times cheaper to build than a frozen dataclass (one is
    built per request).
    """

    operation: int
    id: int
    nr_segments: int = 0  # rw: u8; indirect: u16
    handle: int = 0
    sector_number: int = 0
    segments: tuple[Segment, ...] = ()
    flag: int = 0  # discard
    nr_sectors: int = 0  # discard
    indirect_op: int = 0
    indirect_grefs: tuple[int, ...] = ()  # all 8 slots, as copied


@dataclass(frozen=True)
class Abi:
    """Layout of one ``protocol``: struct formats for the three request shapes and the response."""

    name: str
    request_size: int
    response_size: int
    rw_header: struct.Struct  # operation, nr_segments, handle, id, sector_number
    rw_segments_at: int
    discard: struct.Struct  # operation, flag, _pad1, id, sector_number, nr_sectors
    indirect: struct.Struct  # operation, indirect_op, nr_segments, id, sector, handle, grefs[8]
    response: struct.Struct  # id, operation, status (pad bytes are "x": always zero)

    @property
    def entry_size(self) -> int:
        """Size of one ``union blkif_sring_entry``."""
        return max(self.request_size, self.response_size)

    def ring_entries(self, order: int) -> int:
        """``__RING_SIZE``: slots in a ring of 2**order pages, rounded down to a power of two."""
        if not 0 <= order <= MAX_RING_PAGE_ORDER:
            raise ValueError(f"ring-page-order {order} is outside 0..{MAX_RING_PAGE_ORDER}")
        raw = (PAGE_SIZE << order) - RING_HEADER_SIZE
        n = raw // self.entry_size
        return 1 << (n.bit_length() - 1)

    def decode_request(self, slot: bytes) -> Request:
        """Decode a private copy of one ring slot (``len(slot) >= request_size``)."""
        operation = slot[0]
        if operation == Op.DISCARD:
            _, flag, handle, rid, sector, nr_sectors = self.discard.unpack_from(slot)
            return Request(
                operation,
                rid,
                handle=handle,
                sector_number=sector,
                flag=flag,
                nr_sectors=nr_sectors,
            )
        if operation == Op.INDIRECT:
            fields = self.indirect.unpack_from(slot)
            return Request(
                operation,
                fields[3],
                nr_segments=fields[2],
                handle=fields[5],
                sector_number=fields[4],
                indirect_op=fields[1],
                indirect_grefs=fields[6:14],
            )
        _, nr, handle, rid, sector = self.rw_header.unpack_from(slot)
        segments: tuple[Segment, ...] = ()
        if 0 < nr <= MAX_SEGMENTS_PER_REQUEST:
            segments = decode_segments(slot, self.rw_segments_at, nr)
        return Request(
            operation, rid, nr_segments=nr, handle=handle, sector_number=sector, segments=segments
        )

    def encode_response(self, rid: int, operation: int, status: int) -> bytes:
        """All ``response_size`` bytes of a response; padding is zero (XSA-216)."""
        return self.response.pack(rid & 0xFFFFFFFFFFFFFFFF, operation & 0xFF, status)

    # Frontend side (used by the test frontends and hostile tests).
    def encode_rw(
        self,
        operation: int,
        rid: int,
        sector: int,
        segments: tuple[Segment, ...] | list[Segment],
        *,
        nr_segments: int | None = None,
        handle: int = 0,
    ) -> bytes:
        n = len(segments) if nr_segments is None else nr_segments
        out = bytearray(self.request_size)
        self.rw_header.pack_into(out, 0, operation, n, handle, rid, sector)
        for i, (gref, first, last) in enumerate(segments[:MAX_SEGMENTS_PER_REQUEST]):
            _SEGMENT.pack_into(out, self.rw_segments_at + i * SEGMENT_SIZE, gref, first, last)
        return bytes(out)

    def encode_discard(self, rid: int, sector: int, nr_sectors: int, flag: int = 0) -> bytes:
        out = bytearray(self.request_size)
        self.discard.pack_into(out, 0, Op.DISCARD, flag, 0, rid, sector, nr_sectors)
        return bytes(out)

    def encode_indirect(
        self, indirect_op: int, rid: int, sector: int, nr_segments: int, grefs: list[int]
    ) -> bytes:
        out = bytearray(self.request_size)
        padded = (list(grefs) + [0] * MAX_INDIRECT_PAGES_PER_REQUEST)[
            :MAX_INDIRECT_PAGES_PER_REQUEST
        ]
        self.indirect.pack_into(
            out, 0, Op.INDIRECT, indirect_op, nr_segments, rid, sector, 0, *padded
        )
        return bytes(out)

    def decode_response(self, data: bytes) -> tuple[int, int, int]:
        rid, op, status = self.response.unpack_from(data)
        return int(rid), int(op), int(status)


def decode_segments(buf: bytes, offset: int, count: int) -> tuple[Segment, ...]:
    """``count`` packed 8-byte segments starting at ``offset`` of a private buffer."""
    return tuple(_SEGMENT.iter_unpack(buf[offset : offset + count * SEGMENT_SIZE]))


def encode_segments(segments: list[Segment]) -> bytes:
    return b"".join(_SEGMENT.pack(*s) for s in segments)


X86_64 = Abi(
    name="x86_64-abi",
    request_size=112,
    response_size=16,
    rw_header=struct.Struct("<BBH4xQQ"),
    rw_segments_at=24,
    discard=struct.Struct("<BBH4xQQQ"),
    indirect=struct.Struct("<BBH4xQQH2x8I"),
    response=struct.Struct("<QBxh4x"),
)
# arm-abi has the native 64-bit layout: only the name differs.
ARM = dataclasses.replace(X86_64, name="arm-abi")
X86_32 = Abi(
    name="x86_32-abi",
    request_size=108,
    response_size=12,
    rw_header=struct.Struct("<BBHQQ"),
    rw_segments_at=20,
    discard=struct.Struct("<BBHQQQ"),
    indirect=struct.Struct("<BBHQQH2x8I"),
    response=struct.Struct("<QBxh"),
)

ABIS: Final[dict[str, Abi]] = {a.name: a for a in (X86_64, X86_32, ARM)}


def abi_for(protocol: str | None) -> Abi:
    """The layout for a frontend's ``protocol`` key; missing means native (we run on x86_64/ARM
    hosts serving same-arch guests, as QEMU does).  Unknown strings raise ``KeyError``."""
    if protocol is None or protocol == "":
        return X86_64
    return ABIS[protocol]
