"""Request validation: a decoded blkif request in, a response or an I/O plan out (docs/blkif.md §3).

Pure: no grants, no disk, no threads.  The caller copies a ring slot once (``blockback.ring``),
decodes the copy (``blockback.abi``) and hands the :class:`~blockback.abi.Request` to
:meth:`BlkifEngine.handle`, which returns one of

* :class:`Reply` -- answer now (ERROR for every invalid request the doc lists, EOPNOTSUPP for
  operations we do not implement or did not advertise);
* :class:`NeedIndirect` -- an INDIRECT request whose segment pages must be copied first; the
  caller copies ``grefs`` (once each) and calls :meth:`BlkifEngine.handle_indirect`;
* :class:`IoPlan` -- a validated operation in bytes, with the guest segments to move data
  between: ``(gref, offset in page, length)``.

Rules (Linux blkback's ``dispatch_rw_block_io``, QEMU and tapdisk agree):
READ/WRITE need 1..11 segments; FLUSH and BARRIER may have 0..11; INDIRECT needs
1..``max_indirect_segments`` and an inner READ or WRITE, and is answered with the inner op;
each segment has ``first_sect <= last_sect <= 7``; a request that carries sectors must neither
wrap 64 bits nor pass the device end (an empty FLUSH or BARRIER is not range-checked: Linux
blkfront sends its empty flush with ``sector_number`` 2**64-1, and Linux blkback's
``xen_vbd_translate`` checks the range only when ``nr_sects`` is non-zero); anything but READ on a read-only device is an ERROR; a secure DISCARD is
refused unless ``discard-secure`` was advertised; unknown ops (4, 7..255) get EOPNOTSUPP with the
op echoed, as do DISCARD and INDIRECT when not advertised.

A disk whose logical sector is larger than 512 bytes (a 4K-native VHDX advertises
``sector-size`` 4096) still gets ``sector_number`` and ``first_sect``/``last_sect`` in 512-byte
units; as Linux blkback does (``dispatch_rw_block_io``: ``(sector_number | nsec) &
(logical_block_size / 512 - 1)`` for every segment; ``blkdev_issue_discard`` for DISCARD), a
request whose start or any segment's length is not a whole number of logical sectors is an
ERROR, with no partial I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from blockback.abi import (
    DISCARD_SECURE,
    MAX_SEGMENTS_PER_REQUEST,
    SECTOR_SIZE,
    SEGMENTS_PER_INDIRECT_PAGE,
    Op,
    Request,
    Segment,
    Status,
    decode_segments,
)
from blockback.request import BlockOp

U64 = 1 << 64


class Reply(NamedTuple):
    """Answer immediately; ``operation`` is what the response echoes."""

    id: int
    operation: int
    status: Status
    reason: str = ""


class NeedIndirect(NamedTuple):
    request: Request
    grefs: tuple[int, ...]  # the pages holding the segment descriptors, in order


# A data segment ready for the transport: (gref, byte offset in the page, byte length).
DataSegment = tuple[int, int, int]


class IoPlan(NamedTuple):
    """A validated request in the executor's vocabulary.  ``op`` FLUSH is FLUSH_DISKCACHE (write
    any data, then flush) or, with ``barrier``, WRITE_BARRIER (drain everything before it, flush,
    write any data, flush)."""

    id: int
    operation: int  # echoed in the response (the inner op for INDIRECT)
    op: BlockOp
    offset: int  # bytes
    length: int  # bytes (sum of the segment lengths; DISCARD: the range)
    segments: tuple[DataSegment, ...] = ()
    barrier: bool = False

    @property
    def writes_guest_pages(self) -> bool:
        """True when the data flows disk -> guest (the grants must be writable)."""
        return self.op is BlockOp.READ


Outcome = Reply | NeedIndirect | IoPlan


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    sectors: int  # device size in 512-byte sectors
    read_only: bool = False
    discard: bool = True  # feature-discard advertised
    discard_secure: bool = False
    max_indirect_segments: int = 1024  # 0: INDIRECT not advertised
    sector_size: int = SECTOR_SIZE  # the logical sector advertised as ``sector-size``

    @property
    def sector_mask(self) -> int:
        """Low bits a 512-byte sector count must not have to be whole logical sectors."""
        return self.sector_size // SECTOR_SIZE - 1


class BlkifEngine:
    """Turns private request copies into replies or plans for one device."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config

    def handle(self, req: Request) -> Outcome:
        op = req.operation
        if op == Op.READ or op == Op.WRITE:
            if not 1 <= req.nr_segments <= MAX_SEGMENTS_PER_REQUEST:
                return self._error(req, op, f"{req.nr_segments} segments (need 1..11)")
            kind = BlockOp.READ if op == Op.READ else BlockOp.WRITE
            return self._plan(req, op, kind, req.segments)
        if op == Op.FLUSH_DISKCACHE or op == Op.WRITE_BARRIER:
            if req.nr_segments > MAX_SEGMENTS_PER_REQUEST:
                return self._error(req, op, f"{req.nr_segments} segments (at most 11)")
            barrier = op == Op.WRITE_BARRIER
            return self._plan(req, op, BlockOp.FLUSH, req.segments, barrier=barrier)
        if op == Op.DISCARD:
            return self._discard(req)
        if op == Op.INDIRECT:
            return self._indirect(req)
        return Reply(req.id, op, Status.EOPNOTSUPP, f"operation {op} is not supported")

    def handle_indirect(self, pending: NeedIndirect, pages: Sequence[bytes]) -> Reply | IoPlan:
        """Finish an INDIRECT request given private copies of its descriptor pages."""
        req = pending.request
        n = req.nr_segments
        if len(pages) != len(pending.grefs):
            raise ValueError("one copied page per indirect gref is needed")
        segments: list[Segment] = []
        for i, page in enumerate(pages):
            count = min(SEGMENTS_PER_INDIRECT_PAGE, n - i * SEGMENTS_PER_INDIRECT_PAGE)
            segments.extend(decode_segments(page, 0, count))
        kind = BlockOp.READ if req.indirect_op == Op.READ else BlockOp.WRITE
        outcome = self._plan(req, req.indirect_op, kind, tuple(segments))
        assert not isinstance(outcome, NeedIndirect)
        return outcome

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _error(req: Request, op: int, reason: str) -> Reply:
        return Reply(req.id, op, Status.ERROR, reason)

    def _misaligned(self, sector: int, first: int, last: int) -> str:
        return (
            f"sector {sector}, segment {first}..{last}: not aligned to the "
            f"{self.config.sector_size}-byte logical sector"
        )

    def _indirect(self, req: Request) -> Outcome:
        limit = self.config.max_indirect_segments
        if not limit:
            return Reply(req.id, Op.INDIRECT, Status.EOPNOTSUPP, "INDIRECT is not advertised")
        inner = req.indirect_op
        if inner != Op.READ and inner != Op.WRITE:
            return self._error(req, inner, f"indirect_op {inner} is not READ or WRITE")
        if not 1 <= req.nr_segments <= limit:
            return self._error(req, inner, f"{req.nr_segments} indirect segments (need 1..{limit})")
        if inner == Op.WRITE and self.config.read_only:
            return self._error(req, inner, "write to a read-only device")
        pages = -(-req.nr_segments // SEGMENTS_PER_INDIRECT_PAGE)
        return NeedIndirect(req, req.indirect_grefs[:pages])

    def _plan(
        self,
        req: Request,
        op: int,
        kind: BlockOp,
        segments: tuple[Segment, ...],
        *,
        barrier: bool = False,
    ) -> Reply | IoPlan:
        if kind is not BlockOp.READ and self.config.read_only:
            what = "barrier" if barrier else kind.value
            return self._error(req, op, f"{what} on a read-only device")
        data: list[DataSegment] = []
        total = 0
        mask = self.config.sector_mask
        for gref, first, last in segments:
            if last > 7 or first > last:
                return self._error(req, op, f"bad segment sectors {first}..{last}")
            if (req.sector_number | (last - first + 1)) & mask:
                return self._error(req, op, self._misaligned(req.sector_number, first, last))
            length = (last - first + 1) * SECTOR_SIZE
            data.append((gref, first * SECTOR_SIZE, length))
            total += length
        if not total:
            # Only FLUSH and BARRIER get here without data (READ/WRITE need a segment): the
            # sector number means nothing then, whatever the frontend left in it.
            return IoPlan(req.id, op, kind, 0, 0, barrier=barrier)
        end = req.sector_number + total // SECTOR_SIZE
        if end >= U64:
            return self._error(req, op, "sector range wraps 64 bits")
        if end > self.config.sectors:
            return self._error(req, op, f"sectors {req.sector_number}..{end} pass the device end")
        offset = req.sector_number * SECTOR_SIZE
        return IoPlan(req.id, op, kind, offset, total, tuple(data), barrier=barrier)

    def _discard(self, req: Request) -> Outcome:
        cfg = self.config
        if not cfg.discard or cfg.read_only:
            if cfg.read_only:
                return self._error(req, Op.DISCARD, "discard on a read-only device")
            return Reply(req.id, Op.DISCARD, Status.EOPNOTSUPP, "DISCARD is not advertised")
        if req.flag & DISCARD_SECURE and not cfg.discard_secure:
            return self._error(req, Op.DISCARD, "secure discard was not advertised")
        if (req.sector_number | req.nr_sectors) & cfg.sector_mask:
            return self._error(
                req,
                Op.DISCARD,
                f"discard of sectors {req.sector_number}+{req.nr_sectors} is not aligned to "
                f"the {cfg.sector_size}-byte logical sector",
            )
        end = req.sector_number + req.nr_sectors
        if end >= U64 or end > cfg.sectors:
            return self._error(req, Op.DISCARD, "discard range passes the device end")
        return IoPlan(
            req.id,
            Op.DISCARD,
            BlockOp.DISCARD,
            req.sector_number * SECTOR_SIZE,
            req.nr_sectors * SECTOR_SIZE,
        )
