"""``serve_xen``'s device manager (XenDaemon) against the test xenstored, with the simulated
transport standing in for gntdev/evtchn: discovery, hotplug-status, I/O, toolstack detach,
removal, unopenable images and shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vhd
from blockback.abi import X86_64, Op, Status
from blockback.server import XenDaemon, toolstack_add_vbd
from blockback.transport.sim import SimXen
from blockback.xenstore import XenStoreClient
from blockback.xenstore.server import XenStoreServer

from .pyfront import SimFrontend

ROOT = "/local/domain/0/backend/vbd"


def wait_for(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server = XenStoreServer(tmp / "xs.sock").start()
        self.server.listen(tmp / "xs1.sock", 1)
        self.xen = SimXen(tmp / "sim", pages=512)
        self.toolstack = XenStoreClient(tmp / "xs.sock")
        self.guest = XenStoreClient(tmp / "xs1.sock")
        self.opened: list[Any] = []

        def open_disk(image: str, read_only: bool) -> Any:
            disk = vhd.open(image, "r" if read_only else "r+")
            self.opened.append(disk)
            return disk

        self.xs = XenStoreClient(tmp / "xs.sock")
        self.daemon = XenDaemon(self.xs, self.xen, ROOT, open_disk)
        self.stop = threading.Event()
        self.daemon.start()
        self.thread = threading.Thread(target=self.daemon.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def state(self, path: str) -> str | None:
        value = self.toolstack.try_read(f"{path}/state")
        return None if value is None else value.decode()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.daemon.shutdown()
        for c in (self.xs, self.toolstack, self.guest):
            c.close()
        self.xen.close()
        self.server.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def connect(rig: Rig, fe: str) -> SimFrontend:
    front = SimFrontend(str(rig.tmp / "sim"), X86_64, 0, first_page=10)
    for k, v in front.keys().items():
        rig.guest.write(f"{fe}/{k}", v)
    rig.guest.write(f"{fe}/state", "3")
    return front


def test_discover_serve_detach_remove(rig: Rig) -> None:
    image = rig.tmp / "a.vhd"
    vhd.create(image, 4 << 20).close()
    be, fe = toolstack_add_vbd(rig.toolstack, image=str(image), read_only=False)
    wait_for(lambda: rig.state(be) == "2")
    assert rig.toolstack.read(f"{be}/hotplug-status") == b"connected"
    front = connect(rig, fe)
    wait_for(lambda: rig.state(be) == "4")
    (p,) = front.alloc(1)
    front.page(p)[:] = b"z" * 4096
    assert front.call(X86_64.encode_rw(Op.WRITE, 1, 0, [(p, 0, 7)])) == Status.OKAY
    # Toolstack detach: online=0, backend goes Closing; the frontend closes; device forgotten.
    rig.toolstack.write(f"{be}/online", "0")
    wait_for(lambda: rig.state(be) == "5")
    rig.guest.write(f"{fe}/state", "6")
    wait_for(lambda: rig.state(be) == "6")
    wait_for(lambda: be not in rig.daemon.drivers)
    assert rig.opened[0].closed  # the image was closed with the device
    assert rig.xen.grants.mapped == 0
    rig.toolstack.rm(be)
    front.close()
    # force_share: the daemon sets the closed device up again (it opens the image a second
    # time) and keeps it open after the removal, so a locking open would be refused.
    with vhd.open(image, force_share=True) as disk:
        assert disk.pread(4096, 0) == b"z" * 4096


def test_unopenable_image_reports_hotplug_error(rig: Rig) -> None:
    be, _ = toolstack_add_vbd(rig.toolstack, image=str(rig.tmp / "missing.vhd"), read_only=True)
    wait_for(lambda: rig.toolstack.try_read(f"{be}/hotplug-status") == b"error")
    assert rig.toolstack.try_read(f"{be}/hotplug-error")
    assert be in rig.daemon.failed and be not in rig.daemon.drivers


def test_removed_nodes_and_shutdown(rig: Rig) -> None:
    paths = []
    for devid in (51712, 51728):
        image = rig.tmp / f"{devid}.vhd"
        vhd.create(image, 1 << 20).close()
        be, fe = toolstack_add_vbd(rig.toolstack, image=str(image), read_only=True, devid=devid)
        paths.append((be, fe))
    for be, _ in paths:
        wait_for(lambda be=be: rig.state(be) == "2")
    # The toolstack deletes the first device outright: it is dropped and its image closed.
    rig.toolstack.rm(paths[0][0])
    wait_for(lambda: paths[0][0] not in rig.daemon.drivers)
    assert rig.opened[0].closed
    # The second one is connected when we shut down (SIGTERM): it ends Closed.
    front = connect(rig, paths[1][1])
    wait_for(lambda: rig.state(paths[1][0]) == "4")
    assert rig.toolstack.read(f"{paths[1][0]}/info") == b"4"  # mode=r -> VDISK_READONLY
    rig.stop.set()
    rig.thread.join(10)
    rig.daemon.shutdown()
    assert rig.state(paths[1][0]) == "6"
    assert not rig.daemon.drivers
    assert rig.xen.grants.mapped == 0
    front.close()


def test_params_with_a_toolstack_format_prefix_name_the_image(tmp_path: Path) -> None:
    from blockback.server import image_path

    image = tmp_path / "g.vhd"
    image.write_bytes(b"")
    assert image_path(str(image)) == str(image)
    assert image_path(f"vhd:{image}") == str(image)  # libxl qdisk
    assert image_path(f"tapdisk:vhd:{image}") == str(image)  # blktap toolstacks
    assert image_path(f"aio:{image}") == str(image)
    # Unknown prefixes and missing files are left alone (the open then reports the real name).
    assert image_path(f"nbd:{image}") == f"nbd:{image}"
    assert image_path(f"vhd:{tmp_path}/missing.vhd") == f"vhd:{tmp_path}/missing.vhd"
