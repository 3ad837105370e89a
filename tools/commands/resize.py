"""``vhd resize IMAGE SIZE [--shrink] [--force]``: change a disk's guest size (:mod:`vhd.resize`).

SIZE is bytes or a number with a binary suffix (K, M, G, T: KiB, MiB, GiB, TiB), optionally
``+``/``-`` relative to the current size.  Growing works for every type; shrinking needs
``--shrink`` and refuses when data lies past the new end unless ``--force``.
"""

from __future__ import annotations

import argparse

import vhd
from vhd.resize import resize

from ..common import (
    LOCAL_PARENTS,
    add_parent_dir_option,
    add_progress_options,
    parse_size,
    progress_wanted,
    relative_size_matcher,
)
from ..interrupt import terminate_as_interrupt
from ._progress import progress_bar

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "resize",
        help="grow (or shrink) a disk",
        description="Change the guest size of a fixed, dynamic or differencing VHD or VHDX. "
        "Growing a "
        "dynamic disk grows the BAT, moving the first data blocks to the end if needed.",
    )
    # "-6M" is a size, not an option: argparse takes an argument starting with "-" as an
    # option unless it looks like a negative number (its _negative_number_matcher, per
    # parser; this command has no option that looks like one).  "--" before it works too.
    p._negative_number_matcher = relative_size_matcher()
    p.add_argument("image")
    p.add_argument("size", help="new size: bytes or K/M/G/T (binary), or +N / -N")
    p.add_argument("--shrink", action="store_true", help="allow making the disk smaller")
    p.add_argument("--force", action="store_true", help="with --shrink: drop data past the new end")
    add_parent_dir_option(
        p, "also look for the parent in DIR (growing a differencing disk reads it)"
    )
    add_progress_options(p)
    p.set_defaults(func=run)


def _current_size(path: str) -> int:
    """The disk's size for a relative SIZE; the handle (and its table: 512 MiB for a 64 TiB
    VHDX of 1 MiB blocks) is gone before the resize opens the image again."""
    with vhd.open(path, "r", open_parent=False) as disk:
        return disk.size


@terminate_as_interrupt
def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size, _current_size(args.image))
    if args.force and not args.shrink:
        raise ValueError("--force goes with --shrink")
    bar = progress_bar("moving blocks", progress_wanted(args))
    result = resize(
        args.image,
        size,
        shrink=args.shrink,
        force=args.force,
        progress=bar,
        parent_dirs=args.parent_dir,
        parent_policy=LOCAL_PARENTS,  # the user's own image: its locators as written
    )
    if not result.relocated_blocks:
        bar(0, 0)  # nothing had to move: the bar still ends at 100 %
    if args.quiet:
        return 0
    note = f", {result.relocated_blocks} blocks relocated" if result.relocated_blocks else ""
    if result.dropped_blocks:
        note += f", {result.dropped_blocks} blocks dropped"
    print(f"{result.path}: {result.old_size} -> {result.new_size} bytes{note}")
    return 0
