"""A VHDX whose BAT puts a payload block or a sector bitmap block over the log, the BAT or the
metadata region (MS-VHDX 2.5: blocks lie in free space; 3.1.3: regions must not overlap) is
refused at open, as a VHD block over its metadata is (README, Untrusted images): otherwise a
guest write through ``vhd mount`` or ``vhd serve`` lands in the structure and destroys the image.
``vhd check`` still opens it and lists every offender.  (Found by the acceptance walk of issue 11.)
"""

from __future__ import annotations

import subprocess
import sys
from array import array
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.vhd.vhdx.helpers import MiB, misplaced_model
from vhd import CorruptImageError
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import records as r
from vhd.vhdx.check import check_vhdx
from vhd.vhdx.disk import chunk_ratio
from vhd.vhdx.placement import first_misplaced


def _set_entry(image: Path, index: int, value: int) -> None:
    with open_vhdx(image) as disk:
        bat = disk.layout.bat_region.file_offset
    raw = bytearray(image.read_bytes())
    raw[bat + 8 * index : bat + 8 * index + 8] = value.to_bytes(8, "little")
    image.write_bytes(bytes(raw))


def _structures(image: Path) -> dict[str, int]:
    with open_vhdx(image) as disk:
        lay = disk.layout
        return {
            "log": disk.current_header.log_offset,
            "bat": lay.bat_region.file_offset,
            "metadata": lay.metadata_region.file_offset,
        }


@pytest.mark.parametrize("mode", ["r", "r+"])
@pytest.mark.parametrize("where", ["log", "bat", "metadata"])
def test_block_over_a_structure_is_refused_and_never_written(
    tmp_path: Path, where: str, mode: str
) -> None:
    image = tmp_path / "x.vhdx"
    with create_vhdx(image, 8 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"a" * 4096, 0)
    at = _structures(image)[where]
    _set_entry(image, 0, at | r.PayloadState.FULLY_PRESENT)
    before = image.read_bytes()
    with (
        pytest.raises(CorruptImageError, match=r"block 0 .* lies over the .*vhd check"),
        open_vhdx(image, mode) as disk,
    ):
        disk.pwrite(b"\0" * 4096, 0)  # what a guest's first write through mount/serve does
    assert image.read_bytes() == before
    # vhd check opens it anyway and names it; the CLI says one line and exits 2 elsewhere
    report = check_vhdx(str(image))
    assert any(f"block 0 at [{at}, " in p and "overlaps" in p for p in report.problems)
    run = subprocess.run(
        [sys.executable, "-m", "vhdtools.cli", "info", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "lies over the" in run.stderr and "Traceback" not in run.stderr


def test_a_block_that_only_reaches_a_region_from_below_is_refused(tmp_path: Path) -> None:
    """A 2 MiB block starting 1 MiB before the metadata region covers its first MiB."""
    image = tmp_path / "x.vhdx"
    create_vhdx(image, 8 * MiB, block_size=2 * MiB).close()
    meta = _structures(image)["metadata"]
    assert meta >= 2 * MiB
    _set_entry(image, 0, (meta - MiB) | r.PayloadState.FULLY_PRESENT)
    with pytest.raises(CorruptImageError, match="metadata region"):
        open_vhdx(image).close()


def test_unallocated_entries_keep_any_offset_and_real_blocks_open(tmp_path: Path) -> None:
    """UNMAPPED and ZERO entries may keep an offset (Hyper-V leaves it on trimmed blocks): not
    blocks, not refused.  A block right after a region (Hyper-V's own layout) opens."""
    image = tmp_path / "x.vhdx"
    with create_vhdx(image, 8 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"b" * 4096, 2 * MiB)
    meta = _structures(image)["metadata"]
    _set_entry(image, 0, meta | r.PayloadState.UNMAPPED)
    _set_entry(image, 1, meta | r.PayloadState.ZERO)
    with open_vhdx(image) as disk:
        assert disk.pread(4096, 0) == bytes(4096)
        assert disk.pread(4096, 2 * MiB) == b"b" * 4096


def test_sector_bitmap_block_over_metadata_is_refused(tmp_path: Path) -> None:
    child = tmp_path / "child.vhdx"
    with (
        create_vhdx(tmp_path / "base.vhdx", 8 * MiB, block_size=MiB) as base,
        create_vhdx(child, 8 * MiB, type="differencing", block_size=MiB, parent=base) as disk,
    ):
        disk.pwrite(b"c" * 512, 0)  # a PARTIALLY_PRESENT block and its sector bitmap
    ratio = chunk_ratio(MiB, 512)
    meta = _structures(child)["metadata"]
    _set_entry(child, ratio, meta | r.BitmapState.PRESENT)
    with pytest.raises(CorruptImageError, match=r"sector bitmap block .* metadata region"):
        open_vhdx(child, "r+").close()


# -- the finder against a per-entry model (tests.vhd.vhdx.helpers.misplaced_model) ---------------

_REGIONS = [(MiB, 2 * MiB, "log"), (3 * MiB, 4 * MiB, "BAT region"), (6 * MiB, 7 * MiB, "meta")]


@settings(max_examples=300, deadline=None)
@given(
    ratio=st.sampled_from([1, 3, 8]),
    bs=st.sampled_from([MiB, 2 * MiB, 4 * MiB]),
    entries=st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 7), st.integers(0, 0xFFFFF)), max_size=40
    ),
)
def test_first_misplaced_matches_a_per_entry_scan(
    ratio: int, bs: int, entries: list[tuple[int, int, int]]
) -> None:
    # offsets in MiB (0-12 covers the regions and around them), any state, junk reserved bits
    bat = [(mib * MiB) | (junk & ~7) | state for mib, state, junk in entries]
    got = first_misplaced(array("Q", bat), chunk_ratio=ratio, block_size=bs, regions=_REGIONS)
    assert got == misplaced_model(bat, ratio, bs, _REGIONS)
