"""``vhd set-parent CHILD PARENT [--force]``: retarget a differencing child at its moved parent
(:mod:`vhd.reparent`): the parent name and every locator kind (W2ku, W2ru, MacX) are rewritten,
after checking the parent's unique id (``--force`` accepts a different one, with a warning).
"""

from __future__ import annotations

import argparse
import sys

from vhd.reparent import set_parent

from ..interrupt import terminate_as_interrupt

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "set-parent",
        help="point a differencing disk at its (moved) parent",
        description="Rewrite a differencing disk's parent name, timestamp and W2ku/W2ru/MacX "
        "locators to name PARENT. The parent's unique id must match unless --force.",
    )
    p.add_argument("child")
    p.add_argument("parent")
    p.add_argument("--force", action="store_true", help="accept a parent with another unique id")
    p.set_defaults(func=run)


@terminate_as_interrupt
def run(args: argparse.Namespace) -> int:
    result = set_parent(args.child, args.parent, force=args.force)
    for warning in result.warnings:
        print(f"vhd: warning: {warning}", file=sys.stderr)
    print(f"{result.child}: parent is now {result.parent}")
    return 0
