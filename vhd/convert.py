"""Streaming conversion between raw images and VHDs (any source type, a whole differencing chain
flattened) to raw files, fixed or dynamic VHDs.

Only data is copied: ranges the source reports as zero (unallocated blocks, clear bitmap bits,
file holes) are skipped without reading, and chunks that read as all zeros are not written, so
raw outputs stay sparse and dynamic VHDs get no block for them.  Memory is one chunk buffer.
A block device as raw output is written in place (no truncate), with the ranges that hold no
data zeroed, since a device, unlike a new file, has old content.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import queue
import stat
import struct
from array import array
from collections.abc import Callable, Iterator

from .buffers import mapped
from .create import DEFAULT_BLOCK_SIZE, open_new, plan_create, write_layout
from .disk import Buffer, Disk
from .errors import InvalidArgumentError
from .fileio import open_block_device, write_all, write_zeros
from .newfile import NewFile, named, naming
from .record import FrozenRecord, fill
from .source import Source
from .workers import Job, WorkerPool

MiB = 1024 * 1024
CHUNK = 2 * MiB


class ConvertResult(FrozenRecord):
    # A record, not a dataclass: dataclasses (with inspect) is 9 ms of a convert's start-up.
    _fields = ("size", "data_bytes")
    __slots__ = _fields
    size: int
    data_bytes: int  # bytes of non-zero data written

    def __init__(self, size: int, data_bytes: int) -> None:
        fill(self, size, data_bytes)


def convert(
    src: Source,
    dst: str,
    *,
    to: str = "vhd",
    type: str = "dynamic",
    block_size: int = DEFAULT_BLOCK_SIZE,
    size: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    sync: bool = False,
) -> ConvertResult:
    """Copy the guest-visible content of ``src`` into a new image at ``dst``.

    ``size`` (default: the source's) may be larger than the source, e.g. to round up to a MiB
    for Azure; the extra space reads as zeros.  With ``sync`` the output is fsynced before
    returning; by default it is left to the page cache, as ``qemu-img convert`` does (an output
    interrupted midway is unusable either way, so syncing buys nothing until the end).
    """
    out_size = src.size if size is None else size
    if out_size < src.size:
        raise InvalidArgumentError("the output cannot be smaller than the source")
    if to == "raw" and _is_block_device(dst):
        return _convert_to_block_device(src, dst, out_size, block_size, overwrite, progress)
    _refuse_unseekable(dst)
    if to not in ("raw", "vhd", "vhdx"):
        raise InvalidArgumentError(f"unknown output format {to!r} (raw, vhd or vhdx)")
    if to != "raw" and _is_block_device(dst):
        raise InvalidArgumentError(
            f"{dst} is a block device: vhdkit writes raw output to devices (--to raw)"
        )
    if to == "vhd" and out_size % 512:
        raise InvalidArgumentError(
            f"a VHD's size is a multiple of 512 bytes; the source has {src.size} bytes"
        )
    if src.disk is not None and os.path.exists(dst):
        for layer in src.disk.chain:
            if os.path.samefile(layer.path, dst):
                raise InvalidArgumentError(f"{dst} is the source or one of its parents")
    if to == "vhdx":
        return _convert_vhdx(src, dst, type, block_size, out_size, overwrite, progress, sync)
    # The output is written under a temporary name and renamed when complete (vhd.newfile):
    # an interrupted convert leaves nothing under DST, and an existing DST is only replaced
    # at the end, after its lock showed nobody uses it.
    with NewFile(dst, overwrite=overwrite) as new:
        if to == "raw":
            fd = new.fd
            os.ftruncate(fd, out_size)
            written = _copy(
                src, lambda buf, off: write_all(fd, buf, off), block_size, progress, new.final
            )
            new.publish(durable=sync)
            return ConvertResult(out_size, written)
        footer, _ = plan_create(out_size, type=type, block_size=block_size, parent=None)
        write_layout(new.fd, new.final, footer, block_size, None)
        chunk = block_size if type == "dynamic" else CHUNK
        written = _fill(src, open_new(new), new, chunk, progress, sync)
    return ConvertResult(out_size, written)


def _convert_vhdx(
    src: Source,
    dst: str,
    type: str,
    block_size: int,
    size: int,
    overwrite: bool,
    progress: Callable[[int], None] | None,
    sync: bool,
) -> ConvertResult:
    """The VHDX writer (vhd.vhdx): Hyper-V's 32 MiB blocks unless VHD's 2 MiB default was
    overridden; the size rounded up to a 512-byte sector."""
    from .vhdx import create_vhdx
    from .vhdx.create import DEFAULT_BLOCK_SIZE as VHDX_BLOCK

    bs = VHDX_BLOCK if block_size == DEFAULT_BLOCK_SIZE else block_size
    # Under a temporary name and renamed when complete, as VHD and raw outputs (vhd.newfile).
    with NewFile(dst, overwrite=overwrite) as new:
        disk = create_vhdx(new, -(-size // 512) * 512, type=type, block_size=bs)
        # 2 MiB chunks, not whole 32 MiB blocks: memory stays small; the first write into a
        # block allocates it, the rest go in place.
        written = _fill(src, disk, new, CHUNK, progress, sync)
    return ConvertResult(size, written)


def _fill(
    src: Source,
    disk: Disk,
    new: NewFile,
    chunk: int,
    progress: Callable[[int], None] | None,
    sync: bool,
) -> int:
    """Copy ``src`` into the new image ``disk`` (VHD or VHDX) and publish it under its name;
    the metadata reaches the file before the rename, so the image is complete under its name.
    The disk is closed in any case.  Returns the bytes written."""
    try:
        written = _copy(src, disk.pwrite, chunk, progress, new.final)
        disk.flush(durable=sync)
        new.publish(durable=sync)
    finally:
        disk.close(durable=sync)
    return written


# <linux/fs.h>: _IO(0x12, 127) zero a byte range of a block device (WRITE_ZEROES or written
# zeros, the kernel's choice).
BLKZEROOUT = 0x127F


def _refuse_unseekable(dst: str) -> None:
    """A pipe, terminal or socket as output (``vhd convert a.vhd /dev/stdout``) cannot be
    truncated or written at offsets: say so instead of ftruncate's bare EINVAL."""
    try:
        mode = os.stat(dst).st_mode
    except OSError:
        return  # does not exist: it will be created as a regular file
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise InvalidArgumentError(
            "not a regular file or block device (a pipe or terminal?): the output is written at "
            "offsets; name a file or a block device",
            path=dst,
        )


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _convert_to_block_device(
    src: Source,
    dst: str,
    out_size: int,
    block_size: int,
    overwrite: bool,
    progress: Callable[[int], None] | None,
) -> ConvertResult:
    """Raw output to an existing block device (``vhd convert disk.vhd /dev/sdX``): nothing to
    create or truncate; the device must be at least as large as the disk, every range the source
    holds no data in is zeroed (BLKZEROOUT, falling back to writing zeros: the device's old
    content must not show through), bytes past the disk are left alone, and the device is synced
    before returning."""
    fd, device_size = open_block_device(dst, overwrite=overwrite)
    try:
        if device_size < out_size:
            raise InvalidArgumentError(
                f"the device holds {device_size} bytes, less than the disk's {out_size}",
                path=dst,
            )
        written = _copy(
            src,
            lambda data, off: write_all(fd, data, off),
            block_size,
            progress,
            dst,
            zero=lambda off, n: zero_range(fd, off, n),
        )
        with naming(dst):
            if out_size > src.size:
                zero_range(fd, src.size, out_size - src.size)
            os.fsync(fd)
    finally:
        os.close(fd)
    return ConvertResult(out_size, written)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) of a block device read as zeros."""
    end = offset + length
    # BLKZEROOUT takes 512-byte aligned ranges: write the unaligned edges
    start = min(end, -(-offset // 512) * 512)
    stop = max(start, end // 512 * 512)
    if start > offset:
        write_zeros(fd, offset, start - offset)
    if stop > start:
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", start, stop - start))
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            write_zeros(fd, start, stop - start)
    if end > stop:
        write_zeros(fd, stop, end - stop)


def _copy(
    src: Source,
    write: Callable[[memoryview, int], object],
    chunk: int,
    progress: Callable[[int], None] | None,
    dst: str = "",
    *,
    zero: Callable[[int, int], object] | None = None,
) -> int:
    """Copy the data extents of ``src`` in chunks aligned to ``chunk`` (the output's block size,
    so that each allocating write fills whole blocks), writing only the non-zero runs.

    Chunks are copied by ``_WORKERS`` threads (``preadv``/``pwritev`` release the GIL, and
    ``Disk`` is thread-safe): page-cache copies then run on both cores, as qemu-img's parallel
    requests do.  At most ``_WINDOW`` chunks are in flight, so memory stays bounded.

    ``zero``, when given, is called for every range that is not written (zero extents and zero
    runs inside data), for outputs whose old content would otherwise show through.
    """
    chunk = max(chunk, 64 * 1024)
    # Page-aligned maps (vhd.buffers): the kernel's copies to and from a plain bytearray cost a
    # third more.  Made when a worker first needs one: at most one per worker (a small source
    # needs one), and no larger than the source.
    size = max(1, min(chunk, src.size))
    buffers: queue.SimpleQueue[memoryview] = queue.SimpleQueue()

    def copy_one(pos: int, n: int) -> int:
        try:
            view = buffers.get_nowait()
        except queue.Empty:
            view = mapped(size)
        try:
            try:
                src.preadinto(view[:n], pos)
            except OSError as exc:
                raise named(exc, src.path) from exc
            done = 0
            last = 0
            try:
                for start, end in data_runs(view, n):
                    if zero is not None and start > last:
                        zero(pos + last, start - last)
                    write(view[start:end], pos + start)
                    done += end - start
                    last = end
                if zero is not None and n > last:
                    zero(pos + last, n - last)
            except OSError as exc:
                raise named(exc, dst) from exc
            return done
        finally:
            buffers.put(view)

    written = _copy_chunks(src, copy_one, chunk, progress, zero)
    if progress:
        progress(src.size)
    return written


def _copy_chunks(
    src: Source,
    copy_one: Callable[[int, int], int],
    chunk: int,
    progress: Callable[[int], None] | None,
    zero: Callable[[int, int], object] | None,
) -> int:
    """Hand ``src``'s data extents to ``copy_one`` in ``chunk``-aligned pieces on the worker
    pool, the bytes written.  A job is a run of pieces (up to ``_JOB_BYTES``), and at most
    ``_WINDOW`` jobs are in flight: a job per piece cost about 70 us of hand-offs between the
    threads, 35 ms of the 180 ms of CPU that reading and checking 1 GiB took."""
    per_job = max(1, _JOB_BYTES // chunk)
    written = 0
    pending: collections.deque[tuple[Job[int], int]] = collections.deque()
    pieces: list[tuple[int, int]] = []

    def copy_run(run: tuple[tuple[int, int], ...]) -> int:
        return sum(copy_one(pos, n) for pos, n in run)

    with WorkerPool(copy_run, _WORKERS, "vhd-convert") as pool:

        def submit() -> int:
            done = _settle(pending, progress) if len(pending) >= _WINDOW else 0
            last, n = pieces[-1]
            pending.append((pool.submit(tuple(pieces)), last + n))
            pieces.clear()
            return done

        for ext in src.extents():
            if ext.layer is not None:
                pos = ext.offset
                while pos < ext.end:
                    n = min(ext.end - pos, chunk - pos % chunk)
                    pieces.append((pos, n))
                    if len(pieces) >= per_job:
                        written += submit()
                    pos += n
            else:
                if zero is not None:
                    zero(ext.offset, ext.length)
                if progress and not pending and not pieces:
                    progress(ext.end)
        if pieces:
            written += submit()
        while pending:
            written += _settle(pending, progress)
    return written


def _settle(
    pending: collections.deque[tuple[Job[int], int]], progress: Callable[[int], None] | None
) -> int:
    job, reached = pending.popleft()
    done = job.result()  # re-raises a worker's error here, in the caller's thread
    if progress:
        progress(reached)
    return done


_WORKERS = 2
_WINDOW = 4
_JOB_BYTES = 16 * MiB

_GRAIN = 4096
# Zeros to compare against by ``bytearray.startswith``, which takes any buffer and is one memcmp
# (1.3 us per 64 KiB; comparing a memoryview by ``==`` goes element by element, 109 us).  A
# 64 KiB slab stays in the CPU's cache; a longer range is compared slab by slab.
_SLAB = 64 * 1024
_ZERO_SLAB = bytearray(_SLAB)


def _all_zero(view: memoryview, start: int, end: int) -> bool:
    """Does ``view[start:end]`` hold only zero bytes?  (C-speed compares, no copies.)"""
    return all(
        _ZERO_SLAB.startswith(view[pos : min(end, pos + _SLAB)]) for pos in range(start, end, _SLAB)
    )


def data_runs(buf: Buffer, n: int) -> Iterator[tuple[int, int]]:
    """The runs of ``buf[:n]`` that hold data, at 4 KiB granularity: zero grains are left out,
    so outputs stay sparse like qemu-img's.

    C-speed checks only (memcmp, a strided copy, an ``array`` scan): an all-zero chunk is a few
    compares; a chunk where no aligned grain starts with 8 zero bytes cannot hold a zero grain,
    which one strided copy of each grain's first 8 bytes shows; grain by grain only where zeros
    and data mix.
    """
    view = memoryview(buf).cast("B")
    if _all_zero(view, 0, n):
        return
    full = n - n % _GRAIN
    if full:
        heads = array("Q")
        heads.frombytes(view[:full].cast("Q")[:: _GRAIN // 8].tobytes())
        if 0 not in heads:
            # no zero grain before the short tail grain (if any), which is data or not
            yield 0, full if n > full and _all_zero(view, full, n) else n
            return
    start = -1
    for pos in range(0, n, _GRAIN):
        end = min(n, pos + _GRAIN)
        zero = _ZERO_SLAB.startswith(view[pos:end])
        if zero and start >= 0:
            yield start, pos
            start = -1
        elif not zero and start < 0:
            start = pos
    if start >= 0:
        yield start, n
