"""The xenbus handshake over the test xenstored: SimBackend + a Python frontend (checklist 2, 3,
14, 15 and the connect/close churn of 12)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vhd
from blockback.abi import X86_32, X86_64, Abi, Op, Status
from blockback.sim import SimBackend
from blockback.xenstore import XenStoreClient

from .pyfront import SimFrontend

SIZE = 4 * 1024 * 1024


def wait_for(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.001)


class Guest:
    """The frontend's xenbus side (like Linux blkfront's talk_to_blkback), in Python."""

    def __init__(self, sim: SimBackend) -> None:
        self.sim = sim
        self.xs = XenStoreClient(sim.frontend_xenstored_path)  # as domain 1
        self.fe = sim.frontend_path
        self.be = self.xs.read_text(f"{self.fe}/backend")
        self.front: SimFrontend | None = None

    def be_state(self) -> int:
        return int(self.xs.read_text(f"{self.be}/state"))

    def wait_be(self, state: int) -> None:
        wait_for(lambda: self.be_state() == state)

    def connect(self, layout: Abi = X86_64, order: int = 0, extra: dict[str, str] | None = None,
                queues: int = 1) -> SimFrontend:  # fmt: skip
        self.wait_be(2)
        front = SimFrontend(str(self.sim.directory), layout, order, first_page=100)
        keys = front.keys()
        if queues > 1:  # one real ring in queue-0, and no second ring: only used for refusal
            keys = {
                f"queue-0/{k}": v
                for k, v in keys.items()
                if k not in ("protocol", "ring-page-order")
            }
            keys.update({"multi-queue-num-queues": str(queues), "protocol": layout.name})
            if order:
                keys["ring-page-order"] = str(order)
        keys.update(extra or {})
        tx = self.xs.transaction_start()
        for k, v in keys.items():
            self.xs.write(f"{self.fe}/{k}", v, tx)
        self.xs.write(f"{self.fe}/state", "3", tx)
        self.xs.transaction_end(tx)
        self.front = front
        return front

    def close(self) -> None:
        self.xs.write(f"{self.fe}/state", "5")
        self.wait_be(5)
        self.xs.write(f"{self.fe}/state", "6")
        self.wait_be(6)
        if self.front is not None:
            self.front.close()
            self.front = None


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimBackend]:
    path = tmp_path / "d.vhd"
    vhd.create(path, SIZE).close()
    disk = vhd.open(path, "r+")
    s = SimBackend(tmp_path / "sim", disk, image=str(path), pages=2048).start()
    yield s
    s.stop()
    disk.close()


def test_handshake_keys_and_io(sim: SimBackend) -> None:
    g = Guest(sim)
    g.wait_be(2)
    be = {k: g.xs.read_text(f"{g.be}/{k}") for k in g.xs.directory(g.be)}
    assert be["max-ring-page-order"] == "4" and be["multi-queue-max-queues"] == "4"
    assert be["feature-max-indirect-segments"] == "1024" and be["hotplug-status"] == "connected"
    assert "sectors" not in be  # written only at connect
    front = g.connect(X86_32, 4)
    g.wait_be(4)
    be = {k: g.xs.read_text(f"{g.be}/{k}") for k in g.xs.directory(g.be)}
    assert be["sectors"] == str(SIZE // 512) and be["info"] == "0" and be["sector-size"] == "512"
    assert be["physical-sector-size"] == "512" and be["feature-flush-cache"] == "1"
    assert be["feature-barrier"] == "1" and be["feature-discard"] == "1"
    assert be["feature-persistent"] == "0"
    (p,) = front.alloc(1)
    front.page(p)[:] = b"x" * 4096
    assert front.call(X86_32.encode_rw(Op.WRITE, 1, 8, [(p, 0, 7)])) == Status.OKAY
    g.close()
    assert sim.xen.grants.mapped == 0


@pytest.mark.parametrize(
    "extra, queues",
    [
        ({"ring-page-order": "5"}, 1),
        ({"protocol": "sparc-abi"}, 1),
        ({}, 5),
        ({"multi-queue-num-queues": "0"}, 1),
    ],
)
def test_refused_frontends(sim: SimBackend, extra: dict[str, str], queues: int) -> None:
    g = Guest(sim)
    g.connect(X86_64, 0, extra, queues=queues)
    g.wait_be(5)  # error state: Closing with an error node, no crash
    assert g.xs.read_text(f"{g.be}/error")
    g.close()  # and the device still closes and reconnects afterwards
    g.xs.write(f"{g.fe}/state", "1")
    g.wait_be(2)
    for k in ("ring-page-order", "multi-queue-num-queues", "protocol"):
        g.xs.rm(f"{g.fe}/{k}")
    for k in list(g.xs.directory(g.fe)):
        if k.startswith("queue-"):
            g.xs.rm(f"{g.fe}/{k}")
    front = g.connect(X86_64, 0)
    g.wait_be(4)
    (p,) = front.alloc(1)
    assert front.call(X86_64.encode_rw(Op.READ, 1, 0, [(p, 0, 7)])) == Status.OKAY
    g.close()


def test_multi_queue_layout(sim: SimBackend) -> None:
    g = Guest(sim)
    g.wait_be(2)
    a = SimFrontend(str(sim.directory), X86_64, 1, first_page=100)
    b = SimFrontend(str(sim.directory), X86_64, 1, first_page=200)
    keys = {"multi-queue-num-queues": "2", "ring-page-order": "1", "protocol": "x86_64-abi"}
    for q, f in enumerate((a, b)):
        keys.update({f"queue-{q}/ring-ref{i}": str(r) for i, r in enumerate(f.ring_refs)})
        keys[f"queue-{q}/event-channel"] = str(f.evtchn.port)
    for k, v in keys.items():
        g.xs.write(f"{g.fe}/{k}", v)
    g.xs.write(f"{g.fe}/state", "3")
    g.wait_be(4)
    for rid, f in enumerate((a, b)):
        (p,) = f.alloc(1)
        assert f.call(X86_64.encode_rw(Op.READ, rid, 0, [(p, 0, 7)])) == Status.OKAY
    g.close()
    a.close()
    b.close()


def test_resize(sim: SimBackend) -> None:
    g = Guest(sim)
    g.connect()
    g.wait_be(4)
    g.xs.watch(f"{g.be}/state", "be")
    while g.xs.read_watch(0.2) is not None:
        pass
    sim.driver.disk = GrownDisk(sim.driver.disk, SIZE * 2)
    sim.driver.resize()
    event = g.xs.read_watch(5)
    assert event is not None and event.token == "be"
    assert g.xs.read_text(f"{g.be}/sectors") == str(2 * SIZE // 512)
    assert g.be_state() == 4
    g.close()


class GrownDisk:
    def __init__(self, disk: Any, size: int) -> None:
        self._disk = disk
        self.size = size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._disk, name)


def test_teardown_reconnect_and_churn(sim: SimBackend) -> None:
    """1000 connect/close cycles (3 <-> 6 <-> 1): no leak of ports, mappings, descriptors,
    threads or memory."""
    import gc
    import os
    import threading
    import tracemalloc

    g = Guest(sim)
    threads = threading.active_count()
    front = g.connect()
    g.wait_be(4)
    fds = 0
    for cycle in range(1000):
        if cycle == 600:  # warmed up: from here on, nothing may accumulate
            gc.collect()
            fds = len(os.listdir("/proc/self/fd"))
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
        g.xs.write(f"{g.fe}/state", "6")
        g.wait_be(6)
        g.xs.write(f"{g.fe}/state", "1")
        g.wait_be(2)
        front.close()
        front = g.connect()
        g.wait_be(4)
        if cycle % 250 == 0:
            (p,) = front.alloc(1)
            assert front.call(X86_64.encode_rw(Op.READ, cycle, 0, [(p, 0, 7)])) == Status.OKAY
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 400_000, f"{grown} bytes more after 400 cycles"  # < 1 KiB per cycle
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
    g.close()
    assert sim.driver.connects == 1001
    assert sim.xen.grants.mapped == 0
    assert sim.xen.events.unbound == 0
    wait_for(lambda: threading.active_count() <= threads + 1)


def test_4k_native_vhdx(tmp_path: Path) -> None:
    """A 4K-native VHDX says sector-size 4096 (and its physical size) at connect, keeps sectors
    in 512-byte units, serves whole-sector I/O and answers a request that is not whole logical
    sectors with ERROR and no partial write, as Linux blkback does; libvhdi (the oracle) reads
    what the guest wrote."""
    from tests.interop.oracles import libvhdi_read
    from vhd.vhdx import create_vhdx

    path = tmp_path / "k.vhdx"
    create_vhdx(path, SIZE, block_size=1 << 20, logical_sector_size=4096).close()
    disk = vhd.open(path, "r+")
    sim = SimBackend(tmp_path / "sim", disk, image=str(path), pages=2048).start()
    try:
        g = Guest(sim)
        front = g.connect(X86_64, 0)
        g.wait_be(4)
        be = {k: g.xs.read_text(f"{g.be}/{k}") for k in g.xs.directory(g.be)}
        assert (be["sector-size"], be["physical-sector-size"]) == ("4096", "4096")
        assert be["sectors"] == str(SIZE // 512) and be["discard-granularity"] == "4096"
        p, q = front.alloc(2)
        front.page(p)[:] = b"A" * 4096
        front.page(q)[:] = b"B" * 4096
        # Two whole pages at 512-byte sector 16 (byte 8192).
        assert front.call(X86_64.encode_rw(Op.WRITE, 1, 16, [(p, 0, 7), (q, 0, 7)])) == 0
        for sector, segs in ((20, [(p, 0, 7)]), (24, [(p, 0, 3)]), (32, [(p, 0, 7), (q, 4, 7)])):
            assert front.call(X86_64.encode_rw(Op.WRITE, 2, sector, segs)) == Status.ERROR
            assert front.call(X86_64.encode_rw(Op.READ, 3, sector, segs)) == Status.ERROR
        assert front.call(X86_64.encode_discard(4, 4, 8)) == Status.ERROR
        front.page(q)[:] = bytes(4096)
        assert front.call(X86_64.encode_rw(Op.READ, 5, 16, [(q, 0, 7)])) == Status.OKAY
        assert bytes(front.page(q)) == b"A" * 4096
        g.close()
    finally:
        sim.stop()
        disk.close()
    libvhdi_read([path], tmp_path / "k.raw")
    data = (tmp_path / "k.raw").read_bytes()
    assert data[8192:16384] == b"A" * 4096 + b"B" * 4096
    assert data.count(0) == SIZE - 8192  # nothing of the refused requests landed
