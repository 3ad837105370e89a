"""``vhd umount``: flush and unmount a ``vhd mount``, waiting until the image is closed."""

from __future__ import annotations

import argparse
import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "umount",
        help="flush and unmount a 'vhd mount'",
        description="Flush everything written through MOUNTPOINT to the image, unmount it and "
        "wait until the mount's server has closed the image.",
    )
    p.add_argument("mountpoint")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the server to close the image (default 120)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported when used: other commands never load the FUSE modules.
    unmount = importlib.import_module("vhdfuse.mount").unmount
    unmount(args.mountpoint, timeout=args.timeout)
    return 0
