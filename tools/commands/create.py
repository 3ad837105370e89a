"""``vhd create``: make a fixed, dynamic or differencing image."""

from __future__ import annotations

import argparse
from typing import Any

import vhd

from ..common import parse_size


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "create",
        help="create a fixed, dynamic or differencing image",
        description="Create IMAGE of SIZE (K/M/G/T suffixes, binary), or a differencing child "
        "of PARENT (the size comes from the parent).",
    )
    p.add_argument("image")
    p.add_argument("size", nargs="?", help="disk size, e.g. 10G (not with --parent)")
    p.add_argument("--type", choices=("fixed", "dynamic"), default="dynamic")
    p.add_argument(
        "--block-size", help="dynamic/differencing block size (default 2M); not with fixed"
    )
    p.add_argument("--parent", help="make a differencing child of this image")
    p.add_argument("--force", action="store_true", help="overwrite IMAGE if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.parent and args.size:
        raise ValueError("a differencing child takes its size from the parent: drop SIZE")
    if not args.parent and not args.size:
        raise ValueError("give a SIZE (or --parent)")
    if args.block_size is not None and args.type == "fixed" and not args.parent:
        raise ValueError("--block-size is for dynamic disks: a fixed disk has no blocks")
    size = parse_size(args.size) if args.size else None
    with vhd.create(
        args.image,
        size,
        type=args.type,
        block_size=parse_size(args.block_size or "2M"),
        parent=args.parent,
        overwrite=args.force,
    ) as disk:
        print(f"created {args.image}: {disk.type.label}, {disk.size} bytes")
    return 0
