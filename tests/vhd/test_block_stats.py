"""``vhd info``'s BAT statistics (vhd.inspect.block_stats) against a per-block count made from
the file's bytes by the spec model (tests/model.py): written disks, crafted tables whose blocks
share entries across unallocated gaps or run out of order, and an empty 2040 GiB table (issue 9
item 17: only allocated blocks are walked now)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import vhd
from tests.images import craft
from tests.model import bit_set, bitmap_bytes, model_chain
from vhd.inspect import block_stats

KiB = 1024
MiB = 1024 * KiB


def _oracle(path: Path) -> dict[str, Any]:
    """The statistics counted block by block from the bytes (each allocated block on its own)."""
    model = model_chain([path], strict=False)
    spb = model.block_size // 512
    nbytes = bitmap_bytes(model.block_size)
    full = partial = empty = sectors = aligned = 0
    entries = [e for _, e in model.allocated_blocks()]
    for entry in entries:
        bitmap = model.raw[entry * 512 : entry * 512 + nbytes]
        present = sum(bit_set(bitmap, s) for s in range(spb))
        sectors += present
        full += present == spb
        empty += present == 0
        partial += 0 < present < spb
        aligned += (entry * 512 + nbytes) % 4096 == 0
    return {
        "entries": len(model.bat),
        "allocated_blocks": len(entries),
        "unallocated_blocks": len(model.bat) - len(entries),
        "blocks_full_bitmap": full,
        "blocks_partial_bitmap": partial,
        "blocks_empty_bitmap": empty,
        "sectors_present": sectors,
        "bytes_present": sectors * 512,
        "data_4k_aligned_blocks": aligned,
        "blocks_in_guest_order": entries == sorted(entries),
        "first_block_sector": min(entries, default=None),
        "last_block_sector": max(entries, default=None),
    }


def _stats(path: Path) -> dict[str, Any]:
    with vhd.open(path, strict=False) as disk:
        stats = block_stats(disk)  # type: ignore[arg-type]
    return {k: stats[k] for k in _oracle(path)}


def test_written_disk(tmp_path: Path) -> None:
    path = tmp_path / "w.vhd"
    with vhd.create(path, 8 * MiB, block_size=512 * KiB) as disk:
        disk.pwrite(b"\x11" * (512 * KiB), 0)  # a full block
        disk.pwrite(b"\x22" * 4096, 3 * 512 * KiB + 8192)  # a partial one
        disk.pwrite(b"\x33" * 512, 8 * MiB - 512)  # the last sector
    assert _stats(path) == _oracle(path)
    assert _stats(path)["allocated_blocks"] == 3


def test_crafted_tables(tmp_path: Path) -> None:
    """Blocks sharing an entry across unallocated gaps, a table out of guest order, a bitmap
    with no bit set: each block counts on its own, as the oracle counts them."""
    bs = 4096
    data = 0x600 // 512 + 8  # sectors after the header and table: room for bitmap + data
    step = (512 + bs) // 512
    bat = {0: data, 2: data, 3: data + 2 * step, 5: data + step, 7: data + 2 * step}
    path = craft(tmp_path / "c.vhd", size=64 * KiB, block_size=bs, bat=bat, file_size=48 * 512)
    raw = bytearray(path.read_bytes())
    raw[data * 512] = 0xF0  # 4 of 8 sectors
    raw[(data + step) * 512] = 0x00  # none
    raw[(data + 2 * step) * 512] = 0xFF  # all
    path.write_bytes(bytes(raw))
    got = _stats(path)
    assert got == _oracle(path)
    assert (got["blocks_partial_bitmap"], got["blocks_empty_bitmap"]) == (2, 1)
    assert got["blocks_in_guest_order"] is False


@pytest.mark.parametrize("size", [2040 * 1024 * MiB])
def test_empty_large_table(tmp_path: Path, size: int) -> None:
    path = tmp_path / "big.vhd"
    vhd.create(path, size).close()
    with vhd.open(path) as disk:
        stats = block_stats(disk)  # type: ignore[arg-type]
    assert stats["entries"] == size // (2 * MiB) and stats["allocated_blocks"] == 0
    assert stats["first_block_sector"] is None and stats["blocks_in_guest_order"] is True
