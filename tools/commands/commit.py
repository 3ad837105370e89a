"""``vhd commit CHILD [--keep]``: merge a differencing child into its parent (:mod:`vhd.commit`).

The parent may be fixed, dynamic or differencing.  An interrupted commit leaves the parent
consistent and the chain reading as before; rerunning finishes the job.
"""

from __future__ import annotations

import argparse

from vhd.commit import commit

from ..common import LOCAL_PARENTS, add_parent_dir_option, add_progress_options, progress_wanted
from ..interrupt import terminate_as_interrupt
from ._progress import progress_bar

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "commit",
        help="merge a differencing child into its parent",
        description="Copy every range a differencing child holds into its parent, then remove "
        "the child (or keep it with --keep). Crash-safe: rerun after an interruption.",
    )
    p.add_argument("child")
    p.add_argument("--keep", action="store_true", help="keep the child after merging")
    add_parent_dir_option(p, "also look for parents in DIR")
    add_progress_options(p)
    p.set_defaults(func=run)


@terminate_as_interrupt
def run(args: argparse.Namespace) -> int:
    show = progress_wanted(args)
    result = commit(
        args.child,
        keep=args.keep,
        parent_dirs=args.parent_dir,
        progress=progress_bar("commit", show),
        parent_policy=LOCAL_PARENTS,
    )
    if not args.quiet:
        what = "kept" if args.keep else "removed"
        print(
            f"committed {result.bytes_copied} bytes of {result.child} into {result.parent}; "
            f"child {what}"
        )
        for path in result.relinked:
            print(f"{path}: now a child of {result.parent}")
    return 0
