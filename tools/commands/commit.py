"""``vhd commit CHILD [--keep]``: merge a differencing child into its parent (:mod:`vhd.commit`).

The parent may be fixed, dynamic or differencing.  An interrupted commit leaves the parent
consistent and the chain reading as before; rerunning finishes the job.
"""

from __future__ import annotations

import argparse
import os
import sys

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
    try:
        result = commit(
            args.child,
            keep=args.keep,
            parent_dirs=args.parent_dir,
            progress=progress_bar("commit", show),
            parent_policy=LOCAL_PARENTS,
        )
    except KeyboardInterrupt:
        # The child is removed last, after the parent's flush and the relinking: gone, it says
        # the commit had finished when the interrupt came (while the child closed, or on the
        # way back here).  "interrupted" would send the user to rerun a finished commit.
        if args.keep or os.path.lexists(args.child):
            raise
        if not args.quiet:
            print(f"committed {args.child} into its parent; child removed")
        print("vhd: warning: the interrupt came after the commit had finished", file=sys.stderr)
        return 0
    if not args.quiet:
        what = "kept" if args.keep else "removed"
        print(
            f"committed {result.bytes_copied} bytes of {result.child} into {result.parent}; "
            f"child {what}"
        )
        for path in result.relinked:
            print(f"{path}: now a child of {result.parent}")
    return 0
