"""``vhd map``'s host_offset on VHDX layers (MS-VHDX 2.5: a payload block's FileOffsetMB): the
bytes at host_offset in the row's file are the guest's.  qemu-img map reports no offsets for
VHDX, so the oracle is the guest content itself: what qemu-io wrote (read back by qemu-img
convert) or, for chains, the patterns written."""

from __future__ import annotations

import json
from pathlib import Path

from tests.vhd.helpers import run_cli
from tests.vhd.vhdx.helpers import MiB, qemu_create, qemu_raw, qemu_write
from vhd import Disk
from vhd import create as vhd_create
from vhd import open as vhd_open
from vhd.vhdx import create_vhdx, open_vhdx


def _assert_rows_point_at_the_guest_bytes(image: Path, content: bytes) -> int:
    rc, out = run_cli("map", "--json", str(image))
    assert rc == 0, out
    rows = json.loads(out)
    assert sum(r["length"] for r in rows) == len(content)
    seen = 0
    for r in rows:
        if not r["data"]:
            continue
        seen += 1
        with open(r["path"], "rb") as f:
            f.seek(r["host_offset"])
            got = f.read(r["length"])
        want = content[r["guest_offset"] : r["guest_offset"] + r["length"]]
        assert got == want, r
    return seen


def test_qemu_made_dynamic_vhdx(tmp_path: Path) -> None:
    image = tmp_path / "q.vhdx"
    qemu_create(image, 64 * MiB, block_size=MiB)
    # the second write lands in a block allocated after the first: file order != guest order
    qemu_write(image, "write -P 0x5a 40M 1M", "write -P 0x6b 4096 64k", "write -P 0x11 9M 3M")
    assert _assert_rows_point_at_the_guest_bytes(image, qemu_raw(image, tmp_path / "q.raw")) >= 3


def test_fixed_vhdx(tmp_path: Path) -> None:
    image = tmp_path / "f.vhdx"
    content = bytearray(8 * MiB)
    with create_vhdx(image, len(content), type="fixed", block_size=MiB) as disk:
        for off, n, byte in ((0, 4096, 1), (3 * MiB + 512, 70000, 2), (8 * MiB - 512, 512, 3)):
            disk.pwrite(bytes([byte]) * n, off)
            content[off : off + n] = bytes([byte]) * n
    assert _assert_rows_point_at_the_guest_bytes(image, bytes(content)) >= 1


def test_mixed_chain_with_partial_blocks(tmp_path: Path) -> None:
    """VHDX child (sector bitmaps) over a VHD child over a VHDX base: every layer's rows."""
    size = 8 * MiB
    content = bytearray(size)

    def put(disk: Disk, off: int, n: int, byte: int) -> None:
        disk.pwrite(bytes([byte]) * n, off)
        content[off : off + n] = bytes([byte]) * n

    base = tmp_path / "base.vhdx"
    with create_vhdx(base, size, block_size=MiB) as disk:
        put(disk, 0, 3 * MiB, 0x21)
        put(disk, 6 * MiB, MiB, 0x22)
    mid = tmp_path / "mid.vhd"
    vhd_create(str(mid), parent=str(base)).close()
    with vhd_open(str(mid), "r+") as middle:
        put(middle, MiB + 4096, 8192, 0x31)
    top = tmp_path / "top.vhdx"
    with vhd_open(str(mid)) as parent:
        create_vhdx(top, 0, type="differencing", parent=parent, block_size=MiB).close()
    with open_vhdx(top, "r+") as leaf:
        put(leaf, 2 * MiB + 512, 1024, 0x41)
        put(leaf, 5 * MiB, 4096, 0x42)
    _, out = run_cli("map", "--json", str(top))
    assert {r["layer"] for r in json.loads(out) if r["data"]} == {0, 1, 2}, out
    assert _assert_rows_point_at_the_guest_bytes(top, bytes(content)) >= 5
