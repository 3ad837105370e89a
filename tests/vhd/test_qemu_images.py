"""Images made and written by qemu-img/qemu-io (creator 'qemu', packed blocks, C*H*S sizes) go
through check, resize and compact, and qemu-io reads back what it wrote."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import need_tool
from tests.vhd.helpers import qemu_info, qemu_raw, read_image, run_cli
from vhd.check import check


def qemu_io(path: Path, *commands: str) -> str:
    tool = need_tool("qemu-io")
    args = [tool, "-f", "vpc"]
    for c in commands:
        args += ["-c", c]
    res = subprocess.run([*args, str(path)], check=True, capture_output=True, text=True, timeout=60)
    assert "Pattern verification failed" not in res.stdout, res.stdout
    return res.stdout


def test_qemu_dynamic_through_commands(tmp_path: Path) -> None:
    qemu = need_tool("qemu-img")
    path = tmp_path / "q.vhd"
    subprocess.run([qemu, "create", "-f", "vpc", str(path), "10M"], check=True, capture_output=True)
    qemu_io(path, "write -P 0x41 0 64k", "write -P 0x42 5M 8k", "write -P 0x43 9M 4k")
    report = check(path, deep=True)
    assert report.clean, [f.message for f in report.problems]
    old = read_image(path)
    rc, out = run_cli("resize", str(path), "+6M")
    assert rc == 0, out
    new_size = len(old) + 6 * 1024 * 1024
    assert qemu_info(path)["virtual-size"] == new_size
    assert check(path, deep=True).clean
    qemu_io(path, "write -P 0 5M 8k")  # the block now holds only zeros
    rc, out = run_cli("compact", str(path))
    assert rc == 0 and "1 blocks freed" in out, out
    assert check(path, deep=True).clean
    qemu_io(path, "read -P 0x41 0 64k", "read -P 0 5M 8k", "read -P 0x43 9M 4k")
    assert qemu_raw(path, tmp_path / "q.raw") == read_image(path)


def test_qemu_fixed_through_commands(tmp_path: Path) -> None:
    qemu = need_tool("qemu-img")
    path = tmp_path / "f.vhd"
    subprocess.run(
        [qemu, "create", "-f", "vpc", "-o", "subformat=fixed", str(path), "10M"],
        check=True,
        capture_output=True,
    )
    qemu_io(path, "write -P 0x51 1M 64k")
    assert check(path, deep=True).clean
    rc, out = run_cli("resize", str(path), "32M")
    assert rc == 0, out
    assert qemu_info(path)["virtual-size"] == 32 * 1024 * 1024
    qemu_io(path, "read -P 0x51 1M 64k", "write -P 0x52 31M 64k", "read -P 0x52 31M 64k")
    assert check(path, deep=True).clean
