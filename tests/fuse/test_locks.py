"""Mounts hold locks (vhd.lock): a read-write mount excludes every other opener, read-only
mounts share, a live chain's parents refuse writers; what is refused leaves the mount working
and its data intact."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import vhd
from tests.conftest import need_tool
from tests.images import vhd_image

from .mounting import MiB, Mounts, run, vhd_cli, wait_until


def _image(path: Path) -> Path:
    return vhd_image(path, 8 * MiB, writes=[(0, b"\x11" * MiB)]).path


def _sha(path: Path) -> bytes:
    return path.read_bytes()  # small images: the bytes themselves


def test_rw_mount_refuses_other_mounts_and_overwrites(tmp_path: Path, mounts: Mounts) -> None:
    image = _image(tmp_path / "d.vhd")
    other = _image(tmp_path / "o.vhd")
    mnt = mounts.mount(image)
    before = _sha(image)
    for argv in (
        ["mount", str(image), str(tmp_path / "second")],
        ["mount", "--read-only", str(image), str(tmp_path / "third")],
        ["convert", "--force", str(other), str(image)],
        ["create", "--force", str(image), "1M"],
        ["commit", str(image)],
    ):
        (tmp_path / "second").mkdir(exist_ok=True)
        (tmp_path / "third").mkdir(exist_ok=True)
        result = vhd_cli(*argv)
        assert result.returncode != 0, argv
        assert "in use by another process (read-write)" in result.stderr, (argv, result.stderr)
    assert _sha(image) == before
    assert not os.path.ismount(tmp_path / "second") and not os.path.ismount(tmp_path / "third")
    with open(mnt / "disk", "r+b", buffering=0) as f:
        f.seek(2 * MiB)
        f.write(b"\x77" * 4096)
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read(4096) == b"\x11" * 4096
    mounts.unmount(mnt)
    with vhd.open(str(image)) as disk:
        assert disk.pread(4096, 2 * MiB) == b"\x77" * 4096


def test_read_only_mounts_share_and_refuse_writers(tmp_path: Path, mounts: Mounts) -> None:
    base = _image(tmp_path / "base.vhd")
    child = tmp_path / "child.vhd"
    vhd.create(str(child), parent=str(base)).close()
    first = mounts.mount(child, "--read-only")
    second = mounts.mount(child, "--read-only")
    assert (first / "disk").read_bytes()[:4] == (second / "disk").read_bytes()[:4] == b"\x11" * 4
    (tmp_path / "rw").mkdir()
    result = vhd_cli("mount", str(child), str(tmp_path / "rw"))
    assert result.returncode != 0 and "in use by another process (read-only)" in result.stderr
    # The parent of a live chain cannot be rewritten or resized under the mounts.
    before = _sha(base)
    result = vhd_cli("resize", str(base), "16M")
    assert result.returncode == 2 and "in use" in result.stderr
    other = _image(tmp_path / "other.vhd")
    result = vhd_cli("convert", "--force", str(other), str(base))
    assert result.returncode == 2 and "in use" in result.stderr
    assert _sha(base) == before
    assert (first / "disk").read_bytes()[:4] == b"\x11" * 4


def test_mount_and_qemu_see_each_other(tmp_path: Path, mounts: Mounts) -> None:
    qemu_io = need_tool("qemu-io")
    qemu_nbd = need_tool("qemu-nbd")
    image = _image(tmp_path / "d.vhd")
    # vhdkit mounted: qemu-io may not write into it.
    mnt = mounts.mount(image)
    result = run([qemu_io, "-f", "vpc", "-c", "write -P 0x77 0 4k", str(image)])
    assert result.returncode != 0 and "lock" in result.stderr
    assert (mnt / "disk").read_bytes()[:4096] == b"\x11" * 4096
    mounts.unmount(mnt)
    # qemu-nbd serving read-write: vhd mount may not mount it.
    with tempfile.TemporaryDirectory(prefix="lk-", dir="/tmp") as short:
        sock = Path(short) / "s"
        server = subprocess.Popen([qemu_nbd, "-f", "vpc", "-k", str(sock), str(image)])
        try:
            wait_until(sock.exists)
            (tmp_path / "m").mkdir()
            result = vhd_cli("mount", str(image), str(tmp_path / "m"))
            assert result.returncode != 0
            assert "in use by another process (read-write)" in result.stderr
            assert not os.path.ismount(tmp_path / "m")
        finally:
            server.kill()
            server.wait(timeout=60)
