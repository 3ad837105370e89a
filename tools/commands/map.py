"""``vhd map``: which layer of the chain holds each range of the guest address space."""

from __future__ import annotations

import argparse
import json

from vhd.inspect import host_extents

from ..common import add_parent_dir_option, open_vhd
from ..locking import add_force_share_option

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "map",
        help="show which layer holds each guest range",
        description="List the runs of the guest address space with where their data lives: "
        "a layer of the chain (0 = the image itself) and the byte offset in that file "
        "(host_offset), or nowhere (reads as zeros).",
    )
    p.add_argument("image")
    p.add_argument("--json", action="store_true")
    add_parent_dir_option(p, None)
    add_force_share_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_vhd(args.image, parent_dirs=args.parent_dir, force_share=args.force_share) as disk:
        paths = [layer.path for layer in disk.chain]
        rows = [
            {
                # "guest_offset" is where the run is in the disk; "host_offset" where its bytes
                # are in the file "path" (qemu-img map calls these "start" and "offset").
                # "offset" repeats guest_offset for scripts written before host_offset existed.
                "guest_offset": guest,
                "offset": guest,
                "length": length,
                "layer": layer,
                "data": layer is not None,
                "path": paths[layer] if layer is not None else None,
                "host_offset": host,
            }
            for guest, length, layer, host in host_extents(disk)
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'guest offset':>16} {'length':>16} {'host offset':>16}  where")
    for row in rows:
        where = f"[{row['layer']}] {row['path']}" if row["data"] else "zero (unallocated)"
        host = "-" if row["host_offset"] is None else row["host_offset"]
        print(f"{row['guest_offset']:>16} {row['length']:>16} {host:>16}  {where}")
    return 0
