"""The xenbus driver of the blkif backend (§2 of docs/blkif.md: the handshake, reconnect and
teardown of one vbd) over a XenStore client and a transport.

:class:`VbdDriver` runs one vbd through :class:`blockback.xenbus.XenbusMachine`: it turns watch
events on the frontend's ``state`` and the toolstack's ``online`` node into machine inputs and
performs the resulting actions (publish the InitWait keys, connect in one transaction, close
after draining in-flight I/O, reconnect, remove).  Watches are narrow -- two nodes per device --
and events are handled by re-reading the node, so a frontend churning its directory costs one read
per coalesced event (XSA-349).

Every backend write is one transaction that first checks the backend directory still exists:
the toolstack owns it, and once it is removed (``xl destroy``, ``block-detach``) nothing of ours
may re-create it.  Who creates drivers: :mod:`blockback.sim` (one simulated guest) and
:mod:`blockback.daemon` (the dom0 daemon).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from blockback.device import BlkifDevice
from blockback.engine import BlkifEngine, DeviceConfig
from blockback.errors import RemoteProtocolError
from blockback.executor import BlockDisk, RequestExecutor, sector_sizes
from blockback.transport import Transport
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
                sector_size=sector_sizes(self.disk)[0],
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
        logical, physical = sector_sizes(self.disk)
        keys = connect_keys(
            sector_size=logical,
            physical_sector_size=physical,
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
