"""The grant-copy data path of ``blockback/transport/xen.py`` through the whole blkif backend.

The ring and the data go through :class:`XenTransport` over the fake gntdev of
``test_xen.py`` (guest memory is a file; the fake ``IOCTL_GNTDEV_GRANT_COPY`` reads the
segment array the transport built and performs each copy, failing revoked or read-only refs with
the hypervisor's status codes); only the event channels come from the simulated hypervisor.  The
disk is a real dynamic VHD, checked against a bytearray model and re-read after the run.
"""

from __future__ import annotations

import errno
import inspect
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vhd
from blockback import errors
from blockback.abi import X86_64, Op, Status, encode_segments
from blockback.device import BlkifDevice
from blockback.engine import BlkifEngine, DeviceConfig
from blockback.executor import RequestExecutor
from blockback.transport import bounce, xen, xen_abi, xen_devices
from blockback.transport.sim import SimEventChannel, SimEventHub, alloc_unbound_port
from blockback.xenbus import read_frontend
from tests.blockback.pyfront import FrontRing, SimFrontend
from tests.blockback.transport.test_xen import DOMID, FakeHypervisor

SIZE = 16 * 1024 * 1024
PAGES = 2048  # guest memory: ring page(s) first, then data and indirect pages


class FlakyDisk:
    """A ``vhd.Disk`` whose reads fail at chosen offsets (everything else passes through)."""

    def __init__(self, disk: Any) -> None:
        self.disk = disk
        self.fail_reads_at: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.disk, name)

    def preadinto(self, buffer: Any, offset: int) -> int:
        if offset in self.fail_reads_at:
            raise OSError(errno.EIO, "injected read error")
        n: int = self.disk.preadinto(buffer, offset)
        return n


class HybridTransport:
    """Rings and data through the (fake-device) Xen transport, event channels simulated."""

    def __init__(self, xen_transport: xen.XenTransport, events: SimEventHub) -> None:
        self.xen = xen_transport
        self.events = events
        self.mappers: list[xen.XenGrantMapper] = []

    def map_ring(self, domid: int, refs: Any) -> Any:
        return self.xen.map_ring(domid, refs)

    def unmap_ring(self, memory: Any) -> None:
        self.xen.unmap_ring(memory)

    def grant_mapper(self, domid: int) -> xen.XenGrantMapper:
        mapper = self.xen.grant_mapper(domid)
        self.mappers.append(mapper)
        return mapper

    def bind_interdomain(self, domid: int, port: int) -> SimEventChannel:
        return self.events.bind_interdomain(domid, port)


class XenFront(SimFrontend):
    """The Python frontend of pyfront.py, its ring and pages in the fake gntdev's memory."""

    def __init__(self, hv: FakeHypervisor, directory: Path) -> None:
        self.hv = hv
        self.abi = X86_64
        self.order = 0
        self.ring_refs = [0]
        self._mem = memoryview(hv.mem)
        self.ring = FrontRing(self._mem[:4096], X86_64, 0)
        self.evtchn = alloc_unbound_port(directory)
        self._next = 1
        self.notifications = 0

    def alloc(self, n: int, read_only: bool = False) -> list[int]:
        pages = list(range(self._next, self._next + n))
        self._next += n
        assert self._next <= self.hv.pages
        return pages

    def page(self, gref: int) -> memoryview:
        return self._mem[gref * 4096 : (gref + 1) * 4096]

    def close(self) -> None:
        self.evtchn.close()
        self.ring.view.release()
        self._mem.release()


class Rig:
    def __init__(
        self,
        tmp: Path,
        *,
        data_path: str = "copy",
        inline_max: int = 0,
        pool_bytes: int = bounce.DEFAULT_POOL_BYTES,
        workers: int = 4,
    ) -> None:
        self.hv = FakeHypervisor(tmp / "gntdev", PAGES)
        (tmp / "evtchn").write_bytes(b"")
        self.xen = xen.XenTransport(
            str(self.hv.memory_path),
            str(tmp / "evtchn"),
            ioctl=self.hv.ioctl,
            data_path=data_path,
            pool_bytes=pool_bytes,
        )
        self.events = SimEventHub(tmp)
        self.transport = HybridTransport(self.xen, self.events)
        self.path = tmp / "disk.vhd"
        vhd.create(self.path, SIZE).close()  # dynamic: blocks are allocated by our writes
        self.disk = FlakyDisk(vhd.open(self.path, "r+"))
        self.front = XenFront(self.hv, tmp)
        self.executor = RequestExecutor(self.disk, workers=workers)
        params = read_frontend(self.front.keys().get)
        self.device = BlkifDevice(
            self.transport,
            DOMID,
            params,
            BlkifEngine(DeviceConfig(sectors=SIZE // 512)),
            self.executor,
            name="xen-copy",
            inline_max=inline_max,
        )
        self.device.start()
        self.model = bytearray(SIZE)

    @property
    def mapper(self) -> xen.XenGrantMapper:
        return self.transport.mappers[0]

    @property
    def pool(self) -> bounce.BouncePool:
        return self.mapper.pool

    def copies_since(self, mark: int) -> list[list[tuple[int, int, int, bool]]]:
        return self.hv.copies[mark:]

    def close(self) -> None:
        self.device.stop()
        self.executor.close()
        self.front.close()
        self.events.close()
        self.xen.close()
        self.disk.close()
        self.hv.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def fill(rig: Rig, pages: list[int], rnd: random.Random) -> None:
    for p in pages:
        rig.front.page(p)[:] = rnd.randbytes(4096)


def guest_bytes(rig: Rig, segs: list[tuple[int, int, int]]) -> bytes:
    return b"".join(bytes(rig.front.page(g)[a * 512 : (b + 1) * 512]) for g, a, b in segs)


@pytest.mark.parametrize("data_path", ["copy", "map"])
def test_random_round_trips_against_a_model(tmp_path: Path, data_path: str) -> None:
    rig = Rig(tmp_path, data_path=data_path)
    try:
        f, abi = rig.front, rig.front.abi
        pages = f.alloc(11)
        rnd = random.Random(7)
        for rid in range(400):
            n = rnd.randint(1, 11)
            segs = []
            for p in pages[:n]:
                first = rnd.randrange(8)
                segs.append((p, first, rnd.randrange(first, 8)))
            length = sum((b - a + 1) * 512 for _, a, b in segs)
            sector = rnd.randrange(0, (SIZE - length) // 512 + 1)
            start = sector * 512
            if rnd.random() < 0.5:
                fill(rig, pages[:n], rnd)
                assert f.call(abi.encode_rw(Op.WRITE, rid, sector, segs)) == Status.OKAY
                rig.model[start : start + length] = guest_bytes(rig, segs)
            else:
                fill(rig, pages[:n], rnd)  # stale guest bytes must all be overwritten
                assert f.call(abi.encode_rw(Op.READ, rid, sector, segs)) == Status.OKAY
                assert guest_bytes(rig, segs) == rig.model[start : start + length]
        ring_maps = 1
        if data_path == "copy":
            assert rig.hv.ioctl_count("map") == ring_maps  # no data page was ever mapped
            assert rig.pool.in_use == 0  # every bounce buffer went back
        else:
            assert rig.hv.ioctl_count("map") == ring_maps + 400
            assert rig.hv.ioctl_count("copy") == 0
        rig.device.stop()
        rig.disk.flush()
        with vhd.open(rig.path, force_share=True) as again:  # rig.disk is still open
            assert again.pread(SIZE, 0) == bytes(rig.model)
    finally:
        rig.close()


def test_indirect_round_trip_one_copy_per_direction(rig: Rig) -> None:
    f, abi = rig.front, rig.front.abi
    n = 600
    data = f.alloc(n)
    ind = f.alloc(2)
    segs = [(p, 1, 6) for p in data]  # 3 KiB of each page, at 512 B into it
    f.page(ind[0])[:] = encode_segments(segs[:512])
    f.page(ind[1])[: (n - 512) * 8] = encode_segments(segs[512:])
    fill(rig, data, random.Random(3))
    payload = guest_bytes(rig, segs)
    mark = len(rig.hv.copies)
    assert f.call(abi.encode_indirect(Op.WRITE, 1, 64, n, ind)) == Status.OKAY
    # One grant copy for the descriptor pages, one for all 600 data segments.
    batches = rig.copies_since(mark)
    assert [len(b) for b in batches] == [2, n]
    assert batches[1] == [(p, 512, 3072, False) for p in data]
    fill(rig, data, random.Random(4))
    mark = len(rig.hv.copies)
    f.submit([abi.encode_indirect(Op.READ, 2, 64, n, ind)])
    assert f.wait(1) == [(2, Op.READ, Status.OKAY)]  # answered with the inner op
    assert guest_bytes(rig, segs) == payload
    batches = rig.copies_since(mark)
    assert [len(b) for b in batches] == [2, n]
    assert batches[1] == [(p, 512, 3072, True) for p in data]
    rig.disk.flush()
    with vhd.open(rig.path, force_share=True) as again:  # rig.disk is still open
        assert again.pread(len(payload), 64 * 512) == payload


def test_failed_copy_in_answers_error_and_writes_nothing(rig: Rig) -> None:
    f, abi = rig.front, rig.front.abi
    pages = f.alloc(11)
    fill(rig, pages, random.Random(5))
    sector = 4 * 2048 * 2  # a block of its own (2 MiB blocks): nothing allocated there yet
    rig.hv.revoked.add(pages[6])  # one segment of eleven
    mark = len(rig.hv.copies)
    segs = [(p, 0, 7) for p in pages]
    assert f.call(abi.encode_rw(Op.WRITE, 1, sector, segs)) == Status.ERROR
    assert len(rig.copies_since(mark)) == 1  # the one batched copy-in, then nothing
    assert rig.mapper.copy_failures == 1
    assert rig.pool.in_use == 0
    rig.disk.flush()
    with vhd.open(rig.path, force_share=True) as again:  # rig.disk is still open
        assert [e.layer for e in again.extents(sector * 512, 11 * 4096)] == [None]
        assert again.pread(11 * 4096, sector * 512) == bytes(11 * 4096)
    # The ring carries on: the same write without the bad page succeeds.
    rig.hv.revoked.clear()
    assert f.call(abi.encode_rw(Op.WRITE, 2, sector, segs)) == Status.OKAY
    assert rig.disk.pread(11 * 4096, sector * 512) == guest_bytes(rig, segs)


def test_failed_copy_out_answers_error(rig: Rig) -> None:
    f, abi = rig.front, rig.front.abi
    pages = f.alloc(4)
    fill(rig, pages, random.Random(6))
    segs = [(p, 0, 7) for p in pages]
    assert f.call(abi.encode_rw(Op.WRITE, 1, 0, segs)) == Status.OKAY
    rig.hv.read_only.add(pages[2])  # the guest granted this page without write access
    mark = len(rig.hv.copies)
    assert f.call(abi.encode_rw(Op.READ, 2, 0, segs)) == Status.ERROR
    assert [len(b) for b in rig.copies_since(mark)] == [4]
    rig.hv.read_only.clear()
    assert f.call(abi.encode_rw(Op.READ, 3, 0, segs)) == Status.OKAY
    assert rig.pool.in_use == 0


def test_failed_disk_read_copies_nothing_to_the_guest(rig: Rig) -> None:
    f, abi = rig.front, rig.front.abi
    pages = f.alloc(2)
    secret = b"S" * 8192
    rig.front.page(pages[0])[:] = secret[:4096]
    rig.front.page(pages[1])[:] = secret[4096:]
    segs = [(p, 0, 7) for p in pages]
    assert f.call(abi.encode_rw(Op.WRITE, 1, 0, segs)) == Status.OKAY
    assert f.call(abi.encode_rw(Op.READ, 2, 0, segs)) == Status.OKAY  # the pool holds "S"s now
    for p in pages:
        rig.front.page(p)[:] = b"\xee" * 4096
    rig.disk.fail_reads_at.add(1 << 20)
    mark = len(rig.hv.copies)
    assert f.call(abi.encode_rw(Op.READ, 3, (1 << 20) // 512, segs)) == Status.ERROR
    assert rig.copies_since(mark) == []  # nothing, stale or not, reached the guest
    assert guest_bytes(rig, segs) == b"\xee" * 8192
    assert rig.pool.in_use == 0


def test_one_copy_ioctl_per_request_and_per_batch(tmp_path: Path) -> None:
    rig = Rig(tmp_path, inline_max=1 << 20)
    try:
        f, abi = rig.front, rig.front.abi
        pages = f.alloc(11 * 16)
        fill(rig, pages, random.Random(8))
        segs = [(p, 0, 7) for p in pages[:11]]
        mark = len(rig.hv.calls)
        assert f.call(abi.encode_rw(Op.WRITE, 1, 0, segs)) == Status.OKAY
        assert [c for c in rig.hv.calls[mark:] if c[0] != "notify"] == [("copy", 11)]
        mark = len(rig.hv.calls)
        assert f.call(abi.encode_rw(Op.READ, 2, 0, segs)) == Status.OKAY
        assert [c for c in rig.hv.calls[mark:] if c[0] != "notify"] == [("copy", 11)]
        # Sixteen reads published at once are taken in one wake-up and run inline (the first
        # sixteen always are): their data reaches the guest in ONE grant copy.
        reads = [
            abi.encode_rw(Op.READ, 100 + i, i * 88, [(p, 0, 7) for p in pages[i * 11 :][:11]])
            for i in range(16)
        ]
        mark = len(rig.hv.copies)
        f.submit(reads)
        got = f.wait(16)
        assert sorted(r[0] for r in got) == [100 + i for i in range(16)]
        assert all(status == Status.OKAY for _, _, status in got)
        assert [len(b) for b in rig.copies_since(mark)] == [16 * 11]
    finally:
        rig.close()


def test_map_path_costs_two_ioctls_per_request(tmp_path: Path) -> None:
    """The comparison the copy path is for: map + unmap per request (plus mmap/munmap)."""
    rig = Rig(tmp_path, data_path="map")
    try:
        f, abi = rig.front, rig.front.abi
        segs = [(p, 0, 7) for p in f.alloc(11)]
        mark = len(rig.hv.calls)
        assert f.call(abi.encode_rw(Op.READ, 1, 0, segs)) == Status.OKAY
        assert [c[0] for c in rig.hv.calls[mark:] if c[0] != "notify"] == ["map", "unmap"]
    finally:
        rig.close()


def test_bounce_buffers_are_reused(rig: Rig) -> None:
    f, abi = rig.front, rig.front.abi
    n = f.ring.nr_ents  # 32 requests in flight at once, 11 pages each
    pages = f.alloc(11 * n)
    fill(rig, pages, random.Random(9))
    for round_ in range(10):
        op = Op.WRITE if round_ % 2 == 0 else Op.READ
        reqs = [
            abi.encode_rw(op, i, i * 88, [(p, 0, 7) for p in pages[i * 11 :][:11]])
            for i in range(n)
        ]
        f.submit(reqs)
        assert all(status == Status.OKAY for _, _, status in f.wait(n))
    # 320 requests of 44 KiB: at most one ring's worth of buffers was ever created.
    assert rig.pool.allocated <= n
    assert rig.pool.in_use == 0
    assert rig.pool.free_bytes == rig.pool.allocated * 16 * 4096  # 11 pages -> 16-page class
    for _ in range(50):  # sequential requests reuse what is there: nothing new
        assert f.call(abi.encode_rw(Op.READ, 1, 0, [(pages[0], 0, 7)] * 11)) == Status.OKAY
    assert rig.pool.allocated <= n


def test_pool_keeps_at_most_its_budget(tmp_path: Path) -> None:
    rig = Rig(tmp_path, pool_bytes=256 * 1024)
    try:
        f, abi = rig.front, rig.front.abi
        n = f.ring.nr_ents
        pages = f.alloc(11 * n)
        for _ in range(3):
            reqs = [
                abi.encode_rw(Op.WRITE, i, i * 88, [(p, 0, 7) for p in pages[i * 11 :][:11]])
                for i in range(n)
            ]
            f.submit(reqs)
            assert all(status == Status.OKAY for _, _, status in f.wait(n))
        assert rig.pool.in_use == 0
        assert rig.pool.free_bytes <= 256 * 1024
    finally:
        rig.close()


def test_finish_mappings_batches_and_reports_each_request(
    tmp_path: Path,
) -> None:
    hv = FakeHypervisor(tmp_path / "gntdev", 64)
    (tmp_path / "evtchn").write_bytes(b"")
    transport = xen.XenTransport(str(hv.memory_path), str(tmp_path / "evtchn"), ioctl=hv.ioctl)
    try:
        mapper = transport.grant_mapper(DOMID)
        a = mapper.map_segments([(10, 0, 4096), (11, 512, 1024)], writable=True)
        b = mapper.map_segments([(12, 0, 4096)], writable=True)
        c = mapper.map_segments([(13, 0, 512), (14, 0, 512)], writable=True)
        assert all(isinstance(m, xen.XenCopyMapping) for m in (a, b, c))
        assert isinstance(a, xen.XenCopyMapping)
        assert hv.ioctl_count("copy") == 0  # reads: nothing to fetch from the guest
        assert [len(m.buffers) for m in (a, b, c)] == [1, 1, 1]  # one contiguous buffer each
        for m, byte in ((a, b"a"), (b, b"b"), (c, b"c")):
            m.buffers[0][:] = byte * len(m.buffers[0])
        hv.read_only.add(14)
        results = mapper.finish_mappings([(a, True), (b, False), (c, True)])
        assert results == [True, False, False]
        assert hv.copies == [
            [(10, 0, 4096, True), (11, 512, 1024, True), (13, 0, 512, True), (14, 0, 512, True)]
        ]
        assert hv.page(10) == b"a" * 4096 and hv.page(11)[512:1536] == b"a" * 1024
        assert hv.page(12) == bytes(4096)  # b failed on the disk: not copied
        assert a.finish(True) is True  # already finished: no second copy
        assert len(hv.copies) == 1
        for m in (a, b, c):
            m.release()
            m.release()  # idempotent
        assert mapper.pool.in_use == 0 and mapper.pool.allocated == 3  # one 2-page, two 1-page
        # A write's data is fetched at map time, in one ioctl, into private memory.
        hv.mem[20 * 4096 : 21 * 4096] = b"w" * 4096
        w = mapper.map_segments([(20, 0, 4096), (20, 0, 512)], writable=False)
        assert hv.copies[-1] == [(20, 0, 4096, False), (20, 0, 512, False)]
        hv.mem[20 * 4096 : 21 * 4096] = b"x" * 4096  # the guest changes it afterwards
        assert w.buffers[0].tobytes() == b"w" * 4608  # what we write is what we fetched
        assert mapper.finish_mappings([(w, True)]) == [True]
        w.release()
        assert mapper.pool.allocated == 3  # a's 2-page buffer again
        hv.revoked.add(21)
        with pytest.raises(errors.GrantError, match="ref 21"):
            mapper.map_segments([(20, 0, 512), (21, 0, 512)], writable=False)
        assert mapper.pool.in_use == 0
    finally:
        transport.close()
        hv.close()


def test_copy_path_is_the_default_and_options_are_checked(tmp_path: Path) -> None:
    assert inspect.signature(xen.XenTransport).parameters["data_path"].default == "copy"
    hv = FakeHypervisor(tmp_path / "gntdev", 8)
    try:
        with pytest.raises(ValueError, match="data_path"):
            xen.XenTransport(str(hv.memory_path), str(tmp_path), ioctl=hv.ioctl, data_path="x")
        t = xen.XenTransport(str(hv.memory_path), str(tmp_path), ioctl=hv.ioctl)
        assert t.grant_mapper(DOMID).data_path == "copy"
        t.close()
    finally:
        hv.close()


def test_copy_raw_builds_the_segments_encode_copy_segment_does(tmp_path: Path) -> None:
    """``copy_raw`` packs with structs; ``encode_copy_segment`` (ctypes) is checked against the
    C header by test_xen_abi.py: the bytes must agree, and statuses come back per segment."""
    seen: list[bytes] = []

    def ioctl(fd: int, request: int, arg: Any, mutate: bool = False) -> int:
        assert request == xen_abi.IOCTL_GNTDEV_GRANT_COPY and mutate
        head = xen_abi.GntdevGrantCopy.from_buffer(arg)
        segs = (xen_abi.GntdevGrantCopySegment * head.count).from_address(head.segments)
        seen.append(bytes(segs))
        for i, seg in enumerate(segs):
            seg.status = -i
        return 0

    (tmp_path / "gntdev").write_bytes(b"")
    dev = xen_devices.GntDev(str(tmp_path / "gntdev"), ioctl=ioctl)
    entries = [
        (7, 1234, 512, 0x7F00_1234_5000, 3072, True),
        (65535, 0xFFFF_FFFF, 0, 0x1000, 4096, False),
        (1, 5, 4095, 0xDEAD_BEEF_0000, 1, True),
    ]
    assert dev.copy_raw(entries) == [0, -1, -2]
    expected = b"".join(
        xen_abi.encode_copy_segment(
            xen_abi.CopyOp(domid, gref, offset, bytearray(length), to_guest), address
        )
        for domid, gref, offset, address, length, to_guest in entries
    )
    assert seen == [expected]
    with pytest.raises(ValueError, match="4 KiB frame"):
        dev.copy_raw([(1, 1, 4000, 0x1000, 200, False)])
    assert len(seen) == 1  # refused before the ioctl
    dev.close()
