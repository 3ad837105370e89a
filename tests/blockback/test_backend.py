"""The blkif data path (ring + engine + executor + sim transport) driven by a Python frontend."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vhd
from blockback.abi import X86_32, X86_64, Abi, Op, Status, encode_segments
from blockback.device import BlkifDevice
from blockback.engine import BlkifEngine, DeviceConfig
from blockback.errors import RemoteProtocolError
from blockback.executor import RequestExecutor
from blockback.transport.sim import SimXen, alloc_unbound_port
from blockback.xenbus import read_frontend

from .pyfront import SimFrontend

SIZE = 8 * 1024 * 1024


class Rig:
    def __init__(self, tmp: Path, layout: Abi, order: int, read_only: bool = False) -> None:
        self.path = tmp / "disk.vhd"
        if not self.path.exists():
            vhd.create(self.path, SIZE).close()
        self.disk = vhd.open(self.path, "r" if read_only else "r+")
        self.xen = SimXen(tmp / "sim", pages=4096)
        self.front = SimFrontend(str(tmp / "sim"), layout, order)
        self.executor = RequestExecutor(self.disk, read_only=read_only, workers=4)
        self.config = DeviceConfig(sectors=SIZE // 512, read_only=read_only)
        params = read_frontend(self.front.keys().get)
        self.device = BlkifDevice(
            self.xen, 1, params, BlkifEngine(self.config), self.executor, name="test"
        )
        self.device.start()
        self.model = bytearray(SIZE)

    @property
    def ring(self):  # type: ignore[no-untyped-def]
        return self.device.rings[0]

    def close(self) -> None:
        self.device.stop()
        self.executor.close()
        self.front.close()
        self.xen.close()
        self.disk.close()


@pytest.fixture(params=[(X86_64, 0), (X86_32, 4)], ids=["x86_64-order0", "x86_32-order4"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    layout, order = request.param
    r = Rig(tmp_path, layout, order)
    yield r
    r.close()


def test_write_read_every_sector_pair(rig: Rig) -> None:
    f, abi = rig.front, rig.front.abi
    pages = f.alloc(11)
    rnd = random.Random(1)
    rid = 0
    for first in range(8):
        for last in range(first, 8):
            n = rnd.randint(1, 11)
            sector = rnd.randrange(0, SIZE // 512 - 90)
            chunks = []
            for p in pages[:n]:
                data = rnd.randbytes((last - first + 1) * 512)
                f.page(p)[first * 512 : (last + 1) * 512] = data
                chunks.append(data)
            segs = [(p, first, last) for p in pages[:n]]
            rid += 1
            assert f.call(abi.encode_rw(Op.WRITE, rid, sector, segs)) == Status.OKAY
            blob = b"".join(chunks)
            rig.model[sector * 512 : sector * 512 + len(blob)] = blob
            for p in pages[:n]:
                f.page(p)[:] = bytes(4096)
            rid += 1
            assert f.call(abi.encode_rw(Op.READ, rid, sector, segs)) == Status.OKAY
            back = b"".join(bytes(f.page(p)[first * 512 : (last + 1) * 512]) for p in pages[:n])
            assert back == blob
    assert rig.xen.grants.mapped == 0  # no mapping outlives its response
    rig.device.stop()
    rig.disk.flush()
    with vhd.open(rig.path, force_share=True) as again:  # rig.disk is still open
        assert again.pread(SIZE, 0) == bytes(rig.model)


def test_full_ring_out_of_order_unique_ids(rig: Rig) -> None:
    f, abi = rig.front, rig.front.abi
    n = f.ring.nr_ents
    pages = f.alloc(n)
    reqs = [
        abi.encode_rw(Op.READ, 1000 + i, (i * 8) % (SIZE // 512), [(pages[i], 0, 7)])
        for i in range(n)
    ]
    f.submit(reqs)
    got = f.wait(n)
    assert sorted(r[0] for r in got) == [1000 + i for i in range(n)]
    assert all(op == Op.READ and status == Status.OKAY for _, op, status in got)


def test_errors_and_unsupported(rig: Rig) -> None:
    f, abi = rig.front, rig.front.abi
    (p,) = f.alloc(1)
    (ro,) = f.alloc(1, read_only=True)
    last = SIZE // 512
    cases = [
        (abi.encode_rw(Op.READ, 1, 0, [], nr_segments=0), Status.ERROR),
        (abi.encode_rw(Op.READ, 2, 0, [(p, 0, 7)] * 11, nr_segments=12), Status.ERROR),
        (abi.encode_rw(Op.READ, 3, 0, [(p, 0, 8)]), Status.ERROR),
        (abi.encode_rw(Op.READ, 4, 0, [(p, 3, 2)]), Status.ERROR),
        (abi.encode_rw(Op.READ, 5, last - 4, [(p, 0, 7)]), Status.ERROR),
        (abi.encode_rw(Op.WRITE, 6, 2**64 - 2, [(p, 0, 7)]), Status.ERROR),
        (abi.encode_rw(Op.READ, 7, 0, [(999999, 0, 7)]), Status.ERROR),  # bad gref
        (abi.encode_rw(Op.READ, 8, 0, [(ro, 0, 7)]), Status.ERROR),  # read into a read-only grant
        (abi.encode_rw(Op.WRITE, 9, 0, [(ro, 0, 7)]), Status.OKAY),  # write from it is fine
        (abi.encode_rw(4, 10, 0, [(p, 0, 7)]), Status.EOPNOTSUPP),
        (abi.encode_rw(200, 11, 0, [(p, 0, 7)]), Status.EOPNOTSUPP),
        (abi.encode_rw(Op.FLUSH_DISKCACHE, 12, 0, [], nr_segments=0), Status.OKAY),
        (abi.encode_rw(Op.WRITE_BARRIER, 13, 0, [(p, 0, 7)]), Status.OKAY),
        (abi.encode_discard(14, 8, 8), Status.OKAY),
        (abi.encode_discard(15, last, 1), Status.ERROR),
        (abi.encode_discard(16, 0, 8, flag=1), Status.ERROR),
    ]
    for data, want in cases:
        assert f.call(data) == want, abi.decode_request(data)
    # Revoked grant.
    f.mem.revoke(p)
    assert f.call(abi.encode_rw(Op.WRITE, 17, 0, [(p, 0, 7)])) == Status.ERROR
    assert rig.xen.grants.mapped == 0


def test_indirect(rig: Rig) -> None:
    f, abi = rig.front, rig.front.abi
    n = 600
    data_pages = f.alloc(n)
    ind = f.alloc(2)
    segs = [(p, 0, 7) for p in data_pages]
    f.page(ind[0])[:] = encode_segments(segs[:512])
    f.page(ind[1])[: (n - 512) * 8] = encode_segments(segs[512:])
    payload = os.urandom(n * 4096)
    for i, p in enumerate(data_pages):
        f.page(p)[:] = payload[i * 4096 : (i + 1) * 4096]
    assert f.call(abi.encode_indirect(Op.WRITE, 1, 16, n, ind)) == Status.OKAY
    for p in data_pages:
        f.page(p)[:] = bytes(4096)
    f.submit([abi.encode_indirect(Op.READ, 2, 16, n, ind)])
    ((rid, op, status),) = f.wait(1)
    assert (rid, op, status) == (2, Op.READ, Status.OKAY)  # answered with the inner op
    assert b"".join(bytes(f.page(p)) for p in data_pages) == payload
    assert f.call(abi.encode_indirect(Op.READ, 3, 0, 1025, ind)) == Status.ERROR


def test_read_only_device(tmp_path: Path) -> None:
    vhd.create(tmp_path / "disk.vhd", SIZE).close()
    r = Rig(tmp_path, X86_64, 0, read_only=True)
    try:
        f, abi = r.front, r.front.abi
        (p,) = f.alloc(1)
        assert f.call(abi.encode_rw(Op.READ, 1, 0, [(p, 0, 7)])) == Status.OKAY
        for data in (
            abi.encode_rw(Op.WRITE, 2, 0, [(p, 0, 7)]),
            abi.encode_rw(Op.FLUSH_DISKCACHE, 3, 0, [], nr_segments=0),
            abi.encode_rw(Op.WRITE_BARRIER, 4, 0, [], nr_segments=0),
            abi.encode_discard(5, 0, 8),
        ):
            assert f.call(data) == Status.ERROR
    finally:
        r.close()


class SlowDisk:
    """Delegates to a Disk; reads at offset 0 are slow, and every operation is logged."""

    def __init__(self, disk: vhd.Disk) -> None:
        self.disk = disk
        self.size = disk.size
        self.read_only = disk.read_only
        self.log: list[tuple[str, int]] = []

    def preadinto(self, buffer: memoryview, offset: int) -> int:
        if offset == 0:
            time.sleep(0.2)
        self.log.append(("read", offset))
        return self.disk.preadinto(buffer, offset)

    def pwrite(self, data: memoryview, offset: int) -> int:
        if offset == 0:
            time.sleep(0.2)
        n = self.disk.pwrite(data, offset)
        self.log.append(("write", offset))
        return n

    def flush(self) -> None:
        self.log.append(("flush", 0))
        self.disk.flush()

    def discard(self, offset: int, length: int) -> None:
        self.disk.discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.disk.write_zeroes(offset, length)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[vhd.Extent]:
        return self.disk.extents(offset, length)


def test_out_of_order_and_barrier_drain(rig: Rig) -> None:
    slow = SlowDisk(rig.disk)
    rig.executor.disk = slow  # the executor's documented attribute: swap in the logging proxy
    f, abi = rig.front, rig.front.abi
    pages = f.alloc(4)
    f.submit(
        [
            abi.encode_rw(Op.READ, 1, 0, [(pages[0], 0, 7)]),  # slow
            abi.encode_rw(Op.READ, 2, 8, [(pages[1], 0, 7)]),
        ]
    )
    got = f.wait(2)
    assert [r[0] for r in got] == [2, 1]  # completion order is free: the fast one came first
    slow.log.clear()
    f.submit(
        [
            abi.encode_rw(Op.WRITE, 3, 0, [(pages[0], 0, 7)]),  # slow write before the barrier
            abi.encode_rw(Op.WRITE_BARRIER, 4, 16, [(pages[1], 0, 7)]),
            abi.encode_rw(Op.WRITE, 5, 24, [(pages[2], 0, 7)]),  # must not start before the barrier
        ]
    )
    got = f.wait(3)
    assert [r[0] for r in got] == [3, 4, 5]
    assert slow.log == [("write", 0), ("flush", 0), ("write", 8192), ("flush", 0), ("write", 12288)]


def test_linux_empty_flush_and_barrier_are_flushes(rig: Rig) -> None:
    """Linux blkfront's empty flush: FLUSH_DISKCACHE, 0 segments, sector_number 2**64-1 (and
    the same for an empty barrier).  Answered OKAY after a real flush of the disk."""
    slow = SlowDisk(rig.disk)
    rig.executor.disk = slow
    f, abi = rig.front, rig.front.abi
    for rid, op in ((1, Op.FLUSH_DISKCACHE), (2, Op.WRITE_BARRIER)):
        slow.log.clear()
        assert f.call(abi.encode_rw(op, rid, 2**64 - 1, [], nr_segments=0)) == Status.OKAY
        assert ("flush", 0) in slow.log and all(k == "flush" for k, _ in slow.log)
    # Requests with data are still range-checked.
    (p,) = f.alloc(1)
    assert f.call(abi.encode_rw(Op.FLUSH_DISKCACHE, 3, 2**64 - 1, [(p, 0, 7)])) == Status.ERROR


def test_adaptive_inline_falls_back_to_pool(tmp_path: Path) -> None:
    """Small requests run inline while they are fast; once they look like real disk I/O the
    ring hands them to the pool again, so one slow read no longer blocks the others."""
    vhd.create(tmp_path / "disk.vhd", SIZE).close()
    r = Rig(tmp_path, X86_64, 0)
    try:
        ring = r.ring
        ring.inline_max = 65536
        f, abi = r.front, r.front.abi
        pages = f.alloc(2)
        for i in range(20):  # fast: inline
            assert f.call(abi.encode_rw(Op.READ, i, 8, [(pages[0], 0, 7)])) == Status.OKAY
        assert ring.stats.inline >= 1  # (a loaded host may already have pushed some out)
        slow = SlowDisk(r.disk)
        r.executor.disk = slow
        ring._inline_slow = False  # white box: start from "fast" whatever the host load did
        ring._inline_times = [1.0] * 15  # the slow read below completes a slow window
        before = ring.stats.inline
        assert f.call(abi.encode_rw(Op.READ, 99, 0, [(pages[0], 0, 7)])) == Status.OKAY  # 0.2 s
        assert ring.stats.inline == before + 1
        f.submit(
            [
                abi.encode_rw(Op.READ, 100, 0, [(pages[0], 0, 7)]),  # slow, now on the pool
                abi.encode_rw(Op.READ, 101, 8, [(pages[1], 0, 7)]),
            ]
        )
        got = f.wait(2)
        assert [g[0] for g in got] == [101, 100]  # the fast one overtook the slow one
        assert ring.stats.inline == before + 1
    finally:
        r.close()


def test_stop_answers_everything_published(rig: Rig) -> None:
    """Teardown serves what was published before the stop: nothing left unanswered at Closed."""
    f, abi = rig.front, rig.front.abi
    pages = f.alloc(32)
    time.sleep(0.05)  # let the ring thread go to sleep (req_event armed)
    f.ring.push_requests()
    for i in range(32):
        f.ring.put_request(abi.encode_rw(Op.READ, 500 + i, 8 * i, [(pages[i], 0, 7)]))
    f.ring.push_requests()  # published, but no notification: the backend is asleep
    rig.device.stop()
    got = f.ring.take_responses()
    assert sorted(r[0] for r in got) == [500 + i for i in range(32)]
    assert rig.xen.grants.mapped == 0


def test_a_restarted_backend_attaches_where_the_ring_stands(rig: Rig) -> None:
    """A backend that dies under a connected guest and comes back (BACK_RING_ATTACH at the
    shared rsp_prod): the requests published while it was gone are answered, once each, and
    I/O goes on -- past more requests than the ring holds, so attaching at 0 would halt."""
    f, abi = rig.front, rig.front.abi
    (p,) = f.alloc(1)
    n = f.ring.nr_ents + 8
    for i in range(n):
        f.page(p)[:] = bytes([i % 251]) * 4096
        assert f.call(abi.encode_rw(Op.WRITE, i, 8 * i, [(p, 0, 7)])) == Status.OKAY
    rig.device.stop()  # gone; the guest's ring and grants stay as they are
    # On Xen the frontend's port falls back to unbound when the backend's end closes; the
    # simulated hub hands out a port once, so the guest offers a fresh one.
    f.evtchn.close()
    f.evtchn = alloc_unbound_port(rig.xen.directory)
    pages = f.alloc(3)
    f.submit([abi.encode_rw(Op.READ, 1000 + i, 8 * i, [(q, 0, 7)]) for i, q in enumerate(pages)])
    rig.device = BlkifDevice(
        rig.xen, 1, read_frontend(rig.front.keys().get), BlkifEngine(rig.config), rig.executor
    )
    rig.device.start()
    got = f.wait(3)
    assert sorted(r[0] for r in got) == [1000, 1001, 1002]
    assert all(status == Status.OKAY for _, _, status in got)
    for i, q in enumerate(pages):
        assert bytes(f.page(q)) == bytes([i % 251]) * 4096
    assert f.call(abi.encode_rw(Op.READ, 2000, 0, [(p, 0, 7)])) == Status.OKAY


def test_a_ring_with_more_requests_than_slots_is_refused_at_connect(rig: Rig) -> None:
    rig.device.stop()
    f = rig.front
    f.evtchn.close()
    f.evtchn = alloc_unbound_port(rig.xen.directory)
    f.ring.view[0:4] = (f.ring.nr_ents + 1).to_bytes(4, "little")  # req_prod past rsp_prod=0
    with pytest.raises(RemoteProtocolError, match="past rsp_prod"):
        BlkifDevice(rig.xen, 1, read_frontend(f.keys().get), BlkifEngine(rig.config), rig.executor)
