"""NBD_CMD_BLOCK_STATUS with bounded work (the NBD protocol document, "Metadata querying" and
``base:allocation``).

Work is bounded per request: at most :data:`STATUS_BLOCKS` blocks of the disk (of the smallest
block size in its chain: :func:`status_range`) and :data:`STATUS_EXAMINED` runs of
``Disk.extents()`` are looked at -- the reply covers less than asked, as the document allows,
and clients ask again from where it ends.  While other clients are busy the connection then
waits as long as the work took, so a client looping on the map of a costly disk gets at most
half the server's time and cannot starve the others.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
import time
from collections.abc import Callable

import vhd
from blockback.executor import BlockDisk
from blockback.nbd import protocol as p

log = logging.getLogger("blockback.nbd")

# One BLOCK_STATUS request looks at no more than this many blocks of the disk (of the smallest
# block size in its chain; a fixed disk is one run whatever the size) and this many runs of
# Disk.extents(): about a millisecond of work, where a whole 4 GiB map could take a second.
STATUS_BLOCKS = 256
STATUS_EXAMINED = 512
# Block status that took longer than this yields as long again to busy neighbours.
STATUS_YIELD = 0.0002


def status_range(disk: BlockDisk) -> int:
    """Bytes one BLOCK_STATUS request may look at: STATUS_BLOCKS of the smallest block size in
    the disk's chain, a multiple of 512 (the protocol's largest length is 4 GiB - 1)."""
    sizes = [
        size
        for layer in getattr(disk, "chain", None) or [disk]
        if (size := getattr(layer, "block_size", None))
    ]
    limit = STATUS_BLOCKS * min(sizes) if sizes else 0xFFFFFFFF
    return max(512, min(limit, 0xFFFFFFFF) // 512 * 512)


def block_status(
    disk: BlockDisk,
    lock: threading.Lock,
    max_length: int,
    session: p.Session,
    req: p.Request,
    *,
    others_busy: Callable[[], bool],
    peer: str,
) -> bytes:
    """The reply to ``req``, looking at no more than ``max_length`` bytes (the server's
    ``status_range``) and :data:`STATUS_EXAMINED` runs under ``lock`` (``Disk.extents`` is not
    thread-safe); then a yield to busy neighbours (``others_busy``) as long as the work took."""
    one = bool(req.flags & p.CmdFlag.REQ_ONE)
    length = min(req.length, max_length)
    started = time.perf_counter()
    try:
        with lock:
            runs = disk.extents(req.offset, length)
            extents = p.clip_extents(
                ((e.offset, e.length, e.layer) for e in itertools.islice(runs, STATUS_EXAMINED)),
                req.offset,
                length,
                one=one,
            )
    except (vhd.VHDError, OSError) as exc:
        log.error("%s: block status failed: %s", peer, exc)
        return p.error_reply(session, req.handle, errno.EIO, str(exc))
    if not extents:
        # The disk reported nothing for the start of the range: call it data, which is
        # always a correct (if unhelpful) answer.
        extents = [(length, 0)]
    spent = time.perf_counter() - started
    if spent > STATUS_YIELD and others_busy():
        time.sleep(spent)
    return p.block_status_reply(req.handle, p.BASE_ALLOCATION_ID, extents)
