"""``vhd compare``: do two disks (VHD or raw, either side) have the same guest-visible content?

Exit 0 when identical, 1 when they differ (the first differing offset is printed), 2 on error.
"""

from __future__ import annotations

import argparse
from typing import Any

from vhd.source import open_source

from ..common import Progress, warn
from ..locking import add_force_share_option

CHUNK = 4 * 1024 * 1024


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "compare",
        help="compare the guest-visible content of two disks",
        description="Compare A and B (each a VHD of any type, or a raw image).",
    )
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--parent-dir", action="append", default=[], metavar="DIR")
    add_force_share_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with (
        open_source(args.a, parent_dirs=args.parent_dir, force_share=args.force_share) as a,
        open_source(args.b, parent_dirs=args.parent_dir, force_share=args.force_share) as b,
    ):
        for message in a.warnings + b.warnings:
            warn(message)
        if a.size != b.size:
            print(f"sizes differ: {a.size} != {b.size}")
            return 1
        offset = _first_difference(a, b)
    if offset is None:
        print("identical")
        return 0
    print(f"content differs at offset {offset}")
    return 1


def _first_difference(a: Any, b: Any) -> int | None:
    buf_a, buf_b = bytearray(CHUNK), bytearray(CHUNK)
    view_a, view_b = memoryview(buf_a), memoryview(buf_b)
    progress = Progress(a.size, "comparing")
    pos = 0
    while pos < a.size:
        n = min(CHUNK, a.size - pos)
        a.preadinto(view_a[:n], pos)
        b.preadinto(view_b[:n], pos)
        if view_a[:n] != view_b[:n]:
            for i in range(n):
                if buf_a[i] != buf_b[i]:
                    progress.finish()
                    return pos + i
        pos += n
        progress.update(pos)
    progress.finish()
    return None
