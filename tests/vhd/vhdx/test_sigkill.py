"""Crash safety for real: a writer process is killed with SIGKILL at random moments during
allocating writes to a dynamic and to a differencing VHDX, many rounds.  After each kill, every
write acknowledged by a completed ``flush()`` reads back exactly and pages touched only by
unacknowledged writes hold their old content or one of those writes — read by vhdkit (an ``r+``
open replays what the kill left in the log) and, for the dynamic disk, by qemu (``qemu-img
check -r all`` on a copy: its own replay), with ``qemu-img check`` clean afterwards.  qemu
cannot open differencing VHDX; the parent is checked to be untouched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.images import sha
from tests.strategies import payload
from tests.vhd.harness import ROUNDS, killed_writers, verify
from tests.vhd.vhdx.helpers import MiB, assert_qemu_clean, current_header, qemu_check, qemu_raw
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import records as r

SIZE = 48 * MiB


def _kill_rounds(image: Path, tmp: Path, base: bytes, seed0: int, *, qemu: bool) -> None:
    acknowledged = 0
    live_logs = 0
    rounds = killed_writers("vhdx", image, tmp, seed0, 0.15, more=lambda: live_logs == 0)
    for seed, writes, flushed in rounds:
        acknowledged += flushed + 1
        live_logs += current_header(image.read_bytes())[1].log_guid != r.ZERO_GUID
        with open_vhdx(image) as disk:  # read-only: replays in memory
            in_memory = disk.pread(SIZE, 0)
        verify(base, in_memory, writes, flushed, seed)
        if qemu:
            copy = tmp / "qemu.vhdx"
            shutil.copy(image, copy)
            check = qemu_check(copy, "-r", "all")
            assert check.returncode == 0, check.stdout + check.stderr
            assert qemu_raw(copy, tmp / "q.raw") == in_memory
        with open_vhdx(image, "r+") as disk:  # replays whatever the kill left in the log
            ours = disk.pread(SIZE, 0)
        assert ours == in_memory
        if qemu:
            assert_qemu_clean(image)
        base = ours
    # The writer got work done, and kills really caught transactions with a live log.
    assert acknowledged > ROUNDS and live_logs > 0


@pytest.mark.timeout(600)
def test_sigkill_dynamic_vhdx(tmp_path: Path) -> None:
    image = tmp_path / "dyn.vhdx"
    create_vhdx(image, SIZE, block_size=MiB).close()
    _kill_rounds(image, tmp_path, bytes(SIZE), 11, qemu=True)


@pytest.mark.timeout(600)
def test_sigkill_differencing_vhdx(tmp_path: Path) -> None:
    parent = tmp_path / "base.vhdx"
    content = payload(SIZE // 2, 4) + bytes(SIZE // 2)
    with create_vhdx(parent, SIZE, block_size=MiB) as disk:
        disk.pwrite(content, 0)
    digest = sha(parent)
    child = tmp_path / "child.avhdx"
    create_vhdx(child, 0, type="differencing", parent=open_vhdx(parent), block_size=MiB).close()
    _kill_rounds(child, tmp_path, content, 12, qemu=False)
    assert sha(parent) == digest
