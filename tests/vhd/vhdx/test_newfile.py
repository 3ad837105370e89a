"""VHDX outputs are written under a temporary name and renamed when complete (vhd.newfile), as
VHD and raw outputs are: `--force` over a VHDX in use is refused and leaves it as it was, and
create/convert publish the whole image.  An interrupted or killed `vhd convert ... out.vhdx`
leaving nothing under the final name is tested with the VHD cases, by format, in
tests/vhd/test_safety.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.images import MiB, sha
from tests.lockhelpers import Holder
from tests.vhd.harness import leftovers
from tests.vhd.helpers import run_cli
from tests.vhd.vhdx.helpers import qemu_raw
from vhd.vhdx import create_vhdx, open_vhdx


@pytest.mark.parametrize("command", ["convert", "create"])
def test_force_over_a_vhdx_in_use_is_refused_and_harmless(
    tmp_path: Path, big_source: Path, command: str
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    dst = folder / "out.vhdx"
    with create_vhdx(dst, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"\x42" * 512, 0)
    with Holder(dst, "r") as holder:
        before = sha(dst)
        if command == "convert":
            rc, out = run_cli("convert", "--force", str(big_source), str(dst))
        else:
            rc, out = run_cli("create", "--force", str(dst), "8M")
        assert rc == 2 and "in use" in out and "\n" not in out.strip(), out
        assert leftovers(folder) == ["out.vhdx"] and sha(dst) == before
        holder.close()
    with open_vhdx(dst) as disk:
        assert disk.pread(512, 0) == b"\x42" * 512


def test_convert_and_create_publish_complete_vhdx(tmp_path: Path, big_source: Path) -> None:
    """The published file is the whole image (qemu-img reads it back), under its final name
    only, and --force replaces an idle VHDX."""
    folder = tmp_path / "out"
    folder.mkdir()
    dst = folder / "out.vhdx"
    rc, out = run_cli("create", str(dst), "4M")
    assert rc == 0, out
    assert leftovers(folder) == ["out.vhdx"]
    rc, out = run_cli("convert", "--force", str(big_source), str(dst))
    assert rc == 0, out
    assert leftovers(folder) == ["out.vhdx"]
    assert qemu_raw(dst, tmp_path / "back.raw") == big_source.read_bytes()
