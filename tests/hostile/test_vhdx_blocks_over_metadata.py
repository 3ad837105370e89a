"""A VHDX whose BAT puts a payload block over the log, the BAT or the metadata region (MS-VHDX
2.5: blocks lie in free space; 3.1.3: regions must not overlap) must be refused at open, as a VHD
block over its metadata is (README, Untrusted images): otherwise a guest write through ``vhd
mount`` or ``vhd serve`` lands in the structure and destroys the image.

Open today (acceptance walk of issue 11, branch ``acc``): only blocks before 1 MiB or past the end
of the file are refused; the fix belongs in ``vhd/vhdx/disk.py`` (the open's BAT validation),
which another branch owns.  Strict xfail: this fails as soon as the open refuses them -- then
drop the marker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vhd.vhdx.helpers import MiB
from vhd import CorruptImageError
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import records as r


@pytest.mark.xfail(strict=True, reason="open_vhdx does not refuse a block over metadata yet")
@pytest.mark.parametrize("where", ["log", "bat", "metadata"])
def test_block_over_a_structure_is_refused_and_never_written(tmp_path: Path, where: str) -> None:
    image = tmp_path / "x.vhdx"
    with create_vhdx(image, 8 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"a" * 4096, 0)
        lay = disk.layout
        target = {
            "log": disk.current_header.log_offset,
            "bat": lay.bat_region.file_offset,
            "metadata": lay.metadata_region.file_offset,
        }[where]
    raw = bytearray(image.read_bytes())
    bat = lay.bat_region.file_offset
    raw[bat : bat + 8] = (target | r.PayloadState.FULLY_PRESENT).to_bytes(8, "little")
    image.write_bytes(bytes(raw))
    before = image.read_bytes()
    with pytest.raises(CorruptImageError), open_vhdx(image, "r+") as disk:
        disk.pwrite(b"\0" * 4096, 0)  # what a guest's first write through mount/serve does
    assert image.read_bytes() == before
