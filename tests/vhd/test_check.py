"""vhd check and vhd check --repair: every damage a crash or a bad copy leaves is found (exit 1),
the plain check and --dry-run leave the file untouched, and after a repair the check is clean,
the data is intact (but for reported lost ranges) and qemu-img reads it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import vhd
from tests.images import MiB, build_hyperv, make_chain, make_dynamic, sha
from tests.model import spec_chs
from tests.vhd.helpers import qemu_info, qemu_raw, read_image, run_cli
from vhd.check import check
from vhd.footer import Footer
from vhd.header import DynamicHeader

BS = 2 * MiB


def bat_entries(path: Path) -> list[int]:
    raw = path.read_bytes()
    header = DynamicHeader.parse(raw[512:1536])
    count = header.max_table_entries
    return list(
        struct.unpack(f">{count}I", raw[header.table_offset : header.table_offset + 4 * count])
    )


def set_bat(path: Path, block: int, value: int) -> None:
    raw = path.read_bytes()
    header = DynamicHeader.parse(raw[512:1536])
    with open(path, "r+b") as f:
        f.seek(header.table_offset + 4 * block)
        f.write(struct.pack(">I", value))


def codes(path: Path, **kw: object) -> set[str]:
    return {f.code for f in check(path, **kw).problems}  # type: ignore[arg-type]


def repair_ok(path: Path, expected: bytes, tmp: Path, *, lost: list[int] = ()) -> str:  # type: ignore[assignment]
    """Run the CLI repair (dry run first) and verify the result."""
    before = sha(path)
    rc, out = run_cli("check", str(path))
    assert rc == 1, out
    assert sha(path) == before
    rc, out = run_cli("check", "--repair", "--dry-run", str(path))
    assert rc == 1 and "would change" in out, out
    assert sha(path) == before
    rc, out = run_cli("check", "--repair", str(path))
    assert rc == 0, out
    assert "after repair: clean" in out
    rc, out2 = run_cli("check", "--deep", str(path))
    assert rc == 0, out2
    got = read_image(path)
    want = bytearray(expected)
    for block in lost:
        want[block * BS : (block + 1) * BS] = bytes(BS)
    assert got == bytes(want)
    assert qemu_raw(path, tmp / "qemu.raw") == bytes(want)
    return out


def test_clean_images(tmp_path: Path) -> None:
    make_dynamic(tmp_path / "d.vhd")
    with vhd.create(tmp_path / "f.vhd", 4 * MiB, type="fixed") as disk:
        disk.pwrite(b"x" * 1000, 5)
    make_chain(tmp_path)
    for p in ("d.vhd", "f.vhd", "parent.vhd", "child.vhd"):
        rc, out = run_cli("check", "--deep", str(tmp_path / p))
        assert rc == 0, out
        assert "clean" in out


def test_hyperv_layout_is_clean(tmp_path: Path) -> None:
    size = 10 * MiB
    content = bytearray(size)
    for mb in (0, 3, 7, 9):
        content[mb * MiB : mb * MiB + 8192] = bytes([mb + 1]) * 8192
    pid = build_hyperv(tmp_path / "hv.vhd", size=size, block_size=BS, content=bytes(content))
    assert check(tmp_path / "hv.vhd", deep=True).clean
    build_hyperv(
        tmp_path / "hvc.vhd",
        size=size,
        block_size=BS,
        content=bytes(content),
        parent=("hv.vhd", pid),
        seed=3,
    )
    report = check(tmp_path / "hvc.vhd", deep=True)
    # The builder writes no parent timestamp, as Windows 10 does: a note, not a problem.
    assert report.clean, [f.message for f in report.problems]
    assert "parent-timestamp-zero" in {f.code for f in report.findings}


def test_json_output(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    make_dynamic(path)
    with open(path, "r+b") as f:
        f.seek(-512, os.SEEK_END)
        f.write(bytes(512))
    rc, out = run_cli("check", "--json", str(path))
    assert rc == 1
    doc = json.loads(out)
    assert doc["clean"] is False
    (finding,) = [f for f in doc["findings"] if f["code"] == "footer-tail-missing"]
    assert finding["severity"] == "error" and finding["repairable"] and finding["repair"]
    rc, out = run_cli("check", "--json", "--repair", str(path))
    assert rc == 0
    doc = json.loads(out)
    assert doc["after"]["clean"] and doc["repair"]["steps"]


def zero_tail(p: Path) -> None:
    with open(p, "r+b") as f:
        f.seek(-512, os.SEEK_END)
        f.write(bytes(512))


def cut_tail(p: Path) -> None:
    os.truncate(p, p.stat().st_size - 512)


def zero_head(p: Path) -> None:
    with open(p, "r+b") as f:
        f.write(bytes(512))


def bad_header_checksum(p: Path) -> None:
    with open(p, "r+b") as f:
        f.seek(512 + 36)
        f.write(b"\x12\x34\x56\x78")


def tail_checksum(p: Path) -> None:
    with open(p, "r+b") as f:
        f.seek(-512 + 64, os.SEEK_END)
        f.write(b"\0\0\0\1")


def drop_feature(p: Path) -> None:
    raw = p.read_bytes()
    footer = Footer.parse(raw[-512:]).replace(features=0).build()
    with open(p, "r+b") as f:
        f.write(footer)
        f.seek(-512, os.SEEK_END)
        f.write(footer)


def orphan(p: Path) -> None:
    """What an allocation interrupted after writing the new footer leaves."""
    raw = p.read_bytes()
    footer = raw[-512:]
    with open(p, "r+b") as f:
        f.seek(-512, os.SEEK_END)
        f.write(os.urandom(512))
        f.seek(len(raw) - 512 + BS + 4096)
        f.write(footer)


def footer_inside_last_block(p: Path) -> None:
    """qemu's allocation order cut short: the BAT entry landed, the footer did not move."""
    raw = p.read_bytes()
    footer = raw[-512:]
    os.truncate(p, len(raw) - 700 * 1024)
    with open(p, "a+b") as f:
        f.write(footer)


DAMAGE: dict[str, tuple[Callable[[Path], None], set[str]]] = {
    "tail-zeroed": (zero_tail, {"footer-tail-missing"}),
    "tail-cut": (cut_tail, {"footer-tail-missing"}),
    "head-zeroed": (zero_head, {"footer-head-missing"}),
    "header-checksum": (bad_header_checksum, {"header-checksum"}),
    "tail-checksum": (tail_checksum, {"footer-tail-missing"}),
    "features": (drop_feature, {"footer-features"}),
    "orphan": (orphan, {"orphan-space"}),
    "footer-inside-block": (footer_inside_last_block, {"block-past-footer"}),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_found_and_repaired(tmp_path: Path, damage: str, require_tool: object) -> None:
    path = tmp_path / "d.vhd"
    model = make_dynamic(path)
    spoil, want = DAMAGE[damage]
    spoil(path)
    assert want <= codes(path)
    expected = bytearray(model)
    if damage == "footer-inside-block":
        # The last block's tail was cut off with the file: the repair keeps what remains.
        last = max(b for b, e in enumerate(bat_entries(path)) if e != 0xFFFFFFFF)
        entry = bat_entries(path)[last]
        data = entry * 512 + 512
        fsize = path.stat().st_size
        kept = fsize - 512 - data
        # Bytes of the block still in the file before the footer stay; the footer sector
        # itself now reads as the footer's bytes; the rest reads as zeros.
        raw = path.read_bytes()
        expected[last * BS + kept : (last + 1) * BS] = bytes(BS - kept)
        expected[last * BS + kept : last * BS + kept + 512] = raw[-512:]
    repair_ok(path, bytes(expected), tmp_path)


def test_bat_past_eof(tmp_path: Path, require_tool: object) -> None:
    path = tmp_path / "d.vhd"
    model = make_dynamic(path)
    entries = bat_entries(path)
    victim = next(b for b, e in enumerate(entries) if e != 0xFFFFFFFF)
    set_bat(path, victim, 0x00F00000)
    assert "bat-past-eof" in codes(path)
    out = repair_ok(path, model, tmp_path, lost=[victim])
    assert f"lost: guest bytes {victim * BS:#x}" in out


def test_bat_overlapping_metadata_and_each_other(tmp_path: Path, require_tool: object) -> None:
    path = tmp_path / "d.vhd"
    model = make_dynamic(path)
    entries = bat_entries(path)
    used = [b for b, e in enumerate(entries) if e != 0xFFFFFFFF]
    assert len(used) >= 3
    set_bat(path, used[0], 3)  # over the BAT at 0x600
    set_bat(path, used[2], entries[used[1]])  # two blocks share one place
    found = codes(path)
    assert {"bat-overlaps-metadata", "bat-overlap"} <= found
    report = check(path)
    assert set(report.fixes.drop) == {used[0], used[2]}
    repair_ok(path, model, tmp_path, lost=[used[0], used[2]])


def test_file_cut_mid_block(tmp_path: Path, require_tool: object) -> None:
    """A bad copy stopped part-way: the footer is gone and the last block is cut short."""
    path = tmp_path / "d.vhd"
    model = make_dynamic(path)
    entries = bat_entries(path)
    last = max(range(len(entries)), key=lambda b: entries[b] if entries[b] != 0xFFFFFFFF else -1)
    data = entries[last] * 512 + 512
    keep = 300 * 1024
    os.truncate(path, data + keep)
    assert {"footer-tail-missing", "block-past-footer"} <= codes(path)
    expected = bytearray(model)
    expected[last * BS + keep : (last + 1) * BS] = bytes(BS - keep)
    repair_ok(path, bytes(expected), tmp_path)


def test_fixed_repairs(tmp_path: Path, require_tool: object) -> None:
    path = tmp_path / "f.vhd"
    with vhd.create(path, 4 * MiB, type="fixed") as disk:
        disk.pwrite(b"\x5a" * 8192, 4096)
        model = disk.pread(disk.size, 0)
    tail_checksum(path)
    assert "footer-checksum" in codes(path)
    repair_ok(path, model, tmp_path)
    # Stray bytes between data and footer.
    raw = path.read_bytes()
    path.write_bytes(raw[:-512] + b"junk" * 256 + raw[-512:])
    assert "fixed-gap" in codes(path)
    repair_ok(path, model, tmp_path)
    # A 511-byte footer (Virtual PC before 2004).
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    assert "footer-511" in codes(path)
    repair_ok(path, model, tmp_path)
    assert path.stat().st_size == 4 * MiB + 512


def test_fixed_truncated_is_not_repairable(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    vhd.create(path, 4 * MiB, type="fixed").close()
    raw = path.read_bytes()
    path.write_bytes(raw[: 2 * MiB] + raw[-512:])
    rc, out = run_cli("check", "--repair", str(path))
    assert rc == 1 and "fixed-truncated" in out


def test_stale_parent_timestamp(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path)
    os.utime(parent, (1_700_000_500, 1_700_000_500))
    report = check(child)
    (finding,) = [f for f in report.problems if f.code == "parent-timestamp"]
    assert finding.severity == "warning" and finding.repairable
    rc, out = run_cli("check", "--repair", str(child))
    assert rc == 0, out
    assert read_image(child) == model


def test_parent_missing_and_mismatch(tmp_path: Path) -> None:
    parent, child, _ = make_chain(tmp_path)
    other = tmp_path / "other.vhd"
    vhd.create(other, 8 * MiB).close()
    os.rename(other, parent)
    assert "parent-mismatch" in codes(child)
    os.unlink(parent)
    rc, out = run_cli("check", str(child))
    assert rc == 1 and "parent-not-found" in out


def test_deep_bitmap_past_end(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    size = 3 * MiB  # the second block is half outside the disk
    with vhd.create(path, size) as disk:
        disk.pwrite(b"\1" * 4096, size - 4096)
        model = disk.pread(size, 0)
    entry = bat_entries(path)[1]
    with open(path, "r+b") as f:
        f.seek(entry * 512)
        f.write(b"\xff" * 512)
    assert "bitmap-past-end" not in {f.code for f in check(path).findings}  # no bitmap reads
    report = check(path, deep=True)
    (finding,) = [f for f in report.findings if f.code == "bitmap-past-end"]
    assert finding.repairable
    rc, out = run_cli("check", "--deep", "--repair", str(path))
    assert rc == 0, out
    assert "bitmap-past-end" not in {f.code for f in check(path, deep=True).findings}
    assert read_image(path) == model


def test_metadata_check_reads_no_data(tmp_path: Path, layout_reads: list[tuple[int, int]]) -> None:
    parent, child, _ = make_chain(tmp_path)
    reads = layout_reads
    for path in (parent, child):
        reads.clear()
        entries = [e for e in bat_entries(path) if e != 0xFFFFFFFF]
        assert entries
        check(path, check_parent=False)
        for entry in entries:
            lo, hi = entry * 512, entry * 512 + 512 + BS
            assert not [r for r in reads if r[0] < hi and r[0] + r[1] > lo], "read a block"
        reads.clear()
        check(path, deep=True, check_parent=False)
        assert any(entries[0] * 512 <= off < entries[0] * 512 + BS for off, _ in reads)


def test_cannot_open_exit_2(tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(1 << 16))
    rc, out = run_cli("check", str(raw))
    assert rc == 2 and "not a VHD" in out
    rc, out = run_cli("check", str(tmp_path / "missing.vhd"))
    assert rc == 2
    rc, out = run_cli("check", "--json", str(raw))
    assert rc == 2 and "not a VHD" in json.loads(out)["error"]


def test_corpus_samples(corpus: Path, tmp_path: Path) -> None:
    import gzip

    for name in ("dynamic.vhd.gz", "fixed.vhd.gz"):
        unpacked = tmp_path / name[:-3]
        unpacked.write_bytes(gzip.decompress((corpus / name).read_bytes()))
        assert check(unpacked, deep=True).clean, name
    # The dfvfs pair carries bad checksums everywhere: found, and repaired.
    for name in ("image.vhd", "image-differential.vhd"):
        (tmp_path / name).write_bytes((corpus / name).read_bytes())
    assert "footer-checksum" in codes(tmp_path / "image.vhd")
    before = read_image(tmp_path / "image-differential.vhd", strict=False)
    for name in ("image.vhd", "image-differential.vhd"):
        rc, out = run_cli("check", "--repair", str(tmp_path / name))
        assert rc == 0, out
    assert read_image(tmp_path / "image-differential.vhd") == before
    # A differencing sample whose parent is not in the corpus.
    rc, out = run_cli("check", str(corpus / "fat-differential.vhd"))
    assert rc == 1 and "parent-not-found" in out


def test_azure_check(tmp_path: Path) -> None:
    from vhd.check import azure_check, azure_target_size

    good = tmp_path / "good.vhd"
    vhd.create(good, 20 * MiB, type="fixed").close()
    assert azure_check(good) == []
    odd = tmp_path / "odd.vhd"
    vhd.create(odd, 20 * MiB + 512, type="fixed").close()
    assert any("whole number of MiB" in p for p in azure_check(odd))
    dyn = tmp_path / "dyn.vhd"
    vhd.create(dyn, 20 * MiB).close()
    assert any("fixed" in p for p in azure_check(dyn))
    small = tmp_path / "small.vhd"
    vhd.create(small, 4 * MiB, type="fixed").close()
    assert any("20 MiB" in p for p in azure_check(small))
    zero_tail(good)
    assert azure_check(good)
    assert azure_target_size(20 * MiB + 1) == 21 * MiB
    assert azure_target_size(MiB) == 20 * MiB


@pytest.mark.parametrize("damage", ["tail-zeroed", "head-zeroed", "orphan", "header-checksum"])
def test_hyperv_layout_repairs(tmp_path: Path, damage: str, require_tool: object) -> None:
    size = 10 * MiB
    content = bytearray(size)
    for mb in (0, 3, 7, 9):
        content[mb * MiB : mb * MiB + 8192] = bytes([mb + 1]) * 8192
    path = tmp_path / "hv.vhd"
    build_hyperv(path, size=size, block_size=BS, content=bytes(content), seed=5)
    DAMAGE[damage][0](path)
    assert DAMAGE[damage][1] <= codes(path)
    repair_ok(path, bytes(content), tmp_path)


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_geometry_larger_than_chs_is_found_and_mended(tmp_path: Path, kind: str) -> None:
    """vhdkit's layout before 2026-11 ('vhdk', 65535/16/255 for a 10 MiB disk) fails blktap's
    "geometry too large"; the repair writes the spec's C/H/S and a creator qemu sizes by the
    current size, so qemu still sees the exact size."""
    size = 10 * MiB
    path = tmp_path / "old.vhd"
    vhd.create(path, size, type=kind).close()  # type: ignore[arg-type]
    raw = bytearray(path.read_bytes())
    old = Footer.parse(bytes(raw[-512:])).replace(
        creator_app=b"vhdk", cylinders=65535, heads=16, sectors=255
    )
    raw[-512:] = old.build()
    if kind == "dynamic":
        raw[:512] = old.build()
    path.write_bytes(bytes(raw))
    assert "geometry-too-large" in codes(path)
    rc, out = run_cli("check", "--repair", str(path))
    assert rc == 0, out
    assert not codes(path)
    footer = Footer.parse(path.read_bytes()[-512:])
    assert tuple(footer.geometry) == spec_chs(size)
    assert qemu_info(path)["virtual-size"] == size


def test_check_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """A named pipe nobody writes to: exit 2 at once, as vhd.open does (check's own open used
    to block until a writer came)."""
    fifo = tmp_path / "pipe.vhd"
    os.mkfifo(fifo)
    res = subprocess.run(
        [sys.executable, "-m", "vhdtools.cli", "check", str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "not a regular file" in res.stderr, res.stderr
