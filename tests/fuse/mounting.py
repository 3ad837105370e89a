"""Helpers for tests that really mount: run ``vhd mount`` in a subprocess, always unmount."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from vhdfuse import mount as vhdfuse_mount

from tests.conftest import IN_CI

MiB = 1024 * 1024


def need_fuse() -> None:
    """Skip without /dev/fuse or fusermount3 (fail under CI=true, where both must exist)."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        problems.append("fusermount3 is not installed")
    if problems:
        message = "cannot mount FUSE file systems here: " + ", ".join(problems)
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def vhd_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhdtools.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def is_mounted(path: Path) -> bool:
    """From /proc/self/mountinfo: also true for a dead server's mount, where stat() fails."""
    return vhdfuse_mount.is_mounted(str(path))


def force_unmount(path: Path) -> None:
    """Last resort for a test that failed half-way: lazy unmounts leave nothing behind."""
    for command in (["fusermount3", "-uz", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        if shutil.which(command[0]):
            subprocess.run(command, capture_output=True, timeout=30, check=False)


class Mounts:
    """Mount images during a test; the finalizer unmounts whatever is still mounted."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.active: list[Path] = []
        self.count = 0

    def mount(self, image: Path, *options: str, mountpoint: Path | None = None) -> Path:
        if mountpoint is None:
            self.count += 1
            mountpoint = self.tmp_path / f"mnt{self.count}"
        mountpoint.mkdir(exist_ok=True)
        log = self.tmp_path / f"mount{self.count}.log"
        # Registered first: even a mount that reports failure is checked at clean-up.
        self.active.append(mountpoint)
        result = vhd_cli("mount", str(image), str(mountpoint), "--log", str(log), *options)
        assert result.returncode == 0, result.stderr
        # `vhd mount` returns once the mount is live.
        assert os.path.ismount(mountpoint)
        return mountpoint

    def unmount(self, mountpoint: Path) -> None:
        result = vhd_cli("umount", str(mountpoint))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mountpoint)
        self.active.remove(mountpoint)

    def log(self, index: int = 1) -> str:
        path = self.tmp_path / f"mount{index}.log"
        return path.read_text() if path.exists() else ""

    def cleanup(self) -> None:
        for mountpoint in self.active:
            if is_mounted(mountpoint):
                vhd_cli("umount", str(mountpoint), "--timeout", "30")
            force_unmount(mountpoint)


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=300, check=False, **kwargs
    )  # type: ignore[call-overload]
