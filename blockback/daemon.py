"""The dom0 daemon of ``vhd serve --xen`` (docs/blkif.md §2, the backend's side of device
hot-plug): it watches the backend directory for the vbds the toolstack creates, serves each with a
:class:`~blockback.vbd.VbdDriver` over the real Xen transport, and tears them down on
Closing/Closed, ``online=0``, the frontend's or the backend directory's removal, or shutdown.

Devices ``vhd xen attach`` made (:mod:`blockback.attach`, marked ``toolstack=vhdkit``) have no
toolstack to remove their backend directory when the guest goes away (``xl destroy`` removes
the guest's own directory, not ours): once such a device's frontend directory is gone, the daemon
removes the backend directory, and the ``<fe domid>`` directory once empty.  It looks on every
device it lets go and on ``@releaseDomain``.  Directories libxl made stay libxl's to remove.

Standing attachments (``--attach NAME:IMAGE:VDEV``, :class:`~blockback.attach.StandingAttach`):
on ``@introduceDomain`` (a domain was built: ``xl create``, and the new domain of an ``xl
reboot``), on ``@releaseDomain`` and whenever a device is let go (the image the old domain held
is free again), every named domain that lacks its disk gets it attached under our root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import vhd
from blockback.attach import (
    MARKER,
    MARKER_KEY,
    AttachOptions,
    StandingAttach,
    attach,
    remove_device,
    resolve_domain,
)
from blockback.errors import AttachError, LocalProtocolError
from blockback.transport import Transport
from blockback.vbd import BackendOptions, VbdDriver
from blockback.vdev import devid as vdev_devid
from blockback.xenstore import Transaction, XenStoreClient, XenStoreError

log = logging.getLogger("blockback")


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
        standing: tuple[StandingAttach, ...] = (),
        parent_policy: vhd.ParentPolicy | None = None,
    ) -> None:
        self.xs = xs
        self.standing = standing
        self.standing_done: set[tuple[int, str]] = set()  # (domid, vdev) attached or present
        self.parent_policy = parent_policy or vhd.ParentPolicy()
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
        # A guest that died: its frontend directories are gone, clean up what vhdkit attached.
        self.xs.watch("@releaseDomain", "release")
        if self.standing:
            self.xs.watch("@introduceDomain", "introduce")

    def handle(self, path: str, token: str) -> None:
        if token in ("release", "introduce"):
            if token == "release":
                self.sweep()
            self.reattach()
            return
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
        elif self._wanted(device):
            self._attach(device)

    def _wanted(self, device: str) -> bool:
        """Whether ``device``, whose directory exists, is one to attach now."""
        if device in self.drivers:
            return False
        if device in self.failed | self.finished:
            if not self._written_anew(device):
                return False
            self.failed.discard(device)
            self.finished.discard(device)
        return True

    def _written_anew(self, device: str) -> bool:
        """Whether the toolstack removed a device we let go (or refused) and wrote it again.

        Watch events arrive late: on a loaded dom0 the event of ``block-detach``'s removal is
        read after ``block-attach`` of the same vdev wrote the directory again, so it never
        looks removed.  The directory tells: one we let go holds the Closed state we wrote, one
        we refused our hotplug-status; the toolstack writes a new one with state 1
        (Initialising) and no hotplug-status."""
        return (
            self.xs.try_read(f"{device}/state") == b"1"
            and self.xs.try_read(f"{device}/hotplug-status") is None
        )

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
                    if self._wanted(device):
                        self._attach(device)
        for device in [d for d in self.drivers if d not in seen]:
            self.drivers[device].directory_removed()
        self.failed &= seen
        self.finished &= seen
        self._reap()

    def _attach(self, device: str) -> None:
        if self.remove_orphan(device):
            return  # vhdkit's device of a guest that is gone (e.g. while we were not running)
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
        reaped = [d for d, drv in self.drivers.items() if drv.removed]
        for device in reaped:
            if not self.drivers.pop(device).gone:
                self.finished.add(device)
                self.remove_orphan(device)
        if reaped:
            self.reattach()

    def reattach(self) -> None:
        """Attach each standing disk to its domain (by name) if that domain lacks it."""
        for spec in self.standing:
            try:
                fe_domid = resolve_domain(self.xs, spec.name)
            except AttachError:
                continue  # not running now
            if (fe_domid, spec.vdev) in self.standing_done:
                continue  # once per domain: a later ``vhd xen detach`` is not undone
            number = vdev_devid(spec.vdev)
            if self.xs.exists(f"/local/domain/{fe_domid}/device/vbd/{number}"):
                self.standing_done.add((fe_domid, spec.vdev))
                continue  # the guest's own config has that vdev
            options = AttachOptions(
                str(fe_domid),
                spec.image,
                spec.vdev,
                read_only=spec.read_only,
                backend_dir=self.root,
                parent_policy=self.parent_policy,
            )
            try:
                device = attach(self.xs, options)
            except (AttachError, vhd.VHDError, OSError, XenStoreError) as exc:
                # e.g. the image is still held for the domain's previous incarnation: tried
                # again when that device is let go or the old domain is released.
                log.warning("--attach %s:%s: not now: %s", spec.name, spec.vdev, exc)
                continue
            self.standing_done.add((fe_domid, spec.vdev))
            log.info(
                "%s: attached %s to %s (domain %d)", device.backend, spec.image, spec.vdev, fe_domid
            )

    def sweep(self) -> None:
        """Remove the backend directories of vhdkit's devices whose guest is gone."""
        for device in list(self.finished | self.failed):
            self.remove_orphan(device)
        with contextlib.suppress(XenStoreError):
            for fdom in self.xs.directory(self.root):
                with contextlib.suppress(XenStoreError):
                    for devid in self.xs.directory(f"{self.root}/{fdom}"):
                        device = f"{self.root}/{fdom}/{devid}"
                        if device not in self.drivers:
                            self.remove_orphan(device)

    def remove_orphan(self, device: str) -> bool:
        """If ``device`` carries vhdkit's marker and its frontend directory is gone, remove it
        (and its ``<fe domid>`` directory once empty), in one transaction; True if removed.

        Only such devices: libxl removes its own, and a device whose frontend still exists is
        detached by ``vhd xen detach``, never behind the guest's back."""
        if device in self.drivers:
            return False

        def body(tx: Transaction) -> bool:
            if tx.try_read(f"{device}/{MARKER_KEY}") != MARKER.encode():
                return False
            frontend = (tx.try_read(f"{device}/frontend") or b"").decode(errors="replace")
            if frontend.startswith("/") and tx.exists(frontend):
                return False
            remove_device(tx, device, None)
            return True

        try:
            removed = self.xs.run_transaction(body)
        except XenStoreError as exc:
            log.error("%s: cannot remove: %s", device, exc)
            return False
        if removed:
            log.info("%s: frontend gone, backend directory removed", device)
            self.finished.discard(device)
            self.failed.discard(device)
        return removed

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
            self.xs.unwatch("@releaseDomain", "release")
            if self.standing:
                self.xs.unwatch("@introduceDomain", "introduce")


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


@dataclass(frozen=True)
class XenOptions:
    """What ``vhd serve --xen`` is told: where xenstored and the backend directory are, and how
    images are opened and served."""

    xenstore: str | None = None  # None: $XENSTORED_PATH or the default socket
    backend_dir: str | None = None  # None: /local/domain/<own domid>/backend/vbd
    read_only: bool = False
    # Where served images' parents may come from (README: "Untrusted images").
    parent_policy: vhd.ParentPolicy = field(default_factory=vhd.ParentPolicy)
    backend: BackendOptions = field(default_factory=BackendOptions)
    # Disks attached by domain name whenever such a domain lacks them (README, Xen, reboot).
    standing: tuple[StandingAttach, ...] = ()


def open_xen_transport() -> Transport:
    """The real gntdev/evtchn transport (imported late: it opens /dev/xen devices)."""
    from blockback.transport.xen import XenTransport

    return XenTransport()


def serve_xen(options: XenOptions, stop: threading.Event) -> None:
    """Serve the vbds the toolstack assigns to this domain until ``stop`` is set; then drain and
    close every device (Closed) and every image, whatever ended the loop."""
    xs = XenStoreClient(options.xenstore) if options.xenstore else XenStoreClient()
    transport: Transport | None = None
    try:
        transport = open_xen_transport()
        domid = int((xs.try_read("domid") or b"0").decode() or "0")
        root = options.backend_dir or f"/local/domain/{domid}/backend/vbd"

        def open_disk(image: str, read_only: bool) -> Any:
            mode = "r" if read_only else "r+"
            return vhd.open(image, mode, parent_policy=options.parent_policy)

        daemon = XenDaemon(
            xs,
            transport,
            root,
            open_disk,
            read_only=options.read_only,
            options=options.backend,
            standing=options.standing,
            parent_policy=options.parent_policy,
        )
        try:
            daemon.start()
            daemon.run(stop)
        finally:
            daemon.shutdown()
    finally:
        if transport is not None:
            transport.close()
        xs.close()
