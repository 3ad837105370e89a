"""vhdkit's own ``xl block-attach`` / ``block-detach`` (docs/blkif.md §2, the toolstack's side of
device hot-plug), for disks served by ``vhd serve --xen`` beside the kernel's xen-blkback.

xen-blkback claims every device under ``backend/vbd``, and Xen 4.17's xl offers no PV disk form
that puts a disk anywhere else.  A frontend does not care where its backend lives: Linux's
``xenbus_read_otherend_details`` takes the path from the frontend's ``backend`` node (and its
domain from ``backend-id``) and only checks that it exists.  So we write, as libxl's
``libxl__device_generic_add`` does and in one transaction, the two directories of a vbd:

* the backend directory, by default ``/local/domain/<own domid>/backend/vhd/<fe domid>/<devid>``:
  ``frontend``, ``frontend-id``, ``params``, ``mode``, ``online``, ``state``, ``dev``, ``type``,
  ``removable``, ``bootable``, ``device-type``, ``discard-enable`` and :data:`MARKER_KEY` (the
  daemon removes a marked directory itself once the guest is gone: no toolstack will); owned by
  the backend domain, readable by the frontend's;
* the frontend directory ``/local/domain/<fe domid>/device/vbd/<devid>``: ``backend``,
  ``backend-id``, ``state``, ``virtual-device``, ``device-type``; owned by the frontend domain,
  readable by the backend's.

:func:`detach` does what libxl's device removal does: ``online=0`` and ``state=5`` on the
backend, a bounded wait for the backend's Closed (or the frontend's), then both directories go.
Typed functions and option dataclasses only: the command line is ``tools/commands/xen.py``.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import vhd
from blockback.errors import AttachError
from blockback.vdev import devid as vdev_devid
from blockback.xenbus import XenbusState
from blockback.xenstore import Transaction, XenStoreClient, XenStoreError

# The node that says "vhdkit made this device": the daemon may remove the backend directory of
# such a device when its frontend is gone; directories libxl made stay libxl's.
MARKER_KEY = "toolstack"
MARKER = "vhdkit"
BACKEND_KIND = "vhd"  # backend/<kind>: not "vbd", which the kernel's xen-blkback claims


@dataclass(frozen=True)
class AttachOptions:
    """``vhd xen attach DOMAIN IMAGE --vdev VDEV``."""

    domain: str  # a name or a domid
    image: str
    vdev: str = "xvdb"
    read_only: bool = False
    backend_dir: str | None = None  # None: /local/domain/<own domid>/backend/vhd
    device_type: str = "disk"  # or "cdrom"
    # Only to check that the image opens; the daemon opens it with its own policy.
    parent_policy: vhd.ParentPolicy = field(default_factory=vhd.ParentPolicy)


@dataclass(frozen=True)
class StandingAttach:
    """``vhd serve --xen --attach NAME:IMAGE:VDEV[:ro]``: the daemon attaches IMAGE to every
    domain named NAME that has no VDEV (a reboot is a new domain, with a new domid)."""

    name: str
    image: str
    vdev: str
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> StandingAttach:
        """``NAME:IMAGE:VDEV[:ro]``; ValueError if it is not that (the image may contain ':')."""
        body, ro = (text[:-3], True) if text.endswith(":ro") else (text, False)
        name, _, rest = body.partition(":")
        image, _, vdev = rest.rpartition(":")
        if not name or not image or not vdev:
            raise ValueError(f"--attach wants NAME:IMAGE:VDEV[:ro], not {text!r}")
        vdev_devid(vdev)  # a bad vdev is refused at start, not at the first domain
        return cls(name, image, vdev, ro)


@dataclass(frozen=True)
class DetachOptions:
    """``vhd xen detach DOMAIN VDEV``."""

    domain: str
    vdev: str
    force: bool = False  # remove the nodes without waiting for the backend to close
    timeout: float = 30.0
    backend_dir: str | None = None  # where to look when the frontend's nodes are already gone


@dataclass(frozen=True)
class Device:
    """One vbd vhdkit attached (what :func:`attach` made, what :func:`list_devices` finds)."""

    frontend_domid: int
    devid: int
    backend: str
    frontend: str
    vdev: str = ""
    params: str = ""
    mode: str = ""
    state: str = ""


def own_domid(xs: XenStoreClient) -> int:
    """Our domain's id (xenstored answers the relative path ``domid`` for the caller)."""
    value = (xs.try_read("domid") or b"0").decode().strip()
    return int(value) if value.isdigit() else 0


def default_backend_dir(xs: XenStoreClient) -> str:
    return f"/local/domain/{own_domid(xs)}/backend/{BACKEND_KIND}"


def resolve_domain(xs: XenStoreClient, domain: str) -> int:
    """A domain's id from its id or name (``/local/domain/*/name``); AttachError if unknown."""
    text = domain.strip()
    if text.isdigit():
        if xs.exists(f"/local/domain/{int(text)}"):
            return int(text)
        raise AttachError(f"no domain {text} (no /local/domain/{int(text)} in xenstore)")
    try:
        domids = xs.directory("/local/domain")
    except XenStoreError:
        domids = []
    found = [
        int(d)
        for d in domids
        if d.isdigit() and xs.try_read(f"/local/domain/{d}/name") == text.encode()
    ]
    if not found:
        raise AttachError(f"no domain named {text!r}")
    if len(found) > 1:
        raise AttachError(f"{len(found)} domains are named {text!r}: give a domid")
    return found[0]


def _check_image(options: AttachOptions) -> str:
    """The image's absolute path, after opening it as the daemon will (errors: VHDError)."""
    path = os.path.abspath(options.image)
    disk = vhd.open(path, "r", parent_policy=options.parent_policy)
    disk.close()
    return path


def attach(xs: XenStoreClient, options: AttachOptions) -> Device:
    """Create the vbd's backend and frontend directories in one transaction (retried on EAGAIN).

    Refuses (AttachError) an unknown domain, a device number already under the guest's
    ``device/vbd`` or the backend directory, and (VHDError/OSError) an image that does not open.
    """
    fe_domid = resolve_domain(xs, options.domain)
    number = vdev_devid(options.vdev)
    image = _check_image(options)
    be_domid = own_domid(xs)
    root = (options.backend_dir or default_backend_dir(xs)).rstrip("/")
    be = f"{root}/{fe_domid}/{number}"
    fe = f"/local/domain/{fe_domid}/device/vbd/{number}"
    mode = "r" if options.read_only else "w"
    be_keys = {
        "frontend": fe,
        "frontend-id": str(fe_domid),
        "params": image,
        "mode": mode,
        "online": "1",
        "state": str(int(XenbusState.INITIALISING)),
        "dev": options.vdev,
        "type": BACKEND_KIND,
        "removable": "0",
        "bootable": "1",
        "device-type": options.device_type,
        "discard-enable": "0" if options.read_only else "1",
        MARKER_KEY: MARKER,
    }
    fe_keys = {
        "backend": be,
        "backend-id": str(be_domid),
        "state": str(int(XenbusState.INITIALISING)),
        "virtual-device": str(number),
        "device-type": options.device_type,
    }

    def body(tx: Transaction) -> None:
        # Checked inside the transaction: a concurrent attach of the same device (or the
        # domain's death) makes the commit fail, and the retry sees it.
        if not tx.exists(f"/local/domain/{fe_domid}"):
            raise AttachError(f"domain {fe_domid} went away")
        if tx.exists(fe):
            raise AttachError(
                f"domain {fe_domid} already has a disk {options.vdev} (device/vbd/{number})"
            )
        if tx.exists(be):
            raise AttachError(
                f"{be} is left from an earlier attach: "
                f"vhd xen detach --force {fe_domid} {options.vdev}"
            )
        write_device(tx, (be, be_domid, be_keys), (fe, fe_domid, fe_keys))

    xs.run_transaction(body)
    return Device(fe_domid, number, be, fe, options.vdev, image, mode, "1")


def write_device(
    tx: Transaction,
    backend: tuple[str, int, dict[str, str]],
    frontend: tuple[str, int, dict[str, str]],
) -> None:
    """Write a device's two directories, each ``(path, owner domid, nodes)``, as libxl does:
    each side owns its directory and may read the other's.  Permissions are set node by node,
    so nothing depends on whether the store gives a new node its parent's list."""
    (be, be_domid, _), (fe, fe_domid, _) = backend, frontend
    perms = {be: [f"n{be_domid}", f"r{fe_domid}"], fe: [f"n{fe_domid}", f"r{be_domid}"]}
    for path, _, keys in (backend, frontend):
        tx.mkdir(path)
        tx.set_perms(path, perms[path])
        for key, value in keys.items():
            tx.write(f"{path}/{key}", value)
            tx.set_perms(f"{path}/{key}", perms[path])


def remove_device(tx: Transaction, backend: str, frontend: str | None) -> None:
    """Remove a vbd's directories, and its ``<fe domid>`` backend directory once empty (what
    libxl's path clean-up does)."""
    for path in (frontend, backend):
        if path and tx.exists(path):
            tx.rm(path)
    parent = backend.rsplit("/", 1)[0]
    with contextlib.suppress(XenStoreError):
        if tx.exists(parent) and not tx.directory(parent):
            tx.rm(parent)


def _find(xs: XenStoreClient, options: DetachOptions) -> tuple[int, int, str, str | None]:
    """(frontend domid, devid, backend path, frontend path or None) of a vhdkit device."""
    # A domid need not name a live domain: --force cleans up after one that is gone.
    text = options.domain.strip()
    fe_domid = int(text) if text.isdigit() else resolve_domain(xs, text)
    number = vdev_devid(options.vdev)
    fe = f"/local/domain/{fe_domid}/device/vbd/{number}"
    backend = xs.try_read(f"{fe}/backend")
    if backend is not None:
        be = backend.decode()
    else:
        root = (options.backend_dir or default_backend_dir(xs)).rstrip("/")
        be = f"{root}/{fe_domid}/{number}"
        if not xs.exists(be):
            raise AttachError(f"domain {options.domain} has no disk {options.vdev}")
    if xs.exists(be) and xs.try_read(f"{be}/{MARKER_KEY}") != MARKER.encode():
        raise AttachError(
            f"{options.vdev} of domain {options.domain} was not attached by vhdkit "
            f"({be}): use xl block-detach"
        )
    return fe_domid, number, be, fe if xs.exists(fe) else None


def detach(xs: XenStoreClient, options: DetachOptions) -> Device:
    """Detach a vbd :func:`attach` made: ``online=0`` and ``state=5`` on the backend, wait (at
    most ``timeout`` s) for the backend's Closed or the frontend's, then remove both directories.
    With ``force``, remove them without asking the backend (the guest loses the disk at once)."""
    fe_domid, number, be, fe = _find(xs, options)
    closed = str(int(XenbusState.CLOSED)).encode()
    # Nothing to wait for when the backend is Closed already (drained: removing the directory
    # makes it let go) or never served the device (it wrote hotplug-status=error).
    idle = xs.try_read(f"{be}/state") == closed or xs.try_read(f"{be}/hotplug-status") == b"error"
    if not options.force and fe is not None and xs.exists(be) and not idle:

        def offline(tx: Transaction) -> None:
            if tx.exists(be):
                tx.write(f"{be}/online", "0")
                tx.write(f"{be}/state", str(int(XenbusState.CLOSING)))

        xs.run_transaction(offline)
        deadline = time.monotonic() + options.timeout
        while True:
            # As libxl: the backend's Closed says the image is drained and closed.  A frontend
            # gone meanwhile (the guest died) has nothing left to wait for.
            be_state = xs.try_read(f"{be}/state")
            fe_state = xs.try_read(f"{fe}/state")
            if be_state in (None, closed) or fe_state is None:
                break
            if time.monotonic() >= deadline:
                raise AttachError(
                    f"the backend of {options.vdev} did not close within {options.timeout:g} s "
                    f"(backend state {(be_state or b'-').decode()}, frontend state "
                    f"{(fe_state or b'-').decode()}): is vhd serve --xen running? "
                    "--force removes the nodes anyway"
                )
            time.sleep(0.05)
    xs.run_transaction(lambda tx: remove_device(tx, be, fe))
    return Device(fe_domid, number, be, fe or "")


def list_devices(xs: XenStoreClient, backend_dir: str | None = None) -> list[Device]:
    """Every vbd under the backend directory, vhdkit's or not, by frontend domid and devid."""
    root = (backend_dir or default_backend_dir(xs)).rstrip("/")
    out = []

    def read(path: str) -> str:
        return (xs.try_read(path) or b"").decode(errors="replace")

    with contextlib.suppress(XenStoreError):
        for fdom in sorted(xs.directory(root), key=lambda d: (len(d), d)):
            with contextlib.suppress(XenStoreError):
                for dev in sorted(xs.directory(f"{root}/{fdom}"), key=lambda d: (len(d), d)):
                    be = f"{root}/{fdom}/{dev}"
                    if not (fdom.isdigit() and dev.isdigit()):
                        continue
                    out.append(
                        Device(
                            int(fdom),
                            int(dev),
                            be,
                            read(f"{be}/frontend"),
                            read(f"{be}/dev"),
                            read(f"{be}/params"),
                            read(f"{be}/mode"),
                            read(f"{be}/state"),
                        )
                    )
    return out
