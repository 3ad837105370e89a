"""Locks (vhd.lock): readers share, writers exclude, on every layer of a chain, in both flock
and QEMU's OFD permission bytes, so that qemu-img/qemu-io/qemu-nbd and vhdkit each see the
other; -U/--force-share inspects anyway; an image in use is never truncated, replaced or
deleted by create/convert --force, and the process using it keeps working."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import vhd
from tests.conftest import need_tool
from tests.images import sha, vhd_image
from tests.lockhelpers import Holder, QemuNbd
from vhd import lock
from vhd.resize import resize

MiB = 1024 * 1024


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhdtools.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def short() -> Iterator[Path]:
    """A short folder for unix sockets (107-byte limit)."""
    with tempfile.TemporaryDirectory(prefix="lk-", dir="/tmp") as path:
        yield Path(path)


def make(path: Path, size: int = 4 * MiB, fill: int = 0x11) -> None:
    vhd_image(path, size, writes=[(0, bytes([fill]) * MiB)])


# -- vhdkit against vhdkit ---------------------------------------------------------------------


def test_readers_share_a_writer_excludes(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    make(img)
    with vhd.open(img) as a, vhd.open(img) as b:
        assert a.pread(4, 0) == b.pread(4, 0)
        with pytest.raises(vhd.InUseError, match=r"in use by another process \(read-only\)"):
            vhd.open(img, "r+")
        assert lock.holder(str(img)) == "read-only"
    with vhd.open(img, "r+"):
        assert lock.holder(str(img)) == "read-write"
        with pytest.raises(vhd.InUseError, match=r"in use by another process \(read-write\)"):
            vhd.open(img)
        with pytest.raises(vhd.InUseError):
            vhd.open(img, "r+")
        with vhd.open(img, force_share=True) as peek:
            assert peek.pread(1, 0) == b"\x11"
    assert lock.holder(str(img)) is None
    with pytest.raises(vhd.InvalidArgumentError):
        vhd.open(img, "r+", force_share=True)


def test_parents_are_locked_shared(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "top.vhd"
    make(base)
    vhd.create(mid, parent=base).close()
    vhd.create(top, parent=mid).close()
    before = sha(base)
    with Holder(top, "r+"):
        # Readers of the parents are welcome; writers of any layer are not.
        with vhd.open(base) as disk:
            assert disk.pread(1, 0) == b"\x11"
        for layer in (base, mid):
            assert lock.holder(str(layer)) == "read-only"
            with pytest.raises(vhd.InUseError, match=r"\(read-only\)"):
                vhd.open(layer, "r+")
            with pytest.raises(vhd.InUseError):
                resize(layer, 8 * MiB)
        other = tmp_path / "other.vhd"
        make(other, fill=0x22)
        result = cli("convert", "--force", str(other), str(base))
        assert result.returncode == 2
        assert f"{base}: in use by another process (read-only)" in result.stderr
        result = cli("resize", str(base), "8M")
        assert result.returncode == 2 and "in use" in result.stderr
    assert sha(base) == before


@pytest.mark.parametrize("command", ["create", "convert"])
def test_force_over_an_image_in_use_is_refused_and_harmless(tmp_path: Path, command: str) -> None:
    img = tmp_path / "d.vhd"
    make(img)
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x33" * MiB)
    before = sha(img)
    with Holder(img, "r+") as holder:
        if command == "create":
            result = cli("create", "--force", str(img), "1M")
        else:
            result = cli("convert", "--force", str(src), str(img))
        assert result.returncode == 2
        assert f"{img}: in use by another process (read-write)" in result.stderr
        assert sha(img) == before  # not truncated, not replaced, not deleted
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.vhd", "src.raw"]
        holder.write()  # the process using it keeps working
    with vhd.open(img) as disk:
        assert disk.pread(4096, 0) == b"\x5a" * 4096
        assert disk.pread(4096, 4096) == b"\x11" * 4096


def test_force_share_options(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    make(img)
    copy = tmp_path / "copy.vhd"
    with Holder(img, "r+"):
        for argv in (["info", str(img)], ["map", str(img)], ["check", str(img)]):
            result = cli(*argv)
            assert result.returncode == 2, argv
            assert "in use by another process (read-write)" in result.stderr
            assert "-U/--force-share" in result.stderr
            assert cli(argv[0], "-U", *argv[1:]).returncode == 0, argv
        assert cli("compare", str(img), str(img)).returncode == 2
        assert cli("compare", "--force-share", str(img), str(img)).returncode == 0
        assert cli("convert", str(img), str(copy)).returncode == 2
        assert not copy.exists()
        assert cli("convert", "-U", str(img), str(copy)).returncode == 0
        result = cli("check", "-U", "--repair", str(img))
        assert result.returncode == 2 and "not with --repair" in result.stderr
    assert cli("compare", str(img), str(copy)).returncode == 0


# -- QEMU against vhdkit, both directions ------------------------------------------------------


def test_qemu_nbd_writer_blocks_vhdkit(tmp_path: Path, short: Path) -> None:
    img = tmp_path / "d.vhd"
    make(img)
    before = sha(img)
    other = tmp_path / "o.vhd"
    make(other, fill=0x22)
    with QemuNbd(img, short / "s"):
        with pytest.raises(vhd.InUseError, match=r"\(read-write\)"):
            vhd.open(img)
        with pytest.raises(vhd.InUseError, match=r"\(read-write\)"):
            vhd.open(img, "r+")
        assert lock.holder(str(img)) == "read-write"
        result = cli("info", str(img))
        assert result.returncode == 2 and "in use by another process (read-write)" in result.stderr
        assert cli("info", "-U", str(img)).returncode == 0
        result = cli("convert", "--force", str(other), str(img))
        assert result.returncode == 2 and "in use" in result.stderr
        assert cli("commit", str(img)).returncode == 2
        assert sha(img) == before


def test_qemu_nbd_reader_allows_vhdkit_readers(tmp_path: Path, short: Path) -> None:
    img = tmp_path / "d.vhd"
    make(img)
    with QemuNbd(img, short / "s", read_only=True):
        assert lock.holder(str(img)) == "read-only"
        with vhd.open(img) as disk:
            assert disk.pread(1, 0) == b"\x11"
        with pytest.raises(vhd.InUseError, match=r"\(read-only\)"):
            vhd.open(img, "r+")


def qemu(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)


def test_vhdkit_writer_blocks_qemu(tmp_path: Path) -> None:
    qemu_io = need_tool("qemu-io")
    qemu_img = need_tool("qemu-img")
    img = tmp_path / "d.vhd"
    make(img)
    with vhd.open(img, "r+") as disk:
        result = qemu(qemu_io, "-f", "vpc", "-c", "write -P 0x77 0 4k", str(img))
        assert result.returncode != 0 and "lock" in result.stderr
        result = qemu(qemu_img, "info", "-f", "vpc", str(img))
        assert result.returncode != 0 and "lock" in result.stderr
        # qemu-img's own -U still inspects.
        assert qemu(qemu_img, "info", "-U", "-f", "vpc", str(img)).returncode == 0
        assert disk.pread(1, 0) == b"\x11"
    with vhd.open(img):
        # A vhdkit reader lets qemu read, not write.
        assert qemu(qemu_img, "info", "-f", "vpc", str(img)).returncode == 0
        result = qemu(qemu_io, "-f", "vpc", "-c", "write -P 0x77 0 4k", str(img))
        assert result.returncode != 0 and "lock" in result.stderr
    assert qemu(qemu_io, "-f", "vpc", "-c", "write -P 0x77 0 4k", str(img)).returncode == 0
    with vhd.open(img) as disk:
        assert disk.pread(4096, 0) == b"\x77" * 4096


# -- vhd serve --nbd ---------------------------------------------------------------------------


def test_served_image_refuses_a_second_writer_and_keeps_serving(
    tmp_path: Path, short: Path
) -> None:
    qemu_io = need_tool("qemu-io")
    img = tmp_path / "d.vhd"
    make(img)
    other = tmp_path / "o.vhd"
    make(other, fill=0x22)
    sock = short / "serve.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "vhdtools.cli", "serve", str(img), "--nbd", "--socket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().startswith("nbd+unix")
        before = sha(img)
        for argv in (
            ["convert", "--force", str(other), str(img)],
            ["create", "--force", str(img), "1M"],
            ["serve", str(img), "--nbd", "--socket", str(short / "second.sock")],
            ["commit", str(img)],
            ["resize", str(img), "8M"],
            ["compact", str(img)],
            ["set-parent", str(img), str(other)],
            ["check", "--repair", str(img)],
        ):
            result = cli(*argv)
            assert result.returncode == 2, argv
            assert "in use by another process (read-write)" in result.stderr, argv
        assert sha(img) == before
        url = f"nbd+unix:///?socket={sock}"
        result = qemu(qemu_io, "-f", "raw", "-c", "write -P 0x66 1M 64k", "-c", "flush", url)
        assert result.returncode == 0, result.stderr
        result = qemu(qemu_io, "-f", "raw", "-c", "read -P 0x66 1M 64k", url)
        assert result.returncode == 0 and "Pattern verification failed" not in result.stdout
    finally:
        server.terminate()
        server.wait(timeout=60)
    with vhd.open(img) as disk:
        assert disk.pread(64 * 1024, MiB) == b"\x66" * 64 * 1024
        assert disk.pread(MiB, 0) == b"\x11" * MiB


def test_convert_onto_its_own_parent_is_refused(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    make(base)
    vhd.create(child, parent=base).close()
    before = sha(base)
    result = cli("convert", "--force", str(child), str(base))
    assert result.returncode == 2
    assert f"{base} is the source or one of its parents" in result.stderr
    assert sha(base) == before
