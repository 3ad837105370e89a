"""Real sample images (``$VHD_CORPUS``) through a real mount, against libvhdi."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .mounting import Mounts, is_mounted, vhd_cli

pytestmark = pytest.mark.corpus


def _libvhdi_read_all(image: Path) -> bytes:
    code = (
        "import sys, pyvhdi\n"
        "f = pyvhdi.file(); f.open(sys.argv[1])\n"
        "sys.stdout.buffer.write(f.read_buffer_at_offset(f.get_media_size(), 0))\n"
    )
    result = subprocess.run(
        ["/usr/bin/python3", "-c", code, str(image)], capture_output=True, timeout=120, check=True
    )
    return result.stdout


# The VHDX pair was made by Windows from the same 10 MiB disk as the VHD pair.
@pytest.mark.parametrize(
    "name", ["fixed.vhd.gz", "dynamic.vhd.gz", "vhdx/fixed.vhdx.gz", "vhdx/dynamic.vhdx.gz"]
)
def test_windows_images_with_an_mbr(
    corpus: Path, tmp_path: Path, mounts: Mounts, name: str
) -> None:
    image = tmp_path / Path(name).name.removesuffix(".gz")
    with gzip.open(corpus / name) as src, image.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    mnt = mounts.mount(image, "--read-only")
    # Both hold an MBR with one partition (type 07) at sector 128, 14336 sectors long.
    assert sorted(os.listdir(mnt)) == ["disk", "p1"]
    assert os.stat(mnt / "disk").st_size == 10 * 1024 * 1024
    assert os.stat(mnt / "p1").st_size == 14336 * 512
    whole = (mnt / "disk").read_bytes()
    assert whole == _libvhdi_read_all(image)
    assert (mnt / "p1").read_bytes() == whole[128 * 512 : (128 + 14336) * 512]


def test_bad_checksums_and_missing_parents_fail_cleanly(
    corpus: Path, tmp_path: Path, mounts: Mounts
) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    for name in ("image-differential.vhd", "fat-differential.vhd"):
        shutil.copyfile(corpus / name, tmp_path / name)
        result = vhd_cli("mount", "--read-only", str(tmp_path / name), str(mnt))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not is_mounted(mnt)
