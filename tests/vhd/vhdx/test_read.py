"""Reading VHDX: Windows-made corpus images and qemu-made images against qemu-img and libvhdi,
block states, header choice, metadata rules."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.interop.oracles import libvhdi_read
from tests.vhd.vhdx.helpers import (
    MiB,
    current_header,
    qemu_create,
    qemu_raw,
    qemu_write,
    unpack_corpus,
)
from vhd import CorruptImageError, DiskType, NotAVHDError, UnsupportedFeatureError
from vhd.disk import Extent
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import records as r


@pytest.mark.corpus
@pytest.mark.parametrize(
    ("name", "dtype", "block"),
    [("fixed.vhdx", DiskType.FIXED, 2 * MiB), ("dynamic.vhdx", DiskType.DYNAMIC, 32 * MiB)],
)
def test_windows_corpus_reads_as_qemu_and_libvhdi(
    corpus: Path, tmp_path: Path, name: str, dtype: DiskType, block: int
) -> None:
    image = unpack_corpus(corpus, name, tmp_path)
    before = image.read_bytes()
    with open_vhdx(image) as disk:
        assert (disk.type, disk.size, disk.block_size) == (dtype, 10 * MiB, block)
        assert disk.logical_sector_size == 512
        assert disk.layout.creator.startswith("Microsoft Windows")
        ours = disk.pread(disk.size, 0)
        assert list(disk.extents()) == [Extent(0, 10 * MiB, 0)]
    assert ours[510:512] == b"\x55\xaa"  # the MBR inside
    assert ours == qemu_raw(image, tmp_path / "q.raw")
    libvhdi_read([image], tmp_path / "l.raw")
    assert ours == (tmp_path / "l.raw").read_bytes()
    assert image.read_bytes() == before  # a read-only open writes nothing


def test_qemu_dynamic_with_holes(tmp_path: Path) -> None:
    image = tmp_path / "q.vhdx"
    qemu_create(image, 64 * MiB, block_size=MiB)
    qemu_write(image, "write -P 0x61 0 4k", "write -P 0x62 3M 1M", "write -P 0x63 63M 512k")
    with open_vhdx(image) as disk:
        assert disk.type is DiskType.DYNAMIC and disk.block_size == MiB
        ours = disk.pread(disk.size, 0)
        extents = list(disk.extents())
        # Written ranges are this file's; the rest reads as zeros (unallocated blocks, and the
        # holes qemu left in allocated ones are reported as zeros too).
        data = [(e.offset, e.end) for e in extents if e.layer == 0]
        for lo, hi in ((0, 4096), (3 * MiB, 4 * MiB), (63 * MiB, 63 * MiB + 512 * 1024)):
            assert any(a <= lo and hi <= z for a, z in data), (lo, hi, extents)
        assert {e.layer for e in extents} == {0, None}
        # A read across blocks, unaligned, into a caller's buffer.
        buf = bytearray(3 * MiB + 1000)
        assert disk.preadinto(buf, 2 * MiB - 500) == len(buf)
        assert bytes(buf) == ours[2 * MiB - 500 : 5 * MiB + 500]
    assert ours == qemu_raw(image, tmp_path / "q.raw")
    for e in extents:
        if e.layer is None:
            assert ours[e.offset : e.end] == bytes(e.length)


def _set_bat(image: Path, block: int, value: int) -> None:
    with open_vhdx(image) as disk:
        index = block + block // disk._ratio
        at = disk.layout.bat_region.file_offset + 8 * index
    with image.open("r+b") as f:
        f.seek(at)
        f.write(value.to_bytes(8, "little"))


@pytest.mark.parametrize(
    "state",
    [
        r.PayloadState.NOT_PRESENT,
        r.PayloadState.UNDEFINED,
        r.PayloadState.ZERO,
        r.PayloadState.UNMAPPED,
    ],
)
def test_block_states_that_read_as_zeros(tmp_path: Path, state: int) -> None:
    image = tmp_path / "s.vhdx"
    qemu_create(image, 8 * MiB, block_size=MiB)
    qemu_write(image, "write -P 0x77 1M 1M")
    with open_vhdx(image) as disk:
        offset = disk.bat[1 + 1 // disk._ratio] & r.OFFSET_MASK
    _set_bat(image, 1, offset | state)  # the data stays in the file; the state hides it
    with open_vhdx(image) as disk:
        assert disk.pread(MiB, MiB) == bytes(MiB)
        assert list(disk.extents(MiB, MiB)) == [Extent(MiB, MiB, None)]
    assert qemu_raw(image, tmp_path / "q.raw")[MiB : 2 * MiB] == bytes(MiB)


@pytest.mark.parametrize("state", [4, 5, r.PayloadState.PARTIALLY_PRESENT])
def test_reserved_and_partial_states_refused_without_parent(tmp_path: Path, state: int) -> None:
    image = tmp_path / "s.vhdx"
    create_vhdx(image, 8 * MiB, block_size=MiB).close()
    _set_bat(image, 2, (5 * MiB) | state)
    with open_vhdx(image) as disk:
        assert disk.pread(MiB, 0) == bytes(MiB)
        with pytest.raises(CorruptImageError, match="payload block 2"):
            disk.pread(10, 2 * MiB)


def test_payload_outside_file_is_corruption(tmp_path: Path) -> None:
    image = tmp_path / "s.vhdx"
    create_vhdx(image, 8 * MiB, block_size=MiB).close()
    _set_bat(image, 0, (1 << 40) | r.PayloadState.FULLY_PRESENT)
    with open_vhdx(image) as disk, pytest.raises(CorruptImageError, match="outside the file"):
        disk.pread(512, 0)


def test_logical_sector_4096_read_by_libvhdi(tmp_path: Path) -> None:
    image = tmp_path / "4k.vhdx"
    with create_vhdx(image, 16 * MiB, block_size=MiB, logical_sector_size=4096) as disk:
        disk.pwrite(b"\x42" * 8192, 5 * MiB - 4096)
    with open_vhdx(image) as disk:
        assert disk.logical_sector_size == 4096
        ours = disk.pread(disk.size, 0)
    libvhdi_read([image], tmp_path / "l.raw")
    assert (tmp_path / "l.raw").read_bytes() == ours
    assert ours[5 * MiB - 4096 : 5 * MiB + 4096] == b"\x42" * 8192


def _rewrite_header(image: Path, offset: int, header: r.Header) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(header.build())


def test_current_header_is_the_valid_one_with_the_higher_sequence(tmp_path: Path) -> None:
    image = tmp_path / "h.vhdx"
    create_vhdx(image, 8 * MiB).close()
    data = image.read_bytes()
    off, head = current_header(data)
    other = r.HEADER_OFFSETS[1] if off == r.HEADER_OFFSETS[0] else r.HEADER_OFFSETS[0]
    marker = uuid.uuid4()
    _rewrite_header(
        image,
        other,
        head.replace(sequence_number=head.sequence_number + 5, data_write_guid=marker),
    )
    with open_vhdx(image) as disk:
        assert disk.current_header.data_write_guid == marker
    with image.open("r+b") as f:  # damage the newer one: the older valid one is used
        f.seek(other + 200)
        f.write(b"\x01")
    with open_vhdx(image) as disk:
        assert disk.current_header.data_write_guid == head.data_write_guid
        assert disk.layout.header_errors[r.HEADER_OFFSETS.index(other)]
    with image.open("r+b") as f:
        f.seek(off + 200)
        f.write(b"\x01")
    with pytest.raises(CorruptImageError, match="both headers"):
        open_vhdx(image)


def test_unknown_required_metadata_refused_unknown_optional_kept(tmp_path: Path) -> None:
    image = tmp_path / "m.vhdx"
    create_vhdx(image, 8 * MiB).close()
    with open_vhdx(image) as disk:
        region = disk.layout.metadata_region
        entries = list(disk.metadata.entries)
    extra = uuid.uuid4()
    for required, expect in ((False, None), (True, UnsupportedFeatureError)):
        table = r.build_metadata_table(
            [*entries, r.MetadataEntry(extra, 0, 0, True, False, required)]
        )
        with image.open("r+b") as f:
            f.seek(region.file_offset)
            f.write(table)
        if expect is None:
            with open_vhdx(image) as disk:
                assert extra in disk.metadata.raw_items
        else:
            with pytest.raises(expect, match="unknown required metadata"):
                open_vhdx(image)


def test_region_table_copy_used_when_first_is_damaged(tmp_path: Path) -> None:
    image = tmp_path / "rt.vhdx"
    with create_vhdx(image, 8 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"x" * 512, 0)
    with image.open("r+b") as f:
        f.seek(r.REGION_TABLE_OFFSETS[0] + 20)
        f.write(b"\xff\xff")
    with open_vhdx(image) as disk:
        assert disk.pread(1, 0) == b"x"
        assert any("region table 1" in w for w in disk.warnings)


def test_not_a_vhdx(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(NotAVHDError, match="vhdxfile"):
        open_vhdx(junk)


def test_forged_sizes_are_refused_before_any_allocation(tmp_path: Path) -> None:
    image = tmp_path / "forged.vhdx"
    create_vhdx(image, 8 * MiB, block_size=MiB).close()
    with open_vhdx(image) as disk:
        table = disk.layout.region_tables[0]
        md = disk.layout.metadata
        meta = disk.layout.metadata_region
    assert table is not None
    size_item = next(e for e in md.entries if e.item_id == r.VIRTUAL_DISK_SIZE)
    forged = r.RegionTable(
        tuple(
            r.Region(
                g.guid, g.file_offset, 4095 * MiB if g.guid == r.BAT_REGION else g.length, True
            )
            for g in table.entries
        )
    )
    data = bytearray(image.read_bytes())
    for off in r.REGION_TABLE_OFFSETS:
        data[off : off + r.REGION_TABLE_SIZE] = forged.build()
    at = meta.file_offset + size_item.offset
    data[at : at + 8] = r.MAX_VIRTUAL_SIZE.to_bytes(8, "little")  # 64 TiB: a 512 MiB BAT
    image.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match="past the end of the file"):
        open_vhdx(image)

    other = tmp_path / "log.vhdx"
    create_vhdx(other, 8 * MiB).close()
    data = bytearray(other.read_bytes())
    off, head = current_header(data)
    data[off : off + r.HEADER_SIZE] = head.replace(
        log_guid=uuid.uuid4(), log_offset=(2**63 // MiB) * MiB
    ).build()
    other.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match="past the end of the file"):
        open_vhdx(other)
