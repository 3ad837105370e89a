"""A simulated hypervisor and toolstack for one guest (the test rig of docs/blkif.md §2): a test
xenstored, guest memory and event channels in a directory (:mod:`blockback.transport.sim`), the
vbd nodes libxl would write, and the :class:`~blockback.vbd.VbdDriver` serving them.  What
``vhd serve IMAGE --sim DIR`` runs, and what the handshake and C-frontend tests start in-process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from blockback.attach import write_device
from blockback.errors import LocalProtocolError
from blockback.executor import BlockDisk
from blockback.vbd import BackendOptions, VbdDriver
from blockback.xenstore import Transaction, XenStoreClient, XenStoreError

log = logging.getLogger("blockback")

SIM_FRONTEND_DOMID = 1
SIM_DEVID = 51712  # xvda


def toolstack_add_vbd(
    xs: XenStoreClient,
    *,
    image: str,
    read_only: bool,
    frontend_domid: int = SIM_FRONTEND_DOMID,
    devid: int = SIM_DEVID,
    backend_domid: int = 0,
) -> tuple[str, str]:
    """Write the nodes libxl writes when it attaches a disk; returns (backend, frontend) paths."""
    be = f"/local/domain/{backend_domid}/backend/vbd/{frontend_domid}/{devid}"
    fe = f"/local/domain/{frontend_domid}/device/vbd/{devid}"
    for path in (be, fe):
        with contextlib.suppress(XenStoreError):
            xs.rm(path)

    be_keys = {
        "frontend": fe,
        "frontend-id": str(frontend_domid),
        "online": "1",
        "state": "1",
        "params": image,
        "script": "",
        "type": "vhd",
        "mode": "r" if read_only else "w",
        "dev": "xvda",
        "device-type": "disk",
        "removable": "0",
        "bootable": "1",
        "discard-enable": "1",
    }
    fe_keys = {
        "backend": be,
        "backend-id": str(backend_domid),
        "state": "1",
        "virtual-device": str(devid),
        "device-type": "disk",
    }

    def body(tx: Transaction) -> None:
        write_device(tx, (be, backend_domid, be_keys), (fe, frontend_domid, fe_keys))

    xs.run_transaction(body)
    return be, fe


class SimBackend:
    """Everything ``vhd serve --sim`` runs, as an object tests can start and stop in-process."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        disk: BlockDisk,
        *,
        image: str = "",
        read_only: bool = False,
        pages: int | None = None,
        options: BackendOptions | None = None,
    ) -> None:
        from blockback.transport.sim import DEFAULT_PAGES, SimXen
        from blockback.xenstore.server import XenStoreServer

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.xenstored_path = str(self.directory / "xenstored.sock")
        self.frontend_xenstored_path = str(self.directory / "xenstored-dom1.sock")
        self.xenstored = XenStoreServer(self.xenstored_path).start()
        self.xenstored.listen(self.frontend_xenstored_path, SIM_FRONTEND_DOMID)
        self.xen = SimXen(self.directory, pages or DEFAULT_PAGES)
        self.xs = XenStoreClient(self.xenstored_path)
        self.backend_path, self.frontend_path = toolstack_add_vbd(
            self.xs, image=image, read_only=read_only
        )
        self.driver = VbdDriver(
            self.xs, self.backend_path, self.xen, disk, read_only=read_only, options=options
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SimBackend:
        self.driver.probe()
        self._thread = threading.Thread(target=self.run, name="sim-xenbus", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Dispatch watch events until :meth:`stop`."""
        while not self._stop.is_set():
            event = self.xs.read_watch(timeout=0.2)
            if event is not None and not self._stop.is_set():
                try:
                    self.driver.handle_event(event.token)
                except (LocalProtocolError, XenStoreError, OSError) as exc:
                    log.error("xenbus driver: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with contextlib.suppress(XenStoreError, OSError):
            self.driver.shutdown()
        if not self.driver.removed:
            self.driver._remove()
        self.xs.close()
        self.xen.close()
        self.xenstored.stop()

    def __enter__(self) -> SimBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
