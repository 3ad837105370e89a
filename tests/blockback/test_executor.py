"""Unit tests of the shared block-request executor against an in-memory disk."""

from __future__ import annotations

import errno
import itertools
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vhd
from blockback.executor import RequestExecutor
from blockback.request import BlockOp, BlockRequest
from tests.fakedisk import FakeDisk
from vhd.vhdx import create_vhdx

SIZE = 1024 * 1024
MIB = 1024 * 1024


def read(ex: RequestExecutor, offset: int, length: int) -> tuple[int, bytes]:
    buf = bytearray(length)
    rc = ex.execute(BlockRequest(BlockOp.READ, offset, length, (memoryview(buf),)))
    return rc, bytes(buf)


def write(ex: RequestExecutor, offset: int, data: bytes, *, fua: bool = False) -> int:
    return ex.execute(BlockRequest(BlockOp.WRITE, offset, len(data), (memoryview(data),), fua=fua))


def test_write_then_read_round_trip() -> None:
    disk = FakeDisk(SIZE)
    ex = RequestExecutor(disk)
    assert ex.size == SIZE and not ex.read_only
    assert write(ex, 1000, b"hello world") == 0
    assert read(ex, 995, 20) == (0, bytes(5) + b"hello world" + bytes(4))


def test_scatter_read_and_gather_write() -> None:
    disk = FakeDisk(SIZE)
    ex = RequestExecutor(disk)
    parts = (memoryview(b"abc"), memoryview(b"defgh"), memoryview(b""), memoryview(b"ij"))
    assert ex.execute(BlockRequest(BlockOp.WRITE, 4096, 10, parts)) == 0
    assert bytes(disk.data[4096:4106]) == b"abcdefghij"
    a, b = bytearray(4), bytearray(6)
    req = BlockRequest(BlockOp.READ, 4096, 10, (memoryview(a), memoryview(b)))
    assert ex.execute(req) == 0
    assert (bytes(a), bytes(b)) == (b"abcd", b"efghij")


def test_read_fills_a_slice_of_a_bigger_buffer_in_place() -> None:
    disk = FakeDisk(SIZE)
    disk.data[0:4] = b"WXYZ"
    ex = RequestExecutor(disk)
    reply = bytearray(b"\xff" * 16)
    assert ex.execute(BlockRequest(BlockOp.READ, 0, 4, (memoryview(reply)[8:12],))) == 0
    assert reply == b"\xff" * 8 + b"WXYZ" + b"\xff" * 4


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (0, -1), (SIZE, 1), (SIZE - 1, 2), (SIZE + 1, 0), (2**63, 2**63), (1, SIZE)],
)
@pytest.mark.parametrize("op", list(BlockOp))
def test_out_of_range_is_einval(op: BlockOp, offset: int, length: int) -> None:
    disk = FakeDisk(SIZE)
    ex = RequestExecutor(disk)
    buffers = (memoryview(bytearray(max(length, 0))),) if length in (1, 2) else ()
    assert ex.execute(BlockRequest(op, offset, length, buffers)) == errno.EINVAL
    assert not disk.writes and not disk.discards


def test_range_ending_exactly_at_the_end_is_fine() -> None:
    ex = RequestExecutor(FakeDisk(SIZE))
    assert write(ex, SIZE - 3, b"end") == 0
    assert read(ex, SIZE - 3, 3) == (0, b"end")
    assert read(ex, SIZE, 0) == (0, b"")


def test_buffers_must_match_length() -> None:
    ex = RequestExecutor(FakeDisk(SIZE))
    req = BlockRequest(BlockOp.WRITE, 0, 10, (memoryview(b"short"),))
    assert ex.execute(req) == errno.EINVAL
    req = BlockRequest(BlockOp.READ, 0, 3, (memoryview(bytearray(5)),))
    assert ex.execute(req) == errno.EINVAL


def test_read_into_readonly_buffer_is_einval() -> None:
    ex = RequestExecutor(FakeDisk(SIZE))
    assert ex.execute(BlockRequest(BlockOp.READ, 0, 3, (memoryview(b"abc"),))) == errno.EINVAL


@pytest.mark.parametrize("op", [BlockOp.WRITE, BlockOp.DISCARD, BlockOp.WRITE_ZEROES])
def test_read_only_export_refuses_changes_with_eperm(op: BlockOp) -> None:
    disk = FakeDisk(SIZE)
    disk.data[0:4] = b"keep"
    ex = RequestExecutor(disk, read_only=True)
    assert ex.read_only
    buffers = (memoryview(b"XXXX"),) if op is BlockOp.WRITE else ()
    assert ex.execute(BlockRequest(op, 0, 4, buffers)) == errno.EPERM
    assert bytes(disk.data[0:4]) == b"keep"
    # Reads and flushes still work.
    assert read(ex, 0, 4) == (0, b"keep")
    assert ex.execute(BlockRequest(BlockOp.FLUSH)) == 0


def test_read_only_disk_makes_a_read_only_executor() -> None:
    ex = RequestExecutor(FakeDisk(SIZE, read_only=True))
    assert ex.read_only
    assert write(ex, 0, b"x") == errno.EPERM


def test_fua_and_flush_reach_the_disk() -> None:
    disk = FakeDisk(SIZE)
    ex = RequestExecutor(disk)
    assert write(ex, 0, b"a") == 0
    assert disk.flushes == 0
    assert write(ex, 0, b"a", fua=True) == 0
    assert disk.flushes == 1
    assert ex.execute(BlockRequest(BlockOp.FLUSH)) == 0
    assert disk.flushes == 2


def test_discard_is_a_trim_and_promises_no_zeros() -> None:
    # NBD TRIM and blkif DISCARD leave the range unspecified: Disk.discard, which on a
    # differencing disk never allocates (issue 9 item 11), not Disk.write_zeroes.
    disk = FakeDisk(SIZE)
    ex = RequestExecutor(disk)
    assert write(ex, 0, b"\x01" * 8192) == 0
    assert ex.execute(BlockRequest(BlockOp.DISCARD, 100, 1000)) == 0
    assert disk.discards == [(100, 1000)] and not disk.zeroed


def test_trim_on_a_differencing_disk_never_grows_it(tmp_path: Path) -> None:
    """Issue 9 item 11 through the executor (NBD TRIM, blkif DISCARD): the child's blocks are
    freed, not filled with zeros; WRITE_ZEROES (NBD) still reads back zeros."""
    parent, child = tmp_path / "p.vhd", tmp_path / "c.vhd"
    with vhd.create(parent, 4 * MIB, block_size=64 * 1024) as disk:
        disk.pwrite(b"\x5a" * 4 * MIB, 0)
    vhd.create(child, parent=parent, block_size=64 * 1024).close()
    with vhd.open(child, "r+") as disk:
        ex = RequestExecutor(disk)
        assert write(ex, MIB, b"\x01" * MIB) == 0
        disk.flush()
        grown = child.stat().st_size
        assert ex.execute(BlockRequest(BlockOp.DISCARD, 0, 4 * MIB)) == 0
        assert child.stat().st_size == grown
        assert [e.layer for e in disk.extents()] == [1]  # all of it the parent's again
        assert read(ex, 0, 4 * MIB) == (0, b"\x5a" * 4 * MIB)
        assert ex.execute(BlockRequest(BlockOp.WRITE_ZEROES, 100, 5000)) == 0
        assert read(ex, 0, 5200) == (0, b"\x5a" * 100 + bytes(5000) + b"\x5a" * 100)


def test_trim_on_a_differencing_vhdx_never_grows_it(tmp_path: Path) -> None:
    """The same promise on a VHDX child (a guest's fstrim through NBD or blkif): TRIMs that
    cover blocks partly used to write zeros there, allocating blocks; now the sectors they
    cover entirely read the parent again, whole blocks read as zeros (ZERO: MS-VHDX 2.5.1.1),
    and WRITE_ZEROES still reads back zeros."""
    parent, child = tmp_path / "p.vhdx", tmp_path / "c.vhdx"
    with create_vhdx(parent, 8 * MIB, block_size=MIB) as disk:
        disk.pwrite(b"\x5a" * 8 * MIB, 0)
    create_vhdx(child, 0, type="differencing", parent=vhd.open(parent), block_size=MIB).close()
    with vhd.open(child, "r+") as disk:
        ex = RequestExecutor(disk)
        assert write(ex, MIB - 4096, b"\x01" * (MIB + 8192)) == 0
        disk.flush()
        grown = child.stat().st_size
        # Partial over blocks 0 and 2 (sectors the child holds and sectors it does not), whole
        # over block 1.
        assert ex.execute(BlockRequest(BlockOp.DISCARD, 100, 2 * MIB + 2048 - 100)) == 0
        disk.flush()
        assert child.stat().st_size == grown
        got = read(ex, 0, 3 * MIB)[1]
        assert got[: MIB - 4096] == b"\x5a" * (MIB - 4096)  # never held by the child
        assert got[MIB - 4096 : MIB] == b"\x5a" * 4096  # given back to the parent
        assert got[MIB : 2 * MIB] == bytes(MIB)  # a whole block: ZERO
        assert got[2 * MIB : 2 * MIB + 2048] == b"\x5a" * 2048  # given back
        assert got[2 * MIB + 2048 : 2 * MIB + 4096] == b"\x01" * 2048  # not covered: kept
        assert ex.execute(BlockRequest(BlockOp.WRITE_ZEROES, 3 * MIB + 100, 5000)) == 0
        want = b"\x5a" * 100 + bytes(5000) + b"\x5a" * 100
        assert read(ex, 3 * MIB, 5200) == (0, want)


def test_write_zeroes_may_punch_a_hole() -> None:
    disk = FakeDisk(SIZE)
    ex = RequestExecutor(disk)
    write(ex, 0, b"\x07" * SIZE)
    assert ex.execute(BlockRequest(BlockOp.WRITE_ZEROES, 65536, 65536, fast_zero=True)) == 0
    assert disk.zeroed == [(65536, 65536)] and not disk.discards
    assert read(ex, 65536, 65536) == (0, bytes(65536))
    assert not disk.allocated[1]


def test_write_zeroes_no_hole_writes_real_zeros_in_bounded_chunks() -> None:
    size = 3 * 1024 * 1024 + 5
    disk = FakeDisk(size)
    ex = RequestExecutor(disk)
    write(ex, 0, b"\x07" * size)
    disk.writes.clear()
    req = BlockRequest(BlockOp.WRITE_ZEROES, 1, size - 2, no_hole=True, fua=True)
    assert ex.execute(req) == 0
    assert not disk.discards and not disk.zeroed
    assert disk.flushes == 1
    assert max(n for _, n in disk.writes) <= 1024 * 1024
    assert sum(n for _, n in disk.writes) == size - 2
    assert disk.data[0] == 7 and disk.data[-1] == 7
    assert not any(disk.data[1:-1])
    assert all(disk.allocated)


def test_fast_zero_with_no_hole_is_refused_quickly() -> None:
    disk = FakeDisk(SIZE)
    ex = RequestExecutor(disk)
    req = BlockRequest(BlockOp.WRITE_ZEROES, 0, 4096, no_hole=True, fast_zero=True)
    assert ex.execute(req) == errno.ENOTSUP
    assert not disk.writes and not disk.discards and not disk.zeroed


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (vhd.CorruptImageError("bad BAT"), errno.EIO),
        (vhd.ReadOnlyError("parent"), errno.EPERM),
        (vhd.InvalidArgumentError("bad"), errno.EINVAL),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (OSError(errno.EDQUOT, "quota"), errno.ENOSPC),
        (OSError(errno.EBADF, "closed"), errno.EIO),
        (RuntimeError("bug"), errno.EIO),
    ],
)
def test_disk_errors_become_errno(exc: BaseException, expected: int) -> None:
    disk = FakeDisk(SIZE)
    ex = RequestExecutor(disk)
    disk.fail_next = exc
    assert write(ex, 0, b"x") == expected
    # The executor keeps working afterwards.
    assert write(ex, 0, b"y") == 0


def test_short_read_from_disk_is_eio() -> None:
    class ShortDisk(FakeDisk):
        def preadinto(self, buffer: object, offset: int) -> int:
            return 1

    ex = RequestExecutor(ShortDisk(SIZE))
    assert read(ex, 0, 10)[0] == errno.EIO


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RequestExecutor(FakeDisk(SIZE), workers=0)


def test_submit_runs_every_request_and_calls_back_once_each() -> None:
    disk = FakeDisk(SIZE)
    done: dict[object, int] = {}
    lock = threading.Lock()

    def callback(req: BlockRequest, rc: int) -> None:
        with lock:
            assert req.tag not in done
            done[req.tag] = rc

    with RequestExecutor(disk, workers=4) as ex:
        for i in range(200):
            data = bytes([i % 256]) * 512
            ex.submit(
                BlockRequest(BlockOp.WRITE, i * 512, 512, (memoryview(data),), tag=i), callback
            )
        ex.submit(BlockRequest(BlockOp.WRITE, SIZE, 1, (memoryview(b"x"),), tag="bad"), callback)
        ex.drain()
        assert ex.in_flight == 0
    assert len(done) == 201
    assert done.pop("bad") == errno.EINVAL
    assert set(done.values()) == {0}
    for i in range(200):
        assert disk.data[i * 512 : (i + 1) * 512] == bytes([i % 256]) * 512


def test_completions_may_come_out_of_order() -> None:
    """A slow request does not hold back the ones submitted after it."""
    gate = threading.Event()

    class SlowDisk(FakeDisk):
        def preadinto(self, buffer: object, offset: int) -> int:
            if offset == 0:
                assert gate.wait(10)
            return super().preadinto(buffer, offset)

    order: list[object] = []
    lock = threading.Lock()

    def callback(req: BlockRequest, rc: int) -> None:
        with lock:
            order.append(req.tag)
            if req.tag == "fast":
                gate.set()

    ex = RequestExecutor(SlowDisk(SIZE), workers=2)
    buf1, buf2 = bytearray(512), bytearray(512)
    ex.submit(BlockRequest(BlockOp.READ, 0, 512, (memoryview(buf1),), tag="slow"), callback)
    ex.submit(BlockRequest(BlockOp.READ, 512, 512, (memoryview(buf2),), tag="fast"), callback)
    ex.close()
    assert order == ["fast", "slow"]


def test_in_flight_counts_until_the_callback_returns() -> None:
    release = threading.Event()
    seen: list[int] = []

    def callback(req: BlockRequest, rc: int) -> None:
        assert release.wait(10)
        seen.append(rc)

    ex = RequestExecutor(FakeDisk(SIZE), workers=1)
    ex.submit(BlockRequest(BlockOp.FLUSH), callback)
    assert ex.in_flight == 1
    release.set()
    ex.drain()
    assert ex.in_flight == 0 and seen == [0]
    ex.close()


def test_a_failing_callback_does_not_kill_the_pool() -> None:
    calls: list[int] = []

    def callback(req: BlockRequest, rc: int) -> None:
        calls.append(rc)
        raise RuntimeError("callback bug")

    ex = RequestExecutor(FakeDisk(SIZE), workers=1)
    for _ in range(3):
        ex.submit(BlockRequest(BlockOp.FLUSH), callback)
    ex.drain()
    assert calls == [0, 0, 0]
    ex.close()


def test_submit_after_close_raises() -> None:
    ex = RequestExecutor(FakeDisk(SIZE))
    ex.close()
    with pytest.raises(RuntimeError):
        ex.submit(BlockRequest(BlockOp.FLUSH), lambda r, e: None)
    # close() is idempotent and never closes the disk.
    ex.close()
    assert not ex.disk.closed  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(BlockOp)),
            st.integers(0, 70_000),
            st.integers(0, 70_000),
            st.booleans(),
            st.integers(0, 255),
        ),
        max_size=30,
    )
)
def test_matches_a_model_for_random_request_sequences(
    ops: list[tuple[BlockOp, int, int, bool, int]],
) -> None:
    size = 65536
    disk = FakeDisk(size, grain=4096)
    model = bytearray(size)
    ex = RequestExecutor(disk)
    rng = random.Random(0)
    for op, offset, length, flag, byte in ops:
        in_range = offset + length <= size
        if op is BlockOp.READ:
            rc, data = read(ex, offset, length)
            assert rc == (0 if in_range else errno.EINVAL)
            if in_range:
                assert data == model[offset : offset + length]
        elif op is BlockOp.WRITE:
            payload = bytes([byte]) * length
            # Split the payload into random gather pieces.
            cuts = sorted(rng.randint(0, length) for _ in range(3))
            edges = [0, *cuts, length]
            views = tuple(memoryview(payload)[a:b] for a, b in itertools.pairwise(edges))
            rc = ex.execute(BlockRequest(op, offset, length, views, fua=flag))
            assert rc == (0 if in_range else errno.EINVAL)
            if in_range:
                model[offset : offset + length] = payload
        elif op is BlockOp.FLUSH:
            assert ex.execute(BlockRequest(op)) == 0
        else:
            rc = ex.execute(BlockRequest(op, offset, length, no_hole=flag))
            assert rc == (0 if in_range else errno.EINVAL)
            if in_range and op is BlockOp.WRITE_ZEROES:
                model[offset : offset + length] = bytes(length)
            # DISCARD promises nothing; the fake keeps the data (see FakeDisk.discard).
        assert disk.data == model


def test_close_waits_for_follow_ups_submitted_by_callbacks() -> None:
    """A write whose callback submits its flush: close() drains both, then refuses more."""
    disk = FakeDisk(SIZE)
    gate = threading.Event()
    results: list[tuple[BlockOp, int]] = []
    ex = RequestExecutor(disk, workers=2)

    def flushed(req: BlockRequest, rc: int) -> None:
        results.append((req.op, rc))

    def written(req: BlockRequest, rc: int) -> None:
        results.append((req.op, rc))
        assert gate.wait(10)
        ex.submit(BlockRequest(BlockOp.FLUSH), flushed)

    ex.submit(BlockRequest(BlockOp.WRITE, 0, 1, (memoryview(b"x"),)), written)
    closer = threading.Thread(target=ex.close)
    closer.start()
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert results == [(BlockOp.WRITE, 0), (BlockOp.FLUSH, 0)]
    assert disk.flushes == 1
    with pytest.raises(RuntimeError):
        ex.submit(BlockRequest(BlockOp.FLUSH), flushed)
