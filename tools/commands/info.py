"""``vhd info``: every field of an image, raw and decoded, its locators, BAT and bitmap
statistics, and its parent chain."""

from __future__ import annotations

import argparse
import json

import vhd
from vhd.inspect import describe

from ..common import add_parent_options, open_vhd, parent_policy, warn
from ..locking import add_force_share_option

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "info", help="show every field of an image", description="Decode an image's metadata."
    )
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--chain", action="store_true", help="describe every disk of the chain")
    add_parent_options(p, serving=False)
    add_force_share_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        disk = open_vhd(args.image, policy=parent_policy(args), force_share=args.force_share)
        parent_problem = None
    except vhd.ParentError as exc:
        # Still show the child's own metadata: that is what one needs to find the parent.
        parent_problem = str(exc)
        warn(parent_problem)
        disk = open_vhd(args.image, open_parent=False, force_share=args.force_share)
    if getattr(disk, "format", "vhd") == "vhdx":
        return _run_vhdx(args, disk, parent_problem)
    with disk:
        info = describe(disk)
        if parent_problem:
            info["parent_error"] = parent_problem
        if args.chain:
            info["layers"] = [_describe_layer(layer) for layer in disk.chain[1:]]
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            _render(info)
            for layer in info.get("layers", []):
                print()
                if layer.get("format") == "vhdx":
                    from ._vhdx_info import render_vhdx

                    render_vhdx(layer)
                else:
                    _render(layer)
    return 0


def _describe_layer(layer: vhd.Disk) -> dict[str, Any]:
    """A parent in the chain, VHD or VHDX (a mixed chain)."""
    from vhd.vhdx import VHDXDisk
    from vhd.vhdx.inspect import describe_vhdx

    if isinstance(layer, VHDXDisk):
        return describe_vhdx(layer, chain=False)
    return describe(layer, chain=False)


def _render(info: dict[str, Any]) -> None:
    print(f"{info['path']}")
    print(f"  type:        {info['type']}")
    print(f"  size:        {info['size']} bytes ({info['size'] / 2**30:.3f} GiB)")
    print(f"  file size:   {info['file_size']} bytes")
    print("  footer:")
    for name, field in info["footer"].items():
        print(f"    {name:<18} {_raw(field['raw']):<34} {field['meaning']}")
    if "header" in info:
        print("  dynamic header:")
        for name, field in info["header"].items():
            print(f"    {name:<18} {_raw(field['raw']):<34} {field['meaning']}")
        print("  parent locators (all 8 slots):")
        used = {loc["slot"]: loc for loc in info["locators"]}
        for entry in info["locator_slots"]:
            loc = used.get(entry["slot"])
            if loc is None:
                stale = any(entry[k] for k in ("data_space", "data_len", "reserved", "data_offset"))
                raw = (
                    f" (code 0 but space {entry['data_space']} len {entry['data_len']} "
                    f"reserved {entry['reserved']} offset {entry['data_offset']:#x})"
                    if stale
                    else ""
                )
                print(f"    slot {entry['slot']} empty{raw}")
                continue
            extra = f"  ({loc['problem']})" if loc["problem"] else ""
            print(
                f"    slot {loc['slot']} {loc['kind']:<5} at {loc['data_offset']:#x} "
                f"len {loc['data_len']} space {loc['data_space']} {loc['data_space_unit']}: "
                f"{loc['path']!r}{extra}"
            )
        bat = info["bat"]
        print("  blocks:")
        print(
            f"    {bat['allocated_blocks']} of {bat['entries']} allocated "
            f"({bat['blocks_full_bitmap']} full, {bat['blocks_partial_bitmap']} partial, "
            f"{bat['blocks_empty_bitmap']} empty bitmaps); {bat['bytes_present']} bytes present"
        )
        print(
            f"    {bat['data_4k_aligned_blocks']} with 4 KiB-aligned data; "
            f"{'in guest order' if bat['blocks_in_guest_order'] else 'out of guest order'}"
        )
    if info.get("warnings"):
        print("  warnings:")
        for message in info["warnings"]:
            print(f"    {message}")
    if "chain" in info and len(info["chain"]) > 1:
        print("  chain:")
        for layer in info["chain"]:
            print(
                f"    [{layer['depth']}] {layer['type']:<12} {layer['unique_id']}  {layer['path']}"
            )
    if info.get("parent_error"):
        print(f"  parent: NOT FOUND: {info['parent_error']}")


def _raw(value: object) -> str:
    if isinstance(value, int):
        return f"{value} ({value:#x})"
    return str(value)


def _run_vhdx(args: argparse.Namespace, disk: vhd.Disk, parent_problem: str | None) -> int:
    from vhd.vhdx import VHDXDisk
    from vhd.vhdx.inspect import describe_vhdx

    from ._vhdx_info import render_vhdx

    assert isinstance(disk, VHDXDisk)
    with disk:
        info = describe_vhdx(disk)
        if parent_problem:
            info["parent_error"] = parent_problem
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            render_vhdx(info)
            if parent_problem:
                print(f"  parent: NOT FOUND: {parent_problem}")
    return 0
