"""``vhd convert IMAGE /dev/X``: raw output to a block device (a loop device over a file here): no
truncate, a size check, every range without source data zeroed (the device's old bytes never
show through), bytes past the disk untouched.  ``vhd create --type fixed --force /dev/X``: a
fixed VHD in place, its footer in the device's last sector.  Needs root and loop devices (``losetup``); under
CI=true their absence fails the run instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vhd
from tests.conftest import IN_CI, need_tool
from tests.interop.oracles import qemu_info, qemu_raw
from tests.interop.test_qemu import qemu_io
from tests.strategies import payload

VHD_CLI = str(Path(sys.executable).with_name("vhd"))
MiB = 1 << 20


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    losetup = need_tool("losetup")
    attached: list[str] = []

    def attach(size: int) -> str:
        backing = tmp_path / f"backing{len(attached)}.img"
        backing.write_bytes(b"\xa5" * size)  # old content that must not show through
        proc = subprocess.run(
            [losetup, "-f", "--show", str(backing)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            message = f"cannot attach a loop device (root needed): {proc.stderr.strip()}"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        device = proc.stdout.strip()
        attached.append(device)
        return device

    yield attach
    for device in attached:
        subprocess.run([losetup, "-d", device], timeout=60, check=False)


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [VHD_CLI, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_convert_to_a_block_device(tmp_path: Path, loop_device: Callable[[int], str]) -> None:
    size = 8 * MiB
    image = tmp_path / "d.vhd"
    with vhd.create(image, size, block_size=512 * 1024) as disk:
        disk.pwrite(payload(5000, 1), 1000)  # partial block: zeros around it inside the block
        disk.pwrite(bytes(64 * 1024), 2 * MiB)  # an allocated block of zeros
        disk.pwrite(payload(512, 2), size - 512)
    expected = qemu_raw(image, tmp_path / "ref.raw")
    device = loop_device(size + MiB)

    refused = cli("convert", image, device)  # a device is overwritten only with --force
    assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr
    done = cli("convert", image, device, "--force")
    assert done.returncode == 0, done.stderr
    fd = os.open(device, os.O_RDONLY)
    try:
        got = os.pread(fd, size + MiB, 0)
    finally:
        os.close(fd)
    assert got[:size] == expected
    assert got[size:] == b"\xa5" * MiB  # past the disk: untouched


def test_block_device_too_small_or_vhd(tmp_path: Path, loop_device: Callable[[int], str]) -> None:
    image = tmp_path / "d.vhd"
    vhd.create(image, 4 * MiB).close()
    device = loop_device(2 * MiB)
    small = cli("convert", image, device, "--force")
    assert small.returncode == 2 and "less than" in small.stderr, small.stderr
    as_vhd = cli("convert", image, device, "--force", "--to", "vhd")
    assert as_vhd.returncode == 2 and "block device" in as_vhd.stderr, as_vhd.stderr
    fd = os.open(device, os.O_RDONLY)
    try:
        assert os.pread(fd, 2 * MiB, 0) == b"\xa5" * (2 * MiB)  # nothing written
    finally:
        os.close(fd)


def test_create_a_fixed_vhd_on_a_block_device(
    tmp_path: Path, loop_device: Callable[[int], str]
) -> None:
    size = 8 * MiB
    device = loop_device(size + MiB)
    refused = cli("create", "--type", "fixed", device, "8M")  # overwritten only with --force
    assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr
    dynamic = cli("create", "--force", device, "8M")  # would grow past the device's end
    assert dynamic.returncode == 2 and "--type fixed" in dynamic.stderr, dynamic.stderr
    small = loop_device(size)  # no room for the footer
    too_small = cli("create", "--force", "--type", "fixed", small, "8M")
    assert too_small.returncode == 2 and "less than" in too_small.stderr, too_small.stderr
    for dev, length in ((device, size + MiB), (small, size)):
        fd = os.open(dev, os.O_RDONLY)
        try:
            assert os.pread(fd, length, 0) == b"\xa5" * length  # nothing written yet
        finally:
            os.close(fd)

    done = cli("create", "--force", "--type", "fixed", device, "8M")
    assert done.returncode == 0 and not done.stderr, done.stderr
    # qemu reads it as a fixed VHD of the size asked for, all zeros (the old bytes are gone).
    assert qemu_info(Path(device))["virtual-size"] == size
    assert qemu_raw(Path(device), tmp_path / "read.raw") == bytes(size)
    fd = os.open(device, os.O_RDONLY)
    try:
        assert os.pread(fd, MiB - 512, size) == b"\xa5" * (MiB - 512)  # the rest: untouched
    finally:
        os.close(fd)
    checked = cli("check", device)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Written by qemu, read by vhdkit, and the other way round.
    qemu_io(Path(device), "write -P 0x5a 4096 8192")
    with vhd.open(device, "r+") as disk:
        assert disk.pread(8192, 4096) == b"\x5a" * 8192
        disk.pwrite(payload(4096, 3), size - 4096)
    assert qemu_raw(Path(device), tmp_path / "again.raw")[size - 4096 :] == payload(4096, 3)
