"""``vhd serve --sim`` and ``vhd serve --xen``: the xenbus driver of the blkif backend (§2 of
docs/blkif.md) over a XenStore client and a transport.

:class:`VbdDriver` runs one vbd through :class:`blockback.xenbus.XenbusMachine`: it turns watch
events on the frontend's ``state`` and the toolstack's ``online`` node into machine inputs and
performs the resulting actions (publish the InitWait keys, connect in one transaction, close
after draining in-flight I/O, reconnect, remove).  Watches are narrow -- two nodes per device --
and events are handled by re-reading the node, so a frontend churning its directory costs one read
per coalesced event (XSA-349).

``serve_sim`` plays hypervisor and toolstack for one guest on the simulated transport: a test
xenstored in DIR, guest memory and event channels in DIR, the vbd nodes libxl would write, and
the backend.  ``serve_xen`` is the dom0 daemon: it watches the backend directory for devices the
toolstack creates, serves each with the real Xen transport, and tears them down on
Closing/Closed, ``online=0``, the frontend's or the backend directory's removal, or SIGTERM.
Every backend write is one transaction that first checks the backend directory still exists:
the toolstack owns it, and once it is removed (``xl destroy``, ``block-detach``) nothing of ours
may re-create it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vhd
from blockback.backend import BlkifDevice, Transport
from blockback.engine import BlkifEngine, DeviceConfig
from blockback.executor import BlockDisk, RequestExecutor
from blockback.ring import LocalProtocolError, RemoteProtocolError
from blockback.xenbus import (
    Action,
    Input,
    XenbusMachine,
    XenbusState,
    connect_keys,
    initwait_keys,
    read_frontend,
)
from blockback.xenstore import Transaction, XenStoreClient, XenStoreError

log = logging.getLogger("blockback")

SIM_FRONTEND_DOMID = 1
SIM_DEVID = 51712  # xvda


@dataclass
class BackendOptions:
    workers: int = 4
    max_ring_page_order: int = 4
    max_queues: int = 4
    max_indirect_segments: int = 1024
    # Requests up to this many bytes may run on the ring thread (adaptive: see backend.py).
    inline_max: int = 64 * 1024
    write_hotplug_status: bool = True


class VbdDriver:
    """One vbd: its xenbus state machine, its disk and executor, and (when connected) its rings."""

    def __init__(
        self,
        xs: XenStoreClient,
        backend_path: str,
        transport: Transport,
        disk: BlockDisk,
        *,
        read_only: bool,
        options: BackendOptions | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.xs = xs
        self.be = backend_path.rstrip("/")
        self.transport = transport
        self.disk = disk
        self.read_only = read_only or disk.read_only
        self.options = options or BackendOptions()
        self.on_close = on_close
        self.machine = XenbusMachine()
        self.fe = self._read(f"{self.be}/frontend") or ""
        self.fe_domid = int(self._read(f"{self.be}/frontend-id") or "0")
        self.executor = RequestExecutor(
            disk, read_only=self.read_only, workers=self.options.workers
        )
        self.device: BlkifDevice | None = None
        self.engine: BlkifEngine | None = None
        self.removed = False
        self.gone = False  # the toolstack removed the backend directory: write nothing more
        self.connects = 0
        discard_enable = self._read(f"{self.be}/discard-enable")
        self.discard = discard_enable != "0" and not self.read_only
        self.tokens = (f"fe-state:{self.be}", f"online:{self.be}")

    # -- xenstore helpers ---------------------------------------------------------------------

    def _read(self, path: str) -> str | None:
        value = self.xs.try_read(path)
        return None if value is None else value.decode(errors="replace")

    def _write(self, keys: dict[str, str], *, remove: tuple[str, ...] = ()) -> bool:
        """Write ``keys`` (relative to the backend directory) in one transaction, and only while
        the directory exists; False (and :attr:`gone` set) once the toolstack has removed it.

        The toolstack owns the directory (``xl destroy`` and ``block-detach`` remove it once we
        answer Closed): a plain write after that would re-create it, node by node, and leave
        ``state`` and friends behind for ever.  The existence check and the writes are atomic."""
        if self.gone:
            return False

        def body(tx: Transaction) -> bool:
            if not tx.exists(self.be):
                return False
            for key in remove:
                with contextlib.suppress(XenStoreError):
                    tx.rm(f"{self.be}/{key}")
            for key, value in keys.items():
                tx.write(f"{self.be}/{key}", value)
            return True

        if self.xs.run_transaction(body):
            return True
        log.info("%s: the backend directory was removed", self.be)
        self.gone = True
        return False

    def _write_state(self, state: XenbusState) -> bool:
        return self._write({"state": str(int(state))})

    def watch(self) -> None:
        if self.fe:
            self.xs.watch(f"{self.fe}/state", self.tokens[0])
        self.xs.watch(f"{self.be}/online", self.tokens[1])

    def unwatch(self) -> None:
        for path, token in (
            (f"{self.fe}/state", self.tokens[0]),
            (f"{self.be}/online", self.tokens[1]),
        ):
            with contextlib.suppress(XenStoreError):
                self.xs.unwatch(path, token)

    # -- inputs ---------------------------------------------------------------------------------

    def probe(self) -> None:
        self.feed(Input.PROBE)
        self.watch()

    def handle_event(self, token: str) -> None:
        if token == self.tokens[0]:
            self._frontend_changed()
        elif token == self.tokens[1] and self._read(f"{self.be}/online") == "0":
            self.feed(Input.OFFLINE)

    def _frontend_changed(self) -> None:
        try:
            action = self.machine.frontend_state(self._read(f"{self.fe}/state"))
        except RemoteProtocolError as exc:
            self._fail(str(exc))
            return
        self.perform(action)

    def feed(self, event: Input) -> None:
        try:
            action = self.machine.process(event)
        except RemoteProtocolError as exc:
            self._fail(str(exc))
            return
        self.perform(action)

    def resize(self) -> None:
        """The image changed size: tell the frontend (rewrite ``sectors``, then ``state``)."""
        self.executor.size = self.disk.size
        if self.engine is not None:
            self.engine.config = dataclasses.replace(
                self.engine.config, sectors=self.disk.size // 512
            )
        self.feed(Input.RESIZE)

    def shutdown(self) -> None:
        if not self.removed:
            self.feed(Input.SHUTDOWN)

    def directory_removed(self) -> None:
        """The toolstack removed the backend directory: tear down, close, write nothing."""
        self.gone = True
        if not self.removed:
            self.feed(Input.GONE)

    # -- actions ------------------------------------------------------------------------------

    def perform(self, action: Action) -> None:
        log.info("%s: %s -> %s", self.be, action.value, self.machine.state.name)
        if action is Action.PUBLISH:
            keys = initwait_keys(
                max_ring_page_order=self.options.max_ring_page_order,
                max_indirect_segments=self.options.max_indirect_segments,
                max_queues=self.options.max_queues,
            )
            if self.options.write_hotplug_status:
                keys["hotplug-status"] = "connected"
            keys["state"] = str(int(XenbusState.INIT_WAIT))  # last: the frontend acts on it
            self._write(keys, remove=("error",))  # a reconnect starts clean
        elif action is Action.CONNECT:
            self._connect()
        elif action is Action.CLOSING:
            self._write_state(XenbusState.CLOSING)
        elif action is Action.CLOSE:
            self._disconnect()
            if self._write_state(XenbusState.CLOSED) and self._read(f"{self.be}/online") == "0":
                self.feed(Input.OFFLINE)  # detached: both sides are done, forget the device
        elif action is Action.FAIL:
            self._disconnect()
            self._write_state(XenbusState.CLOSING)
        elif action is Action.RESIZE:
            # ``state`` rewritten after ``sectors``: fires the frontend's watch.
            self._write(
                {"sectors": str(self.disk.size // 512), "state": str(int(XenbusState.CONNECTED))}
            )
        elif action is Action.REMOVE:
            self._disconnect()
            with contextlib.suppress(XenStoreError, OSError):  # xenstored may be gone (SIGTERM)
                self._write_state(XenbusState.CLOSED)  # unless the directory is gone
            self._remove()
        if self.gone and not self.removed:
            self.feed(Input.GONE)  # a write found the directory removed: tear down

    def _fail(self, reason: str) -> None:
        log.error("%s: %s", self.be, reason)
        with contextlib.suppress(XenStoreError):
            self._write({"error": reason[:1000]})
        if self.gone:
            if not self.removed:
                self.feed(Input.GONE)
            return
        if self.machine.state is XenbusState.CONNECTED:
            self.perform(self.machine.process(Input.CONNECT_FAILED))
        elif self.machine.state is not XenbusState.CLOSED:
            self._disconnect()
            self._write_state(XenbusState.CLOSING)

    def _connect(self) -> None:
        self._disconnect()  # idempotent: enforce the precondition (XSA-350)
        try:
            params = read_frontend(
                lambda key: self._read(f"{self.fe}/{key}"),
                max_ring_page_order=self.options.max_ring_page_order,
                max_queues=self.options.max_queues,
            )
            config = DeviceConfig(
                sectors=self.disk.size // 512,
                read_only=self.read_only,
                discard=self.discard,
                max_indirect_segments=self.options.max_indirect_segments,
            )
            self.engine = BlkifEngine(config)
            self.device = BlkifDevice(
                self.transport,
                self.fe_domid,
                params,
                self.engine,
                self.executor,
                name=f"vbd-{self.fe_domid}-{self.be.rsplit('/', 1)[-1]}",
                inline_max=self.options.inline_max,
            )
        except (RemoteProtocolError, OSError) as exc:
            self._connect_failed(str(exc))
            return
        except Exception as exc:
            # One dom0 process serves every guest: a bug met while connecting one device (the
            # OverflowError of issue 13) fails that device, with its traceback in the log,
            # instead of taking every other guest's disk down with the daemon.
            log.exception("%s: connect failed", self.be)
            self._connect_failed(f"{type(exc).__name__}: {exc}")
            return
        self.device.start()
        keys = connect_keys(
            size=self.disk.size,
            read_only=self.read_only,
            discard=self.discard,
            cdrom=self._read(f"{self.fe}/device-type") == "cdrom",  # as Linux blkback reads it
        )
        keys["state"] = str(int(XenbusState.CONNECTED))
        if self._write(keys):  # one transaction, state last
            self.connects += 1

    def _connect_failed(self, reason: str) -> None:
        self.device = None
        self._write({"error": f"connect failed: {reason}"[:1000]})
        log.error("%s: connect failed: %s", self.be, reason)
        self.perform(self.machine.process(Input.CONNECT_FAILED))

    def _disconnect(self) -> None:
        if self.device is not None:
            device, self.device = self.device, None
            device.stop()  # drains in-flight I/O, unbinds, unmaps

    def _remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        self.unwatch()
        self.executor.close()
        if self.on_close is not None:
            self.on_close()


# --- the simulated hypervisor -----------------------------------------------------------------


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
    # As libxl does: the guest owns its device nodes and may read ours; we own ours and may read
    # its.  Permissions are set node by node (a new node inherits its parent's list).
    be_perms = [f"n{backend_domid}", f"r{frontend_domid}"]
    fe_perms = [f"n{frontend_domid}", f"r{backend_domid}"]

    def body(tx: Transaction) -> None:
        for path, keys, perms in ((be, be_keys, be_perms), (fe, fe_keys, fe_perms)):
            tx.mkdir(path)
            tx.set_perms(path, perms)
            for key, value in keys.items():
                tx.write(f"{path}/{key}", value)
                tx.set_perms(f"{path}/{key}", perms)

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


@contextlib.contextmanager
def _signals_stop(stop: threading.Event) -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _open_disk(args: argparse.Namespace, path: str) -> Any:
    mode = "r" if args.read_only else "r+"
    return vhd.open(path, mode, parent_policy=_parent_policy(args))


def _parent_policy(args: argparse.Namespace) -> vhd.ParentPolicy:
    """Served images' parents come only from the folders the admin allows (README: "Untrusted
    images")."""
    return vhd.ParentPolicy(
        dirs=tuple(getattr(args, "parent_dir", None) or ()),
        allow_absolute=bool(getattr(args, "allow_absolute_parents", False)),
    )


def _options(args: argparse.Namespace) -> BackendOptions:
    return BackendOptions(workers=max(1, int(getattr(args, "workers", 4) or 4)))


def serve_sim(args: argparse.Namespace) -> int:
    """``vhd serve IMAGE --sim DIR``: simulated Xen with a test xenstored, until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    directory = Path(args.sim).absolute()
    disk = _open_disk(args, args.image)
    try:
        sim = SimBackend(
            directory,
            disk,
            image=os.path.abspath(args.image),
            read_only=bool(args.read_only or disk.read_only),
            options=_options(args),
        )
        stop = threading.Event()
        with _signals_stop(stop), sim:
            print(
                f"serving {args.image} ({disk.size} bytes) to simulated domain "
                f"{SIM_FRONTEND_DOMID} as vbd {SIM_DEVID}"
            )
            print(f"  guest memory and grants: {directory}/memory, {directory}/grants")
            print(f"  event channels:          {directory}/evtchn.sock")
            print(f"  backend:  {sim.backend_path}")
            print(f"  frontend: {sim.frontend_path}")
            print(
                "attach the C test frontend (build it once with: gcc -O2 -I tests/blockback "
                "-o tests/blockback/frontend tests/blockback/frontend.c -lxenstore):"
            )
            print(
                f"  XENSTORED_PATH={sim.frontend_xenstored_path} "
                f"tests/blockback/frontend {directory} {sim.frontend_path} check"
            )
            print("ready", flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        disk.close()
    return 0


# --- real dom0 ---------------------------------------------------------------------------------


class XenDaemon:
    """The dom0 side of ``vhd serve --xen``: one :class:`VbdDriver` per vbd under ``root``.

    One recursive watch on the backend directory tells us about new devices (the event path
    names the device, so an event costs O(1) and our own writes are cheap to ignore); each
    driver then watches only its frontend's ``state`` and its own ``online`` node."""

    def __init__(
        self,
        xs: XenStoreClient,
        transport: Transport,
        root: str,
        open_disk: Callable[[str, bool], Any],
        *,
        read_only: bool = False,
        options: BackendOptions | None = None,
    ) -> None:
        self.xs = xs
        self.transport = transport
        self.root = root.rstrip("/")
        self.open_disk = open_disk
        self.read_only = read_only
        self.options = options or BackendOptions()
        self.drivers: dict[str, VbdDriver] = {}
        self.failed: set[str] = set()
        # Devices we served and let go whose directory the toolstack has not removed yet
        # (libxl writes online=0 and state=5 into it, runs its hotplug script, then removes it):
        # never attached again until the directory is gone, or its events would re-open the
        # image and re-publish InitWait in a loop.
        self.finished: set[str] = set()
        self._disks: dict[str, Any] = {}
        self._depth = self.root.count("/") + 2  # root/<frontend domid>/<devid>

    def start(self) -> None:
        self.xs.watch(self.root, "root")

    def handle(self, path: str, token: str) -> None:
        if token != "root":
            for driver in list(self.drivers.values()):
                if token in driver.tokens:
                    driver.handle_event(token)
            self._reap()
            return
        if path == self.root or not path.startswith(self.root + "/"):
            self.scan()
            return
        parts = path.split("/")
        if len(parts) - 1 < self._depth:
            self.scan()  # a whole frontend domain directory appeared or vanished
            return
        device = "/".join(parts[: self._depth + 1])
        if self.xs.try_read(device) is None:  # the toolstack removed the directory
            self.finished.discard(device)
            self.failed.discard(device)
            if device in self.drivers:
                self.drivers[device].directory_removed()
                self._reap()
        elif device not in self.drivers and device not in self.failed | self.finished:
            self._attach(device)

    def scan(self) -> None:
        try:
            domains = self.xs.directory(self.root)
        except XenStoreError:
            domains = []
        seen = set()
        for fdom in domains:
            with contextlib.suppress(XenStoreError):
                for devid in self.xs.directory(f"{self.root}/{fdom}"):
                    device = f"{self.root}/{fdom}/{devid}"
                    seen.add(device)
                    if device not in self.drivers and device not in self.failed | self.finished:
                        self._attach(device)
        for device in [d for d in self.drivers if d not in seen]:
            self.drivers[device].directory_removed()
        self.failed &= seen
        self.finished &= seen
        self._reap()

    def _attach(self, device: str) -> None:
        params = self.xs.try_read(f"{device}/params")
        if params is None or self.xs.try_read(f"{device}/state") is None:
            return  # the toolstack is still writing the nodes: a later event brings us back
        if self.xs.try_read(f"{device}/online") == b"0":
            return  # being detached: not ours to serve
        mode = (self.xs.try_read(f"{device}/mode") or b"w").decode()
        image = image_path(params.decode())
        read_only = self.read_only or mode.startswith("r")
        try:
            disk = self.open_disk(image, read_only)
        except (vhd.VHDError, OSError) as exc:
            self._refuse(device, f"cannot open {image}: {exc}")
            return

        def closed(d: str = device) -> None:
            disk_ = self._disks.pop(d, None)
            if disk_ is not None:
                disk_.close()

        try:
            driver = VbdDriver(
                self.xs,
                device,
                self.transport,
                disk,
                read_only=read_only,
                options=self.options,
                on_close=closed,
            )
        except (ValueError, XenStoreError, OSError) as exc:  # e.g. frontend-id is not a number
            disk.close()
            self._refuse(device, f"bad device nodes: {exc}")
            return
        self.drivers[device] = driver
        self._disks[device] = disk
        driver.probe()
        log.info("%s: serving %s (%s)", device, image, "ro" if read_only else "rw")

    def _refuse(self, device: str, reason: str) -> None:
        """Not served (image or nodes unusable): say so where libxl and the admin look, once."""
        log.error("%s: %s", device, reason)
        self.failed.add(device)  # do not retry on every event
        self.xs.write(f"{device}/hotplug-error", reason[:1000])
        self.xs.write(f"{device}/hotplug-status", "error")

    def _reap(self) -> None:
        for device in [d for d, drv in self.drivers.items() if drv.removed]:
            if not self.drivers.pop(device).gone:
                self.finished.add(device)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            event = self.xs.read_watch(timeout=0.5)
            if event is None:
                continue
            try:
                self.handle(event.path, event.token)
            except (LocalProtocolError, XenStoreError, OSError) as exc:
                log.error("xenbus: %s", exc)
            except Exception:
                # A bug: log it and keep serving every other guest rather than exit.
                log.exception("xenbus: handling %s", event.path)

    def shutdown(self) -> None:
        """SIGTERM: drain and close every device (Closed), close every image."""
        for driver in list(self.drivers.values()):
            with contextlib.suppress(XenStoreError, OSError):
                driver.shutdown()
        self._reap()
        with contextlib.suppress(XenStoreError):
            self.xs.unwatch(self.root, "root")


# libxl writes a qdisk's ``params`` as "<format>:<path>" (e.g. "vhd:/srv/g.vhd"), and blktap's
# toolstacks "tapdisk:vhd:/path"; a phy/vbd device has the bare path.
_PARAMS_PREFIXES = ("aio", "file", "phy", "raw", "tap", "tap2", "tapdisk", "vhd", "vpc")


def image_path(params: str) -> str:
    """The image file a ``params`` node names, without a toolstack's format prefixes."""
    path = params
    while not os.path.exists(path):
        prefix, sep, rest = path.partition(":")
        if not sep or prefix.lower() not in _PARAMS_PREFIXES:
            break
        path = rest
    return path if os.path.exists(path) else params


def serve_xen(args: argparse.Namespace) -> int:
    """``vhd serve --xen``: serve the vbds the toolstack assigns to this domain, until SIGTERM."""
    from blockback.transport import xen as xen_transport  # the real gntdev/evtchn layer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    xs = XenStoreClient(args.xenstore) if args.xenstore else XenStoreClient()
    transport: Transport | None = None
    try:
        transport = _xen_transport(xen_transport)
        domid = int((xs.try_read("domid") or b"0").decode() or "0")
        root = args.backend_dir or f"/local/domain/{domid}/backend/vbd"
        policy = _parent_policy(args)

        def open_disk(image: str, read_only: bool) -> Any:
            return vhd.open(image, "r" if read_only else "r+", parent_policy=policy)

        daemon = XenDaemon(
            xs, transport, root, open_disk, read_only=bool(args.read_only), options=_options(args)
        )
        stop = threading.Event()
        # Shut down with our handlers still in place (a second SIGTERM must not kill the drain)
        # and whatever ended the loop: every device closed, every image flushed and closed.
        with _signals_stop(stop):
            try:
                daemon.start()
                daemon.run(stop)
            finally:
                daemon.shutdown()
    finally:
        close = getattr(transport, "close", None)
        if close is not None:
            close()
        xs.close()
    return 0


def _xen_transport(module: Any) -> Transport:
    """Adapt ``blockback.transport.xen`` to :class:`blockback.backend.Transport`."""
    factory = getattr(module, "XenTransport", None)
    if factory is None:
        raise OSError("blockback.transport.xen provides no XenTransport")
    transport: Transport = factory()
    return transport


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - convenience entry point
    print("use: vhd serve IMAGE --sim DIR | vhd serve --xen", file=sys.stderr)
    return 2
