"""``vhd compare``: reads only where either side holds data (unallocated space is never read),
finds the exact first differing byte, and follows ``qemu-img compare`` for different sizes
(the larger disk's tail against zeros; ``--strict`` fails on the size) and exit codes, checked
against qemu-img itself on the same pairs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vhdtools.cli import main

import vhd
import vhd.source
from tests.conftest import need_tool
from tests.strategies import hsettings, payload

MiB = 1 << 20
GiB = 1 << 30


def vhd_compare(*args: str | Path) -> int:
    return main(["compare", *map(str, args)])


def qemu_compare(a: Path, b: Path, *options: str) -> int:
    fmt = [
        "-f",
        "vpc" if a.suffix == ".vhd" else "raw",
        "-F",
        "vpc" if b.suffix == ".vhd" else "raw",
    ]
    proc = subprocess.run(
        [need_tool("qemu-img"), "compare", *options, *fmt, str(a), str(b)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode


def test_unallocated_space_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 64 GiB disks with a little data: only the data ranges are read (the old compare read
    all 128 GiB), and an allocated block of zeros equals an unallocated one."""
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    with vhd.create(a, 64 * GiB) as disk:
        disk.pwrite(payload(5000, 1), 10 * GiB + 3)
        disk.pwrite(bytes(MiB), 20 * GiB)  # allocated, all zeros
    with vhd.create(b, 64 * GiB) as disk:
        disk.pwrite(payload(5000, 1), 10 * GiB + 3)
    read = [0]
    original = vhd.source.Source.preadinto

    def counting(self: vhd.source.Source, buffer: memoryview, offset: int) -> int:
        read[0] += len(buffer)
        return original(self, buffer, offset)

    monkeypatch.setattr(vhd.source.Source, "preadinto", counting)
    assert vhd_compare(a, b) == 0
    assert 0 < read[0] <= 16 * MiB  # a few blocks, never the 128 GiB of zeros
    with vhd.open(b, "r+") as disk:
        disk.pwrite(b"\1", 63 * GiB + 5)
    read[0] = 0
    assert vhd_compare(a, b) == 1
    assert read[0] <= 16 * MiB


@st.composite
def pairs(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    size_a = draw(st.integers(1, 64)) * 64 * 1024
    size_b = draw(st.sampled_from([size_a, size_a + 64 * 1024, max(512, size_a - 512)]))

    def writes(size: int) -> list[tuple[int, bytes]]:
        out = []
        for _ in range(draw(st.integers(0, 4))):
            off = draw(st.integers(0, size - 1))
            n = draw(st.integers(1, min(70000, size - off)))
            data = bytes(n) if draw(st.booleans()) else payload(n, draw(st.integers(0, 3)))
            out.append((off, data))
        return out

    return size_a, size_b, writes(size_a), writes(size_b)


@given(plan=pairs(), raw_b=st.booleans())
@hsettings(max_examples=25)
def test_first_difference_and_exit_code_match_qemu(
    tmp_path_factory: pytest.TempPathFactory,
    plan: tuple[int, int, list[tuple[int, bytes]], list[tuple[int, bytes]]],
    raw_b: bool,
) -> None:
    tmp = tmp_path_factory.mktemp("cmp")
    size_a, size_b, writes_a, writes_b = plan
    a, b = tmp / "a.vhd", tmp / ("b.raw" if raw_b else "b.vhd")
    content_a, content_b = bytearray(size_a), bytearray(size_b)
    with vhd.create(a, size_a, block_size=16 * 1024) as disk:
        for off, data in writes_a:
            disk.pwrite(data, off)
            content_a[off : off + len(data)] = data
    for off, data in writes_b:
        content_b[off : off + len(data)] = data
    if raw_b:
        with b.open("wb") as f:
            f.truncate(size_b)
            for off, data in writes_b:
                f.seek(off)
                f.write(data)
    else:
        with vhd.create(b, size_b, block_size=16 * 1024) as disk:
            for off, data in writes_b:
                disk.pwrite(data, off)
    total = max(size_a, size_b)
    padded_a = bytes(content_a) + bytes(total - size_a)
    padded_b = bytes(content_b) + bytes(total - size_b)
    expected = next((i for i in range(total) if padded_a[i] != padded_b[i]), None)
    rc = vhd_compare(a, b)
    assert rc == (0 if expected is None else 1)
    assert rc == qemu_compare(a, b)
    strict = vhd_compare(a, b, "--strict")
    assert strict == (1 if size_a != size_b else rc)
    if size_a != size_b:  # qemu's -s also fails on allocation differences; ours on sizes only
        assert qemu_compare(a, b, "-s") == 1


def test_reports_the_exact_offset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.vhd", tmp_path / "b.raw"
    vhd.create(a, 8 * MiB).close()
    with b.open("wb") as f:
        f.truncate(9 * MiB)  # one more MiB of zeros: identical (with a warning)
    assert vhd_compare(a, b) == 0
    assert "sizes differ" in capsys.readouterr().err
    with b.open("r+b") as f:
        f.seek(8 * MiB + 12345)
        f.write(b"x")
    assert vhd_compare(a, b) == 1
    assert f"offset {8 * MiB + 12345}" in capsys.readouterr().out


@pytest.mark.parametrize("both", [True, False])
def test_lowest_difference_wins_across_the_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], both: bool
) -> None:
    """More chunks than the read window holds, data in each, and a difference a window or two
    in: with two differences the lower one is reported, with only the higher one that one."""
    from vhdtools.commands.compare import _WINDOW, CHUNK

    size = (3 * _WINDOW + 2) * CHUNK
    a, b = tmp_path / "a.vhd", tmp_path / "b.raw"
    data = payload(size, 1)
    with vhd.create(a, size) as disk:
        disk.pwrite(data, 0)
    low, high = (_WINDOW + 1) * CHUNK + 4097, (2 * _WINDOW + 1) * CHUNK + 3
    changed = bytearray(data)
    changed[high] ^= 0xFF
    if both:
        changed[low] ^= 0xFF
    b.write_bytes(changed)
    assert vhd_compare(a, b) == 1
    assert f"offset {low if both else high}" in capsys.readouterr().out
    assert qemu_compare(a, b) == 1
