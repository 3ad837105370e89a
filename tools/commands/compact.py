"""``vhd compact IMAGE``: give back the space of empty blocks (:mod:`vhd.compact`).

Dynamic disks lose blocks with no bitmap bit set or only zeros; differencing children blocks with
no bit set.  The remaining blocks move down, the file is cut, and the bytes reclaimed are shown.
"""

from __future__ import annotations

import argparse

from vhd.compact import compact

from ..common import add_progress_options, progress_wanted
from ..interrupt import terminate_as_interrupt
from ._progress import progress_bar

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "compact",
        help="reclaim empty blocks of a dynamic or differencing disk",
        description="Unallocate blocks that hold nothing (all zeros or no bitmap bit set; for a "
        "differencing disk only no bit set), move the rest down and cut the file.",
    )
    p.add_argument("image")
    add_progress_options(p)
    p.set_defaults(func=run)


@terminate_as_interrupt
def run(args: argparse.Namespace) -> int:
    result = compact(args.image, progress=progress_bar("scan", progress_wanted(args)))
    if not args.quiet:
        print(
            f"{result.path}: reclaimed {result.reclaimed} bytes ({result.size_before} -> "
            f"{result.size_after}); {result.blocks_freed} blocks freed, "
            f"{result.blocks_moved} moved"
        )
    return 0
