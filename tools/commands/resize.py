"""``vhd resize IMAGE SIZE [--shrink] [--force]``: change a disk's guest size (:mod:`vhd.resize`).

SIZE is bytes or a number with a binary suffix (K, M, G, T: KiB, MiB, GiB, TiB), optionally
``+``/``-`` relative to the current size.  Growing works for every type; shrinking needs
``--shrink`` and refuses when data lies past the new end unless ``--force``.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import vhd
from vhd.resize import resize

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, current: int) -> int:
    match = re.fullmatch(r"([+-]?)(\d+)([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"invalid size {text!r} (use bytes or a K/M/G/T suffix)")
    sign, number, unit = match.groups()
    value = int(number) * _UNITS[unit.upper()]
    if sign == "+":
        return current + value
    if sign == "-":
        return current - value
    return value


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "resize",
        help="grow (or shrink) a disk",
        description="Change the guest size of a fixed, dynamic or differencing VHD. Growing a "
        "dynamic disk grows the BAT, moving the first data blocks to the end if needed.",
    )
    p.add_argument("image")
    p.add_argument("size", help="new size: bytes or K/M/G/T (binary), or +N / -N")
    p.add_argument("--shrink", action="store_true", help="allow making the disk smaller")
    p.add_argument("--force", action="store_true", help="with --shrink: drop data past the new end")
    p.add_argument(
        "--parent-dir",
        metavar="DIR",
        action="append",
        default=[],
        help="also look for the parent in DIR (growing a differencing disk reads it)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with vhd.open(args.image, "r", open_parent=False) as disk:
        current = disk.size
    size = parse_size(args.size, current)
    if args.force and not args.shrink:
        raise ValueError("--force goes with --shrink")
    result = resize(
        args.image, size, shrink=args.shrink, force=args.force, parent_dirs=args.parent_dir
    )
    note = f", {result.relocated_blocks} blocks relocated" if result.relocated_blocks else ""
    if result.dropped_blocks:
        note += f", {result.dropped_blocks} blocks dropped"
    print(f"{result.path}: {result.old_size} -> {result.new_size} bytes{note}")
    return 0
