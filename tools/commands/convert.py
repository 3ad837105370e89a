"""``vhd convert``: raw <-> VHD, fixed <-> dynamic, chains flattened, Azure-ready output."""

from __future__ import annotations

import argparse
import os
import stat

from vhd.convert import convert
from vhd.probe import WRITABLE, output_format
from vhd.source import open_source

from ..common import (
    LOCAL_PARENTS,
    Progress,
    add_parent_dir_option,
    add_progress_options,
    parse_size,
    progress_wanted,
    warn,
)
from ..interrupt import terminate_as_interrupt
from ..locking import add_force_share_option

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "convert",
        help="convert between raw and VHD (flattens differencing chains)",
        description="Copy the guest-visible content of SRC (a VHD of any type, or a raw image) "
        "into a new DST. DST's format is --to, else taken from its extension (.vhd -> vhd; "
        ".vhdx/.avhdx -> vhdx; "
        ".img, .raw, .bin, none, or a block device -> raw; others are refused). SRC in another "
        "format (qcow2, VMDK, VHDX, VDI, ...) is refused, naming the format.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=tuple(WRITABLE), help="DST's format (default: by extension)")
    p.add_argument(
        "--from",
        dest="from_",
        choices=("raw",),
        help="read SRC as a raw disk even if it looks like an image of another format",
    )
    p.add_argument(
        "--type",
        choices=("fixed", "dynamic"),
        default=None,
        help="VHD output type (default dynamic; fixed with --azure)",
    )
    p.add_argument(
        "--block-size", help="dynamic output block size (default 2M); not with fixed or raw"
    )
    p.add_argument(
        "--azure",
        action="store_true",
        help="output that Azure accepts: fixed VHD, size rounded up to a whole MiB (at least 20 MiB)",
    )
    add_parent_dir_option(p, "also look for parent images in DIR")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    add_progress_options(p)
    add_force_share_option(p)
    p.add_argument(
        "--sync",
        action="store_true",
        help="fsync DST before exiting (like qemu-img, the default leaves it to the page cache)",
    )
    p.set_defaults(func=run)


@terminate_as_interrupt
def run(args: argparse.Namespace) -> int:
    to = output_format(
        args.dst, args.to or ("vhd" if args.azure else None), block_device=is_block_device(args.dst)
    )
    vtype = args.type or ("fixed" if args.azure else "dynamic")
    if args.azure and (to != "vhd" or vtype != "fixed"):
        raise ValueError("--azure makes a fixed VHD: drop --to raw / --type dynamic")
    if args.block_size is not None and (to != "vhd" or vtype == "fixed"):
        raise ValueError(
            "--block-size is for dynamic VHD output: a fixed VHD or a raw image has no blocks"
        )
    if os.path.exists(args.dst) and os.path.samefile(args.src, args.dst):
        raise ValueError("SRC and DST are the same file")
    with open_source(
        args.src,
        parent_dirs=args.parent_dir,
        force_raw=args.from_ == "raw",
        parent_policy=LOCAL_PARENTS,
        force_share=args.force_share,
    ) as src:
        for message in src.warnings:
            warn(message)
        size = src.size
        if args.azure:
            # (here, not at the top: the checker's rules are every plain convert's start-up)
            from vhd.azure import azure_target_size

            size = azure_target_size(size)
            if size != src.size:
                warn(
                    f"size grown from {src.size} to {size} bytes for Azure (a whole number of "
                    "MiB, at least 20 MiB); the added space reads as zeros"
                )
        progress = Progress(size, "converting", enabled=progress_wanted(args))
        result = convert(
            src,
            args.dst,
            to=to,
            type=vtype,
            block_size=parse_size(args.block_size or "2M"),
            size=size,
            overwrite=args.force,
            progress=progress.update,
            sync=args.sync or args.azure,
        )
        progress.finish()
    if not args.quiet:
        print(
            f"{args.dst}: {to}{' ' + vtype if to in ('vhd', 'vhdx') else ''}, {result.size} bytes, "
            f"{result.data_bytes} bytes of data"
        )
    if args.azure:
        problems = _azure_problems(args.dst)
        if problems:
            for problem in problems:
                print(f"azure: {problem}")
            return 1
        print("azure: OK (fixed VHD, whole-MiB size, valid footer)")
    return 0


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _azure_problems(path: str) -> list[str]:
    from vhd.azure import azure_check

    problems: list[str] = azure_check(path)
    return problems
