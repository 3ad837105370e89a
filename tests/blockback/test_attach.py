"""``vhd xen attach/detach`` (blockback.attach) and the daemon serving vhdkit's own backend path,
against our xenstored (``blockback.xenstore.server``) with the simulated transport: the nodes
libxl's ``libxl__device_generic_add`` would write, their permissions (seen from a guest's own
connection), one transaction, the refusals, the vdev numbering of Xen's vbd-interface.txt, and
the daemon removing what a guest that is gone leaves under ``backend/vhd``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vhd
from blockback.abi import X86_64, Op, Status
from blockback.attach import (
    AttachOptions,
    DetachOptions,
    StandingAttach,
    attach,
    detach,
    list_devices,
)
from blockback.daemon import XenDaemon
from blockback.errors import AttachError
from blockback.sim import toolstack_add_vbd
from blockback.transport.sim import DEFAULT_PAGES, SimXen
from blockback.vdev import devid
from blockback.xenstore import Transaction, XenStoreClient, XenStoreError
from blockback.xenstore.server import XenStoreServer

from .cbuild import compile_c
from .pyfront import SimFrontend
from .test_xen_daemon import tree, wait_for

ROOT = "/local/domain/0/backend/vhd"
XVDB = 51728  # 202 << 8 | 1 << 4


def test_vdev_numbers_follow_vbd_interface_txt() -> None:
    # xvd: 202 << 8 | disk << 4 | partition while disk, partition < 16 ...
    assert devid("xvda") == 202 << 8 == 51712
    assert devid("xvdb") == XVDB
    assert devid("xvdp15") == 202 << 8 | 15 << 4 | 15
    assert devid("d1p2") == devid("xvdb2") == 202 << 8 | 1 << 4 | 2
    # ... and the extended form 1 << 28 | disk << 8 | partition beyond.
    assert devid("xvdq") == 1 << 28 | 16 << 8
    assert devid("xvda16") == 1 << 28 | 16
    assert devid("xvdaa") == 1 << 28 | 26 << 8  # letters count in bijective base 26
    assert devid("xvdzz") == 1 << 28 | (26 * 27 - 1) << 8
    # hd: major 3 (hda, hdb) and 22 (hdc, hdd), 64 partitions; sd: major 8.
    assert [devid(f"hd{x}") for x in "abcd"] == [3 << 8, 3 << 8 | 64, 22 << 8, 22 << 8 | 64]
    assert devid("hdb63") == 3 << 8 | 64 | 63
    assert devid("sdc1") == 8 << 8 | 2 << 4 | 1
    assert devid("51760") == 51760
    for bad in ("", "xvd", "vda", "hde", "hda64", "sdq", "sda16", "xvda256", "0", "xvdA"):
        with pytest.raises(ValueError):
            devid(bad)


class Lab:
    """Our xenstored with dom0's and guest 1's sockets, guest 1 created as libxl creates a
    domain's directory, and (optionally) the daemon watching vhdkit's backend path."""

    def __init__(
        self, tmp: Path, *, daemon: bool = True, standing: tuple[StandingAttach, ...] = ()
    ) -> None:
        self.tmp = tmp
        self.sock = tmp / "xs.sock"
        self.guest_sock = tmp / "xs1.sock"
        self.server = XenStoreServer(self.sock).start()
        self.server.listen(self.guest_sock, 1)
        self.xs = XenStoreClient(self.sock)
        self.guest = XenStoreClient(self.guest_sock)
        self.xen = SimXen(tmp / "sim", DEFAULT_PAGES)
        self.make_domain(1, "guest1")
        self.opened: list[Any] = []
        self.daemon: XenDaemon | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if daemon:

            def open_disk(image: str, read_only: bool) -> Any:
                disk = vhd.open(image, "r" if read_only else "r+")
                self.opened.append(disk)
                return disk

            self.daemon_xs = XenStoreClient(self.sock)
            self.daemon = XenDaemon(self.daemon_xs, self.xen, ROOT, open_disk, standing=standing)
            self.daemon.start()
            self.thread = threading.Thread(target=self.daemon.run, args=(self.stop,), daemon=True)
            self.thread.start()

    def make_domain(self, domid: int, name: str) -> None:
        """libxl__domain_make: the domain owns its directory; ``device`` is dom0's, readable."""
        dom = f"/local/domain/{domid}"

        def body(tx: Transaction) -> None:
            tx.mkdir(dom)
            tx.set_perms(dom, [f"n{domid}"])
            tx.write(f"{dom}/name", name)
            tx.set_perms(f"{dom}/name", ["n0", f"r{domid}"])
            tx.mkdir(f"{dom}/device")
            tx.set_perms(f"{dom}/device", ["n0", f"r{domid}"])

        self.xs.run_transaction(body)
        self.server.introduce_domain(domid)

    def destroy_domain(self, domid: int) -> None:
        """What ``xl destroy`` does to a domain libxl knows nothing of our disks for: its whole
        directory goes, then the domain dies (@releaseDomain)."""
        self.xs.rm(f"/local/domain/{domid}")
        self.server.release_domain(domid)

    def state(self, path: str) -> str | None:
        value = self.xs.try_read(f"{path}/state")
        return None if value is None else value.decode()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)
        if self.daemon is not None:
            self.daemon.shutdown()
            self.daemon_xs.close()
        for c in (self.xs, self.guest):
            c.close()
        self.xen.close()
        self.server.stop()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    rig = Lab(tmp_path)
    yield rig
    rig.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Lab]:
    rig = Lab(tmp_path, daemon=False)
    yield rig
    rig.close()


def new_image(tmp: Path, name: str = "g.vhd", size: int = 4 << 20) -> Path:
    path = tmp / name
    vhd.create(path, size).close()
    return path


def test_attach_writes_libxls_nodes_with_libxls_permissions(store: Lab) -> None:
    image = new_image(store.tmp)
    dev = attach(store.xs, AttachOptions("guest1", str(image), "xvdb"))
    be, fe = f"{ROOT}/1/{XVDB}", f"/local/domain/1/device/vbd/{XVDB}"
    assert (dev.backend, dev.frontend, dev.devid, dev.frontend_domid) == (be, fe, XVDB, 1)

    def read(path: str) -> str:
        return store.xs.read(path).decode()

    assert {k: read(f"{be}/{k}") for k in store.xs.directory(be)} == {
        "frontend": fe,
        "frontend-id": "1",
        "params": str(image),
        "mode": "w",
        "online": "1",
        "state": "1",
        "dev": "xvdb",
        "type": "vhd",
        "removable": "0",
        "bootable": "1",
        "device-type": "disk",
        "discard-enable": "1",
        "toolstack": "vhdkit",
    }
    assert {k: read(f"{fe}/{k}") for k in store.xs.directory(fe)} == {
        "backend": be,
        "backend-id": "0",
        "state": "1",
        "virtual-device": str(XVDB),
        "device-type": "disk",
    }
    for node in [be, *(f"{be}/{k}" for k in store.xs.directory(be))]:
        assert store.xs.get_perms(node) == ["n0", "r1"], node
    for node in [fe, *(f"{fe}/{k}" for k in store.xs.directory(fe))]:
        assert store.xs.get_perms(node) == ["n1", "r0"], node
    # From the guest's own connection: it reads the backend, writes its frontend, and cannot
    # touch the backend's nodes.
    assert store.guest.read(f"{be}/params") == str(image).encode()
    store.guest.write(f"{fe}/ring-ref", "8")
    store.guest.write(f"{fe}/state", "3")
    for path in (f"{be}/state", f"{be}/params", f"{be}/new"):
        with pytest.raises(XenStoreError) as err:
            store.guest.write(path, "4")
        assert err.value.errno == 13  # EACCES
    with pytest.raises(XenStoreError):
        store.guest.rm(be)
    assert list_devices(store.xs)[0].params == str(image)


def test_attach_read_only_by_domid(store: Lab) -> None:
    image = new_image(store.tmp)
    dev = attach(store.xs, AttachOptions("1", str(image), "xvdc", read_only=True))
    assert store.xs.read(f"{dev.backend}/mode") == b"r"
    assert store.xs.read(f"{dev.backend}/discard-enable") == b"0"
    assert dev.devid == devid("xvdc")


def test_refusals_write_nothing(store: Lab) -> None:
    image = new_image(store.tmp)
    before = tree(store.xs, "/local/domain")
    for options, exc in (
        (AttachOptions("nosuch", str(image), "xvdb"), AttachError),
        (AttachOptions("7", str(image), "xvdb"), AttachError),
        (AttachOptions("guest1", str(image), "vdb"), ValueError),
        (AttachOptions("guest1", str(store.tmp / "missing.vhd"), "xvdb"), OSError),
    ):
        with pytest.raises(exc):
            attach(store.xs, options)
    (store.tmp / "junk.vhd").write_bytes(b"not a vhd" * 1000)
    with pytest.raises(vhd.VHDError):
        attach(store.xs, AttachOptions("guest1", str(store.tmp / "junk.vhd"), "xvdb"))
    assert tree(store.xs, "/local/domain") == before
    # A device number the guest already has (libxl's or ours) is refused, and left alone.
    toolstack_add_vbd(store.xs, image=str(image), read_only=False, devid=XVDB)
    before = tree(store.xs, "/local/domain")
    with pytest.raises(AttachError, match="already has a disk xvdb"):
        attach(store.xs, AttachOptions("guest1", str(image), "xvdb"))
    assert tree(store.xs, "/local/domain") == before
    # ... and detaching a disk libxl attached is refused: it is xl's.
    with pytest.raises(AttachError, match="not attached by vhdkit"):
        detach(store.xs, DetachOptions("guest1", "xvdb", force=True))
    assert tree(store.xs, "/local/domain") == before


def test_one_transaction_retried_when_the_device_appears_meanwhile(
    store: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks and the writes are one transaction: a device created by someone else while
    ours runs makes the commit fail (EAGAIN); the retry sees it and refuses, writing nothing."""
    image = new_image(store.tmp)
    other = XenStoreClient(store.sock)
    real = XenStoreClient.run_transaction
    attempts: list[int] = []

    def racing(self: XenStoreClient, body: Any, attempts_: int = 32) -> Any:
        def wrapped(tx: Transaction) -> Any:
            attempts.append(1)
            result = body(tx)
            if len(attempts) == 1:  # between our writes and our commit
                other.write(f"/local/domain/1/device/vbd/{XVDB}/backend", "elsewhere")
            return result

        return real(self, wrapped, attempts_)

    monkeypatch.setattr(XenStoreClient, "run_transaction", racing)
    with pytest.raises(AttachError, match="already has a disk"):
        attach(store.xs, AttachOptions("guest1", str(image), "xvdb"))
    monkeypatch.undo()
    assert len(attempts) == 2
    assert store.xs.try_read(f"{ROOT}/1/{XVDB}") is None  # none of the first attempt's writes
    assert store.xs.directory(f"/local/domain/1/device/vbd/{XVDB}") == ["backend"]
    other.close()


def cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XENSTORED_PATH=str(lab.sock))
    return subprocess.run(
        [sys.executable, "-m", "vhdtools.cli", "xen", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_cli_refusals_are_one_line_exit_2(store: Lab) -> None:
    image = new_image(store.tmp)
    for args, text in (
        (("attach", "nosuch", str(image), "--vdev", "xvdb"), "no domain named 'nosuch'"),
        (("attach", "guest1", str(image), "--vdev", "vdb"), "not a Xen vbd name"),
        (("attach", "guest1", str(store.tmp / "nope.vhd"), "--vdev", "xvdb"), "nope.vhd"),
        (("detach", "guest1", "xvdb"), "has no disk xvdb"),
    ):
        out = cli(store, *args)
        assert out.returncode == 2, out
        assert out.stderr.startswith("vhd: error:") and out.stderr.count("\n") == 1, out.stderr
        assert text in out.stderr
    assert tree(store.xs, ROOT) == []


def test_attach_serve_io_detach_leaves_nothing(lab: Lab) -> None:
    """attach -> the daemon on backend/vhd serves it -> a frontend writes -> detach (online=0,
    state=5, the frontend closes, Closed) -> both directories and the domid directory gone."""
    image = new_image(lab.tmp)
    out = cli(lab, "attach", "guest1", str(image), "--vdev", "xvdb")
    assert out.returncode == 0, out.stderr
    be, fe = f"{ROOT}/1/{XVDB}", f"/local/domain/1/device/vbd/{XVDB}"
    wait_for(lambda: lab.state(be) == "2")
    front = SimFrontend(str(lab.tmp / "sim"), X86_64, 0, first_page=10)
    for k, v in front.keys().items():
        lab.guest.write(f"{fe}/{k}", v)
    lab.guest.write(f"{fe}/state", "3")
    wait_for(lambda: lab.state(be) == "4")
    (p,) = front.alloc(1)
    front.page(p)[:] = b"v" * 4096
    assert front.call(X86_64.encode_rw(Op.WRITE, 1, 8, [(p, 0, 7)])) == Status.OKAY
    assert "xvdb" in cli(lab, "list").stdout

    # The guest's blkfront answers the backend's Closing by closing (as Linux does).
    def guest_closes() -> None:
        wait_for(lambda: lab.state(be) == "5")
        lab.guest.write(f"{fe}/state", "6")

    closer = threading.Thread(target=guest_closes)
    closer.start()
    out = cli(lab, "detach", "guest1", "xvdb")
    closer.join()
    assert out.returncode == 0, out.stderr
    assert tree(lab.xs, ROOT) == []
    assert lab.xs.try_read(fe) is None
    wait_for(lambda: not lab.daemon.drivers)  # type: ignore[union-attr]
    assert lab.opened[0].closed and lab.xen.grants.mapped == 0
    front.close()
    with vhd.open(image) as disk:
        assert disk.pread(4096, 4096) == b"v" * 4096


def test_detach_times_out_without_a_backend_then_force(store: Lab) -> None:
    image = new_image(store.tmp)
    attach(store.xs, AttachOptions("guest1", str(image), "xvdb"))
    with pytest.raises(AttachError, match=r"did not close within 0\.2 s"):
        detach(store.xs, DetachOptions("guest1", "xvdb", timeout=0.2))
    assert store.xs.read(f"{ROOT}/1/{XVDB}/online") == b"0"
    detach(store.xs, DetachOptions("guest1", "xvdb", force=True))
    assert tree(store.xs, ROOT) == []
    assert store.xs.try_read(f"/local/domain/1/device/vbd/{XVDB}") is None


def test_daemon_removes_vhdkit_devices_of_a_destroyed_guest_only(lab: Lab) -> None:
    """xl destroy removes the guest's directory but knows nothing of backend/vhd: the daemon
    removes vhdkit's devices (connected or not) and the domid directory; a libxl device under
    the same root is left to libxl."""
    lab.make_domain(2, "guest2")
    images = [new_image(lab.tmp, f"{n}.vhd") for n in "abcd"]
    attach(lab.xs, AttachOptions("guest1", str(images[0]), "xvdb"))
    attach(lab.xs, AttachOptions("guest1", str(images[1]), "xvdc"))
    attach(lab.xs, AttachOptions("guest2", str(images[2]), "xvdb"))
    libxl_be, _ = toolstack_add_vbd(
        lab.xs, image=str(images[3]), read_only=True, frontend_domid=1, devid=devid("xvdd")
    )
    libxl_be_moved = f"{ROOT}/1/{devid('xvdd')}"
    lab.xs.run_transaction(lambda tx: _move(tx, libxl_be, libxl_be_moved))
    for d in ("xvdb", "xvdc"):
        be = f"{ROOT}/1/{devid(d)}"
        wait_for(lambda be=be: lab.state(be) == "2")
    lab.destroy_domain(1)
    wait_for(lambda: tree(lab.xs, f"{ROOT}/1") == tree_of(lab.xs, libxl_be_moved))
    assert lab.xs.try_read(f"{ROOT}/2/{XVDB}/state") is not None  # guest 2 untouched
    # The libxl device goes when libxl removes it (the daemon removes nothing of libxl's, not
    # even the domid directory it leaves empty: libxl's path clean-up does that).
    lab.xs.rm(libxl_be_moved)
    lab.destroy_domain(2)
    wait_for(lambda: tree(lab.xs, ROOT) == [f"{ROOT}/1"])
    wait_for(lambda: not lab.daemon.drivers)  # type: ignore[union-attr]
    assert len(lab.opened) == 4 and all(d.closed for d in lab.opened)


def tree_of(xs: XenStoreClient, path: str) -> list[str]:
    return [path, *tree(xs, path)]


def _move(tx: Transaction, src: str, dst: str) -> None:
    """A libxl-made device (no vhdkit marker) under vhdkit's root."""
    keys = {k: tx.read(f"{src}/{k}") for k in tx.directory(src)}
    tx.rm(src)
    for k, v in keys.items():
        tx.write(f"{dst}/{k}", v)


def test_c_frontend_against_an_attached_device(lab: Lab, tmp_path: Path) -> None:
    """The C test frontend (libxenstore, Xen's ring macros) runs its checklist against a disk
    ``vhd xen attach`` created and the daemon serves on backend/vhd; detach leaves nothing."""
    frontend = compile_c("frontend.c", tmp_path / "frontend", libs=("xenstore",))
    image = new_image(tmp_path, size=32 << 20)
    out = cli(lab, "attach", "guest1", str(image), "--vdev", "xvdb")
    assert out.returncode == 0, out.stderr
    fe = f"/local/domain/1/device/vbd/{XVDB}"
    env = dict(os.environ, XENSTORED_PATH=str(lab.guest_sock))
    shadow = tmp_path / "shadow.bin"
    result = subprocess.run(
        [str(frontend), str(lab.tmp / "sim"), fe, "check", "--shadow", str(shadow)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = cli(lab, "detach", "guest1", "xvdb")
    assert out.returncode == 0, out.stderr
    assert tree(lab.xs, ROOT) == [] and lab.xs.try_read(fe) is None
    wait_for(lambda: not lab.daemon.drivers and lab.opened[0].closed)  # type: ignore[union-attr]
    assert lab.xen.grants.mapped == 0 and lab.xen.events.unbound == 0
    with vhd.open(image) as disk:
        assert disk.pread(disk.size, 0) == shadow.read_bytes()


def test_standing_attach_parses() -> None:
    assert StandingAttach.parse("web:/srv/a:b.vhd:xvdb") == StandingAttach(
        "web", "/srv/a:b.vhd", "xvdb"
    )
    assert StandingAttach.parse("web:/srv/a.vhd:xvdc:ro").read_only
    for bad in ("web", "web:/srv/a.vhd", ":/srv/a.vhd:xvdb", "web:/srv/a.vhd:vdb"):
        with pytest.raises(ValueError):
            StandingAttach.parse(bad)
    out = subprocess.run(
        [sys.executable, "-m", "vhdtools.cli", "serve", "--xen", "--attach", "web:x.vhd"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.startswith("vhd: error: --attach wants"), out.stderr


def test_standing_attach_follows_the_domain_by_name(tmp_path: Path) -> None:
    """``serve --xen --attach guest1:IMAGE:xvdb``: attached to the running guest1 at start;
    a detach is not undone; guest1 destroyed, its nodes go; a new guest1 (a reboot: new domid)
    gets the disk again on @introduceDomain; other domains never do."""
    image = new_image(tmp_path)
    lab = Lab(tmp_path, standing=(StandingAttach("guest1", str(image), "xvdb"),))
    try:
        be1 = f"{ROOT}/1/{XVDB}"
        wait_for(lambda: lab.state(be1) == "2")
        assert lab.xs.read(f"/local/domain/1/device/vbd/{XVDB}/backend") == be1.encode()
        detach(lab.xs, DetachOptions("guest1", "xvdb", timeout=30))
        lab.make_domain(2, "other")  # @introduceDomain: guest1 is not re-attached, other never
        wait_for(lambda: not lab.daemon.drivers)  # type: ignore[union-attr]
        assert tree(lab.xs, ROOT) == []
        lab.destroy_domain(1)
        lab.make_domain(3, "guest1")
        be3 = f"{ROOT}/3/{XVDB}"
        wait_for(lambda: lab.state(be3) == "2")
        lab.destroy_domain(3)
        wait_for(lambda: tree(lab.xs, ROOT) == [])
        assert lab.xs.try_read(f"/local/domain/2/device/vbd/{XVDB}") is None
        wait_for(lambda: len(lab.opened) == 2 and all(d.closed for d in lab.opened))
    finally:
        lab.close()
