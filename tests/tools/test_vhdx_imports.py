"""What the VHDX commands import at start-up (issue 11, speed): the interpreter's start-up and
imports are most of a sub-second ``vhd convert``, so a command on a VHDX loads the VHDX package
and what the command itself uses, and no parser library, checker rules or other heavy modules."""

from __future__ import annotations

from pathlib import Path

import vhd
from tests.tools.startup import loaded_modules
from vhd.vhdx import create_vhdx

# construct was VHDX's record parser (with pdb, pickle and hashlib behind it); vhd.check and
# vhd.azure are only for --azure; fractions only for fractional sizes (parse_size); convert's
# workers are plain threads (concurrent.futures brings logging); the VHDX records and convert's
# result are vhd.record classes, not dataclasses (dataclasses and the inspect it imports, with
# each class's methods compiled from source: 12 ms of a VHDX command's start-up); typing is for
# mypy only (3 ms), and convert's buffers are maps, which need no ctypes to align (2 ms).
_HEAVY = (
    "construct",
    "dataclasses",
    "inspect",
    "pdb",
    "pickle",
    "hashlib",
    "vhd.check",
    "vhd.azure",
    "fractions",
    "concurrent.futures",
    "logging",
    "typing",
    "ctypes",
)


def test_vhdx_commands_import_only_what_they_use(tmp_path: Path) -> None:
    image = tmp_path / "a.vhdx"
    with create_vhdx(image, 64 << 20, block_size=1 << 20) as disk:
        disk.pwrite(b"\x5a" * 4096, 3 << 20)
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(1 << 20) + b"\xa5" * (1 << 20))
    for args in (
        ("info", image),
        ("map", image),
        ("convert", image, tmp_path / "out.raw"),
        ("convert", raw, tmp_path / "out.vhdx"),
        ("convert", image, tmp_path / "out.vhd", "--block-size", "2M"),
    ):
        loaded = loaded_modules(*args)
        assert "vhd.vhdx" in loaded and "vhdtools.cli" in loaded
        heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in _HEAVY))
        assert not heavy, f"vhd {args[0]} imports {heavy}"
    # check loads the checkers (VHD's too, for the shared report), still no dataclasses: its
    # report, like commit's, compact's, resize's and set-parent's results, is a vhd.record class
    loaded = loaded_modules("check", image)
    assert "vhd.vhdx.check" in loaded
    assert not {"dataclasses", "inspect"} & loaded, "vhd check imports dataclasses"
    # the outputs are right: the data where it was written, zeros elsewhere
    with vhd.open(tmp_path / "out.vhd") as out:
        assert out.pread(4096, 3 << 20) == b"\x5a" * 4096
        assert out.pread(4096, 0) == bytes(4096)
    assert (tmp_path / "out.raw").read_bytes()[3 << 20 : (3 << 20) + 4096] == b"\x5a" * 4096


def test_convert_azure_still_checks_the_output(tmp_path: Path) -> None:
    """The Azure rules, imported only for --azure, still run and report."""
    image = tmp_path / "a.vhdx"
    with create_vhdx(image, 20 << 20, block_size=1 << 20) as disk:
        disk.pwrite(b"\x11" * 4096, 0)
    loaded = loaded_modules("convert", "--azure", image, tmp_path / "azure.vhd")
    assert "vhd.azure" in loaded
    with vhd.open(tmp_path / "azure.vhd") as out:
        assert out.type == vhd.DiskType.FIXED and out.size == 20 << 20
        assert out.pread(4096, 0) == b"\x11" * 4096
