"""VHDX outputs are written under a temporary name and renamed when complete (vhd.newfile), as
VHD and raw outputs are: an interrupted or killed `vhd convert ... out.vhdx` leaves nothing under
the final name, `vhd create x.vhdx` too, and `--force` over a VHDX in use is refused and leaves
it as it was.  Mirrors the VHD cases of tests/vhd/test_safety.py."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.lockhelpers import Holder, sha
from tests.vhd.helpers import MiB, run_cli
from tests.vhd.test_safety import PARTIAL, leftovers, slow_convert
from tests.vhd.vhdx.helpers import qemu_raw
from vhd.vhdx import create_vhdx, open_vhdx


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "in" / "src.raw"
    src.parent.mkdir()
    with open(src, "wb") as f:
        for i in range(64):
            f.write(bytes([i + 1]) * MiB)
    return src


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_convert_to_vhdx_leaves_nothing(
    tmp_path: Path, source: Path, sig: int, status: int
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    proc = slow_convert(tmp_path, source, folder / "out.vhdx")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert "interrupted" in err
    assert leftovers(folder) == []


def test_killed_convert_to_vhdx_leaves_no_final_file(tmp_path: Path, source: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    proc = slow_convert(tmp_path, source, folder / "out.vhdx")
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -9
    left = leftovers(folder)
    assert "out.vhdx" not in left
    assert all(name.startswith("out.vhdx" + PARTIAL) for name in left), left


def test_interrupted_convert_force_keeps_the_old_vhdx(tmp_path: Path, source: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    dst = folder / "out.vhdx"
    with create_vhdx(dst, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"\x42" * 512, 0)
    before = sha(dst)
    proc = slow_convert(tmp_path, source, dst, "--force")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert leftovers(folder) == ["out.vhdx"] and sha(dst) == before


@pytest.mark.parametrize("command", ["convert", "create"])
def test_force_over_a_vhdx_in_use_is_refused_and_harmless(
    tmp_path: Path, source: Path, command: str
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    dst = folder / "out.vhdx"
    with create_vhdx(dst, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"\x42" * 512, 0)
    with Holder(dst, "r") as holder:
        before = sha(dst)
        if command == "convert":
            rc, out = run_cli("convert", "--force", str(source), str(dst))
        else:
            rc, out = run_cli("create", "--force", str(dst), "8M")
        assert rc == 2 and "in use" in out and "\n" not in out.strip(), out
        assert leftovers(folder) == ["out.vhdx"] and sha(dst) == before
        holder.close()
    with open_vhdx(dst) as disk:
        assert disk.pread(512, 0) == b"\x42" * 512


def test_convert_and_create_publish_complete_vhdx(tmp_path: Path, source: Path) -> None:
    """The published file is the whole image (qemu-img reads it back), under its final name
    only, and --force replaces an idle VHDX."""
    folder = tmp_path / "out"
    folder.mkdir()
    dst = folder / "out.vhdx"
    rc, out = run_cli("create", str(dst), "4M")
    assert rc == 0, out
    assert leftovers(folder) == ["out.vhdx"]
    rc, out = run_cli("convert", "--force", str(source), str(dst))
    assert rc == 0, out
    assert leftovers(folder) == ["out.vhdx"]
    assert qemu_raw(dst, tmp_path / "back.raw") == source.read_bytes()
