"""Interop with blktap's ``vhd-util check`` (XenServer's own checker): every image vhdkit writes,
by every path (create, convert, resize, commit, compact, set-parent; fixed, dynamic and
differencing), is valid there, parents (``-p``) and sector bitmaps (``-b``) included.

blktap is not packaged in Debian and not on PyPI, so the binary comes from the environment:
``VHD_UTIL=/path/to/vhd-util`` (built from xapi-project/blktap's ``vhd/`` and ``lvm/`` folders).
Without it these tests skip, under CI=true too, with the reason shown in pytest's ``-rs`` report.
The same images also go through qemu-img (exact size) and vhdiinfo (exact size), which CI has.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vhd
from tests.interop.oracles import TIMEOUT, qemu_info, vhdiinfo
from tests.strategies import payload

VHD_CLI = str(Path(sys.executable).with_name("vhd"))
KiB = 1024
MiB = 1024 * KiB


def vhd_util() -> str:
    path = os.environ.get("VHD_UTIL", "")
    if not path:
        pytest.skip(
            "VHD_UTIL is not set: blktap's vhd-util is in neither Debian nor PyPI; build it from "
            "xapi-project/blktap and point VHD_UTIL at it"
        )
    if not os.access(path, os.X_OK):
        pytest.fail(f"VHD_UTIL={path} is not an executable")
    return path


def cli(*args: str | Path) -> None:
    proc = subprocess.run(
        [VHD_CLI, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)


def images(tmp: Path) -> dict[str, tuple[Path, int]]:
    """One image per write path: name -> (path, guest size).  Sizes are deliberately not C·H·S
    multiples (10 MiB + 3 sectors), the case that used to fail."""
    size = 10 * MiB + 1536
    out: dict[str, tuple[Path, int]] = {}
    raw = tmp / "src.raw"
    with raw.open("wb") as f:
        f.truncate(size)
        f.seek(12345)
        f.write(payload(300 * KiB, 1))
    for kind in ("fixed", "dynamic"):
        p = tmp / f"create-{kind}.vhd"
        cli("create", p, str(size), "--type", kind)
        out[f"create-{kind}"] = (p, size)
        p = tmp / f"convert-{kind}.vhd"
        cli("convert", raw, p, "--type", kind)
        out[f"convert-{kind}"] = (p, size)
        p = tmp / f"resize-{kind}.vhd"
        cli("convert", raw, p, "--type", kind)
        cli("resize", p, "+1536")
        out[f"resize-{kind}"] = (p, size + 1536)
    base = tmp / "base.vhd"
    cli("convert", raw, base)
    child = tmp / "child.vhd"
    with vhd.create(child, parent=base) as disk:
        disk.pwrite(payload(5000, 2), 3 * MiB + 7)
    out["differencing"] = (child, size)
    mid_base = tmp / "cbase.vhd"
    cli("convert", raw, mid_base)
    top = tmp / "ctop.vhd"
    with vhd.create(top, parent=mid_base) as disk:
        disk.pwrite(payload(70 * KiB, 3), 5 * MiB + 11)
    cli("commit", top)
    out["commit-parent"] = (mid_base, size)
    compacted = tmp / "compact.vhd"
    cli("convert", raw, compacted)
    with vhd.open(compacted, "r+") as disk:
        disk.pwrite(bytes(2 * MiB), 0)
    cli("compact", compacted)
    out["compact"] = (compacted, size)
    moved = tmp / "moved-base.vhd"
    cli("convert", raw, moved)
    reparented = tmp / "reparented.vhd"
    with vhd.create(reparented, parent=base) as disk:
        disk.pwrite(payload(512, 4), 0)
    cli("set-parent", reparented, moved, "--force")
    out["set-parent"] = (reparented, size)
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    return images(tmp_path_factory.mktemp("blktap"))


NAMES = [
    *(f"{op}-{kind}" for op in ("create", "convert", "resize") for kind in ("fixed", "dynamic")),
    "differencing",
    "commit-parent",
    "compact",
    "set-parent",
]


@pytest.mark.parametrize("name", NAMES)
def test_vhd_util_check_accepts(made: dict[str, tuple[Path, int]], name: str) -> None:
    tool = vhd_util()
    path, _ = made[name]
    for options in ([], ["-p"], ["-b"]):
        proc = subprocess.run(
            [tool, "check", "-n", str(path), *options],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        # valid: exit 0; "NAME is valid" for sparse disks, nothing at all for fixed ones
        assert proc.returncode == 0, (options, proc.stdout, proc.stderr)
        assert "invalid" not in proc.stdout + proc.stderr, (options, proc.stdout)


@pytest.mark.parametrize("name", NAMES)
def test_other_readers_see_the_exact_size(made: dict[str, tuple[Path, int]], name: str) -> None:
    path, size = made[name]
    if not name.startswith("resize"):  # resize keeps the original size, which libvhdi reads
        assert f"({size} bytes)" in vhdiinfo(path)
    if name not in ("differencing", "set-parent"):  # qemu ignores parents: size only
        assert qemu_info(path)["virtual-size"] == size
