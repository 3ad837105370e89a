"""``vhd serve``: serve an image as a block device (NBD export, or a Xen blkif backend).

The protocol front ends live in :mod:`blockback`; this module only parses arguments and hands
over: ``--nbd`` to :func:`blockback.nbd.server.serve_from_args`, ``--sim`` to
:func:`blockback.server.serve_sim` and ``--xen`` to :func:`blockback.server.serve_xen`.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from ..common import add_parent_options


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="serve an image as a block device (NBD, or Xen blkif)",
        description="Serve a VHD (a whole differencing chain) to a block-device client: "
        "an NBD export (--nbd), a simulated Xen hypervisor for tests (--sim DIR), "
        "or real Xen PV guests from dom0 (--xen).",
    )
    p.add_argument("image", nargs="?", help="the image to serve (not with --xen)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--nbd", action="store_true", help="export over the NBD protocol")
    mode.add_argument(
        "--sim", metavar="DIR", help="serve over a simulated Xen (shared memory in DIR)"
    )
    mode.add_argument(
        "--xen", action="store_true", help="serve the devices the toolstack gives us (dom0)"
    )
    p.add_argument("--socket", metavar="PATH", help="NBD: listen on this unix socket")
    p.add_argument(
        "--listen", metavar="HOST:PORT", help="NBD: listen on TCP (default 127.0.0.1:10809)"
    )
    p.add_argument("--export-name", metavar="NAME", default="", help="NBD: export name")
    p.add_argument(
        "--describe",
        metavar="TEXT",
        help='NBD: the export description clients see (default "vhdkit", no path)',
    )
    p.add_argument(
        "--show-path",
        action="store_true",
        help="NBD: put the image's path in the export description",
    )
    p.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        help="NBD: clients at once (default 128; when full, a new client takes the slot of "
        "one still negotiating or idle for 10 s, else it is refused)",
    )
    p.add_argument(
        "--handshake-timeout",
        metavar="SECONDS",
        type=float,
        help="NBD: negotiation must be over within this long (default 10)",
    )
    p.add_argument(
        "--idle-timeout",
        metavar="SECONDS",
        type=float,
        help="NBD: hang up on a client that sends no request, or reads no reply, for this "
        "long (default 0: never)",
    )
    p.add_argument(
        "--max-pending-mib",
        metavar="MIB",
        type=int,
        help="NBD: bytes of requests in flight on all connections together (default 256 MiB; "
        "each connection may always have one)",
    )
    p.add_argument("--read-only", action="store_true", help="refuse writes")
    add_parent_options(p, serving=True)
    p.add_argument(
        "--backend-dir",
        metavar="PATH",
        help="Xen: xenstore backend directory to watch "
        "(default /local/domain/<own domid>/backend/vbd)",
    )
    p.add_argument(
        "--xenstore",
        metavar="PATH",
        help="Xen/sim: xenstore unix socket (default $XENSTORED_PATH or /var/run/xenstored/socket)",
    )
    p.add_argument("--workers", type=int, default=4, help="I/O threads per device (default 4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.nbd:
        module, name = "blockback.nbd.server", "serve_from_args"
    elif args.sim:
        module, name = "blockback.server", "serve_sim"
    else:
        module, name = "blockback.server", "serve_xen"
    if not args.xen and not args.image:
        raise ValueError("an IMAGE is needed with --nbd and --sim")
    if args.xen and args.image:
        raise ValueError(
            "--xen serves the disks the toolstack configures in XenStore, not IMAGE: drop "
            f"{args.image!r} (or use --nbd / --sim to serve it)"
        )
    handler = getattr(importlib.import_module(module), name)
    result: int = handler(args)
    return result
