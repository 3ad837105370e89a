"""The real samples in $VHD_CORPUS (see its SOURCES.txt): Windows dynamic and fixed images, a
Windows 10 differencing disk whose parent is absent, a hand-made qemu chain with bad checksums
and Virtual PC metadata fragments.  Reads are checked against qemu-img (never for children: it
ignores parents), libvhdi (pyvhdi) and the spec model."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import vhd
from tests.images import craft_fixed
from tests.interop.oracles import libvhdi_read, qemu_info, qemu_raw
from tests.model import Footer as SpecFooter
from tests.model import Header as SpecHeader
from tests.model import ModelImage, model_chain
from tests.strategies import payload
from vhd.footer import Footer
from vhd.footer import checksum_ok as footer_checksum_ok
from vhd.header import DynamicHeader
from vhd.header import checksum_ok as header_checksum_ok

VHD_CLI = str(Path(sys.executable).with_name("vhd"))
FAT_PARENT_ID = uuid.UUID("5fa21a55-f394-aa4d-9958-1951a67d5540")


def _gunzip(corpus: Path, name: str, tmp: Path) -> Path:
    out = tmp / name.removesuffix(".gz")
    with gzip.open(corpus / name) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def _read_all(path: Path, **kw: object) -> bytes:
    with vhd.open(path, **kw) as disk:  # type: ignore[arg-type]
        return disk.pread(disk.size, 0)


@pytest.mark.parametrize("name", ["dynamic.vhd.gz", "fixed.vhd.gz"])
def test_windows_images_read_like_qemu_and_libvhdi(corpus: Path, tmp_path: Path, name: str) -> None:
    image = _gunzip(corpus, name, tmp_path)
    ours = _read_all(image)
    assert len(ours) == 10 * 1024 * 1024
    assert ours == qemu_raw(image, tmp_path / "qemu.raw")
    info = libvhdi_read([image], tmp_path / "libvhdi.raw")
    assert info["size"] == len(ours)
    assert (tmp_path / "libvhdi.raw").read_bytes() == ours
    assert ModelImage(image).read_all() == ours
    assert ours[510:512] == b"\x55\xaa", "both samples hold an MBR"
    with vhd.open(image) as disk:
        assert disk.warnings == []
        assert disk.footer.creator_app == b"win "
        for ext in disk.extents():
            if ext.layer is None:
                assert ours[ext.offset : ext.end] == bytes(ext.length)


def test_windows_dynamic_layout_facts(corpus: Path, tmp_path: Path) -> None:
    image = _gunzip(corpus, "dynamic.vhd.gz", tmp_path)
    with vhd.open(image) as disk:
        assert disk.type == vhd.DiskType.DYNAMIC
        assert disk.block_size == 2 * 1024 * 1024
        assert disk.footer.geometry == (301, 4, 17)  # C·H·S < size: the size is current_size
        allocated = list(disk.bat.allocated())  # type: ignore[attr-defined]
    assert len(allocated) == 3
    for _, sector in allocated:
        assert (sector * 512 + 512) % 4096 == 0, "Windows aligns block data to 4 KiB"


def test_windows_dynamic_write_round_trip(corpus: Path, tmp_path: Path) -> None:
    """Writes into the Windows layout read back in qemu-img, libvhdi and the model."""
    image = _gunzip(corpus, "dynamic.vhd.gz", tmp_path)
    expected = bytearray(_read_all(image))
    with vhd.open(image, "r+") as disk:
        for off, n, seed in ((4096, 8192, 1), (5 * 1024 * 1024, 4096, 2), (9 << 20, 65536, 3)):
            disk.pwrite(payload(n, seed), off)
            expected[off : off + n] = payload(n, seed)
    assert qemu_raw(image, tmp_path / "q.raw") == expected
    libvhdi_read([image], tmp_path / "l.raw")
    assert (tmp_path / "l.raw").read_bytes() == expected
    assert ModelImage(image).read_all() == expected
    check = subprocess.run(
        [VHD_CLI, "check", str(image)], capture_output=True, text=True, timeout=60, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_fixed_sample_probes_like_qemu_says(corpus: Path, tmp_path: Path) -> None:
    image = _gunzip(corpus, "fixed.vhd.gz", tmp_path)
    assert qemu_info(image)["virtual-size"] == 10 * 1024 * 1024
    with vhd.open(image) as disk:
        assert disk.type == vhd.DiskType.FIXED and disk.size == 10 * 1024 * 1024


def test_fat_differential_parent_is_absent(corpus: Path) -> None:
    with pytest.raises(vhd.ParentNotFoundError) as info:
        vhd.open(corpus / "fat-differential.vhd")
    message = str(info.value)
    assert "fat-parent.vhd" in message and str(FAT_PARENT_ID) in message
    assert "not found" in message
    proc = subprocess.run(
        [VHD_CLI, "map", str(corpus / "fat-differential.vhd")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fat-parent.vhd" in proc.stderr and "not found" in proc.stderr


def test_fat_differential_metadata(corpus: Path) -> None:
    with vhd.open(corpus / "fat-differential.vhd", open_parent=False) as disk:
        assert disk.type == vhd.DiskType.DIFFERENCING and disk.parent is None
        assert disk.size == 4 * 1024 * 1024
        header = disk.header
        assert header is not None
        assert header.parent_uuid == FAT_PARENT_ID
        assert header.parent_name == "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd"
        assert header.parent_timestamp == 0
        used = [loc for loc in header.locators if loc.in_use]
        assert [loc.code for loc in used] == [0x57326B75, 0x57327275]  # W2ku, W2ru
        assert [loc.space_bytes for loc in used] == [4096, 65536]  # stored in bytes
        raw = (corpus / "fat-differential.vhd").read_bytes()
        texts = [raw[loc.data_offset : loc.data_offset + loc.data_len] for loc in used]
        assert texts[0].decode("utf-16-le") == header.parent_name
        assert texts[1].decode("utf-16-le") == ".\\fat-parent.vhd"
        # Its one block has 18 sectors present.
        allocated = list(disk.bat.allocated())  # type: ignore[attr-defined]
        assert len(allocated) == 1
        ext = [e for e in disk.extents() if e.layer == 0]
        assert sum(e.length for e in ext) == 18 * 512
        # Without the parent open, its ranges are still attributed to it (layer 1), and reading
        # them is a clean error.
        absent = next(e for e in disk.extents() if e.layer == 1)
        with pytest.raises(vhd.ParentError):
            disk.pread(512, absent.offset)


def test_fat_differential_over_a_stand_in_parent(corpus: Path, tmp_path: Path) -> None:
    """With a parent carrying the right unique id, the Windows child reads like the model and
    like libvhdi (except inside the one partly set bitmap byte, libvhdi's known bug)."""
    child = tmp_path / "fat-differential.vhd"
    shutil.copyfile(corpus / "fat-differential.vhd", child)
    parent = tmp_path / "fat-parent.vhd"
    # A fixed parent with a known pattern and the unique id the child wants.
    size = 4 * 1024 * 1024
    craft_fixed(parent, size, data={0: payload(size, 77)}, unique_id=FAT_PARENT_ID.bytes)
    ours = _read_all(child)  # found through the W2ru locator
    model = model_chain([parent, child])
    assert model.read_all() == ours
    libvhdi_read([parent, child], tmp_path / "l.raw")
    theirs = (tmp_path / "l.raw").read_bytes()
    assert len(theirs) == len(ours)
    suspect = _partial_bitmap_sectors(model)
    assert suspect, "the sample has a partly set bitmap byte"
    for s in range(len(ours) // 512):
        if s not in suspect:
            assert ours[s * 512 : (s + 1) * 512] == theirs[s * 512 : (s + 1) * 512], s


def _partial_bitmap_sectors(image: ModelImage) -> set[int]:
    """Sectors covered by bitmap bytes that are neither all clear nor all set."""
    out: set[int] = set()
    spb = image.block_size // 512
    for block, entry in image.allocated_blocks():
        bitmap = image.raw[entry * 512 : entry * 512 + spb // 8]
        for i, byte in enumerate(bitmap):
            if byte not in (0, 0xFF):
                out.update(block * spb + i * 8 + k for k in range(8))
    return out


def test_dfvfs_chain_with_bad_checksums(corpus: Path, tmp_path: Path) -> None:
    parent, child = corpus / "image.vhd", corpus / "image-differential.vhd"
    for path in (parent, child):
        with pytest.raises(vhd.ChecksumError):
            vhd.open(path)
    with vhd.open(parent, strict=False) as disk:
        assert disk.size == 104448 and any("checksum" in w for w in disk.warnings)
    with vhd.open(child, strict=False, parent=parent) as disk:
        assert disk.parent is not None and disk.parent.path == str(parent)
        ours = disk.pread(disk.size, 0)
    assert ours == model_chain([parent, child], strict=False).read_all()
    info = libvhdi_read([parent, child], tmp_path / "l.raw")
    assert info["size"] == 104448
    assert (tmp_path / "l.raw").read_bytes() == ours
    # Found by the header's parent name too, next to the child.
    assert _read_all(child, strict=False) == ours
    assert _read_all(parent, strict=False) == model_chain([parent], strict=False).read_all()


def test_virtual_pc_fragments(corpus: Path) -> None:
    raw = (corpus / "file_footer.1").read_bytes()
    footer = Footer.parse(raw)
    assert footer_checksum_ok(raw) and footer.build() == raw
    assert footer.creator_app == b"vpc " and footer.creator_version == 0x00010000
    assert footer.creator_host == b"Wi2k"
    assert footer.current_size == 512 * 1024 * 1024
    assert tuple(footer.geometry) == (1040, 16, 63)
    assert footer.type == vhd.DiskType.DIFFERENCING
    spec = SpecFooter.decode(raw)
    assert spec.checksum_valid and spec.current_size == footer.current_size

    raw = (corpus / "dynamic_disk_header.1").read_bytes()
    header = DynamicHeader.parse(raw)
    assert header_checksum_ok(raw) and header.build() == raw
    assert header.table_offset == 0x600 and header.max_table_entries == 256
    assert header.block_size == 2 * 1024 * 1024
    assert header.parent_name == "dynamic.vhd"
    assert header.parent_timestamp != 0
    codes = [loc.code for loc in header.locators]
    assert codes[:4] == [0, 0, 0, 0]
    assert codes[4:] == [0x57326B75, 0x57327275, 0x5769326B, 0x57693272]  # W2ku W2ru Wi2k Wi2r
    assert all(loc.space_bytes == 512 for loc in header.locators[4:])
    spec_header = SpecHeader.decode(raw)
    assert spec_header.checksum_valid and spec_header.parent_name == "dynamic.vhd"


@pytest.mark.parametrize(
    "name", ["dynamic.vhd.gz", "fixed.vhd.gz", "fat-differential.vhd", "image.vhd"]
)
def test_cli_on_corpus(corpus: Path, tmp_path: Path, name: str) -> None:
    image = _gunzip(corpus, name, tmp_path) if name.endswith(".gz") else corpus / name
    proc = subprocess.run(
        [VHD_CLI, "info", "--json", str(image)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if name.endswith(".gz"):
        out = tmp_path / "out.raw"
        proc = subprocess.run(
            [VHD_CLI, "convert", str(image), str(out)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == qemu_raw(image, tmp_path / "q.raw")
