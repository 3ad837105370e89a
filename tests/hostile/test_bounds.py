"""Bounded memory and time whatever a header says (issue 12, items 4-6): tables past the
memory bound are refused with a clear error, table padding is streamed, block overlaps are
found in one sorted sweep, and a sparse fixed VHD is converted by reading its data only."""

from __future__ import annotations

import itertools
import random
import subprocess
from pathlib import Path

import pytest

import vhd
import vhd.bat
import vhd.check as check_module
import vhd.layout as layout_module
from tests.conftest import need_tool
from tests.images import craft, craft_fixed, repair
from vhd.check import check
from vhd.convert import convert
from vhd.source import Source, open_source

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
# The bound the README states (read from the library when it has one).
MAX_ENTRIES: int = getattr(vhd.bat, "MAX_ENTRIES", 1 << 22)


def test_a_table_past_the_memory_bound_is_refused(tmp_path: Path) -> None:
    """A spec-legal 2040 GiB disk of 512-byte blocks needs a 16 GiB table."""
    path = craft(tmp_path / "huge.vhd", size=2040 * GiB, block_size=512)
    with pytest.raises(vhd.UnsupportedFeatureError) as info:
        vhd.open(path)
    assert "more than vhdkit holds in memory" in str(info.value)
    report = check(path)
    assert [f.code for f in report.findings if f.severity == "error"] == ["header-table-too-large"]
    with pytest.raises(vhd.InvalidArgumentError):
        vhd.create(tmp_path / "new.vhd", 2040 * GiB, block_size=4 * KiB)
    # Right at the bound it opens.
    ok = craft(tmp_path / "ok.vhd", size=MAX_ENTRIES * 512, block_size=512)
    with vhd.open(ok) as disk:
        assert len(disk.bat) == MAX_ENTRIES  # type: ignore[attr-defined]


def test_check_streams_a_huge_claimed_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 16 MiB disk whose header claims 2^32 - 1 entries (a sparse 16 GiB file)."""
    path = craft(tmp_path / "claims.vhd", size=16 * MiB, entries=2**32 - 1)
    largest = 0
    real = layout_module.read_hook

    def bounded(fd: int, length: int, offset: int) -> bytes:
        nonlocal largest
        largest = max(largest, length)
        assert length <= 64 * MiB, f"check asked for {length} bytes in one read"
        return real(fd, length, offset)

    monkeypatch.setattr(layout_module, "read_hook", bounded)
    report = check(path)
    assert "bat-entries-past-size" in {f.code for f in report.findings}
    with vhd.open(path) as disk:  # only the entries the size needs are read
        assert disk.size == 16 * MiB


def _staggered(path: Path, count: int, seed: int) -> None:
    """Blocks of 4 KiB whose data overlaps their neighbours' in random ways."""
    rng = random.Random(seed)
    stride = 4096 + 512
    base = 0x10000 // 512
    bat = {}
    pos = base
    for block in range(count):
        bat[block] = pos
        pos += rng.choice((1, 2, 4, 8, stride // 512, 3 * stride // 512))
    order = list(bat)
    rng.shuffle(order)
    bat = {b: bat[o] for b, o in zip(order, sorted(bat), strict=True)}
    craft(path, size=count * 4096, block_size=4096, bat=bat, file_size=(pos + 64) * 512)


@pytest.mark.parametrize("seed", range(6))
def test_after_the_overlap_drops_no_blocks_overlap(tmp_path: Path, seed: int) -> None:
    """Checked by brute force on small tables: the survivors of the sweep never overlap."""
    path = tmp_path / "s.vhd"
    _staggered(path, 300, seed)
    report = check(path)
    m = report.layout
    assert m.bat is not None
    span = 512 + 4096
    survivors = [(m.bat[b] * 512, b) for b in range(m.bat_count) if m.bat[b] != 0xFFFFFFFF]
    survivors = [(s, b) for s, b in survivors if b not in report.fixes.drop]
    for (s1, b1), (s2, b2) in itertools.combinations(survivors, 2):
        assert s1 + span <= s2 or s2 + span <= s1, f"blocks {b1} and {b2} still overlap"
    assert len(report.fixes.drop) > 0
    _plan, after = repair(path)
    assert not [f for f in after.findings if f.code.startswith("bat-overlap")]


def test_findings_of_one_kind_are_listed_once_and_counted(tmp_path: Path) -> None:
    """An all-zero table: every block overlaps the footer copy."""
    path = craft(tmp_path / "z.vhd", size=64 * MiB, block_size=4096, bat_fill=b"\0")
    report = check(path)
    codes = [f.code for f in report.findings if f.code == "bat-overlaps-metadata"]
    assert len(codes) == check_module.MAX_FINDINGS_PER_CODE + 1
    assert "more like the above" in report.findings[-1].message or any(
        "more like the above" in f.message for f in report.findings
    )
    assert len(report.fixes.drop) == 64 * MiB // 4096


def test_convert_of_a_sparse_fixed_vhd_reads_only_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 4 * GiB
    data = {0: b"boot" * 128, 3 * GiB + 12345: b"middle" * 1000, size - 4096: b"end!" * 1024}
    path = craft_fixed(tmp_path / "fixed.vhd", size, data=data)
    read = 0
    real = Source.preadinto

    def counting(self: Source, buffer: memoryview, offset: int) -> int:
        nonlocal read
        n = real(self, buffer, offset)
        read += n
        return n

    monkeypatch.setattr(Source, "preadinto", counting)
    out = tmp_path / "out.raw"
    with open_source(str(path)) as src:
        convert(src, str(out), to="raw")
    assert read <= 3 * 4 * MiB  # a few chunks around the data, not 4 GiB
    qemu_img = need_tool("qemu-img")
    result = subprocess.run([qemu_img, "compare", "-f", "vpc", "-F", "raw", str(path), str(out)],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
