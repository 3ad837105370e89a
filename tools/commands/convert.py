"""``vhd convert``: raw <-> VHD, fixed <-> dynamic, chains flattened, Azure-ready output."""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any

from vhd.convert import convert
from vhd.source import open_source

from ..common import Progress, parse_size, warn

MiB = 1024 * 1024


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "convert",
        help="convert between raw and VHD (flattens differencing chains)",
        description="Copy the guest-visible content of SRC (a VHD of any type, or a raw image) "
        "into a new DST. DST's format is --to, else taken from its extension (.vhd -> vhd, "
        "anything else -> raw).",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=("raw", "vhd"))
    p.add_argument(
        "--type",
        choices=("fixed", "dynamic"),
        default=None,
        help="VHD output type (default dynamic; fixed with --azure)",
    )
    p.add_argument("--block-size", default="2M", help="dynamic output block size (default 2M)")
    p.add_argument(
        "--azure",
        action="store_true",
        help="output that Azure accepts: fixed VHD, size rounded up to a whole MiB",
    )
    p.add_argument(
        "--parent-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also look for parent images in DIR",
    )
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument(
        "--sync",
        action="store_true",
        help="fsync DST before exiting (like qemu-img, the default leaves it to the page cache)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    to = args.to or ("vhd" if args.dst.lower().endswith(".vhd") or args.azure else "raw")
    vtype = args.type or ("fixed" if args.azure else "dynamic")
    if args.azure and (to != "vhd" or vtype != "fixed"):
        raise ValueError("--azure makes a fixed VHD: drop --to raw / --type dynamic")
    if os.path.exists(args.dst) and os.path.samefile(args.src, args.dst):
        raise ValueError("SRC and DST are the same file")
    with open_source(args.src, parent_dirs=args.parent_dir) as src:
        for message in src.warnings:
            warn(message)
        size = src.size
        if args.azure:
            size = -(-size // MiB) * MiB
            if size != src.size:
                warn(f"size rounded up from {src.size} to {size} bytes (a whole MiB) for Azure")
        progress = Progress(size, "converting")
        result = convert(
            src,
            args.dst,
            to=to,
            type=vtype,
            block_size=parse_size(args.block_size),
            size=size,
            overwrite=args.force,
            progress=progress.update,
            sync=args.sync or args.azure,
        )
        progress.finish()
    print(
        f"{args.dst}: {to}{' ' + vtype if to == 'vhd' else ''}, {result.size} bytes, "
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


def _azure_problems(path: str) -> list[str]:
    # vhd.check (validation rules) provides the full Azure check where it is installed.
    try:
        module = importlib.import_module("vhd.check")
    except ImportError:
        module = None
    azure_check = getattr(module, "azure_check", None)
    if azure_check is not None:
        problems: list[str] = azure_check(path)
        return problems
    return _basic_azure_check(path)


def _basic_azure_check(path: str) -> list[str]:
    import vhd

    problems = []
    with vhd.open(path) as disk:
        if disk.type != vhd.DiskType.FIXED:
            problems.append("not a fixed VHD")
        if disk.size % MiB:
            problems.append(f"size {disk.size} is not a whole number of MiB")
        if os.path.getsize(path) != disk.size + 512:
            problems.append("file size is not size + 512")
    return problems
