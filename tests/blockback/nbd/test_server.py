"""The NBD server over a real unix socket, driven by a raw client: the cases real clients do
not produce (errors, limits, out-of-order completion, simple replies, hostile input)."""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vhdtools.commands.serve import parse_listen

import vhd
from blockback.nbd import protocol as p
from blockback.nbd.server import NBDServer
from tests.blockback.nbd.helpers import (
    IMAGE_SIZE,
    MiB,
    RawClient,
    expected_content,
    make_image,
    pattern,
    serving,
    short_tmpdir,
)

# Reads this large always run on the worker pool.
BIG = 2 * 1024 * 1024


@pytest.fixture
def image() -> Iterator[Path]:
    with short_tmpdir() as tmp:
        path = tmp / "disk.vhd"
        make_image(path)
        yield path


@pytest.fixture
def disk(image: Path) -> Iterator[vhd.Disk]:
    with vhd.open(str(image), "r+") as d:
        yield d


def test_read_write_round_trip_structured(disk: vhd.Disk) -> None:
    expected = expected_content()
    with serving(disk) as (_s, _url, path), RawClient(path) as c:
        c.handshake()
        assert c.size == IMAGE_SIZE
        r = c.read(5 * MiB, 100_000, handle=77)
        assert (r.handle, r.error, r.kind, r.offset) == (77, 0, p.ReplyType.OFFSET_DATA, 5 * MiB)
        assert r.data == expected[5 * MiB : 5 * MiB + 100_000]
        data = pattern(0, 12345, seed=9)
        assert c.write(7 * MiB + 3, data, handle=78, flags=p.CmdFlag.FUA).error == 0
        assert c.read(7 * MiB + 3, 12345).data == data
        c.send(p.Cmd.FLUSH, handle=79)
        assert c.reply().error == 0
        c.send(p.Cmd.DISC)
    assert disk.pread(12345, 7 * MiB + 3) == data


def test_simple_replies_without_structured_negotiation(disk: vhd.Disk) -> None:
    with serving(disk) as (_s, _url, path), RawClient(path) as c:
        c.handshake(structured=False)
        r = c.read(0, 4096, handle=5)
        assert (r.handle, r.error, r.kind) == (5, 0, -1)
        assert r.data == expected_content()[:4096]
        c.send(p.Cmd.READ, IMAGE_SIZE, 1, handle=6)
        r = c.reply()
        assert (r.handle, r.error, r.kind) == (6, errno.EINVAL, -1)
        # After an error reply the stream stays in sync.
        assert c.read(4096, 10).data == expected_content()[4096:4106]


def test_errors_keep_the_connection_usable(disk: vhd.Disk) -> None:
    with serving(disk) as (_s, _url, path), RawClient(path) as c:
        c.handshake()
        for kind, offset, length, flags, want in [
            (p.Cmd.READ, IMAGE_SIZE - 1, 2, 0, errno.EINVAL),
            (p.Cmd.READ, 2**63, 1, 0, errno.EINVAL),
            (p.Cmd.READ, 0, 64 * MiB, 0, errno.EINVAL),
            (p.Cmd.TRIM, IMAGE_SIZE, 1, 0, errno.EINVAL),
            (p.Cmd.READ, 0, 1, p.CmdFlag.NO_HOLE, errno.EINVAL),
            (99, 0, 0, 0, errno.EINVAL),
            (p.Cmd.WRITE_ZEROES, 0, 4096, p.CmdFlag.NO_HOLE | p.CmdFlag.FAST_ZERO, errno.ENOTSUP),
        ]:
            c.send(kind, offset, length, flags=flags, handle=offset & 0xFFFF)
            r = c.reply()
            assert r.error == want, (kind, offset, length)
            assert r.kind == p.ReplyType.ERROR and r.message
        # A write past the end: its payload is consumed, then the error comes back.
        payload = b"x" * 1000
        c.send(p.Cmd.WRITE, IMAGE_SIZE - 10, len(payload), payload=payload, handle=3)
        assert c.reply().error == errno.EINVAL
        assert c.read(0, 16).data == expected_content()[:16]


def test_oversized_write_payload_is_skipped(disk: vhd.Disk) -> None:
    with serving(disk) as (_s, _url, path), RawClient(path, timeout=30) as c:
        c.handshake()
        n = 33 * MiB
        c.send(p.Cmd.WRITE, 0, n, handle=1)
        chunk = bytes(MiB)
        for _ in range(n // MiB):
            c.sock.sendall(chunk)
        r = c.reply()
        assert (r.handle, r.error) == (1, errno.EINVAL)
        assert c.read(0, 16).data == expected_content()[:16]


def test_trim_and_write_zeroes(disk: vhd.Disk) -> None:
    with serving(disk) as (_s, _url, path), RawClient(path) as c:
        c.handshake()
        c.send(p.Cmd.TRIM, 100, 5000, handle=1)
        assert c.reply().error == 0
        c.send(p.Cmd.WRITE_ZEROES, 9 * MiB, 2 * MiB, flags=p.CmdFlag.FAST_ZERO, handle=2)
        assert c.reply().error == 0
        c.send(p.Cmd.WRITE_ZEROES, 0, 512, flags=p.CmdFlag.NO_HOLE | p.CmdFlag.FUA, handle=3)
        assert c.reply().error == 0
        assert c.read(0, 6000).data == bytes(5100) + expected_content()[5100:6000]
        assert c.read(9 * MiB, 2 * MiB).data == bytes(2 * MiB)
    # Zeroing a whole block without NO_HOLE gave the space back.
    layers = {(e.offset, e.layer) for e in disk.extents(9 * MiB, 2 * MiB)}
    assert layers == {(9 * MiB, None)}


def test_block_status(disk: vhd.Disk) -> None:
    with serving(disk) as (_s, _url, path), RawClient(path) as c:
        c.handshake()
        for flags in (0, p.CmdFlag.REQ_ONE):
            c.send(p.Cmd.BLOCK_STATUS, 4 * MiB, 8 * MiB, flags=flags, handle=4)
            r = c.reply()
            assert r.kind == p.ReplyType.BLOCK_STATUS
            (ctx,) = struct.unpack(">I", r.data[:4])
            assert ctx == p.BASE_ALLOCATION_ID
            pairs = [struct.unpack(">II", r.data[i : i + 8]) for i in range(4, len(r.data), 8)]
            want = [
                (2 * MiB, 0),
                (2 * MiB, p.STATE_HOLE | p.STATE_ZERO),
                (4 * MiB, 0),
            ]
            assert pairs == (want[:1] if flags else want)


def test_block_status_needs_a_context(disk: vhd.Disk) -> None:
    with serving(disk) as (_s, _url, path), RawClient(path) as c:
        c.handshake(meta=False)
        c.send(p.Cmd.BLOCK_STATUS, 0, 4096, handle=4)
        assert c.reply().error == errno.EINVAL


def test_read_only_refuses_writes_with_eperm(image: Path) -> None:
    with vhd.open(str(image), "r") as ro, serving(ro) as (_s, _url, path), RawClient(path) as c:
        c.handshake()
        assert c.flags & p.TransmissionFlag.READ_ONLY
        assert c.write(0, b"nope").error == errno.EPERM
        for kind in (p.Cmd.TRIM, p.Cmd.WRITE_ZEROES):
            c.send(kind, 0, 4096)
            assert c.reply().error == errno.EPERM
        c.send(p.Cmd.FLUSH)
        assert c.reply().error == 0
        assert c.read(0, 4).data == expected_content()[:4]


def test_read_only_flag_on_a_writable_disk(disk: vhd.Disk) -> None:
    with serving(disk, read_only=True) as (_s, _url, path), RawClient(path) as c:
        c.handshake()
        assert c.write(0, b"nope").error == errno.EPERM
    assert disk.pread(4, 0) == expected_content()[:4]


class GatedDisk:
    """Wraps a disk; reads at offset 0 wait for a gate, so later requests overtake them."""

    def __init__(self, disk: Any, gated_offset: int = 0) -> None:
        self._disk = disk
        self.gate = threading.Event()
        self.gated_offset = gated_offset
        self.reads = 0
        self.size = disk.size
        self.read_only = disk.read_only

    def preadinto(self, buffer: Any, offset: int) -> int:
        self.reads += 1
        if offset == self.gated_offset:
            assert self.gate.wait(20)
        return int(self._disk.preadinto(buffer, offset))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._disk, name)


def test_replies_complete_out_of_order(disk: vhd.Disk) -> None:
    gated = GatedDisk(disk)
    with serving(gated, workers=4) as (_s, _url, path), RawClient(path) as c:
        c.handshake()
        # Large reads go to the workers; small ones are served inline from the page cache.
        c.send(p.Cmd.READ, 0, BIG, handle=1)
        c.send(p.Cmd.READ, 4096, 512, handle=2)
        c.send(p.Cmd.FLUSH, handle=3)
        c.send(p.Cmd.WRITE, 8 * MiB, 5, handle=4, payload=b"hello")
        first = [c.reply() for _ in range(3)]
        assert {r.handle for r in first} == {2, 3, 4}
        gated.gate.set()
        last = c.reply()
        assert last.handle == 1 and last.data == expected_content()[:BIG]


class SlowOnceDisk(GatedDisk):
    """The first read at offset 0 takes a while, as if it came from a device."""

    def __init__(self, disk: Any) -> None:
        super().__init__(disk, gated_offset=8192)
        self.slow_done = False

    def preadinto(self, buffer: Any, offset: int) -> int:
        if offset == 0 and not self.slow_done:
            self.slow_done = True
            time.sleep(0.01)
        return super().preadinto(buffer, offset)


def test_a_slow_small_read_sends_the_next_ones_to_the_workers(disk: vhd.Disk) -> None:
    slow = SlowOnceDisk(disk)
    with serving(slow, workers=2) as (_s, _url, path), RawClient(path) as c:
        c.handshake()
        assert c.read(0, 4096, handle=1).handle == 1
        c.send(p.Cmd.READ, 8192, 4096, handle=2)  # held back by the gate, on a worker
        c.send(p.Cmd.READ, 4096, 4096, handle=3)
        assert c.reply().handle == 3
        slow.gate.set()
        r = c.reply()
        assert r.handle == 2 and r.data == expected_content()[8192:12288]


def test_requests_in_flight_per_connection_are_bounded(disk: vhd.Disk) -> None:
    gated = GatedDisk(disk)
    with (
        serving(gated, workers=2, max_inflight_requests=4) as (server, _url, path),
        RawClient(path) as c,
    ):
        c.handshake()

        # Sent from a thread: the server stops reading, so the sender may block.
        def send_all() -> None:
            for i in range(100):
                c.send(p.Cmd.READ, 0, BIG, handle=i)

        sender = threading.Thread(target=send_all)
        sender.start()
        time.sleep(0.5)
        # Only the budget's worth were read off the socket; the rest wait in the kernel.
        assert gated.reads <= 4
        conns = list(server._connections)
        assert len(conns) == 1 and conns[0]._budget.requests <= 4
        gated.gate.set()
        handles = sorted(c.reply(BIG).handle for _ in range(100))
        assert handles == list(range(100))
        sender.join(10)


def test_bad_request_magic_hangs_up_and_server_lives_on(disk: vhd.Disk) -> None:
    with serving(disk) as (_s, _url, path):
        with RawClient(path) as c:
            c.handshake()
            c.sock.sendall(b"\x00" * 28)
            assert c.sock.recv(100) == b""
        with RawClient(path) as c:
            c.handshake()
            assert c.read(0, 8).data == expected_content()[:8]


def test_export_name_and_list(disk: vhd.Disk) -> None:
    with serving(disk, export_name="vol") as (_s, url, path):
        assert url.startswith("nbd+unix:///vol?socket=/")
        with RawClient(path) as c:
            c.handshake(name="vol")
            assert c.size == IMAGE_SIZE
        with RawClient(path) as c:
            c.recv_exact(18)
            c.sock.sendall(struct.pack(">I", 1))
            answers = c.option(p.Opt.LIST)
            assert answers == [(p.Rep.SERVER, b"\x00\x00\x00\x03vol"), (p.Rep.ACK, b"")]
            raw = b"other"
            answers = c.option(p.Opt.GO, struct.pack(">I", 5) + raw + b"\x00\x00")
            assert answers[-1][0] == p.Rep.ERR_UNKNOWN
            assert c.option(p.Opt.ABORT) == [(p.Rep.ACK, b"")]


def test_many_clients_at_once(disk: vhd.Disk) -> None:
    expected = expected_content()
    errors: list[BaseException] = []

    def client(path: str, k: int) -> None:
        try:
            with RawClient(path) as c:
                c.handshake()
                for i in range(40):
                    off = ((k * 7919 + i * 104729) * 512) % (IMAGE_SIZE - 65536)
                    for h in range(8):
                        c.send(p.Cmd.READ, off + h * 4096, 4096, handle=h)
                    got = {}
                    for _ in range(8):
                        r = c.reply()
                        got[r.handle] = r.data
                    for h in range(8):
                        assert got[h] == expected[off + h * 4096 : off + (h + 1) * 4096]
        except BaseException as exc:
            errors.append(exc)

    with serving(disk) as (_s, _url, path):
        threads = [threading.Thread(target=client, args=(path, k)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors


def test_stop_drains_requests_in_flight(disk: vhd.Disk) -> None:
    gated = GatedDisk(disk)
    with serving(gated) as (server, _url, path), RawClient(path) as c:
        c.handshake()
        c.send(p.Cmd.READ, 0, BIG, handle=9)
        time.sleep(0.2)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        time.sleep(0.2)
        gated.gate.set()
        r = c.reply(BIG)
        assert r.handle == 9 and r.data == expected_content()[:BIG]
        stopper.join(10)
        assert not stopper.is_alive()
        assert c.sock.recv(10) == b""


def test_tcp_listener(disk: vhd.Disk) -> None:
    server = NBDServer(disk)
    url = server.listen_tcp("127.0.0.1", 0)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(8) == b"NBDMAGIC"
    finally:
        server.stop()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:1234") == ("127.0.0.1", 1234)
    assert parse_listen("[::1]:99") == ("::1", 99)
    assert parse_listen(":5") == ("127.0.0.1", 5)
    with pytest.raises(ValueError):
        parse_listen("host:port")
    with pytest.raises(ValueError):
        parse_listen("host:70000")


@pytest.mark.parametrize("structured", [True, False])
def test_pipelined_small_reads_with_errors_between(disk: vhd.Disk, structured: bool) -> None:
    expected = expected_content()
    plan = [(i * 70_000, 1 + i * 3001) for i in range(40)]
    plan[7] = (IMAGE_SIZE - 100, 4096)  # past the end
    plan[20] = (0, 0)  # empty read
    with serving(disk) as (_s, _url, path), RawClient(path) as c:
        c.handshake(structured=structured)
        c.sock.sendall(
            b"".join(
                struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, h, off, n)
                for h, (off, n) in enumerate(plan)
            )
        )
        # Replies may come in any order (a read found slow sends the next ones to the workers).
        seen = set()
        for _ in plan:
            r = c.reply(lambda handle: plan[handle][1] if handle != 7 else 0)
            assert r.handle not in seen
            seen.add(r.handle)
            off, n = plan[r.handle]
            if r.handle == 7:
                assert r.error == errno.EINVAL
            else:
                assert r.error == 0 and r.data == expected[off : off + n]
        assert seen == set(range(len(plan)))


def test_clients_past_the_connection_limit_are_refused(disk: vhd.Disk) -> None:
    with serving(disk, max_connections=2) as (server, _url, path):
        first, second = RawClient(path), RawClient(path)
        first.handshake()
        second.handshake()
        with RawClient(path) as third, pytest.raises((EOFError, ConnectionError)):
            third.handshake()
        first.close()
        deadline = time.monotonic() + 5
        while server.connections > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with RawClient(path) as fourth:
            fourth.handshake()
            assert fourth.read(0, 4).data == expected_content()[:4]
        second.close()


def test_stop_cuts_off_a_client_that_never_reads(disk: vhd.Disk) -> None:
    with serving(disk) as (server, _url, path), RawClient(path) as c:
        c.handshake()
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

        def flood() -> None:
            try:
                for i in range(2000):
                    c.send(p.Cmd.READ, 0, BIG, handle=i)
            except OSError:
                pass

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        time.sleep(0.5)
        started = time.monotonic()
        server.stop(timeout=2)
        assert time.monotonic() - started < 5
        assert server.connections == 0


def test_a_silent_client_is_dropped_during_negotiation(disk: vhd.Disk) -> None:
    with serving(disk, negotiation_timeout=0.3) as (server, _url, path), RawClient(path) as c:
        assert c.recv_exact(18)[:8] == b"NBDMAGIC"
        c.sock.sendall(struct.pack(">I", 1) + b"IHAVE")  # then nothing more
        started = time.monotonic()
        assert c.sock.recv(10) == b""
        assert time.monotonic() - started < 5
        deadline = time.monotonic() + 5
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.connections == 0


def test_protocol_error_hangs_up_even_if_the_client_reads_nothing(disk: vhd.Disk) -> None:
    with serving(disk) as (server, _url, path), RawClient(path) as c:
        c.handshake()
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Replies pile up unread (workers block sending them), then garbage arrives.
        requests = b"".join(
            struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, i, 0, BIG) for i in range(20)
        )
        c.sock.sendall(requests + b"\xff" * 28)
        deadline = time.monotonic() + 10
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.connections == 0


@pytest.mark.parametrize("length", [4096, BIG])
def test_every_request_is_validated_by_check_request(
    disk: vhd.Disk, monkeypatch: pytest.MonkeyPatch, length: int
) -> None:
    """One validation point: a rule added to ``check_request`` applies to small reads too (they
    run inline, on a path that once decoded the header itself and skipped the check)."""
    seen: list[p.Request] = []

    def refuse_reads(session: p.Session, req: p.Request) -> tuple[int, str]:
        seen.append(req)
        if req.type == p.Cmd.READ:
            return errno.EPERM, "a new rule"
        return 0, ""

    monkeypatch.setattr(p, "check_request", refuse_reads)
    with serving(disk) as (_s, _url, path), RawClient(path) as c:
        c.handshake()
        r = c.read(0, length, handle=11)
        assert (r.handle, r.error) == (11, errno.EPERM)
        c.send(p.Cmd.DISC)
    reads = [(q.handle, q.offset, q.length) for q in seen if q.type == p.Cmd.READ]
    assert reads == [(11, 0, length)]  # checked, and checked once
