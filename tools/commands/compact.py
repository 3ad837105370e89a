"""``vhd compact IMAGE``: give back the space of empty blocks (:mod:`vhd.compact`).

Dynamic disks lose blocks with no bitmap bit set or only zeros; differencing children blocks with
no bit set.  The remaining blocks move down, the file is cut, and the bytes reclaimed are shown.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vhd.compact import compact

from ._progress import progress_bar


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "compact",
        help="reclaim empty blocks of a dynamic or differencing disk",
        description="Unallocate blocks that hold nothing (all zeros or no bitmap bit set; for a "
        "differencing disk only no bit set), move the rest down and cut the file.",
    )
    p.add_argument("image")
    p.add_argument(
        "-p", "--progress", action="store_true", help="show progress even when not a tty"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    show = args.progress or sys.stderr.isatty()
    result = compact(args.image, progress=progress_bar("scan", show))
    print(
        f"{result.path}: reclaimed {result.reclaimed} bytes ({result.size_before} -> "
        f"{result.size_after}); {result.blocks_freed} blocks freed, {result.blocks_moved} moved"
    )
    return 0
