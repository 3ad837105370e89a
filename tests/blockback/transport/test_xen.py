"""``blockback/transport/xen.py`` driven through fake devices (no hypervisor here).

The fake gntdev is a regular file standing for guest memory: a mapping of consecutive grant
references ``r..r+n`` gets the mmap offset ``r * 4096``, so what the transport maps *is* the guest
page, and the fake ``IOCTL_GNTDEV_GRANT_COPY`` reads the segment array the transport built in
memory (through the pointers it passed) and performs the copies. The fake evtchn is a socket pair
put in place of the device's descriptor: pending ports are u32s to read, unmasks u32s written.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockback import errors
from blockback.transport import xen, xen_abi, xen_devices

PAGES = 64
DOMID = 5


GNTST_BAD_GNTREF = -3  # xen/grant_table.h
GNTST_PERMISSION_DENIED = -8
GNTST_BAD_COPY_ARG = -10


class FakeHypervisor:
    """Guest memory of ``pages`` pages; ``revoked`` refs fail maps and copies, ``read_only``
    refs fail copies into the guest (as a grant without write access would)."""

    def __init__(self, memory_path: Path, pages: int = PAGES) -> None:
        with open(memory_path, "wb") as f:
            f.truncate(pages * xen_abi.PAGE_SIZE)
        self.pages = pages
        self.memory_path = memory_path
        fd = os.open(memory_path, os.O_RDWR)
        self.mem = mmap.mmap(fd, pages * xen_abi.PAGE_SIZE)
        os.close(fd)
        self._pin = ctypes.c_char.from_buffer(self.mem)
        self.mem_addr = ctypes.addressof(self._pin)
        self.calls: list[tuple[str, Any]] = []
        # Every grant-copy ioctl: [(ref, offset, len, to_guest)] per segment.
        self.copies: list[list[tuple[int, int, int, bool]]] = []
        self.revoked: set[int] = set()
        self.read_only: set[int] = set()
        self.next_port = 40

    def close(self) -> None:
        del self._pin
        self.mem.close()

    def ioctl_count(self, kind: str) -> int:
        return sum(1 for k, _ in self.calls if k == kind)

    def ioctl(self, fd: int, request: int, arg: Any, mutate: bool = False) -> int:
        # As fcntl.ioctl sees it: a structure must come as a writable buffer with mutate_flag
        # (an int is converted to a C int: a real address overflows it), results written into it.
        if request != xen_abi.IOCTL_EVTCHN_RESET:
            assert mutate and not isinstance(arg, int), "structures go as mutable buffers"
            assert not memoryview(arg).readonly
        if request == xen_abi.IOCTL_GNTDEV_MAP_GRANT_REF:
            head = xen_abi.GntdevMapGrantRef.from_buffer(arg)
            refs = (xen_abi.GntdevGrantRef * head.count).from_buffer(arg, 16)
            pairs = [(r.domid, r.ref) for r in refs]
            self.calls.append(("map", pairs))
            if any(d != DOMID for d, _ in pairs):
                raise OSError(errno.EINVAL, "wrong domain")
            first = pairs[0][1]
            if any(r in self.revoked for _, r in pairs):
                head.index = 123  # an index the mmap will refuse, as a failed map would
            elif [r for _, r in pairs] == list(range(first, first + len(pairs))):
                head.index = first * xen_abi.PAGE_SIZE
            else:
                raise OSError(errno.EINVAL, "the fake maps consecutive refs only")
            return 0
        if request == xen_abi.IOCTL_GNTDEV_UNMAP_GRANT_REF:
            unmap = xen_abi.GntdevUnmapGrantRef.from_buffer(arg)
            self.calls.append(("unmap", (unmap.index, unmap.count)))
            return 0
        if request == xen_abi.IOCTL_GNTDEV_SET_MAX_GRANTS:
            self.calls.append(("max", xen_abi.GntdevSetMaxGrants.from_buffer(arg).count))
            return 0
        if request == xen_abi.IOCTL_GNTDEV_GRANT_COPY:
            copy = xen_abi.GntdevGrantCopy.from_buffer(arg)
            segs = (xen_abi.GntdevGrantCopySegment * copy.count).from_address(copy.segments)
            self.calls.append(("copy", copy.count))
            batch: list[tuple[int, int, int, bool]] = []
            self.copies.append(batch)
            for seg in segs:
                to_guest = not seg.flags & xen_abi.GNTCOPY_SOURCE_GREF
                guest = seg.dest.foreign if to_guest else seg.source.foreign
                batch.append((guest.ref, guest.offset, seg.len, to_guest))
                if guest.domid != DOMID or guest.ref >= self.pages or guest.ref in self.revoked:
                    seg.status = GNTST_BAD_GNTREF
                    continue
                if to_guest and guest.ref in self.read_only:
                    seg.status = GNTST_PERMISSION_DENIED
                    continue
                if guest.offset + seg.len > xen_abi.PAGE_SIZE:
                    seg.status = GNTST_BAD_COPY_ARG
                    continue
                guest_addr = self.mem_addr + guest.ref * xen_abi.PAGE_SIZE + guest.offset
                if seg.flags & xen_abi.GNTCOPY_SOURCE_GREF:
                    ctypes.memmove(seg.dest.virt, guest_addr, seg.len)
                else:
                    ctypes.memmove(guest_addr, seg.source.virt, seg.len)
                seg.status = 0
            return 0
        if request == xen_abi.IOCTL_EVTCHN_BIND_INTERDOMAIN:
            bind = xen_abi.EvtchnBindInterdomain.from_buffer(arg)
            self.calls.append(("bind", (bind.remote_domain, bind.remote_port)))
            self.next_port += 1
            return self.next_port
        if request == xen_abi.IOCTL_EVTCHN_NOTIFY:
            self.calls.append(("notify", xen_abi.EvtchnNotify.from_buffer(arg).port))
            return 0
        if request == xen_abi.IOCTL_EVTCHN_UNBIND:
            self.calls.append(("unbind", xen_abi.EvtchnUnbind.from_buffer(arg).port))
            return 0
        raise OSError(errno.ENOTTY, f"unexpected ioctl {request:#x}")

    def last(self) -> tuple[str, Any]:
        return self.calls[-1]

    def page(self, ref: int) -> bytes:
        return self.mem[ref * xen_abi.PAGE_SIZE : (ref + 1) * xen_abi.PAGE_SIZE]


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[FakeHypervisor]:
    fake = FakeHypervisor(tmp_path / "gntdev")
    (tmp_path / "evtchn").write_bytes(b"")
    yield fake
    fake.close()


@pytest.fixture
def transport(hv: FakeHypervisor, tmp_path: Path) -> Iterator[xen.XenTransport]:
    t = xen.XenTransport(
        str(hv.memory_path), str(tmp_path / "evtchn"), ioctl=hv.ioctl, max_grants=128
    )
    yield t
    t.close()


@pytest.fixture
def map_transport(hv: FakeHypervisor, tmp_path: Path) -> Iterator[xen.XenTransport]:
    t = xen.XenTransport(
        str(hv.memory_path), str(tmp_path / "evtchn"), ioctl=hv.ioctl, data_path="map"
    )
    yield t
    t.close()


def test_missing_devices_say_not_dom0(tmp_path: Path) -> None:
    with pytest.raises(errors.GrantError, match="not a Xen dom0") as info:
        xen.XenTransport(str(tmp_path / "no-gntdev"), str(tmp_path / "no-evtchn"))
    assert info.value.errno == errno.ENODEV
    with pytest.raises(OSError, match="not a Xen dom0"):
        xen_devices.EvtchnDev(str(tmp_path / "no-evtchn"))


def test_real_ioctl_gets_buffers_not_addresses() -> None:
    """Through the real ``fcntl.ioctl`` on /dev/null: every call reaches the kernel (ENOTTY).

    Passing ``ctypes.addressof(obj)`` instead died with OverflowError in CPython's int
    conversion as soon as the structure lived above 2**31 -- always, for heap memory here."""
    assert ctypes.addressof(xen_abi.GntdevSetMaxGrants(1)) > 2**31  # the case that overflowed
    gnt = xen_devices.GntDev("/dev/null")
    evt = xen_devices.EvtchnDev("/dev/null")
    try:
        calls: list[Any] = [
            lambda: gnt.set_max_grants(64),
            lambda: gnt.map_grant_refs(DOMID, [1, 2, 3]),
            lambda: gnt.map_grant_refs(DOMID, list(range(300))),  # > 1 KiB: CPython's direct path
            lambda: gnt.unmap_grant_ref(4096, 1),
            lambda: gnt.grant_copy([xen_abi.CopyOp(DOMID, 1, 0, bytearray(512))]),
            lambda: gnt.copy_raw([(DOMID, 1, 0, 0x7F00_0000_0000, 512, True)]),
            lambda: evt.bind_interdomain(DOMID, 7),
            lambda: evt.bind_unbound_port(DOMID),
            lambda: evt.unbind(7),
            lambda: evt.notify(7),
            lambda: evt.reset(),
            lambda: evt.restrict_domid(DOMID),
        ]
        for call in calls:
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.ENOTTY
        with pytest.raises(OSError) as err:
            xen.XenTransport("/dev/null", "/dev/null", max_grants=128)
        assert err.value.errno == errno.ENOTTY
    finally:
        gnt.close()
        evt.close()


def test_ring_map_and_unmap(transport: xen.XenTransport, hv: FakeHypervisor) -> None:
    assert ("max", 128) in hv.calls
    hv.mem[8 * 4096 : 8 * 4096 + 4] = struct.pack("=I", 7)  # req_prod as the frontend wrote it
    ring = transport.map_ring(DOMID, [8, 9])
    assert hv.last() == ("map", [(DOMID, 8), (DOMID, 9)])
    assert ring.load_u32(0) == 7
    ring.store_u32(8, 3)  # rsp_prod
    ring.copy_in(4096 + 10, b"slot")  # second page
    assert hv.page(8)[8:12] == struct.pack("=I", 3)
    assert hv.page(9)[10:14] == b"slot"
    transport.unmap_ring(ring)
    assert hv.last() == ("unmap", (8 * 4096, 2))


def test_map_segments_coalesces_and_writes_guest_pages(
    map_transport: xen.XenTransport, hv: FakeHypervisor
) -> None:
    mapper = map_transport.grant_mapper(DOMID)
    mapping = mapper.map_segments([(10, 512, 3584), (11, 0, 4096), (12, 0, 1024)], writable=True)
    assert [len(b) for b in mapping.buffers] == [3584 + 4096 + 1024]
    mapping.buffers[0][:] = b"\xab" * len(mapping.buffers[0])
    assert hv.page(10)[:512] == bytes(512) and hv.page(10)[512:] == b"\xab" * 3584
    assert hv.page(12)[:1024] == b"\xab" * 1024 and hv.page(12)[1024:] == bytes(3072)
    mapping.release()
    assert mapping.buffers == []
    assert hv.last() == ("unmap", (10 * 4096, 3))
    mapping.release()  # idempotent
    assert hv.last() == ("unmap", (10 * 4096, 3))

    hv.mem[20 * 4096 : 20 * 4096 + 512] = b"x" * 512
    gaps = mapper.map_segments([(20, 0, 512), (21, 1024, 512)], writable=False)
    assert [len(b) for b in gaps.buffers] == [512, 512]
    assert gaps.buffers[0].tobytes() == b"x" * 512
    assert gaps.buffers[0].readonly  # PROT_READ: gntdev maps the grants read-only
    gaps.release()


def test_map_failures_are_grant_errors_and_undo(
    map_transport: xen.XenTransport, hv: FakeHypervisor
) -> None:
    mapper = map_transport.grant_mapper(DOMID)
    hv.revoked.add(31)
    with pytest.raises(errors.GrantError):
        mapper.map_segments([(30, 0, 4096), (31, 0, 4096)], writable=True)
    assert hv.last() == ("unmap", (123, 2))  # the reservation was given back
    with pytest.raises(errors.GrantError):
        map_transport.grant_mapper(DOMID + 1).map_segments([(1, 0, 512)], writable=True)
    with pytest.raises(errors.GrantError):
        mapper.map_segments([(1, 4000, 512)], writable=True)  # crosses the page


def test_copy_pages_by_grant_copy(transport: xen.XenTransport, hv: FakeHypervisor) -> None:
    for ref in (3, 17, 4):
        hv.mem[ref * 4096 : (ref + 1) * 4096] = bytes([ref]) * 4096
    pages = transport.grant_mapper(DOMID).copy_pages([3, 17, 4])
    assert hv.last() == ("copy", 3)  # one batched ioctl
    assert pages == [b"\x03" * 4096, b"\x11" * 4096, b"\x04" * 4096]
    hv.mem[3 * 4096] = 0xFF
    assert pages[0][0] == 3  # a private copy: later guest writes do not show
    hv.revoked.add(17)
    with pytest.raises(errors.GrantError, match="ref 17"):
        transport.grant_mapper(DOMID).copy_pages([3, 17])


def test_grant_copy_both_directions(transport: xen.XenTransport, hv: FakeHypervisor) -> None:
    dev = transport.gntdev
    out = bytearray(100)
    payload = (b"local-bytes-to-guest" * 5)[:96]
    hv.mem[5 * 4096 + 300 : 5 * 4096 + 400] = b"g" * 100
    statuses = dev.grant_copy(
        [
            xen_abi.CopyOp(DOMID, 5, 300, out),
            xen_abi.CopyOp(DOMID, 6, 4000, payload, to_guest=True),
            xen_abi.CopyOp(DOMID, 99, 0, bytearray(10)),
        ]
    )
    assert statuses == [0, 0, GNTST_BAD_GNTREF]
    assert out == b"g" * 100
    assert hv.page(6)[4000:4096] == payload
    with pytest.raises(ValueError):
        dev.grant_copy([xen_abi.CopyOp(DOMID, 5, 4090, bytearray(10))])
    with pytest.raises(TypeError):
        dev.grant_copy([xen_abi.CopyOp(DOMID, 5, 0, memoryview(b"readonly-view"))])


def test_event_channel(transport: xen.XenTransport, hv: FakeHypervisor) -> None:
    channel = transport.bind_interdomain(DOMID, 17)
    assert hv.last() == ("bind", (DOMID, 17))
    assert channel.port == hv.next_port
    # Stand a socket pair in for the device's descriptor: reads are fired ports.
    ours, theirs = socket.socketpair()
    os.dup2(ours.fileno(), channel.fileno())
    ours.close()
    os.set_blocking(channel.fileno(), False)
    assert channel.ack() == 0  # nothing pending, no unmask written
    theirs.sendall(struct.pack("=III", channel.port, channel.port, channel.port))
    assert channel.ack() == 3
    theirs.setblocking(False)
    assert theirs.recv(64) == struct.pack("=I", channel.port)  # unmasked once (late EOI)
    channel.notify()
    assert hv.last() == ("notify", channel.port)
    channel.close()
    assert hv.last() == ("unbind", channel.port)
    channel.close()  # idempotent
    theirs.close()


def test_evtchn_pending_is_bounded(tmp_path: Path, hv: FakeHypervisor) -> None:
    (tmp_path / "evtchn").write_bytes(b"")
    dev = xen_devices.EvtchnDev(str(tmp_path / "evtchn"), ioctl=hv.ioctl)
    ours, theirs = socket.socketpair()
    os.dup2(ours.fileno(), dev.fileno())
    ours.close()
    os.set_blocking(dev.fileno(), False)
    theirs.sendall(b"".join(struct.pack("=I", p) for p in range(1000)))
    first = dev.pending(max_ports=64)
    assert first == list(range(64))  # one bounded read per wake-up (XSA-332)
    dev.unmask(first)
    dev.close()
    theirs.close()


def test_satisfies_the_backend_transport_protocol(transport: xen.XenTransport) -> None:
    from blockback.transport import Transport

    plugged: Transport = transport  # checked by mypy --strict: the same shape as transport/sim.py
    assert plugged.grant_mapper(DOMID).domid == DOMID  # type: ignore[attr-defined]
