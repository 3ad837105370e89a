"""The one request vocabulary of the block backends: what the NBD export (NBD protocol doc,
"Request types") and the blkif backend (docs/blkif.md §3, the operations) both ask of a disk,
in bytes, after their protocol edge has validated it.

:class:`BlockOp` names the operations both protocols share; a front end maps its wire opcodes
onto them once (``NBD_CMD_READ`` and ``BLKIF_OP_READ`` are both :attr:`BlockOp.READ`) and hands
:class:`BlockRequest` objects to :class:`blockback.executor.RequestExecutor`.  A protocol
operation that is more than one of these (blkif's FLUSH_DISKCACHE with data: a write then a
flush; WRITE_BARRIER: flush, write, flush) is a sequence of them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["BlockOp", "BlockRequest"]


class BlockOp(enum.Enum):
    """The operations both protocols share."""

    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    WRITE_ZEROES = "write_zeroes"


@dataclass(frozen=True, slots=True)
class BlockRequest:
    """One request, in bytes, as a protocol front end decoded it."""

    op: BlockOp
    offset: int = 0
    length: int = 0
    # READ: destinations filled in order from `offset` (scatter); WRITE: sources (gather).
    buffers: tuple[memoryview, ...] = ()
    # WRITE / WRITE_ZEROES: durable before completion.
    fua: bool = False
    # The caller's cookie (NBD handle, blkif id), passed back untouched.
    tag: object = None
    # WRITE_ZEROES: the range must stay allocated (NBD_CMD_FLAG_NO_HOLE): write real zeros.
    no_hole: bool = False
    # WRITE_ZEROES: fail with ENOTSUP rather than take as long as a write
    # (NBD_CMD_FLAG_FAST_ZERO).  Discarding is fast; writing zeros is not.
    fast_zero: bool = False
