"""blockback.engine: every rule of docs/blkif.md §3 on private request copies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockback.abi import X86_64, Op, Request, Status, encode_segments
from blockback.engine import BlkifEngine, DeviceConfig, IoPlan, NeedIndirect, Reply
from blockback.request import BlockOp

SECTORS = 2048  # 1 MiB device
ENGINE = BlkifEngine(DeviceConfig(sectors=SECTORS))
RO = BlkifEngine(DeviceConfig(sectors=SECTORS, read_only=True))


def rw(op: int, sector: int, segs: list[tuple[int, int, int]], nr: int | None = None) -> Request:
    return X86_64.decode_request(X86_64.encode_rw(op, 42, sector, segs, nr_segments=nr))


def status(outcome: object) -> Status:
    assert isinstance(outcome, Reply), outcome
    return outcome.status


@given(first=st.integers(0, 7), last=st.integers(0, 7), n=st.integers(1, 11))
def test_read_plan_every_sector_pair(first: int, last: int, n: int) -> None:
    out = ENGINE.handle(rw(Op.READ, 8, [(g, first, last) for g in range(n)]))
    if first > last:
        assert status(out) is Status.ERROR
        return
    assert isinstance(out, IoPlan)
    length = (last - first + 1) * 512
    assert (out.op, out.offset, out.length, out.id) == (BlockOp.READ, 4096, n * length, 42)
    assert out.segments == tuple((g, first * 512, length) for g in range(n))


@pytest.mark.parametrize(
    "req",
    [
        rw(Op.READ, 0, [], nr=0),
        rw(Op.WRITE, 0, [(1, 0, 7)] * 11, nr=12),
        rw(Op.READ, 0, [(1, 0, 7)] * 11, nr=255),
        rw(Op.READ, 0, [(1, 0, 8)]),
        rw(Op.READ, 0, [(1, 5, 4)]),
        rw(Op.READ, SECTORS - 7, [(1, 0, 7)]),  # end > sectors
        rw(Op.WRITE, 2**64 - 1, [(1, 0, 0)]),  # u64 wrap
        rw(Op.FLUSH_DISKCACHE, 0, [(1, 0, 7)] * 11, nr=12),
    ],
)
def test_errors(req: Request) -> None:
    out = ENGINE.handle(req)
    assert status(out) is Status.ERROR
    assert isinstance(out, Reply) and out.operation == req.operation and out.id == 42


def test_last_sector_exactly_at_end_is_fine() -> None:
    assert isinstance(ENGINE.handle(rw(Op.READ, SECTORS - 8, [(1, 0, 7)])), IoPlan)


@pytest.mark.parametrize("op", [4, *range(7, 256)])
def test_unknown_ops_eopnotsupp(op: int) -> None:
    out = ENGINE.handle(rw(op, 0, [(1, 0, 7)]))
    assert isinstance(out, Reply) and (out.status, out.operation, out.id) == (
        Status.EOPNOTSUPP, op, 42)  # fmt: skip


def test_flush_and_barrier() -> None:
    for op, barrier in ((Op.FLUSH_DISKCACHE, False), (Op.WRITE_BARRIER, True)):
        empty = ENGINE.handle(rw(op, 0, [], nr=0))
        assert isinstance(empty, IoPlan) and empty.op is BlockOp.FLUSH and empty.length == 0
        assert empty.barrier is barrier
        data = ENGINE.handle(rw(op, 16, [(3, 0, 7)]))
        assert isinstance(data, IoPlan) and data.length == 4096 and data.offset == 8192
        assert status(RO.handle(rw(op, 0, [], nr=0))) is Status.ERROR


@pytest.mark.parametrize("op", [Op.FLUSH_DISKCACHE, Op.WRITE_BARRIER])
@pytest.mark.parametrize("sector", [2**64 - 1, SECTORS, SECTORS + 1, 2**63])
def test_empty_flush_and_barrier_ignore_the_sector(op: int, sector: int) -> None:
    """Linux blkfront's empty flush carries sector 2**64-1; Linux blkback range-checks only
    requests with sectors. Refusing it made the guest turn flush (and barriers) off."""
    out = ENGINE.handle(rw(op, sector, [], nr=0))
    assert isinstance(out, IoPlan), out
    assert (out.operation, out.length, out.segments, out.offset) == (op, 0, (), 0)
    # With data the range still counts.
    assert status(ENGINE.handle(rw(op, sector, [(3, 0, 7)]))) is Status.ERROR


def test_read_only() -> None:
    assert isinstance(RO.handle(rw(Op.READ, 0, [(1, 0, 7)])), IoPlan)
    assert status(RO.handle(rw(Op.WRITE, 0, [(1, 0, 7)]))) is Status.ERROR
    assert status(RO.handle(X86_64.decode_request(X86_64.encode_discard(1, 0, 8)))) is Status.ERROR
    ind = X86_64.decode_request(X86_64.encode_indirect(Op.WRITE, 1, 0, 20, [5]))
    assert status(RO.handle(ind)) is Status.ERROR


def test_discard() -> None:
    d = ENGINE.handle(X86_64.decode_request(X86_64.encode_discard(9, 8, 16)))
    assert isinstance(d, IoPlan) and (d.op, d.offset, d.length, d.operation) == (
        BlockOp.DISCARD, 4096, 8192, Op.DISCARD)  # fmt: skip
    bad = [(SECTORS, 1, 0), (2**64 - 1, 2, 0), (0, 8, 1)]  # past end, wrap, secure
    for sector, n, flag in bad:
        req = X86_64.decode_request(X86_64.encode_discard(9, sector, n, flag))
        assert status(ENGINE.handle(req)) is Status.ERROR
    secure = BlkifEngine(DeviceConfig(sectors=SECTORS, discard_secure=True))
    assert isinstance(
        secure.handle(X86_64.decode_request(X86_64.encode_discard(9, 0, 8, 1))), IoPlan
    )
    off = BlkifEngine(DeviceConfig(sectors=SECTORS, discard=False))
    assert (
        status(off.handle(X86_64.decode_request(X86_64.encode_discard(9, 0, 8))))
        is Status.EOPNOTSUPP
    )


def test_indirect_multi_page() -> None:
    n = 600  # two indirect pages
    segs = [(1000 + i, 0, 7) for i in range(n)]
    req = X86_64.decode_request(X86_64.encode_indirect(Op.READ, 5, 0, n, [77, 78, 79]))
    big = BlkifEngine(DeviceConfig(sectors=1 << 20))
    pending = big.handle(req)
    assert isinstance(pending, NeedIndirect) and pending.grefs == (77, 78)
    pages = [
        encode_segments(segs[:512]).ljust(4096, b"\0"),
        encode_segments(segs[512:]).ljust(4096, b"\0"),
    ]
    plan = big.handle_indirect(pending, pages)
    assert isinstance(plan, IoPlan) and plan.operation == Op.READ and plan.length == n * 4096
    assert [s[0] for s in plan.segments] == [1000 + i for i in range(n)]
    # A bad segment anywhere in the indirect pages fails the whole request.
    segs[599] = (1, 3, 2)
    pages[1] = encode_segments(segs[512:]).ljust(4096, b"\0")
    assert status(big.handle_indirect(pending, pages)) is Status.ERROR


@pytest.mark.parametrize(
    "n, inner", [(0, Op.READ), (1025, Op.READ), (65535, Op.WRITE), (20, Op.FLUSH_DISKCACHE)]
)
def test_indirect_errors(n: int, inner: int) -> None:
    out = ENGINE.handle(X86_64.decode_request(X86_64.encode_indirect(inner, 5, 0, n, [1])))
    assert isinstance(out, Reply) and out.status is Status.ERROR and out.operation == inner


def test_indirect_not_advertised() -> None:
    engine = BlkifEngine(DeviceConfig(sectors=SECTORS, max_indirect_segments=0))
    out = engine.handle(X86_64.decode_request(X86_64.encode_indirect(Op.READ, 5, 0, 20, [1])))
    assert status(out) is Status.EOPNOTSUPP


# -- 4K-native disks: sector-size 4096, sector numbers still in 512-byte units -----------------

K4 = BlkifEngine(DeviceConfig(sectors=SECTORS, sector_size=4096))


@given(
    sector=st.integers(0, SECTORS - 88),
    spans=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=11),
    op=st.sampled_from([Op.READ, Op.WRITE, Op.FLUSH_DISKCACHE, Op.WRITE_BARRIER]),
)
def test_4k_alignment_as_linux_blkback(sector: int, spans: list[tuple[int, int]], op: int) -> None:
    """Linux blkback (dispatch_rw_block_io) refuses a request whose sector number or any
    segment's sector count is not a whole number of logical sectors: ERROR, nothing planned."""
    segs = [(g, first, last) for g, (first, last) in enumerate(spans) if first <= last]
    if not segs:
        return
    out = K4.handle(rw(op, sector, segs))
    aligned = sector % 8 == 0 and all((last - first + 1) % 8 == 0 for _, first, last in segs)
    if aligned:
        assert isinstance(out, IoPlan) and out.offset == sector * 512
        assert out.length == 4096 * len(segs)
    else:
        assert status(out) is Status.ERROR
        assert isinstance(out, Reply) and (out.operation, out.id) == (op, 42)
    # The same request on a 512-byte disk is always fine.
    assert isinstance(ENGINE.handle(rw(op, sector, segs)), IoPlan)


def test_4k_empty_flush_and_indirect() -> None:
    # An empty flush has no segment to misalign (blkback checks per segment).
    assert isinstance(K4.handle(rw(Op.FLUSH_DISKCACHE, 2**64 - 1, [], nr=0)), IoPlan)
    req = X86_64.decode_request(X86_64.encode_indirect(Op.WRITE, 5, 16, 20, [77]))
    pending = K4.handle(req)
    assert isinstance(pending, NeedIndirect)
    good = encode_segments([(100 + i, 0, 7) for i in range(20)]).ljust(4096, b"\0")
    plan = K4.handle_indirect(pending, [good])
    assert isinstance(plan, IoPlan) and (plan.offset, plan.length) == (8192, 20 * 4096)
    bad = encode_segments([(100 + i, 0, 7) for i in range(19)] + [(1, 0, 3)]).ljust(4096, b"\0")
    assert status(K4.handle_indirect(pending, [bad])) is Status.ERROR
    odd = K4.handle(X86_64.decode_request(X86_64.encode_indirect(Op.READ, 5, 4, 20, [77])))
    assert isinstance(odd, NeedIndirect)
    assert status(K4.handle_indirect(odd, [good])) is Status.ERROR


@pytest.mark.parametrize(
    ("sector", "count", "ok"), [(8, 16, True), (0, 8, True), (4, 8, False), (8, 12, False)]
)
def test_4k_discard_alignment(sector: int, count: int, ok: bool) -> None:
    """blkdev_issue_discard refuses a range that is not whole logical sectors (EINVAL: ERROR)."""
    out = K4.handle(X86_64.decode_request(X86_64.encode_discard(9, sector, count)))
    if ok:
        assert isinstance(out, IoPlan) and (out.offset, out.length) == (sector * 512, count * 512)
    else:
        assert status(out) is Status.ERROR
