"""The layout step (vhd.layout.read_layout) and the severity rules of vhd check over it.

Images are written from the spec's records (tests.model via tests.images), not by the
library; each damage is checked three ways: what the layout records (with no policy), the
finding vhd check makes of it, and what vhd.open does with the same layout."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import vhd
from tests.images import craft
from tests.model import FIXED, build_footer, checksum, spec_chs
from vhd.check import check
from vhd.errors import CorruptImageError, NotAVHDError, UnsupportedFeatureError
from vhd.findings import ERROR, INFO, WARNING, Finding, Severity
from vhd.layout import Layout, read_layout

SECTOR = 512
MiB = 1 << 20
BS = 4096
TABLE = 0x600  # where craft() puts the BAT
DATA = 0x10000 // SECTOR  # a sector well past the metadata


@contextmanager
def layout_of(path: Path) -> Iterator[Layout]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield read_layout(fd, str(path), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _dynamic(path: Path, blocks: dict[int, int] | None = None) -> Path:
    """A 64 KiB dynamic disk of 4 KiB blocks; ``blocks`` maps block -> sector (data is
    zeros, the file long enough to hold them)."""
    blocks = blocks or {}
    end = max([(s * SECTOR + SECTOR + BS) for s in blocks.values()] + [0x8000])
    return craft(path, size=16 * BS, block_size=BS, bat=blocks, file_size=end + SECTOR)


def _patch(path: Path, offset: int, raw: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)


def _tail(path: Path) -> int:
    return path.stat().st_size - SECTOR


def _reseal_header(path: Path, **fields: int) -> None:
    """Change big-endian header fields (name -> value) and fix its checksum, as the spec's
    'Dynamic Disk Header Format' lays them out."""
    where = {"table_offset": (16, ">Q"), "max_table_entries": (28, ">I"), "block_size": (32, ">I")}
    with open(path, "r+b") as f:
        f.seek(SECTOR)
        raw = bytearray(f.read(1024))
        for name, value in fields.items():
            at, fmt = where[name]
            struct.pack_into(fmt, raw, at, value)
        struct.pack_into(">I", raw, 36, checksum(bytes(raw), 36))
        f.seek(SECTOR)
        f.write(raw)


# -- the layout: facts, no policy ------------------------------------------------------------


def test_layout_of_a_clean_dynamic_disk(tmp_path: Path) -> None:
    path = _dynamic(tmp_path / "d.vhd", {0: DATA, 5: DATA + 9})
    with layout_of(path) as lay:
        assert lay.stop is None
        assert (lay.choice.source, lay.choice.reason) == ("tail", "tail")
        assert lay.choice.checksum_ok and lay.choice.tail_ok and lay.choice.head_ok
        assert lay.choice.offset == lay.data_limit == _tail(path)
        assert lay.header is not None and lay.header.block_size == BS
        assert lay.header_offset == SECTOR
        assert lay.bat_count == 16
        starts, blocks = lay.spans()
        assert list(zip(blocks, starts, strict=True)) == [
            (0, DATA * SECTOR),
            (5, (DATA + 9) * SECTOR),
        ]
        assert lay.block_ends()(DATA * SECTOR, 0) == DATA * SECTOR + SECTOR + BS
        labels = [label for _, _, label in lay.regions()]
        assert labels == ["the footer copy", "the dynamic header", "the BAT"]
        assert lay.regions()[2][:2] == (TABLE, TABLE + SECTOR)


def test_layout_reads_only_metadata(tmp_path: Path, layout_reads: list[tuple[int, int]]) -> None:
    """Opening reads the footers, the header and the BAT: not a byte of a block."""
    path = _dynamic(tmp_path / "d.vhd", {0: DATA, 1: DATA + 9})
    reads = layout_reads
    with vhd.open(path) as disk:
        assert disk.size == 16 * BS
    assert reads, "the open did not read through the layout step"
    for off, n in reads:
        assert off + n <= DATA * SECTOR or off >= _tail(path), f"read {n} bytes at {off:#x}"


@pytest.mark.parametrize(
    ("damage", "source", "reason", "checksum_ok"),
    [
        ("tail-zeroed", "head", "head", True),
        ("tail-checksum", "head", "head", True),
        ("tail-checksum-no-head", "tail", "tail-checksum", False),
        ("both-checksums", "head", "head-checksum", False),
        ("tail-511", "tail-511", "tail", True),
    ],
)
def test_footer_choice_and_its_reason(
    tmp_path: Path, damage: str, source: str, reason: str, checksum_ok: bool
) -> None:
    path = _dynamic(tmp_path / "d.vhd")
    tail = _tail(path)
    if damage == "tail-zeroed":
        _patch(path, tail, bytes(SECTOR))
    if damage in ("tail-checksum", "tail-checksum-no-head", "both-checksums"):
        _patch(path, tail + 64, b"\xde\xad\xbe\xef")
    if damage == "tail-checksum-no-head":
        _patch(path, 0, bytes(SECTOR))
    if damage == "both-checksums":  # no trailing footer, a copy with a bad checksum
        _patch(path, 64, b"\xde\xad\xbe\xef")
        _patch(path, tail, bytes(SECTOR))
    if damage == "tail-511":
        with open(path, "r+b") as f:
            f.seek(tail)
            raw = f.read()
            f.truncate(tail)
            f.seek(tail)
            f.write(raw[:511])
    with layout_of(path) as lay:
        assert (lay.choice.source, lay.choice.reason) == (source, reason)
        assert lay.choice.checksum_ok is checksum_ok
        if source == "head":
            assert lay.choice.offset == lay.file_size
        if damage == "tail-checksum":  # the damaged trailing footer still ends the data
            assert lay.choice.tail_offset == tail == lay.data_limit


def test_no_footer_is_not_a_vhd(tmp_path: Path) -> None:
    path = tmp_path / "raw.img"
    path.write_bytes(bytes(64 * 1024))
    with pytest.raises(NotAVHDError, match="a raw disk"), layout_of(path):
        pass
    with pytest.raises(NotAVHDError, match="a raw disk"):
        check(path)


def _damage_header_offset(path: Path) -> None:
    raw = bytearray(
        build_footer(size=16 * BS, disk_type=3, unique_id=bytes(16), data_offset=1 << 40)
    )
    _patch(path, 0, raw)
    _patch(path, _tail(path), raw)


# Each damage that stops the layout step: (code, how to make it, the open's error).
STOPS = [
    ("header-offset", _damage_header_offset, CorruptImageError),
    ("header-cookie", lambda p: _patch(p, SECTOR, b"notsparse"), CorruptImageError),
    ("header-block-size", lambda p: _reseal_header(p, block_size=3000), CorruptImageError),
    (
        "header-max-table-entries",
        lambda p: _reseal_header(p, max_table_entries=3),
        CorruptImageError,
    ),
    ("bat-offset", lambda p: _reseal_header(p, table_offset=1 << 30), CorruptImageError),
    (
        "bat-overlaps-header",
        lambda p: _reseal_header(p, table_offset=SECTOR * 2),
        CorruptImageError,
    ),
]


@pytest.mark.parametrize(("code", "damage", "error"), STOPS, ids=[s[0] for s in STOPS])
def test_a_stop_is_one_fact_for_open_and_check(
    tmp_path: Path, code: str, damage: object, error: type[Exception]
) -> None:
    """The layout records where it stopped; check reports that as an error with the very
    message the open raises (they cannot disagree: they read one layout)."""
    path = _dynamic(tmp_path / "d.vhd")
    damage(path)  # type: ignore[operator]
    with layout_of(path) as lay:
        assert lay.stop is not None and lay.stop.code == code
        assert lay.bat is None
    report = check(path)
    (finding,) = [f for f in report.findings if f.code == code]
    assert finding.severity is Severity.ERROR
    assert finding.message == lay.stop.message
    with pytest.raises(error) as info:
        vhd.open(path, strict=False).close()
    assert lay.stop.message in str(info.value)


def test_unsupported_disk_type_stops_at_the_footer(tmp_path: Path) -> None:
    path = tmp_path / "t.vhd"
    path.write_bytes(bytes(4096) + build_footer(size=4096, disk_type=5, unique_id=bytes(16)))
    with layout_of(path) as lay:
        assert lay.stop is not None and lay.stop.code == "footer-disk-type"
        assert lay.header is None
    assert [f.code for f in check(path).findings if f.severity == ERROR] == ["footer-disk-type"]
    with pytest.raises(UnsupportedFeatureError, match="disk type 5"):
        vhd.open(path).close()


def test_narrow_readers(tmp_path: Path) -> None:
    path = _dynamic(tmp_path / "d.vhd", {2: DATA})
    _patch(path, DATA * SECTOR, b"\x80")
    with layout_of(path) as lay:
        assert lay.bitmap(2)[:1] == b"\x80" and len(lay.bitmap(2)) == SECTOR
        assert lay.unreadable(DATA * SECTOR, BS) is None
        code, at, _ = lay.unreadable(lay.file_size - SECTOR, 2 * SECTOR) or ("", 0, "")
        assert (code, at) == ("read-short", lay.file_size)
        assert not lay.bat_padding_used()


# -- severities -----------------------------------------------------------------------------


def test_finding_severity_is_an_enum_that_prints_as_before() -> None:
    f = Finding("footer-checksum", Severity.ERROR, "bad", "recompute")
    assert f.repairable and f"{f.severity}" == "error"
    assert f.as_dict() == {
        "severity": "error",
        "code": "footer-checksum",
        "message": "bad",
        "repairable": True,
        "repair": "recompute",
    }
    plain = Finding("x", Severity.INFO, "note")
    assert not plain.repairable and plain.as_dict()["repair"] == ""
    assert [s.value for s in Severity] == ["error", "warning", "info"]


def test_notes_do_not_make_a_problem(tmp_path: Path) -> None:
    """A fixed disk that is not a whole number of MiB: a note (Azure), still clean."""
    size = 3 * MiB + 4096
    path = tmp_path / "f.vhd"
    footer = build_footer(size=size, disk_type=FIXED, unique_id=bytes(16), geometry=spec_chs(size))
    path.write_bytes(bytes(size) + footer)
    report = check(path)
    assert [(f.code, f.severity) for f in report.findings] == [("azure-size", INFO)]
    assert report.clean and report.as_dict()["counts"] == {"error": 0, "warning": 0, "info": 1}


@pytest.mark.parametrize(("data_offset", "severity"), [(0xFFFFFFFF, INFO), (0x200, WARNING)])
def test_fixed_data_offset_severity(tmp_path: Path, data_offset: int, severity: Severity) -> None:
    """All ones in 32 bits is a note (old tools); anything else a warning."""
    path = tmp_path / "f.vhd"
    size = 2 * MiB
    path.write_bytes(
        bytes(size)
        + build_footer(
            size=size,
            disk_type=FIXED,
            unique_id=bytes(16),
            data_offset=data_offset,
            geometry=spec_chs(size),
        )
    )
    (finding,) = [f for f in check(path).findings if f.code == "footer-data-offset"]
    assert finding.severity is severity and finding.repairable


@pytest.mark.parametrize(("field", "severity"), [("timestamp", INFO), ("current_size", WARNING)])
def test_head_copy_differs_severity(tmp_path: Path, field: str, severity: Severity) -> None:
    """A copy at offset 0 that differs only in its timestamp is a note; in its size, a warning."""
    path = _dynamic(tmp_path / "d.vhd")
    changed = (
        build_footer(size=16 * BS, disk_type=3, unique_id=bytes(16), timestamp=12345)
        if field == "timestamp"
        else build_footer(size=32 * BS, disk_type=3, unique_id=bytes(16))
    )
    with open(path, "rb") as f:
        tail_uid = f.read(SECTOR)[68:84]
    raw = bytearray(changed)
    raw[68:84] = tail_uid
    struct.pack_into(">I", raw, 64, checksum(bytes(raw), 64))
    _patch(path, 0, bytes(raw))
    (finding,) = [f for f in check(path).findings if f.code == "footer-head-differs"]
    assert finding.severity is severity and field in finding.message


def test_problems_are_errors_and_warnings(tmp_path: Path) -> None:
    path = _dynamic(tmp_path / "d.vhd")
    _patch(path, _tail(path) + 64, b"\xde\xad\xbe\xef")  # bad trailing checksum, good copy
    report = check(path)
    assert {f.severity for f in report.problems} <= {ERROR, WARNING}
    assert "footer-tail-missing" in {f.code for f in report.problems}
    assert not report.clean
