"""The NBD export under abuse: what a client may learn, how many may connect, how much memory
idle or non-reading clients can pin, and how much work one BLOCK_STATUS request may cost."""

from __future__ import annotations

import contextlib
import gc
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vhd
from blockback.nbd import protocol as p
from tests.nbd.helpers import (
    MiB,
    RawClient,
    expected_content,
    make_image,
    serving,
    short_tmpdir,
)

# Reads this large always run on the worker pool.
BIG = 2 * MiB

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


def _description(sock: str) -> str | None:
    """What NBD_OPT_INFO tells any client about the default export."""
    with RawClient(sock) as c:
        magic, _ihaveopt, _flags = struct.unpack(">QQH", c.recv_exact(18))
        assert magic == p.NBD_MAGIC
        c.sock.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        query = struct.pack(">IH", 0, 1) + struct.pack(">H", p.Info.DESCRIPTION)
        for rep, payload in c.option(p.Opt.INFO, query):
            if rep == p.Rep.INFO and struct.unpack(">H", payload[:2])[0] == p.Info.DESCRIPTION:
                return payload[2:].decode()
    return None


def _serve_cli(image: Path, sock: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhdtools.cli", "serve", str(image), "--nbd", "--socket",
         str(sock), "--read-only", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    if not proc.stdout.readline().strip():
        proc.kill()
        pytest.fail(f"vhd serve printed no URI: {proc.communicate(timeout=10)[1]}")
    return proc


@pytest.mark.parametrize(
    ("extra", "want"),
    [
        ((), "vhdkit"),
        (("--describe", "tenant 7 system disk"), "tenant 7 system disk"),
        (("--show-path",), None),  # the path, shown because the admin asked for it
    ],
)
def test_the_export_description_reveals_no_path_unless_asked(
    tmp: Path, extra: tuple[str, ...], want: str | None
) -> None:
    image = tmp / "secret-tenant-dir" / "child.vhd"
    image.parent.mkdir()
    make_image(image)
    sock = tmp / "s"
    proc = _serve_cli(image, sock, *extra)
    try:
        got = _description(str(sock))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    if want is None:
        assert got is not None and str(image) in got
    else:
        assert got == want
        assert "secret-tenant-dir" not in got


# -- connections: how many, for how long, and what an idle one costs ---------------------------


@pytest.fixture
def disk(tmp: Path) -> Iterator[vhd.Disk]:
    make_image(tmp / "d.vhd")
    with vhd.open(str(tmp / "d.vhd"), "r+") as d:
        yield d


def _closed_by_server(c: RawClient, within: float) -> bool:
    """Does the server hang up on ``c`` within ``within`` seconds (reading what it sends)?"""
    c.sock.settimeout(within)
    try:
        while c.sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_idle_clients_hold_no_reply_arena(disk: vhd.Disk) -> None:
    expected = expected_content()
    with serving(disk) as (_server, _url, path):
        gc.collect()
        tracemalloc.start()
        clients = []
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(20):
                c = RawClient(path)
                clients.append(c)
                c.handshake()
                assert c.read(0, 4096).data == expected[:4096]
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            for c in clients:
                c.close()
    # Each used to keep its own 4 MiB arena for good; now one arena is shared and an idle
    # connection keeps its 256 KiB receive buffer.
    assert grown / 20 < 1024 * 1024, grown


def test_the_handshake_has_one_deadline_however_slowly_bytes_trickle(disk: vhd.Disk) -> None:
    with serving(disk, negotiation_timeout=1.0) as (server, _url, path), RawClient(path) as c:
        c.recv_exact(18)
        c.sock.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE))
        option = struct.pack(">QII", p.IHAVEOPT, p.Opt.LIST, 0)
        hung_up = False
        for byte in option * 4:  # one byte every 0.2 s: 16 s if the server waited for it all
            try:
                c.sock.sendall(bytes([byte]))
            except OSError:
                hung_up = True
                break
            if _closed_by_server(c, 0.2):
                hung_up = True
                break
        assert hung_up
        assert wait_until(lambda: server.connections == 0)


def test_idle_timeout_drops_silent_clients_only(disk: vhd.Disk) -> None:
    expected = expected_content()
    with (
        serving(disk, idle_timeout=0.5) as (_server, _url, path),
        RawClient(path) as idle,
        RawClient(path) as busy,
    ):
        idle.handshake()
        busy.handshake()
        assert idle.read(0, 512).data == expected[:512]
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert busy.read(4096, 512).data == expected[4096:4608]
            time.sleep(0.1)
        assert _closed_by_server(idle, 5)
        assert busy.read(0, 512).data == expected[:512]


def test_a_full_server_gives_the_longest_idle_slot_to_a_new_client(disk: vhd.Disk) -> None:
    expected = expected_content()
    with serving(disk, max_connections=2, evict_idle_after=0.3) as (server, _url, path):
        oldest, recent = RawClient(path), RawClient(path)
        try:
            oldest.handshake()
            recent.handshake()
            time.sleep(0.4)
            assert recent.read(0, 512).data == expected[:512]  # active again: keeps its slot
            with RawClient(path) as newcomer:
                newcomer.handshake()
                assert newcomer.read(0, 512).data == expected[:512]
                assert _closed_by_server(oldest, 5)
                assert recent.read(512, 512).data == expected[512:1024]
                # Both remaining slots are in use and busy: the next client is refused.
                with RawClient(path) as refused, pytest.raises((EOFError, ConnectionError)):
                    refused.handshake()
            assert server.max_connections == 2
        finally:
            oldest.close()
            recent.close()


def test_a_client_stuck_in_negotiation_gives_its_slot_to_a_new_one(disk: vhd.Disk) -> None:
    expected = expected_content()
    with (
        serving(disk, max_connections=2) as (_server, _url, path),
        RawClient(path) as working,
        RawClient(path) as stuck,
    ):
        working.handshake()
        stuck.recv_exact(18)  # and then nothing
        time.sleep(0.2)
        with RawClient(path) as newcomer:
            newcomer.handshake()
            assert newcomer.read(0, 512).data == expected[:512]
            assert _closed_by_server(stuck, 5)
            assert working.read(0, 512).data == expected[:512]


def test_clients_that_never_read_are_bounded_in_total_and_stall_only_themselves(
    disk: vhd.Disk,
) -> None:
    expected = expected_content()
    budget = 8 * MiB
    with serving(disk, max_pending_bytes=budget, workers=2) as (server, _url, path):
        hogs = [RawClient(path) for _ in range(3)]
        senders = []
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for hog in hogs:
                hog.handshake()
                hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

                def flood(c: RawClient = hog) -> None:
                    with contextlib.suppress(OSError):
                        for i in range(64):  # 128 MiB each if nothing held them back
                            c.send(p.Cmd.READ, 0, BIG, handle=i)

                t = threading.Thread(target=flood, daemon=True)
                t.start()
                senders.append(t)
            # Wait until the hogs' replies pile up, then until nothing more moves.
            assert wait_until(lambda: server.pending_bytes >= budget, timeout=20)
            time.sleep(1.0)
            pending = server.pending_bytes
            grown = tracemalloc.get_traced_memory()[0] - before
            # A well-behaved client still gets its (large) reads.
            with RawClient(path) as good:
                good.handshake()
                for off in (0, 9 * MiB):
                    assert good.read(off, BIG).data == expected[off : off + BIG]
        finally:
            tracemalloc.stop()
            for hog in hogs:
                hog.close()
    # The budget, plus the one request any connection may always have in flight.
    assert pending <= budget + 3 * BIG, pending
    # Per connection it used to be 64 MiB each (192 MiB here); arenas and buffers aside.
    assert grown < budget + 3 * BIG + 16 * MiB, grown


def test_serve_rejects_nonsense_limits(tmp: Path) -> None:
    make_image(tmp / "d.vhd")
    for option, value in (
        ("--max-connections", "0"),
        ("--handshake-timeout", "0"),
        ("--idle-timeout", "-1"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "vhdtools.cli", "serve", str(tmp / "d.vhd"), "--nbd",
             "--socket", str(tmp / "s"), option, value],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 2, (option, result.stderr)
        assert option in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
