"""Extents of a read-only VHDX come from one walk of the file's data map (vhd.vhdx.disk
VHDXDisk._data_map: SEEK_DATA/SEEK_HOLE once over the file) instead of probing every present
block, which tmpfs answered by scanning to the end of the file each time.  The map must give the
same extents as the per-block probes of a writable open, on ext4 and on tmpfs, and the holes it
reports must read as zeros."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhd.disk import Extent
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import disk as vdisk

MiB = 1 << 20


@pytest.fixture(params=["tmp_path", "tmpfs"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "tmp_path":
        yield tmp_path
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no tmpfs at /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as where:
        yield Path(where)


def _merged(extents: list[Extent]) -> list[tuple[int, int, int | None]]:
    out: list[tuple[int, int, int | None]] = []
    for e in extents:
        if out and out[-1][2] == e.layer and out[-1][0] + out[-1][1] == e.offset:
            out[-1] = (out[-1][0], out[-1][1] + e.length, e.layer)
        else:
            out.append((e.offset, e.length, e.layer))
    return out


def _image(folder: Path) -> tuple[Path, dict[int, bytes]]:
    """Blocks fully written, partly written (holes inside), and never written."""
    path = folder / "d.vhdx"
    writes = {
        0: os.urandom(MiB),  # block 0 whole
        MiB + 8192: os.urandom(4096),  # block 1: data in the middle, holes around
        3 * MiB: os.urandom(MiB),  # block 3 whole (block 2 never written)
        5 * MiB + MiB - 4096: os.urandom(4096),  # block 5: the last 4 KiB only
        6 * MiB + 65536: os.urandom(3 * 65536),  # block 6
    }
    with create_vhdx(path, 8 * MiB, block_size=MiB) as disk:
        for off, data in writes.items():
            disk.pwrite(data, off)
    return path, writes


def test_read_only_extents_match_the_per_block_probes(folder: Path) -> None:
    path, writes = _image(folder)
    with open_vhdx(path, "r+") as writable:
        probed = _merged(list(writable.extents(0, writable.size)))
    with open_vhdx(path) as disk:
        mapped = _merged(list(disk.extents(0, disk.size)))
        assert disk._data_map() is not None
        assert mapped == probed
        assert any(layer is None for _, _, layer in mapped[:3])  # holes inside block 1 found
        for off, data in writes.items():  # every write lies in data
            assert any(a <= off and off + len(data) <= a + n for a, n, lay in mapped if lay == 0)
            assert disk.pread(len(data), off) == data
        for a, n, layer in mapped:
            if layer is None:
                assert disk.pread(n, a) == bytes(n)
        # windows that start and end inside blocks and holes
        for start in range(0, 8 * MiB, 12288):
            part = _merged(list(disk.extents(start, 20480)))
            assert part[0][0] == start and sum(n for _, n, _ in part) == min(20480, 8 * MiB - start)
            for a, n, layer in part:
                assert any(b <= a and a + n <= b + m and lb == layer for b, m, lb in mapped)


def test_the_map_is_walked_once_per_open(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _image(folder)
    calls: list[int] = []
    real = os.lseek

    def counting(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            calls.append(pos)
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", counting)
    with open_vhdx(path) as disk:
        first = list(disk.extents(0, disk.size))
        walked = len(calls)
        segments = disk._data_map()
        assert segments is not None
        assert 0 < walked <= len(segments) + 1  # a data/hole pair per segment, one past the last
        assert list(disk.extents(0, disk.size)) == first
        for start in range(0, disk.size, MiB):
            list(disk.extents(start, MiB))
        assert len(calls) == walked  # answered from the map


def test_too_many_segments_falls_back_to_probing(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _image(folder)
    with open_vhdx(path) as disk:
        mapped = _merged(list(disk.extents(0, disk.size)))
    monkeypatch.setattr(vdisk, "_MAX_SEGMENTS", 1)
    with open_vhdx(path) as disk:
        assert _merged(list(disk.extents(0, disk.size))) == mapped
        assert disk._data_map() is None
