"""``vhd compare``: do two disks (VHD or raw, either side) have the same guest-visible content?

Exit 0 when identical, 1 when they differ (the first differing byte offset is printed), 2 on
error: ``qemu-img compare``'s codes and rules.  Only ranges where either side holds data are read:
the extents of both sides (VHD block allocation and sector bitmaps, ``SEEK_DATA``/``SEEK_HOLE`` of
a raw file) are walked together; where neither has data both read as zeros.  Disks of different
sizes are compared over the smaller size and the larger one's tail against zeros, as qemu-img
does; ``--strict`` (qemu-img's ``-s``, size part) makes a size difference a difference.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
from collections.abc import Iterator

from vhd.buffers import page_aligned
from vhd.disk import Extent
from vhd.source import Source, open_source

from ..common import (
    LOCAL_PARENTS,
    Progress,
    add_parent_dir_option,
    add_progress_options,
    progress_wanted,
    warn,
)
from ..locking import add_force_share_option

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any

# A read job's size.  2 MiB, not 512 KiB: a job costs a hand-off between threads and two
# preadv calls, and 2048 of them for a 1 GiB pair took 110 ms of CPU against 85 with 512 jobs
# (half-full 1 GiB pair, alternating hyperfine batches: 181-188 -> 132-173 ms, qemu-img 174-189).
# The window's buffers stay at 16 MiB.
CHUNK = 2 * 1024 * 1024
_ZEROS = bytes(CHUNK)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "compare",
        help="compare the guest-visible content of two disks",
        description="Compare A and B (each a VHD of any type, or a raw image). Only ranges "
        "where either side holds data are read. A larger disk's extra tail must read as zeros "
        "(as qemu-img compare); with --strict, different sizes differ.",
    )
    p.add_argument("a")
    p.add_argument("b")
    add_parent_dir_option(p, None)
    p.add_argument(
        "-s",
        "--strict",
        action="store_true",
        help="different sizes count as a difference (the size part of qemu-img compare -s; "
        "allocation differences are not)",
    )
    add_progress_options(p)
    add_force_share_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Both images are opened alike (the same parent folders, policy and sharing).
    opened = functools.partial(
        open_source,
        parent_dirs=args.parent_dir,
        parent_policy=LOCAL_PARENTS,
        force_share=args.force_share,
    )
    with opened(args.a) as a, opened(args.b) as b:
        for message in a.warnings + b.warnings:
            warn(message)
        if a.size != b.size:
            if args.strict:
                print(f"sizes differ: {a.size} != {b.size} (--strict)")
                return 1
            larger = args.a if a.size > b.size else args.b
            warn(
                f"sizes differ: {a.size} != {b.size}; the tail of {larger} is compared "
                "against zeros"
            )
        progress = Progress(max(a.size, b.size), "comparing", enabled=progress_wanted(args))
        offset = first_difference(a, b, progress)
        progress.finish()
    if offset is None:
        if not args.quiet:
            print("identical")
        return 0
    print(f"content differs at offset {offset}")
    return 1


def _padded(extents: Iterator[Extent], size: int, total: int) -> Iterator[Extent]:
    """``extents`` (covering [0, size)) then zeros up to ``total``."""
    pos = 0
    for ext in extents:
        yield ext
        pos = ext.end
    if pos < total:
        yield Extent(pos, total - pos, None)


def _pieces(a: Source, b: Source, total: int) -> Iterator[tuple[int, int, bool, bool]]:
    """(start, end, a has data, b has data) over [0, total), both extent lists walked together
    (streamed: a 2 TiB disk's list is never held in memory)."""
    ia = _padded(a.extents(), a.size, total)
    ib = _padded(b.extents(), b.size, total)
    ea, eb = next(ia, None), next(ib, None)
    pos = 0
    while pos < total and ea is not None and eb is not None:
        end = min(ea.end, eb.end, total)
        if end > pos:
            yield pos, end, ea.layer is not None, eb.layer is not None
        pos = end
        if ea.end <= pos:
            ea = next(ia, None)
        if eb.end <= pos:
            eb = next(ib, None)


def _chunks(a: Source, b: Source, total: int) -> Iterator[tuple[int, int, bool, bool]]:
    """The pieces that must be read, cut into chunks of at most CHUNK bytes."""
    for start, end, data_a, data_b in _pieces(a, b, total):
        if not (data_a or data_b):
            continue  # both zeros: nothing to read
        pos = start
        while pos < end:
            n = min(CHUNK - pos % CHUNK, end - pos)
            yield pos, n, data_a, data_b
            pos += n


def first_difference(a: Source, b: Source, progress: Progress | None = None) -> int | None:
    """The first offset where ``a`` and ``b`` differ (a shorter side reads as zeros past its
    end), or None.

    Chunks are read and compared by ``_WORKERS`` threads (``preadv`` releases the GIL, page-cache
    copies then run on both cores, as qemu-img's parallel requests do), at most ``_WINDOW`` in
    flight; results are taken in offset order, so the first difference is the lowest one.
    """
    total = max(a.size, b.size)
    chunks = _chunks(a, b, total)
    first = next(chunks, None)
    if first is None:
        return None  # neither side holds data anywhere: no reader threads needed
    # Imported only now: a pair with no data anywhere (the sparse case, where start-up is
    # all the time) needs neither the threads nor queue (heapq) and typing (Generic) with them.
    import queue

    from vhd.workers import Job, WorkerPool

    buffers: queue.SimpleQueue[tuple[bytearray, bytearray]] = queue.SimpleQueue()
    for _ in range(_WINDOW):
        # page-aligned (vhd.buffers): a plain bytearray halves the kernel's copy speed
        buffers.put((page_aligned(CHUNK), page_aligned(CHUNK)))

    def compare_one(pos: int, n: int, data_a: bool, data_b: bool) -> int | None:
        buf_a, buf_b = buffers.get()
        try:
            # bytes/bytearray == is one memcmp (memoryview == compares item by item)
            got_a = _read(a, buf_a, pos, n) if data_a else _ZEROS[:n]
            got_b = _read(b, buf_b, pos, n) if data_b else _ZEROS[:n]
            return None if got_a == got_b else pos + _first_unequal(got_a, got_b)
        finally:
            buffers.put((buf_a, buf_b))

    pending: collections.deque[tuple[Job[int | None], int]] = collections.deque()

    def settle_oldest() -> int | None:
        """The oldest chunk's answer, in order; progress reaches its end when it is equal."""
        job, reached = pending.popleft()
        found = job.result()
        if found is None and progress is not None:
            progress.update(reached)
        return found

    # On a difference, leaving the pool drops the chunks not yet started and waits for the rest.
    with WorkerPool(compare_one, _WORKERS, "vhd-compare") as pool:
        for pos, n, data_a, data_b in itertools.chain((first,), chunks):
            if len(pending) >= _WINDOW and (found := settle_oldest()) is not None:
                return found
            pending.append((pool.submit(pos, n, data_a, data_b), pos + n))
        while pending:
            if (found := settle_oldest()) is not None:
                return found
    return None


_WORKERS = 2
_WINDOW = 4


def _read(src: Source, buf: bytearray, pos: int, n: int) -> bytes | bytearray:
    """``n`` bytes of ``src`` at ``pos`` (zeros past its end)."""
    have = max(0, min(n, src.size - pos))
    view = memoryview(buf)
    if have:
        src.preadinto(view[:have], pos)
    if have < n:
        view[have:n] = _ZEROS[: n - have]
    view.release()
    return buf if n == len(buf) else buf[:n]


def _first_unequal(a: bytes | bytearray, b: bytes | bytearray) -> int:
    step = 4096
    for base in range(0, len(a), step):
        if a[base : base + step] != b[base : base + step]:
            for i in range(base, min(base + step, len(a))):
                if a[i] != b[i]:
                    return i
    raise AssertionError("chunks differ but no byte does")  # pragma: no cover
