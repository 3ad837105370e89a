"""Everything ``vhd info`` shows, gathered as plain data (JSON-ready): every footer and header
field raw and decoded, all locators with their encodings, BAT and bitmap statistics, the chain.

Rendering for humans lives in the CLI; this module only collects.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterator

from . import bitmap as bm
from .bat import UNUSED
from .chain import read_locators
from .disk import FULL, SECTOR, Disk, SparseDisk
from .footer import (
    CREATOR_APP,
    FEATURE_RESERVED,
    FEATURE_TEMPORARY,
    VHDKIT_CREATOR_VERSIONS,
    Footer,
    unix_time,
    uuid_text,
)
from .geometry import chs_from_size
from .header import DynamicHeader
from .locator import code_name

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any

_HOSTS = {b"Wi2k": "Windows", b"Mac ": "Macintosh", b"\0\0\0\0": "none (blktap writes 0)"}
_CREATORS = {
    b"vpc ": "Virtual PC",
    b"vs  ": "Virtual Server",
    b"win ": "Windows / Hyper-V",
    b"d2v ": "Disk2vhd",
    b"d2v\0": "Disk2vhd",
    b"qemu": "QEMU",
    b"qem2": "QEMU (force_size)",
    b"tap\0": "blktap / XenServer",
    b"CTXS": "XenConverter",
    b"wa\0\0": "Azure export",
    b"vbox": "VirtualBox",
    b"vhdk": "vhdkit",
    b"Py  ": "FATtools",
}


def _creator_meaning(f: Footer) -> str:
    if f.creator_app == CREATOR_APP and f.creator_version in VHDKIT_CREATOR_VERSIONS:
        return "vhdkit (with Windows' creator code, so that qemu takes the current size)"
    return _CREATORS.get(f.creator_app, "unknown")


def _iso(vhd_time: int) -> str:
    # What datetime.fromtimestamp(t, UTC).isoformat() writes for whole seconds, without
    # importing datetime (about 2-4 ms of `vhd info`'s start-up).
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(unix_time(vhd_time)))


def _text4(raw: bytes) -> str:
    return raw.decode("latin-1").replace("\0", "\\0")


def footer_fields(f: Footer) -> dict[str, dict[str, Any]]:
    features = []
    if f.features & FEATURE_TEMPORARY:
        features.append("temporary")
    if f.features & FEATURE_RESERVED:
        features.append("reserved (always set)")
    if f.features & ~(FEATURE_TEMPORARY | FEATURE_RESERVED):
        features.append(f"unknown bits {f.features & ~3:#x}")
    geo = f.geometry
    return {
        "cookie": {"raw": _text4(f.cookie), "meaning": "ok" if f.cookie_ok else "BAD"},
        "features": {"raw": f.features, "meaning": ", ".join(features) or "none"},
        "version": {"raw": f.version, "meaning": f"{f.version >> 16}.{f.version & 0xFFFF}"},
        "data_offset": {
            "raw": f.data_offset,
            "meaning": "none (fixed)" if f.data_offset == 0xFFFFFFFFFFFFFFFF else "header offset",
        },
        "timestamp": {"raw": f.timestamp, "meaning": _iso(f.timestamp)},
        "creator_app": {
            "raw": _text4(f.creator_app),
            "meaning": _creator_meaning(f),
        },
        "creator_version": {
            "raw": f.creator_version,
            "meaning": f"{f.creator_version >> 16}.{f.creator_version & 0xFFFF}",
        },
        "creator_host": {
            "raw": _text4(f.creator_host),
            "meaning": _HOSTS.get(f.creator_host, "unknown"),
        },
        "original_size": {"raw": f.original_size, "meaning": "bytes at creation"},
        "current_size": {"raw": f.current_size, "meaning": "guest-visible size (authoritative)"},
        "geometry": {
            "raw": [geo.cylinders, geo.heads, geo.sectors],
            "meaning": "maximum: use current size"
            if geo.is_max
            else f"{geo.total_bytes} bytes by CHS (spec CHS for this size: "
            f"{'/'.join(map(str, chs_from_size(f.current_size)))})",
        },
        "disk_type": {
            "raw": f.disk_type,
            "meaning": f.type.label if f.type is not None else "unknown",
        },
        "checksum": {"raw": f.checksum, "meaning": f"{f.checksum:#010x}"},
        "unique_id": {"raw": f.unique_id.hex(), "meaning": uuid_text(f.unique_id)},
        "saved_state": {"raw": f.saved_state, "meaning": "saved" if f.saved_state else "no"},
        "hidden": {"raw": f.reserved[0], "meaning": "blktap hidden" if f.hidden else "no"},
    }


def header_fields(h: DynamicHeader) -> dict[str, dict[str, Any]]:
    return {
        "cookie": {"raw": h.cookie.decode("latin-1"), "meaning": "ok" if h.cookie_ok else "BAD"},
        "data_offset": {"raw": h.data_offset, "meaning": "unused (all ones)"},
        "table_offset": {"raw": h.table_offset, "meaning": f"BAT at {h.table_offset:#x}"},
        "version": {"raw": h.version, "meaning": f"{h.version >> 16}.{h.version & 0xFFFF}"},
        "max_table_entries": {"raw": h.max_table_entries, "meaning": "BAT entries"},
        "block_size": {"raw": h.block_size, "meaning": f"{h.block_size // 1024} KiB"},
        "checksum": {"raw": h.checksum, "meaning": f"{h.checksum:#010x}"},
        "parent_unique_id": {
            "raw": h.parent_unique_id.hex(),
            "meaning": uuid_text(h.parent_unique_id),
        },
        "parent_timestamp": {
            "raw": h.parent_timestamp,
            "meaning": _iso(h.parent_timestamp) if h.parent_timestamp else "not set",
        },
        "parent_name": {"raw": h.parent_name_raw.rstrip(b"\0").hex(), "meaning": h.parent_name},
    }


def _first_and_count(run: Iterator[int]) -> tuple[int, int]:
    """The first item of a non-empty run and how many it holds, counted at C speed."""
    first = next(run)
    rest = collections.deque(enumerate(run, 2), maxlen=1)  # (count, item) of the last one
    return first, rest[0][0] if rest else 1


def block_stats(disk: SparseDisk) -> dict[str, Any]:
    """BAT and bitmap statistics (reads one bitmap per allocated block, no data).

    Only the allocated blocks are walked: their numbers come from C-level passes over the table
    (:meth:`~vhd.bat.BlockAllocationTable.allocated_indices`), so the million unused entries of a
    sparse 2040 GiB disk cost no Python step (walking them all took 86 ms of its ``vhd info``).
    They are taken in runs of equal entries (``itertools.groupby``, counted by a C-level
    ``deque``): a run of blocks sharing one entry -- a damaged table; an all-equal one has
    millions -- costs one bitmap read and one step, not one per block.
    """
    assert disk.header is not None
    header = disk.header
    spb = header.block_size // 512
    full = partial = empty = 0
    sectors = 0
    aligned = 0
    lowest = highest = None
    order_ok = True
    previous = -1
    entry_of = disk.bat.entries.__getitem__
    for entry, run in itertools.groupby(disk.bat.allocated_indices(), key=entry_of):
        first, count = _first_and_count(run)
        bits = disk._bitmap(first, entry)
        if bits is FULL:
            full += count
            sectors += spb * count
        else:
            present = bm.count_set(bits, spb)
            sectors += present * count
            if present == spb:
                full += count
            elif present == 0:
                empty += count
            else:
                partial += count
        if (entry * 512 + header.bitmap_bytes) % 4096 == 0:
            aligned += count
        lowest = entry if lowest is None else min(lowest, entry)
        highest = entry if highest is None else max(highest, entry)
        if entry < previous:
            order_ok = False
        previous = entry
    allocated = full + partial + empty
    return {
        "entries": len(disk.bat),
        "max_table_entries": header.max_table_entries,
        "allocated_blocks": allocated,
        "unallocated_blocks": len(disk.bat) - allocated,
        "blocks_full_bitmap": full,
        "blocks_partial_bitmap": partial,
        "blocks_empty_bitmap": empty,
        "sectors_present": sectors,
        "bytes_present": sectors * 512,
        "bitmap_bytes_per_block": header.bitmap_bytes,
        "data_4k_aligned_blocks": aligned,
        "blocks_in_guest_order": order_ok,
        "first_block_sector": lowest,
        "last_block_sector": highest,
        "unused_marker": UNUSED,
    }


def describe(disk: Disk, *, chain: bool = True) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": disk.path,
        "type": disk.type.label,
        "size": disk.size,
        "file_size": disk.file_size,  # (st_size is 0 for a block device)
        "footer_offset": disk.footer_offset,
        "footer": footer_fields(disk.footer),
        "warnings": list(disk.warnings),
    }
    if isinstance(disk, SparseDisk) and disk.header is not None:
        info["header"] = header_fields(disk.header)
        info["locators"] = [
            {
                "slot": loc.slot,
                "code": loc.code,
                "kind": code_name(loc.code),
                "data_offset": loc.data_offset,
                "data_len": loc.data_len,
                "data_space": loc.data_space,
                "data_space_unit": "sectors" if loc.data_space < 512 else "bytes",
                "path": loc.text,
                "problem": loc.problem,
            }
            for loc in read_locators(disk.fd, disk.file_size, disk.header)
        ]
        # all 8 entries of the header's locator table as stored, empty ones included (a slot
        # with code 0 but other fields set is worth seeing: some tools leave stale entries)
        info["locator_slots"] = [
            {
                "slot": slot,
                "code": loc.code,
                "kind": code_name(loc.code) if loc.in_use else None,
                "data_space": loc.data_space,
                "data_len": loc.data_len,
                "reserved": loc.reserved,
                "data_offset": loc.data_offset,
                "in_use": loc.in_use,
            }
            for slot, loc in enumerate(disk.header.locators)
        ]
        info["bat"] = block_stats(disk)
    if chain:
        from .lineage import identity_text, recorded_parent_texts

        info["chain"] = [
            {
                "depth": depth,
                "path": layer.path,
                "type": layer.type.label,
                "size": layer.size,
                # What a child records to name the layer (vhd.lineage: a VHDX's DataWriteGuid).
                "unique_id": identity_text(layer),
                "parent_unique_id": ", ".join(recorded_parent_texts(layer))
                if layer.type.label == "differencing"
                else None,
            }
            for depth, layer in enumerate(disk.chain)
        ]
    return info


def host_extents(disk: Disk) -> Iterator[tuple[int, int, int | None, int | None]]:
    """(guest offset, length, layer, host offset) runs: :meth:`Disk.extents` cut where the data
    is not contiguous in the layer's file, with the byte offset in that file (the layer's path is
    ``disk.chain[layer].path``).  Zero runs have no layer and no host offset.  Like
    ``qemu-img map``'s "offset", which is a host offset (its guest offset is "start")."""
    chain = disk.chain
    for ext in disk.extents():
        if ext.layer is None:
            yield ext.offset, ext.length, None, None
            continue
        layer = chain[ext.layer]
        locate = _block_locator(layer)
        if locate is None:
            yield ext.offset, ext.length, ext.layer, ext.offset  # fixed: the file is the disk
            continue
        bs = layer.block_size
        assert bs is not None
        run_start, run_host = ext.offset, -1
        pos = ext.offset
        while pos < ext.end:
            block = pos // bs
            stop = min(ext.end, (block + 1) * bs)
            host = locate(block) + pos - block * bs
            if run_host >= 0 and run_host + (pos - run_start) != host:
                yield run_start, pos - run_start, ext.layer, run_host
                run_start, run_host = pos, host
            elif run_host < 0:
                run_host = host
            pos = stop
        yield run_start, ext.end - run_start, ext.layer, run_host


def _block_locator(layer: Disk) -> Callable[[int], int] | None:
    """For a layer whose data lives in blocks, the file offset of a block's first data byte (of
    a block ``extents()`` says holds data); None where the file is the disk (fixed VHD, raw)."""
    if isinstance(layer, SparseDisk):
        assert layer.header is not None
        bat, skip = layer.bat, layer.header.bitmap_bytes
        # data of a block follows its sector bitmap (VHD spec: "Block Allocation Table")
        return lambda block: bat[block] * SECTOR + skip
    if layer.block_size is None:
        return None
    # Only a VHDX layer gets here; its package is loaded already, since the layer is one.
    from .vhdx import records as xr
    from .vhdx.disk import VHDXDisk, chunk_ratio

    if not isinstance(layer, VHDXDisk):
        return None
    # MS-VHDX 2.5: payload entries are interleaved with a sector bitmap entry every chunk
    # ratio blocks; an entry's FileOffsetMB is where the block's data starts (fixed disks too).
    entries = layer.bat
    ratio = chunk_ratio(layer.metadata.block_size, layer.metadata.logical_sector_size)
    return lambda block: entries[block + block // ratio] & xr.OFFSET_MASK
