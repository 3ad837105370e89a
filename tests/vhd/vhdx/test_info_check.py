"""``vhd info`` and ``vhd check [--repair]`` on VHDX: every header, region, metadata item and
locator entry shown; damage found and mended (a live log replayed, a torn header or region table
copy rewritten from its twin), with qemu-img check as the second opinion."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.vhd.helpers import run_cli
from tests.vhd.vhdx.helpers import MiB, assert_qemu_clean, current_header, qemu_check, unpack_corpus
from tests.vhd.vhdx.test_fuzz import _live_log
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import records as r


@pytest.mark.corpus
def test_info_json_of_windows_image(corpus: Path, tmp_path: Path) -> None:
    image = unpack_corpus(corpus, "dynamic.vhdx", tmp_path)
    rc, out = run_cli("info", "--json", str(image))
    assert rc == 0, out
    info = json.loads(out)
    assert info["format"] == "vhdx" and info["type"] == "dynamic"
    assert info["creator"].startswith("Microsoft Windows")
    assert [h["valid"] for h in info["headers"]] == [True, True]
    assert sum(h["current"] for h in info["headers"]) == 1
    assert {e["name"] for t in info["region_tables"] for e in t["entries"]} == {"bat", "metadata"}
    names = {m["name"] for m in info["metadata"]}
    assert {"file_parameters", "virtual_disk_size", "logical_sector_size"} <= names
    assert info["log"]["state"] == "empty"
    assert info["bat"]["chunk_ratio"] == 128 and info["block_size"] == 32 * MiB
    rc, text = run_cli("info", str(image))
    assert rc == 0 and "region table 2" in text and "virtual_disk_id" in text


@pytest.mark.corpus
def test_info_json_guids_are_uuids_text_of_the_bytes(corpus: Path, tmp_path: Path) -> None:
    """Every GUID ``vhd info --json`` shows is ``str(uuid.UUID(bytes_le=...))`` of its bytes in
    the file (MS-VHDX GUIDs; vhdkit parses them with vhd.guid, not uuid), and a child's
    parent_linkage is its parent's DataWriteGuid as Hyper-V writes it, in braces."""
    base = unpack_corpus(corpus, "dynamic.vhdx", tmp_path)
    child = tmp_path / "c.avhdx"
    create_vhdx(child, 0, type="differencing", parent=open_vhdx(base)).close()
    for image in (base, child):
        raw = image.read_bytes()
        info = json.loads(run_cli("info", "--json", str(image))[1])

        def text(off: int, raw: bytes = raw) -> str:
            return str(uuid.UUID(bytes_le=raw[off : off + 16]))

        for head in info["headers"]:
            fields, at = head["fields"], head["offset"]
            for name, off in (("file_write_guid", 16), ("data_write_guid", 32), ("log_guid", 48)):
                assert fields[name]["raw"] == text(at + off), (image, name)
        for table in info["region_tables"]:
            for i, e in enumerate(table["entries"]):
                assert e["guid"] == text(table["offset"] + 16 + 32 * i)
        meta = next(
            e for t in info["region_tables"] for e in t["entries"] if e["name"] == "metadata"
        )
        for i, item in enumerate(info["metadata"]):
            assert item["item_id"] == text(meta["file_offset"] + 32 + 32 * i)
        assert info["log"]["guid"] == text(current_header(raw)[0] + 48)
    data = base.read_bytes()
    at = current_header(data)[0] + 32
    parent_id = str(uuid.UUID(bytes_le=data[at : at + 16]))
    assert info["parent_locator"]["entries"]["parent_linkage"] == "{" + parent_id + "}"
    assert info["parent_locator"]["type"] == "b04aefb7-d19e-4a81-b789-25b8e9445913"


def test_info_shows_locator_and_live_log(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    with create_vhdx(base, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"x" * 4096, 0)
    child = tmp_path / "c.avhdx"
    create_vhdx(child, 0, type="differencing", parent=open_vhdx(base), block_size=MiB).close()
    info = json.loads(run_cli("info", "--json", str(child))[1])
    assert info["parent_locator"]["entries"]["relative_path"] == ".\\base.vhdx"
    assert [layer["path"] for layer in info["chain"]] == [str(child), str(base)]
    _live_log(base)
    info, _ = json.JSONDecoder().raw_decode(run_cli("info", "--json", str(base))[1])
    assert info["log"]["state"].startswith("needs replay") and info["log"]["entries"] >= 1


def test_check_clean_and_repairs(tmp_path: Path) -> None:
    image = tmp_path / "d.vhdx"
    with create_vhdx(image, 8 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"y" * MiB, MiB)
    assert run_cli("check", str(image)) == (0, f"{image}: vhdx dynamic, {8 * MiB} bytes: clean\n")
    _live_log(image)
    data = bytearray(image.read_bytes())
    off, _ = current_header(data)
    other = r.HEADER_OFFSETS[1 - r.HEADER_OFFSETS.index(off)]
    data[other + 100] ^= 0xFF  # the non-current header copy torn
    data[r.REGION_TABLE_OFFSETS[1] + 20] ^= 0xFF  # and a region table copy
    image.write_bytes(bytes(data))
    assert qemu_check(image).returncode != 0  # qemu: the log needs replay
    rc, out = run_cli("check", str(image))
    assert rc == 1 and "log is live" in out and "header" in out and "region table 2" in out, out
    rc, out = run_cli("check", "--repair", "--dry-run", str(image))
    assert rc == 1 and "would repair" in out
    rc, out = run_cli("check", "--repair", str(image))
    assert rc == 0 and "repaired: replay the log" in out, out
    assert run_cli("check", str(image))[0] == 0
    assert_qemu_clean(image)
    raw = image.read_bytes()
    assert all(r.Header.parse(raw[o : o + 4096]).log_guid == r.ZERO_GUID for o in r.HEADER_OFFSETS)
    with open_vhdx(image) as disk:
        assert disk.pread(MiB, MiB) == b"y" * MiB


def test_check_finds_overlapping_blocks(tmp_path: Path) -> None:
    image = tmp_path / "o.vhdx"
    with create_vhdx(image, 8 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"a" * 10, 0)
        disk.pwrite(b"b" * 10, MiB)
        bat = disk.layout.bat_region.file_offset
        first = disk.bat[0]
    with image.open("r+b") as f:
        f.seek(bat + 8)
        f.write(first.to_bytes(8, "little"))  # block 1 now points at block 0's space
        f.seek(bat + 16)
        f.write(((1 << 20) | 6).to_bytes(8, "little"))  # block 2 inside the log
    rc, out = run_cli("check", str(image))
    assert rc == 1 and "overlap" in out and "log" in out, out
    proc = qemu_check(image)
    assert proc.returncode != 0  # qemu agrees the image is damaged


def test_check_unopenable_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(b"vhdxfile" + bytes(400 * 1024))
    rc, out = run_cli("check", str(bad))
    assert rc == 1 and "both headers are invalid" in out and "Traceback" not in out
