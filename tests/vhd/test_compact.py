"""vhd compact and Disk.discard: empty blocks are given back, remaining blocks move down, the file
shrinks by what is reported, the content is unchanged (our reader, qemu-img, libvhdi), vhd check
is clean, and a compaction stopped after any synced step repairs clean with the content intact."""

from __future__ import annotations

from pathlib import Path

import pytest

import vhd
import vhd.compact as vcompact
from tests.images import MiB, build_hyperv, make_chain, random_writes
from tests.vhd.harness import stopped_runs
from tests.vhd.helpers import libvhdi_read, qemu_raw, read_image, run_cli
from vhd.check import check
from vhd.disk import SparseDisk

BS = 256 * 1024


def make_sparse_with_holes(path: Path) -> bytes:
    size = 8 * MiB
    model = bytearray(size)
    with vhd.create(path, size, block_size=BS) as disk:
        random_writes(disk, model, 60, 11)
        # A block overwritten with zeros, a whole block discarded, part of a block discarded,
        # and an unaligned discard.
        disk.pwrite(bytes(BS), 2 * BS)
        model[2 * BS : 3 * BS] = bytes(BS)
        disk.discard(5 * BS, BS)
        model[5 * BS : 6 * BS] = bytes(BS)
        disk.discard(9 * BS + 4096, 8192)
        model[9 * BS + 4096 : 9 * BS + 12288] = bytes(8192)
        disk.discard(12 * BS + 100, 1000)
        model[12 * BS + 100 : 12 * BS + 1100] = bytes(1000)
        assert disk.pread(size, 0) == bytes(model)
    return bytes(model)


def test_discard_dynamic(tmp_path: Path, require_tool: object) -> None:
    path = tmp_path / "d.vhd"
    model = make_sparse_with_holes(path)
    assert read_image(path) == model
    assert check(path, deep=True).clean
    # qemu ignores bitmaps: the punched data must read as zeros for it too.
    assert qemu_raw(path, tmp_path / "q.raw") == model
    # A discarded whole block is unallocated on disk and its space punched.
    with vhd.open(path) as disk:
        assert isinstance(disk, SparseDisk) and disk.bat[5] == 0xFFFFFFFF
    blocks_before = path.stat().st_blocks
    with vhd.open(path, "r+") as disk:
        disk.discard(0, 4 * BS)
    assert path.stat().st_blocks < blocks_before


def test_discard_differencing_hides_parent(tmp_path: Path) -> None:
    _parent, child, model = make_chain(tmp_path)
    with vhd.open(child, "r+") as disk:
        disk.discard(MiB + 512, 3 * 4096)
    want = bytearray(model)
    want[MiB + 512 : MiB + 512 + 3 * 4096] = bytes(3 * 4096)
    assert read_image(child) == bytes(want)
    assert check(child, deep=True).clean


def test_compact_dynamic(tmp_path: Path, require_tool: object) -> None:
    path = tmp_path / "d.vhd"
    model = make_sparse_with_holes(path)
    before = path.stat().st_size
    rc, out = run_cli("compact", str(path))
    assert rc == 0, out
    after = path.stat().st_size
    assert after < before - BS
    assert f"reclaimed {before - after} bytes" in out
    assert read_image(path) == model
    report = check(path, deep=True)
    assert report.clean, [f.message for f in report.problems]
    assert "free-space" not in {f.code for f in report.findings}
    assert qemu_raw(path, tmp_path / "q.raw") == model
    assert libvhdi_read([path], len(model)) == model
    with vhd.open(path, "r+") as disk:  # still writable: new blocks go after the packed ones
        disk.pwrite(b"\x99" * BS, 2 * BS)
    rc, out = run_cli("compact", str(path))
    assert rc == 0 and "reclaimed 0 bytes" in out


def test_compact_differencing(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path)
    with vhd.open(child, "r+") as disk:
        disk.pwrite(bytes(4096), 0)  # zeros in a child hide the parent: kept
        assert isinstance(disk, SparseDisk)
        entries = list(disk.bat.allocated())
    want = bytearray(model)
    want[:4096] = bytes(4096)
    # Clear every bit of one block by hand (as other tools leave them): it is reclaimable.
    victim_block, victim_entry = entries[-1]
    with open(child, "r+b") as f:
        f.seek(victim_entry * 512)
        f.write(bytes(512))
    with vhd.open(parent) as p:
        bs = 2 * MiB
        want[victim_block * bs : (victim_block + 1) * bs] = p.pread(bs, victim_block * bs)
    assert read_image(child) == bytes(want)
    rc, out = run_cli("compact", str(child))
    assert rc == 0, out
    assert "1 blocks freed" in out
    assert read_image(child) == bytes(want)
    assert check(child, deep=True).clean
    assert libvhdi_read([child, parent], len(model)) == bytes(want)


def test_compact_hyperv_layout(tmp_path: Path, require_tool: object) -> None:
    size = 8 * MiB
    content = bytearray(size)
    for i in range(0, 8):
        content[i * MiB : i * MiB + 4096] = bytes([i + 1]) * 4096
    build_hyperv(tmp_path / "hv.vhd", size=size, block_size=MiB, content=bytes(content), seed=12)
    with vhd.open(tmp_path / "hv.vhd", "r+") as disk:
        for i in (1, 4, 6):
            disk.pwrite(bytes(4096), i * MiB)
            content[i * MiB : i * MiB + 4096] = bytes(4096)
    rc, out = run_cli("compact", str(tmp_path / "hv.vhd"))
    assert rc == 0, out
    assert "3 blocks freed" in out
    assert read_image(tmp_path / "hv.vhd") == bytes(content)
    assert check(tmp_path / "hv.vhd", deep=True).clean
    assert qemu_raw(tmp_path / "hv.vhd", tmp_path / "q.raw") == bytes(content)


def test_compact_refuses_fixed(tmp_path: Path) -> None:
    vhd.create(tmp_path / "f.vhd", MiB, type="fixed").close()
    rc, out = run_cli("compact", str(tmp_path / "f.vhd"))
    assert rc == 2 and "fixed" in out


def test_crash_during_compact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base.vhd"
    model = make_sparse_with_holes(base)
    # Hyper-V-like spacing leaves room to move; free many blocks so that several batches run.
    with vhd.open(base, "r+") as disk:
        for i in range(0, 32, 3):
            disk.discard(i * BS, BS)
    with vhd.open(base) as disk:
        model = disk.pread(disk.size, 0)
    raw = base.read_bytes()
    step = 0
    for step, path, _finished in stopped_runs(monkeypatch, raw, tmp_path / "c", vcompact.compact):
        rc, out = run_cli("check", "--repair", str(path))
        assert rc == 0, f"step {step}: {out}"
        assert read_image(path) == model, f"step {step}"
    assert step >= 3
