"""``vhd serve``: serve an image as a block device (NBD export, or a Xen blkif backend).

The protocol front ends live in :mod:`blockback`, which exposes typed functions and options;
this module owns what belongs to a command: argument parsing, signals, logging set-up and what
is printed.  ``--nbd`` goes to :class:`blockback.nbd.server.NBDServer`, ``--sim`` to
:class:`blockback.sim.SimBackend` and ``--xen`` to :func:`blockback.daemon.serve_xen`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from vhdtools.signals import stop_on_signals

import vhd

from ..common import add_parent_options

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


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
        "--attach",
        metavar="NAME:IMAGE:VDEV[:ro]",
        action="append",
        default=[],
        help="Xen: attach IMAGE as VDEV to the domain NAME whenever one runs without it "
        "(as 'vhd xen attach' does; again after each reboot; repeatable)",
    )
    p.add_argument(
        "--xenstore",
        metavar="PATH",
        help="Xen/sim: xenstore unix socket (default $XENSTORED_PATH or /var/run/xenstored/socket)",
    )
    p.add_argument("--workers", type=int, default=4, help="I/O threads per device (default 4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.xen and not args.image:
        raise ValueError("an IMAGE is needed with --nbd and --sim")
    if args.xen and args.image:
        raise ValueError(
            "--xen serves the disks the toolstack configures in XenStore, not IMAGE: drop "
            f"{args.image!r} (or use --nbd / --sim to serve it)"
        )
    if args.attach and not args.xen:
        raise ValueError("--attach is for --xen")
    if args.nbd:
        return _serve_nbd(args)
    if args.sim:
        return _serve_sim(args)
    return _serve_xen(args)


def _parent_policy(args: argparse.Namespace) -> vhd.ParentPolicy:
    """Served images' parents come only from the folders the admin allows (README: "Untrusted
    images")."""
    return vhd.ParentPolicy(
        dirs=tuple(getattr(args, "parent_dir", None) or ()),
        allow_absolute=bool(getattr(args, "allow_absolute_parents", False)),
    )


def _backend_options(args: argparse.Namespace) -> Any:
    from blockback.vbd import BackendOptions

    return BackendOptions(workers=max(1, int(args.workers or 4)))


def parse_listen(value: str) -> tuple[str, int]:
    """``--listen HOST:PORT`` (``[v6]:PORT``; a bare host takes the NBD port)."""
    from blockback.nbd.server import DEFAULT_PORT

    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(DEFAULT_PORT)
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--listen wants HOST:PORT, not {value!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range")
    return host, number


def describe(args: argparse.Namespace) -> str:
    """The export description every client may read (``NBD_INFO_DESCRIPTION``).

    The image's path says where the host keeps its files, so it is shown only when asked
    (``--show-path``); ``--describe TEXT`` replaces the description altogether.
    """
    text: str | None = getattr(args, "describe", None)
    if text is not None:
        return text
    if getattr(args, "show_path", False):
        return f"vhdkit: {args.image}"
    return "vhdkit"


def _limits_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The abuse limits ``vhd serve --nbd`` was given (None: the default)."""
    import blockback.nbd.server as nbd

    def given(name: str, default: float) -> float:
        value = getattr(args, name, None)
        return default if value is None else float(value)

    max_connections = int(given("max_connections", nbd.MAX_CONNECTIONS))
    handshake = given("handshake_timeout", nbd.HANDSHAKE_TIMEOUT)
    idle = given("idle_timeout", nbd.IDLE_TIMEOUT)
    pending = given("max_pending_mib", nbd.MAX_PENDING_BYTES / (1024 * 1024))
    if max_connections < 1:
        raise ValueError("--max-connections must be at least 1")
    if handshake <= 0:
        raise ValueError("--handshake-timeout must be more than 0 seconds")
    if idle < 0 or pending < 0:
        raise ValueError("--idle-timeout and --max-pending-mib cannot be negative")
    return {
        "max_connections": max_connections,
        "negotiation_timeout": handshake,
        "idle_timeout": idle,
        "max_pending_bytes": int(pending * 1024 * 1024),
    }


def _serve_nbd(args: argparse.Namespace) -> int:
    """``vhd serve IMAGE --nbd``: serve in the foreground until SIGINT or SIGTERM."""
    from blockback.nbd.server import DEFAULT_PORT, NBDServer

    if args.socket and args.listen:
        raise ValueError("give --socket or --listen, not both")
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    limits = _limits_from_args(args)
    mode = "r" if args.read_only else "r+"
    # The image is handed to clients: its parents only from the folders the admin allows.
    disk = vhd.open(args.image, mode, parent_policy=_parent_policy(args))
    try:
        server = NBDServer(
            disk,
            export_name=args.export_name or "",
            read_only=args.read_only,
            workers=args.workers,
            description=describe(args),
            **limits,
        )
        if args.socket:
            url = server.listen_unix(args.socket)
        else:
            url = server.listen_tcp(*parse_listen(args.listen or f"127.0.0.1:{DEFAULT_PORT}"))
        with stop_on_signals(threading.Event()) as stop:
            server.start()
            files = " <- ".join(layer.path for layer in disk.chain)
            print(f"vhd serve: {url} serves {files}", file=sys.stderr, flush=True)
            print(url, flush=True)
            while not stop.wait(3600):
                pass
            print("vhd serve: stopping", file=sys.stderr, flush=True)
            server.stop()
    finally:
        disk.close()
    return 0


def _serve_sim(args: argparse.Namespace) -> int:
    """``vhd serve IMAGE --sim DIR``: simulated Xen with a test xenstored, until SIGTERM/SIGINT."""
    from blockback.sim import SIM_DEVID, SIM_FRONTEND_DOMID, SimBackend

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    directory = Path(args.sim).absolute()
    disk = vhd.open(args.image, "r" if args.read_only else "r+", parent_policy=_parent_policy(args))
    try:
        sim = SimBackend(
            directory,
            disk,
            image=os.path.abspath(args.image),
            read_only=bool(args.read_only or disk.read_only),
            options=_backend_options(args),
        )
        with stop_on_signals(threading.Event()) as stop, sim:
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


def _serve_xen(args: argparse.Namespace) -> int:
    """``vhd serve --xen``: serve the vbds the toolstack assigns to this domain, until SIGTERM."""
    from blockback.attach import StandingAttach
    from blockback.daemon import XenOptions, serve_xen

    standing = tuple(StandingAttach.parse(text) for text in args.attach or ())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = XenOptions(
        xenstore=args.xenstore or None,
        backend_dir=args.backend_dir or None,
        read_only=bool(args.read_only),
        parent_policy=_parent_policy(args),
        backend=_backend_options(args),
        standing=standing,
    )
    # The daemon shuts down with our handlers still in place: a second SIGTERM must not kill
    # the drain.
    with stop_on_signals(threading.Event()) as stop:
        serve_xen(options, stop)
    return 0
