"""``vhd info`` for VHDX: every header, region table entry, metadata item and parent locator
entry, raw and decoded, the log state and BAT statistics (MS-VHDX 2.2-2.6), as plain data.
BAT statistics come from C-level passes over the table, never a step per entry.

Rendering lives in the CLI; this module only builds dictionaries (JSON-ready).
"""

from __future__ import annotations

from . import placement
from . import records as r
from .disk import VHDXDisk, chunk_ratio

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def _field(raw: object, meaning: object) -> dict[str, Any]:
    return {"raw": raw, "meaning": meaning}


def _header(h: r.Header) -> dict[str, Any]:
    return {
        "signature": _field("head", "header"),
        "checksum": _field(f"{h.checksum:#010x}", "CRC-32C, valid"),
        "sequence_number": _field(h.sequence_number, "higher is newer"),
        "file_write_guid": _field(
            str(h.file_write_guid), "changes on the first write of a session"
        ),
        "data_write_guid": _field(
            str(h.data_write_guid), "changes when guest-visible data changes"
        ),
        "log_guid": _field(
            str(h.log_guid),
            "no log to replay" if h.log_guid == r.ZERO_GUID else "the log must be replayed",
        ),
        "log_version": _field(h.log_version, "0 is the only one"),
        "version": _field(h.version, "VHDX 1"),
        "log_length": _field(h.log_length, f"{h.log_length // r.MiB} MiB"),
        "log_offset": _field(h.log_offset, f"at {h.log_offset // r.MiB} MiB"),
    }


def _item_meaning(disk: VHDXDisk, entry: r.MetadataEntry) -> str:
    md = disk.metadata
    if entry.item_id == r.FILE_PARAMETERS:
        return (
            f"block size {md.block_size}, LeaveBlocksAllocated {int(md.leave_blocks_allocated)}, "
            f"HasParent {int(md.has_parent)}"
        )
    if entry.item_id == r.VIRTUAL_DISK_SIZE:
        return f"{md.virtual_size} bytes"
    if entry.item_id == r.VIRTUAL_DISK_ID:
        return f"page 83 id {md.virtual_disk_id}"
    if entry.item_id == r.LOGICAL_SECTOR_SIZE:
        return f"{md.logical_sector_size}-byte logical sectors"
    if entry.item_id == r.PHYSICAL_SECTOR_SIZE:
        return f"{md.physical_sector_size}-byte physical sectors"
    if entry.item_id == r.PARENT_LOCATOR:
        return "parent locator (see parent_locator)"
    return "unknown item (kept)"


def _bat(disk: VHDXDisk) -> dict[str, Any]:
    """State counts by C-level passes (:mod:`vhd.vhdx.placement`): a 64 TiB disk of 1 MiB
    blocks has 64 Mi entries."""
    ratio = chunk_ratio(disk.metadata.block_size, disk.metadata.logical_sector_size)
    blocks = -(-disk.size // disk.metadata.block_size)
    stride = ratio + 1
    last = blocks - 1 + (blocks - 1) // ratio  # the last payload entry
    counts = placement.count_payload_states(disk.bat, last + 1, stride) if blocks else [0] * 8
    states = {
        r.PAYLOAD_STATE_NAMES.get(state, f"RESERVED_{state}"): n
        for state, n in enumerate(counts)
        if n
    }
    bitmaps = placement.bitmap_states(disk.bat, -(-blocks // ratio), stride)
    return {
        "payload_blocks": blocks,
        "chunk_ratio": ratio,
        "states": dict(sorted(states.items())),
        "sector_bitmap_blocks_present": bitmaps.count(r.BitmapState.PRESENT),
    }


def describe_vhdx(disk: VHDXDisk, *, chain: bool = True) -> dict[str, Any]:
    lay = disk.layout
    md = disk.metadata
    headers = []
    for i, (h, err) in enumerate(zip(lay.headers, lay.header_errors, strict=True)):
        headers.append(
            {
                "copy": i + 1,
                "offset": r.HEADER_OFFSETS[i],
                "current": i == lay.current,
                "valid": h is not None,
                "error": err or None,
                "fields": _header(h) if h is not None else None,
            }
        )
    tables = []
    for i, (t, err) in enumerate(zip(lay.region_tables, lay.region_errors, strict=True)):
        tables.append(
            {
                "copy": i + 1,
                "offset": r.REGION_TABLE_OFFSETS[i],
                "valid": t is not None,
                "error": err or None,
                "entries": [
                    {
                        "guid": str(e.guid),
                        "name": e.name,
                        "file_offset": e.file_offset,
                        "length": e.length,
                        "required": e.required,
                    }
                    for e in (t.entries if t is not None else ())
                ],
            }
        )
    items = [
        {
            "item_id": str(e.item_id),
            "name": e.name,
            "offset": e.offset,
            "length": e.length,
            "is_user": e.is_user,
            "is_virtual_disk": e.is_virtual_disk,
            "is_required": e.is_required,
            "raw": md.raw_items.get(e.item_id, b"")[:64].hex(),
            "meaning": _item_meaning(disk, e),
        }
        for e in md.entries
    ]
    head = disk.current_header
    replayed = lay.replayed
    if replayed is None:
        log: dict[str, Any] = {
            "state": "empty" if head.log_guid == r.ZERO_GUID else "LogGuid set, no valid entries",
            "entries": 0,
        }
    else:
        log = {
            "state": "needs replay (replayed in memory for this read-only view)",
            "entries": len(replayed.entries),
            "sequence": [e.sequence_number for e in replayed.entries],
            "flushed_file_offset": replayed.head.flushed_file_offset,
            "last_file_offset": replayed.head.last_file_offset,
        }
    log.update({"offset": head.log_offset, "length": head.log_length, "guid": str(head.log_guid)})
    loc = md.parent_locator
    info: dict[str, Any] = {
        "path": disk.path,
        "format": "vhdx",
        "type": disk.type.label,
        "size": disk.size,
        "file_size": disk.file_size,
        "creator": lay.creator,
        "block_size": md.block_size,
        "logical_sector_size": md.logical_sector_size,
        "physical_sector_size": md.physical_sector_size,
        "headers": headers,
        "region_tables": tables,
        "metadata": items,
        "parent_locator": (
            {"type": str(loc.locator_type), "entries": dict(loc.entries)} if loc else None
        ),
        "log": log,
        "bat": _bat(disk),
        "warnings": list(disk.warnings),
    }
    if chain:
        info["chain"] = [
            {"depth": d, "type": layer.type.label, "path": layer.path}
            for d, layer in enumerate(disk.chain)
        ]
    return info
