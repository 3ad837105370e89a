"""Real mounts: ``vhd mount`` in a subprocess, ordinary syscalls and real tools on the files."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from vhdfuse.mount import server_pid

import vhd
from tests.images import image, sha
from tests.interop.oracles import libvhdi_read
from tests.model import model_chain
from vhd.vhdx import create_vhdx

from .mounting import MiB, Mounts, is_mounted, run, vhd_cli, wait_until

KiB = 1024


def _pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


# The front end is format-neutral (a Disk): the tests that touch the data path run on VHD and on
# VHDX, named by the image's suffix.
FORMATS = ["vhd", "vhdx"]


def _image(path: Path, size: int = 64 * MiB, **kwargs: Any) -> Path:
    """A new dynamic image; a ``.vhdx`` path makes a VHDX (Hyper-V's 32 MiB blocks unless
    ``block_size`` says otherwise)."""
    return image(path, size, **kwargs).path


def _child(path: Path, parent: Path, **kwargs: object) -> Path:
    """A differencing child of ``parent``, in the format ``path``'s suffix names."""
    if path.suffix == ".vhdx":
        create_vhdx(path, 0, type="differencing", parent=vhd.open(str(parent)), **kwargs).close()  # type: ignore[arg-type]
    else:
        vhd.create(str(path), parent=str(parent), **kwargs).close()  # type: ignore[arg-type]
    return path


def _qemu_format(path: Path) -> str:
    return "vhdx" if path.suffix == ".vhdx" else "vpc"


def _read_image(path: Path, offset: int, length: int) -> bytes:
    with vhd.open(str(path)) as disk:
        return disk.pread(length, offset)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cache", ["direct", "kernel"])
def test_disk_file_reads_and_writes_the_image(
    tmp_path: Path, mounts: Mounts, cache: str, fmt: str
) -> None:
    image = _image(tmp_path / f"a.{fmt}", 48 * MiB + 512)
    data = _pattern(1, 3 * MiB)
    with vhd.open(str(image), "r+") as disk:
        disk.pwrite(data, 5 * MiB)
    mnt = mounts.mount(image, "--cache", cache)
    assert sorted(os.listdir(mnt)) == ["disk"]
    st = os.stat(mnt / "disk")
    assert st.st_size == 48 * MiB + 512 and st.st_blksize == MiB
    with open(mnt / "disk", "r+b", buffering=0) as f:
        assert os.pread(f.fileno(), len(data), 5 * MiB) == data
        assert os.pread(f.fileno(), 4096, 0) == bytes(4096)
        # Unaligned write across a block boundary, and a write at the very end.
        assert os.pwrite(f.fileno(), b"x" * 1000, 2 * MiB - 300) == 1000
        assert os.pwrite(f.fileno(), b"end", 48 * MiB + 509) == 3
        # Past the end: ENOSPC, as for a block device.
        with pytest.raises(OSError) as info:
            os.pwrite(f.fileno(), b"y", 48 * MiB + 512)
        assert info.value.errno == errno.ENOSPC
        assert os.pread(f.fileno(), 1000, 2 * MiB - 300) == b"x" * 1000
        # Truncation to another size is refused; the same size is fine.
        with pytest.raises(OSError) as info:
            os.ftruncate(f.fileno(), MiB)
        assert info.value.errno == errno.EINVAL
        os.ftruncate(f.fileno(), 48 * MiB + 512)
    mounts.unmount(mnt)
    assert _read_image(image, 2 * MiB - 300, 1000) == b"x" * 1000
    assert _read_image(image, 48 * MiB + 509, 3) == b"end"
    assert _read_image(image, 5 * MiB, len(data)) == data


@pytest.mark.parametrize("fmt", FORMATS)
def test_mkfs_ext4_e2fsck_and_debugfs(
    tmp_path: Path, mounts: Mounts, require_tool: Callable[[str], str], fmt: str
) -> None:
    mkfs, e2fsck, debugfs = (require_tool(t) for t in ("mkfs.ext4", "e2fsck", "debugfs"))
    qemu_img = require_tool("qemu-img")
    image = _image(tmp_path / f"ext4.{fmt}", 128 * MiB)
    mnt = mounts.mount(image)
    disk = str(mnt / "disk")
    # mke2fs discards (fallocate PUNCH_HOLE -> Disk.discard) before writing its tables.
    result = run([mkfs, "-q", "-F", "-E", "discard", disk])
    assert result.returncode == 0, result.stderr
    result = run([e2fsck, "-fn", disk])
    assert result.returncode == 0, result.stdout + result.stderr
    payload = tmp_path / "payload.bin"
    payload.write_bytes(_pattern(2, 700 * KiB + 123))
    result = run([debugfs, "-w", "-R", f"write {payload} payload.bin", disk])
    assert result.returncode == 0, result.stderr
    result = run([debugfs, "-w", "-R", "mkdir somedir", disk])
    assert result.returncode == 0, result.stderr
    mounts.unmount(mnt)
    raw = tmp_path / "ext4.raw"
    result = run(
        [qemu_img, "convert", "-f", _qemu_format(image), "-O", "raw", str(image), str(raw)]
    )
    assert result.returncode == 0, result.stderr
    if fmt == "vhdx":
        result = run([qemu_img, "check", "-f", "vhdx", str(image)])
        assert result.returncode == 0 and "No errors" in result.stdout, result.stdout
    assert run([e2fsck, "-fn", str(raw)]).returncode == 0
    out = tmp_path / "out.bin"
    result = run([debugfs, "-R", f"dump payload.bin {out}", str(raw)])
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == payload.read_bytes()


def test_partitions_appear_after_remount(
    tmp_path: Path, mounts: Mounts, require_tool: Callable[[str], str]
) -> None:
    sfdisk, mkfs_vfat = require_tool("sfdisk"), require_tool("mkfs.vfat")
    mcopy, mtype = require_tool("mcopy"), require_tool("mtype")
    image = _image(tmp_path / "parts.vhd", 96 * MiB)
    mnt = mounts.mount(image)
    script = "label: dos\nstart=2048, size=20480, type=83\nstart=24576, size=81920, type=c\n"
    result = run([sfdisk, "-q", str(mnt / "disk")], input=script)
    assert result.returncode == 0, result.stderr
    # The table is read at mount time: the running mount still shows only the disk.
    assert sorted(os.listdir(mnt)) == ["disk"]
    mounts.unmount(mnt)
    # Asking for the page cache must not make the aliases disk/pN incoherent.
    mnt = mounts.mount(image, "--cache", "kernel")
    assert sorted(os.listdir(mnt)) == ["disk", "p1", "p2"]
    assert os.stat(mnt / "p1").st_size == 20480 * 512
    assert os.stat(mnt / "p2").st_size == 81920 * 512
    result = run([mkfs_vfat, str(mnt / "p2")])
    assert result.returncode == 0, result.stderr
    note = tmp_path / "note.txt"
    note.write_text("hello from a partition\n")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    result = run([mcopy, "-i", str(mnt / "p2"), str(note), "::NOTE.TXT"], env=env)
    assert result.returncode == 0, result.stderr
    result = run([mtype, "-i", str(mnt / "p2"), "::NOTE.TXT"], env=env)
    assert result.stdout == note.read_text()
    # The partition file is a window: its first bytes are the disk's bytes at the partition.
    with open(mnt / "p2", "rb") as part, open(mnt / "disk", "rb") as whole:
        whole.seek(24576 * 512)
        assert part.read(64 * KiB) == whole.read(64 * KiB)
    # Writes through p1 land at p1's offset, stop at p1's end, and show at once through disk.
    with open(mnt / "disk", "rb", buffering=0) as whole:
        assert os.pread(whole.fileno(), 512, 2048 * 512) != b"P1" * 256
        with open(mnt / "p1", "r+b", buffering=0) as f:
            os.pwrite(f.fileno(), b"P1" * 256, 0)
            with pytest.raises(OSError) as info:
                os.pwrite(f.fileno(), b"z", 20480 * 512)
            assert info.value.errno == errno.ENOSPC
            assert os.pread(whole.fileno(), 512, 2048 * 512) == b"P1" * 256
    mounts.unmount(mnt)
    assert _read_image(image, 2048 * 512, 512) == b"P1" * 256


def _libvhdi_read(image: Path, parent: Path | None, offset: int, length: int) -> bytes:
    code = (
        "import sys, pyvhdi\n"
        "f = pyvhdi.file(); f.open(sys.argv[1])\n"
        "if sys.argv[2]:\n"
        "    p = pyvhdi.file(); p.open(sys.argv[2]); f.set_parent(p)\n"
        "sys.stdout.buffer.write(f.read_buffer_at_offset(int(sys.argv[4]), int(sys.argv[3])))\n"
    )
    result = subprocess.run(
        ["/usr/bin/python3", "-c", code, str(image), str(parent or ""), str(offset), str(length)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return result.stdout


@pytest.mark.parametrize("fmt", FORMATS)
def test_differencing_child_takes_the_writes(
    tmp_path: Path, mounts: Mounts, require_tool: Callable[[str], str], fmt: str
) -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.fail("/usr/bin/python3 with pyvhdi (python3-libvhdi) is needed")
    # VHDX: 1 MiB blocks, so the 32 MiB disk has many blocks, some partly written.
    sizes = {"block_size": MiB} if fmt == "vhdx" else {}
    parent = _image(tmp_path / f"parent.{fmt}", 32 * MiB, **sizes)
    base = bytearray(_pattern(3, 32 * MiB))
    with vhd.open(str(parent), "r+") as disk:
        disk.pwrite(base, 0)
    parent_hash = sha(parent)
    child = _child(tmp_path / f"child.{fmt}", parent, **sizes)
    mnt = mounts.mount(child)
    model = bytearray(base)
    rng = random.Random(4)
    with open(mnt / "disk", "r+b", buffering=0) as f:
        for _ in range(40):
            offset = rng.randrange(0, 32 * MiB // 4096 - 64) * 4096
            chunk = rng.randbytes(rng.randrange(1, 64) * 4096)
            os.pwrite(f.fileno(), chunk, offset)
            model[offset : offset + len(chunk)] = chunk
        os.fsync(f.fileno())
        assert os.pread(f.fileno(), 32 * MiB, 0) == model
    mounts.unmount(mnt)
    assert sha(parent) == parent_hash
    with vhd.open(str(child)) as disk:
        assert disk.pread(32 * MiB, 0) == model
    if fmt == "vhdx":
        # libvhdi reads differencing VHDX chains (qemu refuses them).
        libvhdi_read([parent, child], tmp_path / "libvhdi.raw")
        assert (tmp_path / "libvhdi.raw").read_bytes() == model
        return
    assert _libvhdi_read(child, parent, 0, 32 * MiB) == model
    # The spec model (an independent reader of the spec) agrees.
    chain = model_chain([parent, child])
    assert chain.read_all() == model


def test_parent_dir_finds_a_moved_parent(tmp_path: Path, mounts: Mounts) -> None:
    parent = _image(tmp_path / "base.vhd", 8 * MiB)
    with vhd.open(str(parent), "r+") as disk:
        disk.pwrite(b"from the parent", 4096)
    child = tmp_path / "child.vhd"
    vhd.create(str(child), parent=str(parent)).close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    parent.rename(elsewhere / "base.vhd")
    mnt = tmp_path / "m"
    mnt.mkdir()
    result = vhd_cli("mount", str(child), str(mnt))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert not is_mounted(mnt)
    mnt = mounts.mount(child, "--parent-dir", str(elsewhere))
    with open(mnt / "disk", "rb") as f:
        f.seek(4096)
        assert f.read(15) == b"from the parent"


def test_plain_fusermount_unmount_closes_cleanly(
    tmp_path: Path, mounts: Mounts, require_tool: Callable[[str], str]
) -> None:
    fusermount = require_tool("fusermount3")
    image = _image(tmp_path / "plain.vhd", 8 * MiB)
    mnt = mounts.mount(image)
    pid = server_pid(str(mnt))
    with open(mnt / "disk", "r+b", buffering=0) as f:
        os.pwrite(f.fileno(), b"plain", MiB)
    assert run([fusermount, "-u", str(mnt)]).returncode == 0
    mounts.active.remove(mnt)
    assert pid is not None
    # The server removes its pid file after destroy() has flushed and closed the image.
    wait_until(lambda: server_pid(str(mnt)) is None)
    assert _read_image(image, MiB, 5) == b"plain"


@pytest.mark.parametrize("cache", ["direct", "kernel"])
def test_read_only_mount_refuses_writes(tmp_path: Path, mounts: Mounts, cache: str) -> None:
    # Spaces and commas must survive libfuse's option parsing and /proc/self/mountinfo.
    image = _image(tmp_path / "r,o image.vhd", 16 * MiB)
    with vhd.open(str(image), "r+") as disk:
        disk.pwrite(b"keep", 0)
    before = sha(image)
    mnt = mounts.mount(image, "--read-only", "--cache", cache, mountpoint=tmp_path / "m, n")
    assert os.stat(mnt / "disk").st_mode & 0o222 == 0
    with pytest.raises(OSError) as info:
        os.open(mnt / "disk", os.O_RDWR)
    assert info.value.errno == errno.EROFS
    with open(mnt / "disk", "rb") as f:
        assert f.read(4) == b"keep"
    with pytest.raises(OSError) as info:
        os.utime(mnt / "disk")
    assert info.value.errno == errno.EROFS
    mounts.unmount(mnt)
    assert sha(image) == before


def _process_worker(args: tuple[str, int, int]) -> int:
    """Write then re-read a private stripe through its own descriptor (a separate process)."""
    path, index, rounds = args
    rng = random.Random(100 + index)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(rounds):
            offset = (index * 64 + rng.randrange(64)) * 4096
            chunk = bytes([index + 1]) * 4096
            os.pwrite(fd, chunk, offset)
            if os.pread(fd, 4096, offset) != chunk:
                return 1
    finally:
        os.close(fd)
    return 0


@pytest.mark.parametrize("cache", ["direct", "kernel"])
def test_concurrent_threads_and_processes(tmp_path: Path, mounts: Mounts, cache: str) -> None:
    image = _image(tmp_path / "conc.vhd", 32 * MiB, block_size=512 * KiB)
    mnt = mounts.mount(image, "--cache", cache)
    path = str(mnt / "disk")
    model = bytearray(32 * MiB)
    # Stripes 0-7 belong to processes, 8-15 to threads; readers scan everything meanwhile.
    for index in range(16):
        rng = random.Random(100 + index)
        for _ in range(150):
            offset = (index * 64 + rng.randrange(64)) * 4096
            model[offset : offset + 4096] = bytes([index + 1]) * 4096

    def reader() -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(0, 32 * MiB, 256 * KiB):
                block = os.pread(fd, 256 * KiB, offset)
                # Every 4 KiB piece is all zeros or one writer's byte (never torn).
                for piece in range(0, len(block), 4096):
                    chunk = block[piece : piece + 4096]
                    if chunk.count(chunk[0]) != 4096:
                        return 1
        finally:
            os.close(fd)
        return 0

    with ProcessPoolExecutor(4) as processes, ThreadPoolExecutor(12) as threads:
        proc_results = [processes.submit(_process_worker, (path, i, 150)) for i in range(8)]
        thread_results = [threads.submit(_process_worker, (path, i, 150)) for i in range(8, 16)] + [
            threads.submit(reader) for _ in range(4)
        ]
        assert [f.result(timeout=240) for f in proc_results + thread_results] == [0] * 20
    with open(path, "rb") as f:
        assert f.read() == model
    mounts.unmount(mnt)
    assert _read_image(image, 0, 32 * MiB) == model


@pytest.mark.parametrize("fmt", FORMATS)
def test_fallocate_punch_hole_discards(
    tmp_path: Path, mounts: Mounts, require_tool: Callable[[str], str], fmt: str
) -> None:
    fallocate = require_tool("fallocate")
    image = _image(tmp_path / f"punch.{fmt}", 16 * MiB, block_size=MiB)
    with vhd.open(str(image), "r+") as disk:
        disk.pwrite(b"\xaa" * 16 * MiB, 0)
    mnt = mounts.mount(image)
    result = run([fallocate, "-p", "-o", str(2 * MiB), "-l", str(3 * MiB), str(mnt / "disk")])
    assert result.returncode == 0, result.stderr
    with open(mnt / "disk", "rb") as f:
        f.seek(2 * MiB - 1)
        assert f.read(3 * MiB + 2) == b"\xaa" + bytes(3 * MiB) + b"\xaa"
    mounts.unmount(mnt)
    with vhd.open(str(image)) as disk:
        assert disk.pread(3 * MiB, 2 * MiB) == bytes(3 * MiB)
        holes = [e for e in disk.extents() if e.layer is None]
        assert sum(e.length for e in holes) == 3 * MiB  # whole blocks were given back
    if fmt == "vhdx":
        qemu_img = require_tool("qemu-img")
        result = run([qemu_img, "check", "-f", "vhdx", str(image)])
        assert result.returncode == 0 and "No errors" in result.stdout, result.stdout
        raw = tmp_path / "punch.raw"
        result = run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", str(image), str(raw)])
        assert result.returncode == 0, result.stderr
        assert raw.read_bytes() == b"\xaa" * 2 * MiB + bytes(3 * MiB) + b"\xaa" * 11 * MiB


@pytest.mark.parametrize("fmt", FORMATS)
def test_punch_hole_on_a_differencing_disk_reads_zeros(
    tmp_path: Path, mounts: Mounts, require_tool: Callable[[str], str], fmt: str
) -> None:
    """Punch-hole promises zeros: on a child it must hide the parent (Disk.write_zeroes, not the
    TRIM-like Disk.discard that lets the parent show through)."""
    fallocate = require_tool("fallocate")
    parent = _image(tmp_path / f"parent.{fmt}", 8 * MiB, block_size=MiB)
    with vhd.open(str(parent), "r+") as disk:
        disk.pwrite(b"\xaa" * 8 * MiB, 0)
    child = _child(tmp_path / f"child.{fmt}", parent, block_size=MiB)
    mnt = mounts.mount(child)
    result = run([fallocate, "-p", "-o", str(MiB + 512), "-l", str(MiB), str(mnt / "disk")])
    assert result.returncode == 0, result.stderr
    with open(mnt / "disk", "rb") as f:
        f.seek(MiB)
        assert f.read(2 * MiB) == b"\xaa" * 512 + bytes(MiB) + b"\xaa" * (MiB - 512)
    mounts.unmount(mnt)
    want = b"\xaa" * (MiB + 512) + bytes(MiB) + b"\xaa" * (6 * MiB - 512)
    if fmt == "vhdx":
        libvhdi_read([parent, child], tmp_path / "libvhdi.raw")
        assert (tmp_path / "libvhdi.raw").read_bytes() == want
    else:
        assert model_chain([parent, child]).read_all() == want


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cache", ["direct", "kernel"])
def test_du_seek_hole_and_sparse_copies(
    tmp_path: Path, mounts: Mounts, require_tool: Callable[[str], str], cache: str, fmt: str
) -> None:
    """Issue 9 item 13: du showed 256M for an empty disk, and SEEK_HOLE found no holes."""
    du, cp = require_tool("du"), require_tool("cp")
    parent = _image(tmp_path / f"base.{fmt}", 256 * MiB, block_size=MiB)
    with vhd.open(str(parent), "r+") as disk:
        disk.pwrite(_pattern(1, MiB), 0)  # the parent holds [0, 1 MiB)
    image = _child(tmp_path / f"child.{fmt}", parent, block_size=MiB)
    mnt = mounts.mount(image, "--cache", cache)
    disk_file = mnt / "disk"

    def du_kib() -> int:
        return int(run([du, "-k", str(disk_file)]).stdout.split()[0])

    assert du_kib() == 1024  # the parent's MiB, not 256M
    with open(disk_file, "r+b", buffering=0) as f:
        os.pwrite(f.fileno(), _pattern(2, 3 * MiB), 100 * MiB)
    assert du_kib() == 4 * 1024  # the new data shows without a remount
    fd = os.open(disk_file, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB
        assert os.lseek(fd, MiB, os.SEEK_DATA) == 100 * MiB
        assert os.lseek(fd, 100 * MiB, os.SEEK_HOLE) == 103 * MiB
        with pytest.raises(OSError) as info:
            os.lseek(fd, 103 * MiB, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    copy = tmp_path / "copy.raw"
    assert run([cp, "--sparse=always", str(disk_file), str(copy)]).returncode == 0
    assert copy.stat().st_size == 256 * MiB
    assert copy.stat().st_blocks * 512 <= 8 * MiB  # the holes stayed holes
    with open(copy, "rb") as f:
        assert f.read(MiB) == _pattern(1, MiB)
        f.seek(100 * MiB)
        assert f.read(3 * MiB) == _pattern(2, 3 * MiB)
    mounts.unmount(mnt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigterm_flushes_and_closes(tmp_path: Path, mounts: Mounts, fmt: str) -> None:
    image = _image(tmp_path / f"term.{fmt}", 16 * MiB)
    mnt = mounts.mount(image)
    pid = server_pid(str(mnt))
    assert pid is not None
    with open(mnt / "disk", "r+b", buffering=0) as f:
        f.seek(3 * MiB)
        f.write(b"written before SIGTERM")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not is_mounted(mnt))
    wait_until(lambda: server_pid(str(mnt)) is None)
    mounts.active.remove(mnt)
    # Clean: opens strictly (checksums, footer copies) and the data is there.
    assert _read_image(image, 3 * MiB, 22) == b"written before SIGTERM"
    assert "stopping (SIGTERM)" in mounts.log() and "failed" not in mounts.log()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_foreground_mount_stops_cleanly_on_a_signal(
    tmp_path: Path, mounts: Mounts, stop: signal.Signals
) -> None:
    """Issue 9 item 12: Ctrl-C or `systemctl stop` is a clean stop: exit 0, image closed clean
    (it used to exit 2 with "libfuse could not mount (status 8)")."""
    image = _image(tmp_path / "fg.vhd", 8 * MiB)
    mnt = tmp_path / "fg"
    mnt.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "vhdtools.cli", "mount", "--foreground", str(image), str(mnt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    mounts.active.append(mnt)
    try:
        wait_until(lambda: os.path.ismount(mnt) or process.poll() is not None)
        assert process.poll() is None
        with open(mnt / "disk", "r+b", buffering=0) as f:
            f.seek(5 * MiB)
            f.write(b"before the signal")
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert "error" not in stderr
    finally:
        if process.poll() is None:
            process.kill()
    assert not is_mounted(mnt)
    mounts.active.remove(mnt)
    assert _read_image(image, 5 * MiB, 17) == b"before the signal"
    result = vhd_cli("check", str(image))
    assert result.returncode == 0 and "clean" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("fmt", FORMATS)
def test_crash_after_fsync_keeps_flushed_writes(tmp_path: Path, mounts: Mounts, fmt: str) -> None:
    # VHDX: 1 MiB blocks, so that the unflushed write allocates a block of its own.
    image = _image(
        tmp_path / f"crash.{fmt}", 16 * MiB, **({"block_size": MiB} if fmt == "vhdx" else {})
    )
    mnt = mounts.mount(image)
    pid = server_pid(str(mnt))
    assert pid is not None
    payload = _pattern(5, 3 * MiB)
    fd = os.open(mnt / "disk", os.O_RDWR)
    try:
        os.pwrite(fd, payload, 5 * MiB + 512)
        os.fsync(fd)
        # Not flushed: allocates a block whose BAT entry may never reach the file.
        os.pwrite(fd, b"lost?" * 1000, 12 * MiB)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: server_pid(str(mnt)) is None)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # ENOTCONN: the server is gone
    # The kernel keeps a dead FUSE mount until it is unmounted.
    assert vhd_cli("umount", str(mnt)).returncode == 0
    mounts.active.remove(mnt)
    with vhd.open(str(image)) as disk:
        assert disk.pread(len(payload), 5 * MiB + 512) == payload
    # `vhd check --repair` mends what the crash left (space of an unfinished allocation)
    # without losing the flushed write.
    assert vhd_cli("check", "--repair", str(image)).returncode == 0
    result = vhd_cli("check", str(image))
    assert result.returncode == 0, result.stdout + result.stderr
    with vhd.open(str(image)) as disk:
        assert disk.pread(len(payload), 5 * MiB + 512) == payload


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_block_reads_as_eio(tmp_path: Path, mounts: Mounts, fmt: str) -> None:
    image = _image(tmp_path / f"bad.{fmt}", 8 * MiB, block_size=MiB)
    with vhd.open(str(image), "r+") as disk:
        disk.pwrite(b"\x11" * 8 * MiB, 0)
        # Block 4 is stored last: the file is cut into it below.
        disk.discard(4 * MiB, MiB)
        disk.pwrite(b"\x11" * MiB, 4 * MiB)
    mnt = mounts.mount(image, "--read-only")
    with open(mnt / "disk", "rb", buffering=0) as f:
        assert os.pread(f.fileno(), 4096, 0) == b"\x11" * 4096
        # A table that points past the end of the file is refused at open; a file cut
        # under a running mount is the damage that can still meet a read.
        os.truncate(image, os.path.getsize(image) - MiB)
        with pytest.raises(OSError) as info:
            os.pread(f.fileno(), 4096, 5 * MiB - 4096)
        assert info.value.errno == errno.EIO
        assert os.pread(f.fileno(), 4096, 3 * MiB) == b"\x11" * 4096
    mounts.unmount(mnt)
    log = mounts.log(1)
    assert "EIO" in log and "Traceback" not in log


def test_cli_errors_are_one_line(tmp_path: Path, mounts: Mounts) -> None:
    mnt = tmp_path / "empty"
    mnt.mkdir()
    result = vhd_cli("mount", str(tmp_path / "missing.vhd"), str(mnt))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    not_vhd = tmp_path / "junk.vhd"
    not_vhd.write_bytes(b"\0" * 4096)
    result = vhd_cli("mount", str(not_vhd), str(mnt))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert not is_mounted(mnt)
    result = vhd_cli("umount", str(mnt))
    assert result.returncode == 2 and "not mounted" in result.stderr
    # A second writable mount of the same image is refused (the image is locked).
    image = _image(tmp_path / "once.vhd", 8 * MiB)
    mounts.mount(image)
    result = vhd_cli("mount", str(image), str(mnt))
    assert result.returncode == 2, result.stderr
    assert not is_mounted(mnt)


def test_foreground_mount_serves_until_unmounted(tmp_path: Path, mounts: Mounts) -> None:
    image = _image(tmp_path / "fg.vhd", 8 * MiB)
    mnt = tmp_path / "fg"
    mnt.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "vhdtools.cli", "mount", "--foreground", str(image), str(mnt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    mounts.active.append(mnt)
    try:
        wait_until(lambda: os.path.ismount(mnt) or process.poll() is not None)
        assert process.poll() is None
        (mnt / "disk").write_bytes(b"fg" * (4 * MiB))
        assert vhd_cli("umount", str(mnt)).returncode == 0
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    mounts.active.remove(mnt)
    assert _read_image(image, 0, 8 * MiB) == b"fg" * (4 * MiB)


# Another FUSE server, even one with our subtype: only the fsname ``vhd:IMAGE`` marks ours.
_OTHER_FUSE_SERVER = """
import sys
from vhdfuse import adapter
from vhdfuse.fs import DiskFilesystem
from tests.fakedisk import FakeDisk
fs = DiskFilesystem(FakeDisk(1 << 20))
adapter.run(fs, sys.argv[1], fsname="somebody-else")
"""


def test_umount_refuses_a_foreign_fuse_mount(tmp_path: Path, mounts: Mounts) -> None:
    """Issue 9 item 7: `vhd umount` leaves file systems that `vhd mount` did not make alone."""
    mnt = tmp_path / "other"
    mnt.mkdir()
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(
        [sys.executable, "-c", _OTHER_FUSE_SERVER, str(mnt)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mounts.active.append(mnt)
    try:
        wait_until(lambda: is_mounted(mnt) or server.poll() is not None)
        assert server.poll() is None, "the other FUSE server did not start"
        result = vhd_cli("umount", str(mnt))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "not a 'vhd mount'" in result.stderr
        assert is_mounted(mnt) and server.poll() is None
        assert os.path.getsize(mnt / "disk") == MiB
    finally:
        run(["fusermount3", "-u", str(mnt)])
        server.wait(timeout=60)
        mounts.active.remove(mnt)


def test_umount_refuses_a_tmpfs(tmp_path: Path, mounts: Mounts) -> None:
    """The case of the report: `vhd umount` took down a tmpfs and the files on it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    result = run(["mount", "-t", "tmpfs", "-o", "size=1m", "vhdkit-test", str(mnt)])
    assert result.returncode == 0, result.stderr
    try:
        (mnt / "precious").write_text("keep me")
        result = vhd_cli("umount", str(mnt))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert is_mounted(mnt)
        assert (mnt / "precious").read_text() == "keep me"
    finally:
        run(["umount", str(mnt)])
    # Our own mounts still unmount, and so does one whose server was killed.
    image = _image(tmp_path / "ours.vhd", 8 * MiB)
    mine = mounts.mount(image)
    pid = server_pid(str(mine))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: server_pid(str(mine)) is None)
    mounts.unmount(mine)
