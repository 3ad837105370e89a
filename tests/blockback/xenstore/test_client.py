"""Our xenstore client against our xenstore server: operations, transactions, watches."""

from __future__ import annotations

import errno
import select
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockback.xenstore.client import Transaction, WatchEvent, XenStoreClient
from blockback.xenstore.server import XenStoreServer
from blockback.xenstore.wire import XenStoreError


@pytest.fixture
def xs_server(tmp_path: Path) -> Iterator[XenStoreServer]:
    server = XenStoreServer(tmp_path / "xenstored.sock").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def xs(xs_server: XenStoreServer) -> Iterator[XenStoreClient]:
    client = XenStoreClient(xs_server.path, timeout=10)
    try:
        yield client
    finally:
        client.close()


def test_read_write_directory_rm(xs: XenStoreClient) -> None:
    xs.write("/local/domain/0/backend/vbd/5/768/params", "/img/a.vhd")
    assert xs.read("/local/domain/0/backend/vbd/5/768/params") == b"/img/a.vhd"
    # Missing ancestors were created, with empty values, children in creation order.
    assert xs.read("/local/domain/0/backend") == b""
    xs.write("/local/domain/0/backend/vbd/5/768/mode", b"r")
    assert xs.directory("/local/domain/0/backend/vbd/5/768") == ["params", "mode"]
    xs.rm("/local/domain/0/backend/vbd/5")
    assert not xs.exists("/local/domain/0/backend/vbd/5/768/params")
    assert xs.directory("/local/domain/0/backend/vbd") == []
    with pytest.raises(XenStoreError) as info:
        xs.read("/local/domain/0/backend/vbd/5")
    assert info.value.errno == errno.ENOENT and info.value.name == "ENOENT"
    # rm of a missing node whose parent exists is fine; with a missing parent it is ENOENT.
    xs.rm("/local/domain/0/backend/vbd/9")
    with pytest.raises(XenStoreError) as info:
        xs.rm("/local/domain/0/nothing/here")
    assert info.value.errno == errno.ENOENT


def test_binary_values_mkdir_and_relative_paths(xs: XenStoreClient) -> None:
    value = bytes(range(256)) * 8
    xs.write("/bin", value)
    assert xs.read("/bin") == value
    xs.write("/empty", b"")
    assert xs.read("/empty") == b""
    xs.mkdir("/d/e")
    xs.mkdir("/d/e")  # idempotent
    assert xs.directory("/d") == ["e"]
    # Relative paths are under the connection's home, /local/domain/0.
    xs.write("device/vbd/768/state", "1")
    assert xs.read("/local/domain/0/device/vbd/768/state") == b"1"
    assert xs.get_domain_path(7) == "/local/domain/7"


@pytest.mark.parametrize(
    "path", ["", "/a/", "/a//b", "/a b", "/a\u00e9", "@other", "/" + "x" * 3100, "x" * 2100]
)
def test_invalid_paths_are_einval(xs: XenStoreClient, path: str) -> None:
    with pytest.raises(XenStoreError) as info:
        xs.write(path, "v")
    assert info.value.errno == errno.EINVAL


def test_permissions(xs: XenStoreClient) -> None:
    xs.write("/p", "x")
    assert xs.get_perms("/p") == ["n0"]
    xs.set_perms("/p", ["n0", "r5", "b7"])
    assert xs.get_perms("/p") == ["n0", "r5", "b7"]
    xs.write("/p/child", "y")  # inherits, owner = creator (dom0)
    assert xs.get_perms("/p/child") == ["n0", "r5", "b7"]
    with pytest.raises(XenStoreError) as info:
        xs.set_perms("/p", ["q0"])
    assert info.value.errno == errno.EINVAL


def test_large_directory_uses_directory_part(xs: XenStoreClient) -> None:
    names = [f"child-with-a-long-name-{i:05d}" for i in range(400)]  # ~12 KiB of names
    tx = xs.transaction_start()
    for name in names:
        xs.write(f"/big/{name}", "", tx)
    assert xs.transaction_end(tx)
    with pytest.raises(XenStoreError) as info:
        xs.request(1, b"/big\0")  # plain DIRECTORY does not fit 4096 bytes
    assert info.value.errno == errno.E2BIG
    assert xs.directory("/big") == names


def test_transaction_commit_abort_and_isolation(
    xs: XenStoreClient, xs_server: XenStoreServer
) -> None:
    xs.write("/t/a", "1")
    tx = xs.transaction_start()
    xs.write("/t/a", "2", tx)
    xs.write("/t/b", "3", tx)
    assert xs.read("/t/a") == b"1"  # not visible outside yet
    assert not xs.exists("/t/b")
    assert xs.read("/t/a", tx) == b"2"
    assert xs.transaction_end(tx, commit=True)
    assert xs.read("/t/a") == b"2" and xs.read("/t/b") == b"3"

    tx = xs.transaction_start()
    xs.rm("/t", tx)
    assert xs.transaction_end(tx, commit=False)
    assert xs.read("/t/b") == b"3"
    # A finished transaction id is gone.
    with pytest.raises(XenStoreError) as info:
        xs.read("/t/a", tx)
    assert info.value.errno == errno.ENOENT


def test_transaction_conflict_is_eagain(xs_server: XenStoreServer) -> None:
    with XenStoreClient(xs_server.path) as one, XenStoreClient(xs_server.path) as two:
        one.write("/c/x", "0")
        tx1 = one.transaction_start()
        tx2 = two.transaction_start()
        assert one.read("/c/x", tx1) == b"0"
        assert two.read("/c/x", tx2) == b"0"
        one.write("/c/x", "1", tx1)
        two.write("/c/x", "2", tx2)
        assert one.transaction_end(tx1) is True
        assert two.transaction_end(tx2) is False  # EAGAIN: the node changed since tx2 read it
        assert one.read("/c/x") == b"1"
        # A transaction that only touched other nodes commits.
        tx3 = two.transaction_start()
        two.write("/c/y", "y", tx3)
        one.write("/elsewhere", "z")
        assert two.transaction_end(tx3) is True
        # A node created meanwhile that the transaction saw missing is a conflict too.
        tx4 = two.transaction_start()
        assert not two.exists("/c/new", tx4)
        two.write("/c/other", "o", tx4)
        one.write("/c/new", "n")
        assert two.transaction_end(tx4) is False
        assert not two.exists("/c/other")


def test_run_transaction_retries_until_it_wins(xs_server: XenStoreServer) -> None:
    """Two clients increment one counter 50 times each through transactions: no lost update."""
    with XenStoreClient(xs_server.path) as setup:
        setup.write("/counter", "0")

    def worker() -> None:
        with XenStoreClient(xs_server.path) as client:
            for _ in range(50):

                def bump(tx: Transaction) -> None:
                    tx.write("/counter", str(int(tx.read("/counter")) + 1))

                client.run_transaction(bump, attempts=1000)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with XenStoreClient(xs_server.path) as check:
        assert check.read("/counter") == b"100"


def test_run_transaction_aborts_on_exception(xs: XenStoreClient) -> None:
    def body(tx: Transaction) -> None:
        tx.write("/aborted", "x")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        xs.run_transaction(body)
    assert not xs.exists("/aborted")


def test_watch_fires_at_once_then_on_changes(xs_server: XenStoreServer) -> None:
    with XenStoreClient(xs_server.path) as watcher, XenStoreClient(xs_server.path) as writer:
        watcher.watch("/local/domain/5/device/vbd", "fe")
        assert watcher.read_watch(5) == WatchEvent("/local/domain/5/device/vbd", "fe")
        writer.write("/local/domain/5/device/vbd/768/state", "3")
        assert watcher.read_watch(5) == WatchEvent("/local/domain/5/device/vbd/768/state", "fe")
        writer.write("/local/domain/5/other", "x")  # not below the watch
        assert watcher.read_watch(0.2) is None
        # Removing an ancestor of watched nodes fires each watch with the watch's own path.
        watcher.watch("/local/domain/5/device/vbd/768/state", "st")
        assert watcher.read_watch(5) == WatchEvent("/local/domain/5/device/vbd/768/state", "st")
        writer.rm("/local/domain/5/device")
        got = {watcher.read_watch(5), watcher.read_watch(5)}
        assert got == {
            WatchEvent("/local/domain/5/device/vbd", "fe"),
            WatchEvent("/local/domain/5/device/vbd/768/state", "st"),
        }
        watcher.watch("/local/domain/5", "top")
        assert watcher.read_watch(5) == WatchEvent("/local/domain/5", "top")
        writer.rm("/local/domain/5/other")  # below a watch: the removed path
        assert watcher.read_watch(5) == WatchEvent("/local/domain/5/other", "top")
        watcher.unwatch("/local/domain/5", "top")
        watcher.unwatch("/local/domain/5/device/vbd", "fe")
        watcher.unwatch("/local/domain/5/device/vbd/768/state", "st")
        writer.write("/local/domain/5/device/vbd/768/state", "4")
        assert watcher.read_watch(0.2) is None
        with pytest.raises(XenStoreError) as info:
            watcher.unwatch("/nowhere", "x")
        assert info.value.errno == errno.ENOENT


def test_watch_relative_path_and_duplicate(xs: XenStoreClient) -> None:
    xs.watch("device", "rel")
    assert xs.read_watch(5) == WatchEvent("device", "rel")
    xs.write("/local/domain/0/device/vbd/1", "x")
    assert xs.read_watch(5) == WatchEvent("device/vbd/1", "rel")
    with pytest.raises(XenStoreError) as info:
        xs.watch("device", "rel")
    assert info.value.errno == errno.EEXIST


def test_transaction_fires_watches_only_on_commit(xs: XenStoreClient) -> None:
    xs.watch("/w", "tok")
    assert xs.read_watch(5) == WatchEvent("/w", "tok")
    tx = xs.transaction_start()
    xs.write("/w/a", "1", tx)
    assert xs.read_watch(0.2) is None
    assert xs.transaction_end(tx)
    assert xs.read_watch(5) == WatchEvent("/w/a", "tok")
    tx = xs.transaction_start()
    xs.write("/w/b", "1", tx)
    xs.transaction_end(tx, commit=False)
    assert xs.read_watch(0.2) is None


def test_special_domain_watches(xs: XenStoreClient, xs_server: XenStoreServer) -> None:
    xs.watch("@introduceDomain", "intro")
    xs.watch("@releaseDomain", "rel")
    assert {xs.read_watch(5), xs.read_watch(5)} == {
        WatchEvent("@introduceDomain", "intro"),
        WatchEvent("@releaseDomain", "rel"),
    }
    assert not xs.is_domain_introduced(3)
    xs.introduce_domain(3, 1234, 5)
    assert xs.read_watch(5) == WatchEvent("@introduceDomain", "intro")
    assert xs.is_domain_introduced(3)
    xs_server.release_domain(3)  # the in-process path a simulated toolstack uses
    assert xs.read_watch(5) == WatchEvent("@releaseDomain", "rel")
    with pytest.raises(XenStoreError) as info:
        xs.release_domain(3)
    assert info.value.errno == errno.ENOENT


def test_event_fileno_and_callback(xs_server: XenStoreServer) -> None:
    with XenStoreClient(xs_server.path) as client:
        client.watch("/f", "t")
        ready, _, _ = select.select([client.event_fileno()], [], [], 5)
        assert ready
        assert client.read_watch(0) == WatchEvent("/f", "t")
        ready, _, _ = select.select([client.event_fileno()], [], [], 0)
        assert not ready

    seen: list[WatchEvent] = []
    done = threading.Event()

    def callback(event: WatchEvent) -> None:
        seen.append(event)
        # The callback may use the client (it runs on the dispatcher thread, not the reader).
        if cb_client.exists("/g/x"):
            done.set()

    cb_client = XenStoreClient(xs_server.path, on_watch=callback)
    try:
        cb_client.watch("/g", "t")
        cb_client.write("/g/x", "1")
        assert done.wait(5)
        assert seen[0] == WatchEvent("/g", "t")
    finally:
        cb_client.close()


def test_client_sees_server_going_away(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    server = XenStoreServer(path).start()
    client = XenStoreClient(path, timeout=5)
    client.write("/x", "1")
    server.stop()
    with pytest.raises(XenStoreError) as info:
        client.read("/x")
    assert info.value.errno == errno.EIO
    with pytest.raises(XenStoreError):
        client.read_watch(1)
    client.close()
    with pytest.raises(XenStoreError):
        XenStoreClient(path)


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from blockback.xenstore.client import default_socket_path

    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    assert default_socket_path() == "/var/run/xenstored/socket"
    monkeypatch.setenv("XENSTORED_PATH", "/tmp/elsewhere")
    assert default_socket_path() == "/tmp/elsewhere"


def test_device_style_channel(xs_server: XenStoreServer) -> None:
    """The read()/write() path used for /dev/xen/xenbus, over a descriptor of a socket."""
    import os
    import socket
    import time

    from blockback.xenstore.channel import Channel

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(xs_server.path)
    fd = os.dup(sock.fileno())
    sock.close()
    client = XenStoreClient(xs_server.path, _channel=Channel.from_fd(fd))
    client.write("/dev-style", "v")
    assert client.read("/dev-style") == b"v"
    client.watch("/dev-style", "t")
    assert client.read_watch(5) == WatchEvent("/dev-style", "t")
    started = time.monotonic()
    client.close()  # wakes the reader blocked on the descriptor
    assert time.monotonic() - started < 2
    with pytest.raises(OSError):
        os.fstat(fd)  # released


def test_find_xenstore(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from blockback.xenstore import channel as client_module

    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "x.sock"))
    assert client_module.find_xenstore() == str(tmp_path / "x.sock")
    monkeypatch.delenv("XENSTORED_PATH")
    monkeypatch.setattr(client_module, "DEFAULT_SOCKET", str(tmp_path / "none.sock"))
    device = tmp_path / "xenbus"
    device.write_bytes(b"")
    monkeypatch.setattr(client_module, "XENBUS_DEVICES", (str(tmp_path / "missing"), str(device)))
    assert client_module.find_xenstore() == str(device)
    device.unlink()
    assert client_module.find_xenstore() == str(tmp_path / "none.sock")
