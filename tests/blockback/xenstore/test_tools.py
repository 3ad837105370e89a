"""Conformance of our xenstore server against the real clients: Debian's ``xenstore-*`` tools
(xenstore-utils) and a C program linked with ``libxenstore`` (what a blkif frontend uses).

Both find the daemon through ``$XENSTORED_PATH`` (``xs_daemon_socket()``; a socket there is
used directly, no ``/dev/xen/xenbus`` or ``/proc/xen/xenbus`` needed).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockback.xenstore.client import Transaction, WatchEvent, XenStoreClient
from blockback.xenstore.server import XenStoreServer
from tests.conftest import need_tool

HERE = Path(__file__).parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[XenStoreServer]:
    srv = XenStoreServer(tmp_path / "xenstored.sock").start()
    try:
        yield srv
    finally:
        srv.stop()


def run(
    server: XenStoreServer, *argv: str, check: bool = True, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    tool = need_tool(argv[0])
    env = dict(os.environ, XENSTORED_PATH=server.path)
    result = subprocess.run(
        [tool, *argv[1:]], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}): {result.stderr}")
    return result


def test_write_read_exists_rm(server: XenStoreServer) -> None:
    run(server, "xenstore-write", "/vm/a", "hello", "/vm/b/c", "world")
    assert run(server, "xenstore-read", "/vm/a", "/vm/b/c").stdout == "hello\nworld\n"
    assert run(server, "xenstore-exists", "/vm/b/c").returncode == 0
    missing = run(server, "xenstore-exists", "/vm/none", check=False)
    assert missing.returncode == 1
    bad = run(server, "xenstore-read", "/vm/none", check=False)
    assert bad.returncode == 1 and "couldn't read path" in bad.stderr
    run(server, "xenstore-rm", "/vm/b")
    assert run(server, "xenstore-exists", "/vm/b/c", check=False).returncode == 1
    with XenStoreClient(server.path) as xs:
        assert xs.read("/vm/a") == b"hello"
        assert xs.directory("/vm") == ["a"]


def test_rm_tidy_removes_empty_parents(server: XenStoreServer) -> None:
    run(server, "xenstore-write", "/t/x/y/z", "1", "/t/keep", "2")
    run(server, "xenstore-rm", "-t", "/t/x/y/z")
    with XenStoreClient(server.path) as xs:
        assert xs.directory("/t") == ["keep"]


def test_list_and_ls(server: XenStoreServer) -> None:
    with XenStoreClient(server.path) as xs:
        xs.write("/local/domain/0/backend/vbd/5/768/params", "/img/a.vhd")
        xs.write("/local/domain/0/backend/vbd/5/768/mode", "r")
        xs.set_perms("/local/domain/0/backend/vbd/5", ["n0", "r5"])
    listed = run(server, "xenstore-list", "/local/domain/0/backend/vbd/5/768").stdout
    assert listed.split() == ["params", "mode"]
    ls = run(server, "xenstore-ls", "-f", "/local/domain/0/backend").stdout.splitlines()
    assert ls == [
        '/local/domain/0/backend/vbd = ""',
        '/local/domain/0/backend/vbd/5 = ""',
        '/local/domain/0/backend/vbd/5/768 = ""',
        '/local/domain/0/backend/vbd/5/768/params = "/img/a.vhd"',
        '/local/domain/0/backend/vbd/5/768/mode = "r"',
    ]
    perms = run(server, "xenstore-ls", "-p", "/local/domain/0/backend/vbd").stdout
    assert perms.splitlines()[0].endswith("(n0,r5)")


def test_big_directory_through_directory_part(server: XenStoreServer) -> None:
    """libxenstore's xs_directory falls back to XS_DIRECTORY_PART when the list passes 4 KiB."""
    names = [f"a-rather-long-child-name-{i:04d}" for i in range(300)]

    def fill(tx: Transaction) -> None:
        for name in names:
            tx.write(f"/big/{name}", "")

    with XenStoreClient(server.path) as xs:
        xs.run_transaction(fill)
    assert run(server, "xenstore-list", "/big").stdout.split() == names


def test_chmod(server: XenStoreServer) -> None:
    run(server, "xenstore-write", "/perm", "v")
    run(server, "xenstore-chmod", "/perm", "n0", "r7", "b9")
    with XenStoreClient(server.path) as xs:
        assert xs.get_perms("/perm") == ["n0", "r7", "b9"]


def test_values_are_escaped_like_xenstored_tools(server: XenStoreServer) -> None:
    with XenStoreClient(server.path) as xs:
        xs.write("/bin", b"a\x01b\\")
    # xenstore-read sanitises non-printable bytes; -R prints them raw.
    assert run(server, "xenstore-read", "/bin").stdout == "a\\001b\\\\\n"
    raw = subprocess.run(
        [need_tool("xenstore-read"), "-R", "/bin"],
        env=dict(os.environ, XENSTORED_PATH=server.path),
        capture_output=True,
        timeout=20,
    )
    assert raw.stdout == b"a\x01b\\"  # raw: the bytes only, no newline


def test_watch_prints_initial_and_change_events(server: XenStoreServer) -> None:
    tool = need_tool("xenstore-watch")
    env = dict(os.environ, XENSTORED_PATH=server.path)
    with subprocess.Popen(
        [tool, "-n", "3", "/local/domain/5/device"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        # The first line is the initial fire: once it is out, the watch is registered.
        assert proc.stdout.readline() == "/local/domain/5/device\n"
        with XenStoreClient(server.path) as xs:
            xs.write("/local/domain/5/device/vbd/768/state", "3")
            xs.write("/local/domain/5/elsewhere", "no event")
            xs.rm("/local/domain/5/device")
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        "/local/domain/5/device/vbd/768/state",
        "/local/domain/5/device",
    ]


def test_libxenstore_program(server: XenStoreServer, tmp_path: Path) -> None:
    """The handshake calls of a C frontend (xs_open(0), watches, transactions with EAGAIN)."""
    gcc = need_tool("gcc")
    exe = tmp_path / "xs_libxenstore"
    subprocess.run(
        [gcc, "-Wall", "-Werror", "-o", str(exe), str(HERE / "xs_libxenstore.c"), "-lxenstore"],
        check=True,
        timeout=120,
    )
    result = subprocess.run(
        [str(exe)],
        env=dict(os.environ, XENSTORED_PATH=server.path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert "FAIL" not in result.stdout
    assert "ok transaction retried once" in steps and "ok watch initial fire" in steps
    assert len(steps) == 18


def test_tools_and_python_client_share_watches(server: XenStoreServer) -> None:
    with XenStoreClient(server.path) as xs:
        xs.watch("/shared", "py")
        assert xs.read_watch(5) == WatchEvent("/shared", "py")
        run(server, "xenstore-write", "/shared/k", "v")
        assert xs.read_watch(5) == WatchEvent("/shared/k", "py")


def test_standalone_daemon_module(tmp_path: Path) -> None:
    """``python -m blockback.xenstore.server SOCKET --domain 5:PATH``: serves, stops on SIGTERM."""
    import signal
    import sys
    import time

    sock = tmp_path / "xs.sock"
    dom5 = tmp_path / "dom5.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockback.xenstore.server", str(sock), "--domain", f"5:{dom5}"],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not (sock.exists() and dom5.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        env = dict(os.environ, XENSTORED_PATH=str(sock))
        tool = need_tool("xenstore-write")
        subprocess.run([tool, "/local/domain/5/x", "1"], env=env, check=True, timeout=20)
        # The toolstack (dom0) created the node: the guest may not read it.
        with XenStoreClient(dom5) as guest, pytest.raises(Exception, match="EACCES"):
            guest.read("/local/domain/5/x")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not sock.exists() and not dom5.exists()
