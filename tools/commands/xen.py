"""``vhd xen attach|detach|list``: vhdkit's own ``xl block-attach`` for disks ``vhd serve --xen``
serves beside the kernel's xen-blkback (docs/blkif.md §2, the toolstack's side of hot-plug).

The work is :mod:`blockback.attach` (typed functions and options); this module parses arguments
and prints.
"""

from __future__ import annotations

import argparse

from ..common import add_parent_options, parent_policy

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "xen",
        help="attach/detach VHDs to Xen guests for 'vhd serve --xen' (dom0)",
        description="Give a running (or paused) Xen guest a disk that 'vhd serve --xen "
        "--backend-dir /local/domain/0/backend/vhd' serves, beside the kernel's xen-blkback.",
    )
    p.add_argument("--xenstore", metavar="PATH", help="xenstored's unix socket (default: as xl)")
    cmds = p.add_subparsers(dest="xen_command", metavar="SUBCOMMAND", required=True)

    a = cmds.add_parser(
        "attach",
        help="attach IMAGE to DOMAIN as VDEV",
        description="Write the guest's new vbd into xenstore (one transaction): the backend "
        "directory under --backend-dir, the frontend directory under the guest's device/vbd.",
    )
    a.add_argument("domain", metavar="DOMAIN", help="the guest's name or domid")
    a.add_argument("image", metavar="IMAGE")
    a.add_argument("--vdev", default="xvdb", help="the guest's device name (default xvdb)")
    a.add_argument("--ro", action="store_true", help="read-only for the guest")
    a.add_argument("--cdrom", action="store_true", help="a cdrom rather than a disk")
    a.add_argument(
        "--backend-dir",
        metavar="PATH",
        help="backend directory the daemon watches (default /local/domain/<own domid>/backend/vhd)",
    )
    add_parent_options(a, serving=True)
    a.set_defaults(func=run_attach)

    d = cmds.add_parser(
        "detach",
        help="detach VDEV from DOMAIN",
        description="online=0 and state=5 on the backend, wait for it to close, then remove "
        "the device's nodes (only devices 'vhd xen attach' made).",
    )
    d.add_argument("domain", metavar="DOMAIN", help="the guest's name or domid")
    d.add_argument("vdev", metavar="VDEV")
    d.add_argument("--force", action="store_true", help="remove the nodes without waiting")
    d.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the backend to close (default 30)",
    )
    d.add_argument("--backend-dir", metavar="PATH", help="as for attach")
    d.set_defaults(func=run_detach)

    ls = cmds.add_parser("list", help="the devices under the backend directory")
    ls.add_argument("--backend-dir", metavar="PATH", help="as for attach")
    ls.set_defaults(func=run_list)


def _client(args: argparse.Namespace) -> Any:
    from blockback.xenstore import XenStoreClient

    return XenStoreClient(args.xenstore) if args.xenstore else XenStoreClient()


def run_attach(args: argparse.Namespace) -> int:
    from blockback.attach import AttachOptions, attach

    options = AttachOptions(
        domain=args.domain,
        image=args.image,
        vdev=args.vdev,
        read_only=args.ro,
        backend_dir=args.backend_dir or None,
        device_type="cdrom" if args.cdrom else "disk",
        parent_policy=parent_policy(args),
    )
    with _client(args) as xs:
        device = attach(xs, options)
    print(f"{device.vdev} ({device.devid}) of domain {device.frontend_domid}: {device.backend}")
    return 0


def run_detach(args: argparse.Namespace) -> int:
    from blockback.attach import DetachOptions, detach

    if args.timeout < 0:
        raise ValueError("--timeout cannot be negative")
    options = DetachOptions(
        domain=args.domain,
        vdev=args.vdev,
        force=args.force,
        timeout=args.timeout,
        backend_dir=args.backend_dir or None,
    )
    with _client(args) as xs:
        device = detach(xs, options)
    print(f"detached {args.vdev} ({device.devid}) of domain {device.frontend_domid}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from blockback.attach import list_devices

    with _client(args) as xs:
        devices = list_devices(xs, args.backend_dir or None)
    print("Domid  Vdev    Devid      Mode State Image")
    for d in devices:
        print(
            f"{d.frontend_domid:<6} {d.vdev:<7} {d.devid:<10} {d.mode:<4} {d.state:<5} {d.params}"
        )
    return 0
