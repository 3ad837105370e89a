"""vhd commit: the parent (fixed, dynamic, differencing, Hyper-V layout) ends up with the chain's
content; qemu-img (fixed/dynamic parents) and libvhdi read it; --keep leaves a clean chain; an
interrupted commit (SIGKILL) leaves the chain readable as before, and a rerun finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhd
from tests.images import MiB, build_hyperv, make_chain, random_writes
from tests.vhd.helpers import libvhdi_read, qemu_raw, read_image, run_cli
from vhd.check import check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("ptype", ["fixed", "dynamic"])
def test_commit_into_fixed_and_dynamic(tmp_path: Path, ptype: str, require_tool: object) -> None:
    size = 8 * MiB
    parent, child = tmp_path / "parent.vhd", tmp_path / "child.vhd"
    model = bytearray(size)
    with vhd.create(parent, size, type=ptype) as disk:
        random_writes(disk, model, 10, 1)
    with vhd.create(child, parent=parent) as disk:
        random_writes(disk, model, 30, 2, align=512, max_len=8192)
        disk.write_zeroes(MiB, 4096)  # zeros that must hide the parent's data
        model[MiB : MiB + 4096] = bytes(4096)
    assert read_image(child) == bytes(model)
    rc, out = run_cli("commit", str(child))
    assert rc == 0, out
    assert not child.exists()
    assert read_image(parent) == bytes(model)
    assert check(parent, deep=True).clean
    assert qemu_raw(parent, tmp_path / "q.raw") == bytes(model)
    assert libvhdi_read([parent], size) == bytes(model)


def test_commit_keep_and_libvhdi(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path)
    rc, out = run_cli("commit", "--keep", "--progress", str(child))
    assert rc == 0, out
    assert "commit [" in out and "100.0%" in out  # the progress bar, on stderr
    assert read_image(parent) == model
    assert read_image(child) == model
    assert check(child).clean  # the parent timestamp was brought up to date
    aligned = len(model)
    assert libvhdi_read([parent], aligned) == model


def test_commit_into_differencing_parent(tmp_path: Path) -> None:
    """Three layers: the middle one receives the top's data; libvhdi reads the new chain."""
    size = 8 * MiB
    base, mid, top = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "top.vhd"
    model = bytearray(size)
    with vhd.create(base, size) as disk:
        random_writes(disk, model, 10, 3)
    with vhd.create(mid, parent=base) as disk:
        random_writes(disk, model, 10, 4)
    base_content = read_image(base)
    with vhd.create(top, parent=mid) as disk:
        random_writes(disk, model, 10, 5)
    rc, out = run_cli("commit", str(top))
    assert rc == 0, out
    assert read_image(mid) == bytes(model)
    assert read_image(base) == base_content
    assert libvhdi_read([mid, base], size) == bytes(model)


def test_commit_hyperv_layout(tmp_path: Path) -> None:
    size = 8 * MiB
    content = bytearray(size)
    for mb in range(0, 8, 2):
        content[mb * MiB : mb * MiB + 12288] = bytes([mb + 1]) * 12288
    pid = build_hyperv(tmp_path / "hvp.vhd", size=size, block_size=2 * MiB, content=bytes(content))
    child_content = bytearray(content)
    for mb in (1, 2, 5):
        child_content[mb * MiB + 4096 : mb * MiB + 16384] = bytes([0xA0 + mb]) * 12288
    build_hyperv(
        tmp_path / "hvc.vhd",
        size=size,
        block_size=2 * MiB,
        content=bytes(child_content),
        present={
            s
            for mb in (1, 2, 5)
            for s in range((mb * MiB + 4096) // 512, (mb * MiB + 16384) // 512)
        },
        parent=("hvp.vhd", pid),
        seed=4,
    )
    assert read_image(tmp_path / "hvc.vhd") == bytes(child_content)
    rc, out = run_cli("commit", str(tmp_path / "hvc.vhd"))
    assert rc == 0, out
    assert read_image(tmp_path / "hvp.vhd") == bytes(child_content)
    assert check(tmp_path / "hvp.vhd", deep=True).clean
    assert libvhdi_read([tmp_path / "hvp.vhd"], size) == bytes(child_content)


def test_commit_refuses_non_child(tmp_path: Path) -> None:
    vhd.create(tmp_path / "d.vhd", MiB).close()
    rc, out = run_cli("commit", str(tmp_path / "d.vhd"))
    assert rc == 2 and "only a differencing disk" in out


def test_interrupted_commit_then_rerun(tmp_path: Path) -> None:
    size = 64 * MiB
    parent, child = tmp_path / "parent.vhd", tmp_path / "child.vhd"
    model = bytearray(size)
    with vhd.create(parent, size, block_size=64 * 1024) as disk:
        random_writes(disk, model, 50, 6)
    with vhd.create(child, parent=parent, block_size=64 * 1024) as disk:
        for i in range(0, size, 128 * 1024):
            data = bytes([i // 65536 % 250 + 1]) * 65536
            disk.pwrite(data, i)
            model[i : i + 65536] = data
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    interrupted = 0
    for delay in (0.15, 0.3, 0.45):
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhdtools.cli", "commit", "--keep", "-q", str(child)],
            cwd=ROOT,
            env=env,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=30)
        interrupted += rc != 0
        # The chain reads exactly as before, the parent repairs clean.
        rc2, out = run_cli("check", "--repair", str(parent))
        assert rc2 == 0, out
        assert read_image(child) == bytes(model)
    assert interrupted
    rc, out = run_cli("commit", str(child))
    assert rc == 0, out
    assert read_image(parent) == bytes(model)
    assert check(parent, deep=True).clean
