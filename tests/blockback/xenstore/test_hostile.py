"""A hostile or broken xenstore client must get an error or a hang-up, never crash the server,
and never make it (or our client) hold unbounded memory (XSA-349 watch floods)."""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockback.xenstore.client import WatchEvent, XenStoreClient
from blockback.xenstore.server import XenStoreServer
from blockback.xenstore.wire import (
    HEADER,
    PAYLOAD_MAX,
    Message,
    MessageDecoder,
    XenStoreError,
    XsType,
    join_strings,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[XenStoreServer]:
    srv = XenStoreServer(tmp_path / "xs.sock", event_limit=16 * 1024).start()
    srv.listen(tmp_path / "dom5.sock", domid=5)
    try:
        yield srv
    finally:
        srv.stop()


class RawConn:
    """A socket speaking the wire format by hand, to send what a real client never would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.decoder = MessageDecoder()

    def send(self, mtype: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> None:
        self.sock.sendall(HEADER.pack(mtype, req_id, tx_id, len(payload)) + payload)

    def recv(self) -> Message | None:
        """The next message, or None when the server hung up."""
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            data = self.sock.recv(65536)
            if not data:
                return None
            self.decoder.feed(data)

    def close(self) -> None:
        self.sock.close()


def assert_alive(server: XenStoreServer) -> None:
    with XenStoreClient(server.path, timeout=10) as xs:
        xs.write("/alive", "yes")
        assert xs.read("/alive") == b"yes"


def test_oversized_message_gets_error_then_hangup(server: XenStoreServer) -> None:
    other = XenStoreClient(server.path, timeout=10)
    raw = RawConn(server.path)
    raw.sock.sendall(HEADER.pack(XsType.WRITE, 7, 0, PAYLOAD_MAX + 1) + b"x" * 100)
    reply = raw.recv()
    assert reply is not None and reply.type == XsType.ERROR and reply.error_name() == "EINVAL"
    assert raw.recv() is None  # then the server closes the connection
    raw.close()
    other.write("/still", "served")  # the other connection is unaffected
    assert other.read("/still") == b"served"
    other.close()


@pytest.mark.parametrize(
    ("mtype", "payload", "tx_id", "error"),
    [
        (99, b"", 0, "EINVAL"),  # unknown type
        (0xFFFF, b"", 0, "EINVAL"),  # XS_INVALID
        (XsType.WATCH_EVENT, b"/a\0t\0", 0, "EINVAL"),  # server-to-client types
        (XsType.ERROR, b"EINVAL\0", 0, "EINVAL"),
        (XsType.WRITE, b"/no-nul-separator", 0, "EINVAL"),
        (XsType.READ, b"/\xff\xfe\0", 0, "EINVAL"),  # not UTF-8
        (XsType.READ, b"/a\0/b\0", 0, "EINVAL"),  # too many arguments
        (XsType.WATCH, b"/a\0", 0, "EINVAL"),  # missing token
        (XsType.READ, b"/local\0", 12345, "ENOENT"),  # unknown transaction
        (XsType.TRANSACTION_END, b"T\0", 0, "ENOENT"),
        (XsType.TRANSACTION_START, b"junk\0", 0, "EINVAL"),
        (XsType.GET_DOMAIN_PATH, b"-1\0", 0, "EINVAL"),
        (XsType.GET_DOMAIN_PATH, b"99999999\0", 0, "EINVAL"),
        (XsType.DIRECTORY_PART, b"/\0x\0", 0, "EINVAL"),
        (XsType.DIRECTORY_PART, b"/\0999999\0", 0, "EINVAL"),
        (XsType.SET_PERMS, b"/local\0", 0, "EINVAL"),
        (XsType.SET_PERMS, b"/local\0z1\0", 0, "EINVAL"),
        (XsType.RM, b"/\0", 0, "EINVAL"),
        (XsType.INTRODUCE, b"1\0x\0y\0", 0, "EINVAL"),
    ],
)
def test_malformed_requests_get_error_replies(
    server: XenStoreServer, mtype: int, payload: bytes, tx_id: int, error: str
) -> None:
    raw = RawConn(server.path)
    raw.send(mtype, payload, req_id=42, tx_id=tx_id)
    reply = raw.recv()
    assert reply is not None
    assert (reply.type, reply.req_id, reply.error_name()) == (XsType.ERROR, 42, error)
    # The connection stays usable after an error reply.
    raw.send(XsType.READ, b"/local\0", req_id=43)
    reply = raw.recv()
    assert reply is not None and (reply.type, reply.req_id) == (XsType.READ, 43)
    raw.close()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    messages=st.lists(
        st.tuples(
            st.integers(0, 30),
            st.binary(max_size=64) | st.sampled_from([b"/a\0", b"/a\0b", b"\0", b"/a\0t\0"]),
            st.integers(0, 5),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_fuzzed_messages_always_get_one_reply_each(
    server: XenStoreServer, messages: list[tuple[int, bytes, int]]
) -> None:
    raw = RawConn(server.path)
    try:
        for index, (mtype, payload, tx_id) in enumerate(messages):
            raw.send(mtype, payload, req_id=1000 + index, tx_id=tx_id)
        replies: list[int] = []
        while len(replies) < len(messages):
            msg = raw.recv()
            assert msg is not None, "server hung up on a well-framed message"
            if msg.type != XsType.WATCH_EVENT:
                replies.append(msg.req_id)
        assert replies == [1000 + i for i in range(len(messages))]
    finally:
        raw.close()
    assert_alive(server)


def test_truncated_message_and_abrupt_disconnects(server: XenStoreServer) -> None:
    for cut in (1, 8, 15, 16, 20):
        raw = RawConn(server.path)
        data = HEADER.pack(XsType.WRITE, 1, 0, 10) + b"/x\0value.."
        raw.sock.sendall(data[:cut])
        raw.close()
    # A client that disconnects with a transaction open and a watch set leaves nothing behind.
    xs = XenStoreClient(server.path)
    xs.transaction_start()
    xs.watch("/gone", "t")
    xs.close()
    time.sleep(0.1)
    assert_alive(server)
    assert all(s["watches"] == 0 for s in server.connection_stats())


def test_client_that_never_reads_is_flow_controlled(server: XenStoreServer) -> None:
    with XenStoreClient(server.path) as xs:
        xs.write("/big", b"v" * 4000)
    raw = RawConn(server.path)
    raw.sock.setblocking(False)
    request = HEADER.pack(XsType.READ, 1, 0, 5) + b"/big\0"
    sent = 0
    deadline = time.monotonic() + 5
    # Push requests until the socket stops taking them: the server has stopped reading.
    while time.monotonic() < deadline:
        try:
            raw.sock.send(request)
            sent += 1
        except BlockingIOError:
            time.sleep(0.05)
            try:
                raw.sock.send(request)
                sent += 1
            except BlockingIOError:
                break
    assert time.monotonic() < deadline, "server kept reading requests it could not answer"
    stats = [s for s in server.connection_stats() if s["out_bytes"] > 0]
    assert stats and max(s["out_bytes"] for s in stats) <= server.reply_limit + 2 * 4096
    assert_alive(server)  # others are still served
    raw.close()
    assert sent > 10


def test_watch_flood_keeps_server_queue_bounded(server: XenStoreServer) -> None:
    """A watcher that does not read while a writer churns 3000 distinct watched nodes."""
    raw = RawConn(server.path)
    raw.send(XsType.WATCH, join_strings("/flood", "tok"), req_id=1)
    name = "n" * 200
    with XenStoreClient(server.path) as writer:
        for i in range(3000):
            writer.write(f"/flood/{name}{i}", "x")
        stats = max(server.connection_stats(), key=lambda s: s["events_dropped"])
        assert stats["events_dropped"] > 0
        assert stats["out_bytes"] <= server.event_limit + 1024
        # Same-path churn is coalesced, not queued.
        for _ in range(200):
            writer.write("/flood/same", "y")
    # Draining, the watcher learns of the overflow through an event at the watch's own path.
    paths = []
    raw.sock.settimeout(5)
    while True:
        msg = raw.recv()
        assert msg is not None
        if msg.type == XsType.WATCH_EVENT:
            paths.append(msg.strings()[0])
            if paths.count("/flood") == 2:  # the initial fire, then the overflow's rescan
                break
    assert len(paths) < 3000
    raw.close()
    assert_alive(server)


def test_client_side_event_queue_is_bounded(server: XenStoreServer) -> None:
    with XenStoreClient(server.path, max_events=32) as watcher, XenStoreClient(server.path) as w:
        watcher.watch("/q", "tok")
        for i in range(500):
            w.write(f"/q/{i}", "x")
        w.write("/q/sync", "x")
        deadline = time.monotonic() + 5
        while watcher.events_collapsed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.pending_events() <= 32
        assert watcher.events_collapsed > 0
        events = []
        while (event := watcher.read_watch(0.2)) is not None:
            events.append(event)
        assert WatchEvent("/q", "tok") in events  # the "rescan" event survives the collapse


def test_unprivileged_domain_connection(server: XenStoreServer, tmp_path: Path) -> None:
    dom5 = str(tmp_path / "dom5.sock")
    with XenStoreClient(server.path) as dom0, XenStoreClient(dom5) as guest:
        # The toolstack gives the guest its home and a backend dir it may read.
        dom0.mkdir("/local/domain/5")
        dom0.set_perms("/local/domain/5", ["n5", "r0"])
        dom0.mkdir("/local/domain/0/backend/vbd/5/768")
        dom0.set_perms("/local/domain/0/backend/vbd/5/768", ["n0", "r5"])
        dom0.write("/local/domain/0/backend/vbd/5/768/state", "2")  # inherits n0,r5
        dom0.write("/local/domain/0/secret", "s")
        dom0.write("/local/domain/0/shared", "")
        dom0.set_perms("/local/domain/0/shared", ["n0", "b5"])  # writable, not owned
        # Relative paths are under its own home; it owns what it creates.
        guest.write("device/vbd/768/state", "1")
        assert dom0.read("/local/domain/5/device/vbd/768/state") == b"1"
        assert dom0.get_perms("/local/domain/5/device/vbd/768/state")[0] == "n5"
        assert guest.read("/local/domain/0/backend/vbd/5/768/state") == b"2"
        for action in (
            lambda: guest.read("/local/domain/0/secret"),
            lambda: guest.write("/local/domain/0/backend/vbd/5/768/state", "6"),
            lambda: guest.write("/local/domain/0/new", "x"),
            lambda: guest.introduce_domain(6, 1, 1),
            lambda: guest.set_perms("device", ["n0"]),  # giving it away
            lambda: guest.set_perms("/local/domain/0/shared", ["b5"]),  # not the owner
        ):
            with pytest.raises(XenStoreError) as info:
                action()
            assert info.value.errno in (errno.EACCES, errno.EPERM)
        # Watches: it hears of nodes it may read, not of others.
        guest.watch("/local/domain/0", "tok")
        assert guest.read_watch(5) == WatchEvent("/local/domain/0", "tok")
        dom0.write("/local/domain/0/secret", "s2")
        dom0.write("/local/domain/0/backend/vbd/5/768/state", "4")
        assert guest.read_watch(5) == WatchEvent("/local/domain/0/backend/vbd/5/768/state", "tok")
        assert guest.read_watch(0.2) is None


def test_unprivileged_quotas(server: XenStoreServer, tmp_path: Path) -> None:
    from blockback.xenstore import quotas

    with XenStoreClient(server.path) as dom0, XenStoreClient(tmp_path / "dom5.sock") as guest:
        dom0.mkdir("/local/domain/5")
        dom0.set_perms("/local/domain/5", ["n5"])
        with pytest.raises(XenStoreError) as info:
            guest.write("big", b"x" * (quotas.QUOTA_ENTRY_SIZE + 1))
        assert info.value.errno == errno.ENOSPC
        for i in range(quotas.QUOTA_WATCHES):
            guest.watch(f"w{i}", "t")
        with pytest.raises(XenStoreError) as info:
            guest.watch("one-too-many", "t")
        assert info.value.errno == errno.E2BIG
        txs = [guest.transaction_start() for _ in range(quotas.QUOTA_TRANSACTIONS)]
        with pytest.raises(XenStoreError) as info:
            guest.transaction_start()
        assert info.value.errno == errno.ENOSPC
        for tx in txs:
            guest.transaction_end(tx, commit=False)

        def fill() -> None:
            tx = guest.transaction_start()
            for i in range(quotas.QUOTA_NODES_PER_DOMAIN + 1):
                guest.write(f"n/{i}", "", tx)

        with pytest.raises(XenStoreError) as info:
            fill()
        assert info.value.errno == errno.ENOSPC


def test_header_struct_is_native_16_bytes() -> None:
    assert HEADER.size == 16
    assert struct.calcsize("=IIII") == 16


def test_special_watches_reach_only_whom_their_permissions_allow(
    server: XenStoreServer, tmp_path: Path
) -> None:
    """As C xenstored since XSA-115: @introduceDomain and @releaseDomain events go to
    privileged connections, and to a domain only when dom0 gave it read access with SET_PERMS
    on the special path (a driver domain); a guest must not learn of other guests' lives."""
    dom5 = str(tmp_path / "dom5.sock")
    with XenStoreClient(server.path) as dom0, XenStoreClient(dom5) as guest:
        for client in (dom0, guest):
            for special in ("@introduceDomain", "@releaseDomain"):
                client.watch(special, "t")
                assert client.read_watch(5) == WatchEvent(special, "t")  # the initial fire
        server.introduce_domain(7)
        assert dom0.read_watch(5) == WatchEvent("@introduceDomain", "t")
        server.release_domain(7)
        assert dom0.read_watch(5) == WatchEvent("@releaseDomain", "t")
        assert guest.read_watch(0.3) is None
        for action in (
            lambda: guest.get_perms("@releaseDomain"),
            lambda: guest.set_perms("@releaseDomain", ["n5"]),
        ):
            with pytest.raises(XenStoreError) as info:
                action()
            assert info.value.errno == errno.EACCES
        # dom0 lets domain 5 hear of releases (not of introductions).
        dom0.set_perms("@releaseDomain", ["n0", "r5"])
        assert guest.get_perms("@releaseDomain") == ["n0", "r5"]
        server.introduce_domain(8)
        server.release_domain(8)
        assert guest.read_watch(5) == WatchEvent("@releaseDomain", "t")
        assert guest.read_watch(0.3) is None
        assert dom0.read_watch(5) == WatchEvent("@introduceDomain", "t")
        assert dom0.read_watch(5) == WatchEvent("@releaseDomain", "t")
        # A released domain's access goes with it (a new domain 5 does not inherit it).
        server.call(lambda s: s.introduced.add(5))
        server.release_domain(5)
        assert dom0.get_perms("@releaseDomain") == ["n0"]
