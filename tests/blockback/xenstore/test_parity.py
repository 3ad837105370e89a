"""Our xenstored against C xenstored's rules where a guest could tell the difference: which
watch events an unprivileged watcher hears (``watch_permitted``), MKDIR on a node the caller may
not write, who owns what dom0 creates in a guest's home (``construct_node``), and the memory an
open transaction costs (copy-on-write, ``xenstored_transaction.c``)."""

from __future__ import annotations

import errno
import gc
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from blockback.xenstore import XenStoreClient, XenStoreError
from blockback.xenstore.store import ConnState, Store
from blockback.xenstore.wire import Message, XsType, join_strings, split_strings

GUEST = 5
HOME = f"/local/domain/{GUEST}"


def call(store: Store, conn: ConnState, mtype: int, payload: bytes, tx: int = 0) -> Message:
    """Send one request; return its reply (events queued before it are kept in order)."""
    store.handle(conn, Message(mtype, 1, tx, payload))
    pending: list[bytes] = []
    while True:
        data = conn.pop_out()
        assert data is not None
        if int.from_bytes(data[:4], "little") != XsType.WATCH_EVENT:
            for event in reversed(pending):
                conn.out.appendleft((event, None))
                conn.out_bytes += len(event)
            return Message(int.from_bytes(data[:4], "little"), 0, 0, data[16:])
        pending.append(data)


def events(conn: ConnState) -> list[str]:
    """Paths of the watch events queued for ``conn`` (and forget them)."""
    out = []
    while (data := conn.pop_out()) is not None:
        if int.from_bytes(data[:4], "little") == XsType.WATCH_EVENT:
            out.append(split_strings(data[16:])[0])
    return out


def write(store: Store, conn: ConnState, path: str, value: bytes = b"v", tx: int = 0) -> Message:
    return call(store, conn, XsType.WRITE, path.encode() + b"\0" + value, tx)


def setup() -> tuple[Store, ConnState, ConnState]:
    store = Store()
    dom0 = store.connect(0)
    guest = store.connect(GUEST)
    write(store, dom0, HOME, b"")
    assert call(store, dom0, XsType.SET_PERMS, join_strings(HOME, f"n{GUEST}")).payload == b"OK\0"
    return store, dom0, guest


def test_a_guest_does_not_hear_of_removals_it_could_not_read() -> None:
    store, dom0, guest = setup()
    write(store, dom0, "/tool/secret/deep")  # /tool is n0: the guest may read none of it
    write(store, dom0, f"{HOME}/mine")
    for path in ("/", "/tool/secret/deep"):
        assert call(store, guest, XsType.WATCH, join_strings(path, "t")).payload == b"OK\0"
    events(guest)
    call(store, dom0, XsType.RM, join_strings("/tool/secret"))
    assert events(guest) == []
    # What it may read, it hears of, removals included.
    call(store, dom0, XsType.RM, join_strings(f"{HOME}/mine"))
    assert events(guest) == [f"{HOME}/mine"]


def test_a_guest_hears_when_it_loses_read_access() -> None:
    store, dom0, guest = setup()
    write(store, dom0, "/shared", b"x")
    call(store, dom0, XsType.SET_PERMS, join_strings("/shared", "n0", f"r{GUEST}"))
    call(store, guest, XsType.WATCH, join_strings("/shared", "t"))
    assert events(guest) == ["/shared"]
    call(store, dom0, XsType.SET_PERMS, join_strings("/shared", "n0"))
    assert events(guest) == ["/shared"]  # judged by the permissions it had before
    write(store, dom0, "/shared", b"y")
    assert events(guest) == []


def test_mkdir_on_a_node_the_caller_may_not_write_is_eaccess_whether_or_not_it_exists() -> None:
    store, dom0, guest = setup()
    write(store, dom0, "/tool/exists")
    for path in ("/tool/exists", "/tool/missing"):
        reply = call(store, guest, XsType.MKDIR, join_strings(path))
        assert (reply.type, reply.payload) == (XsType.ERROR, b"EACCES\0"), path
    assert call(store, guest, XsType.MKDIR, join_strings(f"{HOME}/d")).payload == b"OK\0"


def test_nodes_dom0_creates_in_a_guest_home_keep_the_guests_ownership() -> None:
    store, dom0, guest = setup()
    write(store, dom0, f"{HOME}/device/vbd/768/state", b"1")
    for path in (f"{HOME}/device", f"{HOME}/device/vbd/768/state"):
        perms = call(store, dom0, XsType.GET_PERMS, join_strings(path)).payload
        assert split_strings(perms) == [f"n{GUEST}"], path
    # The guest may change what is its own, and what it creates is its own too.
    assert write(store, guest, f"{HOME}/device/vbd/768/state", b"4").payload == b"OK\0"
    write(store, guest, f"{HOME}/data/x")
    assert split_strings(
        call(store, guest, XsType.GET_PERMS, join_strings(f"{HOME}/data")).payload
    ) == [f"n{GUEST}"]
    # Outside the guest's home, dom0's nodes stay dom0's.
    write(store, dom0, "/local/domain/0/backend/vbd/5/768/state", b"1")
    perms = call(store, dom0, XsType.GET_PERMS, join_strings("/local/domain/0/backend")).payload
    assert split_strings(perms) == ["n0"]


def test_open_transactions_cost_what_they_touch_not_the_tree() -> None:
    store = Store()
    dom0 = store.connect(0)
    for i in range(10_000):
        write(store, dom0, f"/data/{i // 100}/{i % 100}", b"x" * 16)
    conns = [store.connect(0) for _ in range(20)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, conn in enumerate(conns):
            reply = call(store, conn, XsType.TRANSACTION_START, b"\0")
            tx = int(reply.payload.rstrip(b"\0"))
            assert (
                call(store, conn, XsType.READ, join_strings(f"/data/{i}/1"), tx).payload
                == b"x" * 16
            )
            write(store, conn, f"/data/{i}/2", b"y", tx)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # A copy of the tree per transaction was over 1 MiB each here; what they touched is a few KiB.
    assert grown < 1024 * 1024, grown
    # And they still commit (or conflict) as before.
    for conn in conns:
        tx = next(iter(conn.transactions))
        assert call(store, conn, XsType.TRANSACTION_END, join_strings("T"), tx).payload == b"OK\0"
    assert call(store, dom0, XsType.READ, join_strings("/data/7/2")).payload == b"y"


def test_a_transaction_conflicts_on_what_it_read_after_a_later_change() -> None:
    store = Store()
    dom0, other = store.connect(0), store.connect(0)
    write(store, dom0, "/a", b"1")
    tx = int(call(store, dom0, XsType.TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
    assert call(store, dom0, XsType.READ, join_strings("/a"), tx).payload == b"1"
    write(store, other, "/a", b"2")
    assert call(store, dom0, XsType.READ, join_strings("/a"), tx).payload == b"1"  # its own view
    write(store, dom0, "/b", b"x", tx)
    reply = call(store, dom0, XsType.TRANSACTION_END, join_strings("T"), tx)
    assert (reply.type, reply.payload) == (XsType.ERROR, b"EAGAIN\0")
    assert call(store, dom0, XsType.READ, join_strings("/b")).type == XsType.ERROR


def test_unprivileged_permission_lists_are_bounded_like_c() -> None:
    store, dom0, guest = setup()
    write(store, guest, f"{HOME}/shared")
    five = join_strings(f"{HOME}/shared", f"n{GUEST}", *(f"r{d}" for d in range(1, 5)))
    assert call(store, guest, XsType.SET_PERMS, five).payload == b"OK\0"
    six = join_strings(f"{HOME}/shared", f"n{GUEST}", *(f"r{d}" for d in range(1, 6)))
    reply = call(store, guest, XsType.SET_PERMS, six)
    assert (reply.type, reply.payload) == (XsType.ERROR, b"ENOSPC\0")
    # dom0 is not bound by it.
    assert call(store, dom0, XsType.SET_PERMS, six).payload == b"OK\0"


def test_quotas_are_configurable_from_the_command_line(tmp_path: Path) -> None:
    sock, guest_sock = tmp_path / "xs.sock", tmp_path / "dom5.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockback.xenstore.server", str(sock),
         "--domain", f"{GUEST}:{guest_sock}", "--quota-transactions", "2",
         "--quota-entry-size", "16"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not guest_sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        with XenStoreClient(sock) as dom0, XenStoreClient(guest_sock) as guest:
            dom0.mkdir(HOME)
            dom0.set_perms(HOME, [f"n{GUEST}"])
            guest.write("small", b"x" * 16)
            with pytest.raises(XenStoreError) as info:
                guest.write("big", b"x" * 17)
            assert info.value.errno == errno.ENOSPC
            txs = [guest.transaction_start() for _ in range(2)]
            with pytest.raises(XenStoreError) as info:
                guest.transaction_start()
            assert info.value.errno == errno.ENOSPC
            for tx in txs:
                guest.transaction_end(tx, commit=False)
    finally:
        proc.terminate()
        proc.wait(20)
    bad = subprocess.run(
        [sys.executable, "-m", "blockback.xenstore.server", str(sock), "--quota-watches", "0"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "quota" in bad.stderr and "Traceback" not in bad.stderr
