"""``vhd map``: which layer of the chain holds each range of the guest address space."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..common import open_vhd
from ..locking import add_force_share_option


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "map",
        help="show which layer holds each guest range",
        description="List the runs of the guest address space with where their data lives: "
        "a layer of the chain (0 = the image itself) or nowhere (reads as zeros).",
    )
    p.add_argument("image")
    p.add_argument("--json", action="store_true")
    p.add_argument("--parent-dir", action="append", default=[], metavar="DIR")
    add_force_share_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_vhd(args.image, parent_dirs=args.parent_dir, force_share=args.force_share) as disk:
        paths = [layer.path for layer in disk.chain]
        rows = [
            {
                "offset": e.offset,
                "length": e.length,
                "layer": e.layer,
                "data": e.layer is not None,
                "path": paths[e.layer] if e.layer is not None else None,
            }
            for e in disk.extents()
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'offset':>16} {'length':>16}  where")
    for row in rows:
        where = f"[{row['layer']}] {row['path']}" if row["data"] else "zero (unallocated)"
        print(f"{row['offset']:>16} {row['length']:>16}  {where}")
    return 0
