"""Writing dynamic and fixed VHDX: data against a bytearray model and qemu-img (check, convert),
the header update protocol and FileWriteGuid/DataWriteGuid, discard, metadata only through the
log (the image is clean at rest after every flush)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.vhd.vhdx.helpers import (
    MiB,
    assert_qemu_clean,
    current_header,
    qemu_create,
    qemu_raw,
    qemu_write,
)
from vhd import InvalidArgumentError, ReadOnlyError
from vhd.disk import Extent
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import records as r


def _random_ops(disk_size: int, seed: int, count: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    ops = []
    for _ in range(count):
        kind = rng.choice(("write", "write", "write", "discard", "flush"))
        off = rng.randrange(0, disk_size - 1)
        length = min(disk_size - off, rng.choice((1, 511, 4096, 70000, MiB + 3, 3 * MiB)))
        ops.append((kind, off, length))
    return ops


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_writes_match_model_and_qemu(tmp_path: Path, seed: int) -> None:
    size = 24 * MiB + 4096
    image = tmp_path / "w.vhdx"
    model = bytearray(size)
    rng = random.Random(seed)
    with create_vhdx(image, size, block_size=MiB) as disk:
        for kind, off, length in _random_ops(size, seed, 60):
            if kind == "write":
                data = rng.randbytes(length)
                assert disk.pwrite(data, off) == length
                model[off : off + length] = data
            elif kind == "discard":
                disk.discard(off, length)
                model[off : off + length] = bytes(length)
            else:
                disk.flush()
            probe = rng.randrange(0, size - 9000)
            assert disk.pread(9000, probe) == model[probe : probe + 9000]
        assert disk.pread(size, 0) == model
    assert_qemu_clean(image)
    assert qemu_raw(image, tmp_path / "q.raw") == model
    with open_vhdx(image) as disk:
        assert disk.pread(size, 0) == model


def test_writes_into_a_qemu_image(tmp_path: Path) -> None:
    image = tmp_path / "q.vhdx"
    qemu_create(image, 64 * MiB)  # qemu's defaults: 32 MiB blocks here
    qemu_write(image, "write -P 0x41 0 1M")
    with open_vhdx(image, "r+") as disk:
        disk.pwrite(b"\x42" * 4096, 512)
        disk.pwrite(b"\x43" * 8192, 40 * MiB)
    assert_qemu_clean(image)
    raw = qemu_raw(image, tmp_path / "q.raw")
    assert raw[:512] == b"\x41" * 512 and raw[512:4608] == b"\x42" * 4096
    assert raw[4608 : 1 * MiB] == b"\x41" * (MiB - 4608)
    assert raw[40 * MiB : 40 * MiB + 8192] == b"\x43" * 8192


def test_header_protocol_and_write_guids(tmp_path: Path) -> None:
    image = tmp_path / "g.vhdx"
    create_vhdx(image, 8 * MiB, block_size=MiB).close()
    _, h0 = current_header(image.read_bytes())
    with open_vhdx(image, "r+") as disk:
        pass  # an open that modifies nothing changes nothing
    assert current_header(image.read_bytes())[1] == h0
    with open_vhdx(image, "r+") as disk:
        disk.pwrite(b"x", 0)
        disk.flush()
        data = image.read_bytes()
        _, h1 = current_header(data)
        assert h1.log_guid == r.ZERO_GUID  # clean at rest after a flush
        assert h1.sequence_number > h0.sequence_number
        assert h1.file_write_guid != h0.file_write_guid
        assert h1.data_write_guid != h0.data_write_guid
        disk.pwrite(b"y", 1)
        disk.flush()
        # One session: the guids change once.
        _, h2 = current_header(image.read_bytes())
        assert (h2.file_write_guid, h2.data_write_guid) == (h1.file_write_guid, h1.data_write_guid)
    both = [r.Header.parse(image.read_bytes()[o : o + 4096]) for o in r.HEADER_OFFSETS]
    # Both copies valid and up to date after close, sequence numbers one apart.
    assert {h.data_write_guid for h in both} == {h1.data_write_guid}
    assert abs(both[0].sequence_number - both[1].sequence_number) == 1


def test_discard_frees_whole_blocks_and_zeroes_parts(tmp_path: Path) -> None:
    image = tmp_path / "d.vhdx"
    with create_vhdx(image, 8 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"\x55" * (4 * MiB), 0)
        disk.discard(MiB, MiB)
        disk.discard(2 * MiB + 4096, 8192)
        # Holes punched into a present block are reported as zeros (SEEK_HOLE), like freed ones.
        assert list(disk.extents()) == [
            Extent(0, MiB, 0),
            Extent(MiB, MiB, None),
            Extent(2 * MiB, 4096, 0),
            Extent(2 * MiB + 4096, 8192, None),
            Extent(2 * MiB + 12288, 2 * MiB - 12288, 0),
            Extent(4 * MiB, 4 * MiB, None),
        ]
        expect = bytearray(b"\x55" * (4 * MiB))
        expect[MiB : 2 * MiB] = bytes(MiB)
        expect[2 * MiB + 4096 : 2 * MiB + 12288] = bytes(8192)
        assert disk.pread(4 * MiB, 0) == expect
    assert_qemu_clean(image)
    assert qemu_raw(image, tmp_path / "q.raw")[: 4 * MiB] == expect


def test_fixed_writes_in_place(tmp_path: Path) -> None:
    image = tmp_path / "f.vhdx"
    with create_vhdx(image, 10 * MiB, type="fixed", block_size=2 * MiB) as disk:
        size_before = image.stat().st_size
        disk.pwrite(b"\x66" * 5000, 3 * MiB - 100)
        disk.discard(6 * MiB, 2 * MiB)  # LeaveBlocksAllocated: blocks stay, read as zeros
        # Every block is present; the file's holes (never written) are reported as zeros.
        assert list(disk.extents()) == [
            Extent(0, 3 * MiB - 4096, None),
            Extent(3 * MiB - 4096, 12288, 0),
            Extent(3 * MiB + 8192, 7 * MiB - 8192, None),
        ]
    assert image.stat().st_size == size_before
    assert_qemu_clean(image)
    raw = qemu_raw(image, tmp_path / "q.raw")
    assert raw[3 * MiB - 100 : 3 * MiB + 4900] == b"\x66" * 5000


def test_read_only_and_bounds(tmp_path: Path) -> None:
    image = tmp_path / "ro.vhdx"
    create_vhdx(image, 8 * MiB).close()
    before = image.read_bytes()
    with open_vhdx(image) as disk:
        with pytest.raises(ReadOnlyError):
            disk.pwrite(b"x", 0)
        with pytest.raises(ReadOnlyError):
            disk.discard(0, 4096)
        assert disk.pread(100, 8 * MiB - 10) == bytes(10)
    assert image.read_bytes() == before
    with open_vhdx(image, "r+") as disk, pytest.raises(InvalidArgumentError):
        disk.pwrite(b"xx", 8 * MiB - 1)


def test_many_dirty_pages_span_several_log_transactions(tmp_path: Path) -> None:
    # 1 MiB blocks over 2 GiB: 2048 BAT entries, 4 pages; with 4 KiB-apart writes across many
    # chunks more than one log entry is needed when the BAT is large.
    image = tmp_path / "big.vhdx"
    size = 600 * 1024 * MiB
    with create_vhdx(image, size, block_size=MiB) as disk:
        for block in range(0, size // MiB, 512):  # one entry in each BAT page (>= 300 pages)
            disk.pwrite(block.to_bytes(4, "little"), block * MiB)
    assert_qemu_clean(image)
    with open_vhdx(image) as disk:
        for block in range(0, size // MiB, 512):
            assert disk.pread(4, block * MiB) == block.to_bytes(4, "little")
