"""``vhd mount``: show an image (a whole differencing chain) as files under a directory.

The directory holds ``disk`` (the guest-visible disk as a raw file) and ``p1``, ``p2``, ... for
the partitions of an MBR or GPT.  The work happens in :mod:`vhdfuse.mount`; this module only
parses arguments.
"""

from __future__ import annotations

import argparse
import importlib

from ..common import add_parent_options

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "mount",
        help="mount an image as a directory holding 'disk' and one file per partition (FUSE)",
        description="Mount IMAGE on MOUNTPOINT with FUSE: MOUNTPOINT/disk is the guest-visible "
        "disk as a raw file, MOUNTPOINT/p1, p2, ... are its partitions (MBR or GPT, numbered as "
        "Linux does). Writes go to IMAGE (the leaf of a chain; parents are never written). "
        "Returns once the mount is live; 'vhd umount MOUNTPOINT' flushes and unmounts.",
    )
    p.add_argument("image", help="the VHD to mount")
    p.add_argument("mountpoint", help="an existing directory")
    p.add_argument(
        "--read-only", action="store_true", help="open the image read-only; refuse writes"
    )
    p.add_argument(
        "--foreground", action="store_true", help="stay in the foreground until unmounted"
    )
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users access the mount (needs user_allow_other for non-root)",
    )
    add_parent_options(p, serving=True)
    p.add_argument(
        "--cache",
        choices=("direct", "kernel"),
        default=None,
        help="direct (default): every read and write goes to the image (fastest for "
        "single passes); kernel: the kernel page cache where it is safe (read-only mounts, "
        "writable mounts without partitions)",
    )
    p.add_argument(
        "--log",
        metavar="FILE",
        help="append the server's log to FILE (default: syslog, or "
        "$XDG_RUNTIME_DIR|/run|/tmp/vhdkit-UID/mount-*.log without a syslog socket)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported when used: other commands never load the FUSE modules.
    mount = importlib.import_module("vhdfuse.mount").mount
    files = mount(
        args.image,
        args.mountpoint,
        read_only=args.read_only,
        foreground=args.foreground,
        allow_other=args.allow_other,
        parent_dirs=args.parent_dir,
        allow_absolute_parents=args.allow_absolute_parents,
        cache=args.cache,
        log_file=args.log,
    )
    if not args.foreground:
        # The startup line names every file the mount serves, so that a parent found
        # somewhere unexpected is seen at once.
        print(f"vhd mount: {args.mountpoint} serves {' <- '.join(files) or args.image}")
    return 0
