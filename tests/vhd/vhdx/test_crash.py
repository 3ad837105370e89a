"""Crash ordering for VHDX: replay every prefix of the writes the library issues (a crash after
each one) onto the image as it was, and open each result.

Every prefix (and every reordering of the writes between two barriers, one write at a time) must open (with our replay, read-only and so in memory) and read, sector by sector,
either the old or the new content; once the last flush has returned, the new content in full.
qemu (``qemu-img check -r all`` on a copy, its own log replay) must open every prefix too and
read what we read.  Writes reach the disk in the order issued between the ``fdatasync`` barriers.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import vhd.fileio
import vhd.vhdx.disk
from tests.strategies import payload
from tests.vhd.harness import Op, apply_ops, assert_old_or_new, changed, record_io
from tests.vhd.vhdx.helpers import MiB, qemu_check, qemu_raw
from vhd.vhdx import VHDXDisk, create_vhdx, open_vhdx

SIZE = 8 * MiB


def _record(monkeypatch: pytest.MonkeyPatch, log: list[Op]) -> None:
    # The names vhd.vhdx.disk imported from vhd.fileio are the ones its code calls; the log
    # and the BAT are synced with fsync, and the file is grown with ftruncate.
    record_io(
        monkeypatch,
        log,
        {vhd.vhdx.disk: ("write_all", "punch_hole")},
        fsync=True,
        ftruncate=True,
    )


def _crash_points(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image: Path,
    work: Callable[[VHDXDisk], list[tuple[int, bytes]]],
    *,
    qemu: bool,
) -> None:
    with open_vhdx(image) as disk:
        old = disk.pread(SIZE, 0)
    before = image.read_bytes()
    log: list[Op] = []
    _record(monkeypatch, log)
    with open_vhdx(image, "r+") as disk:
        changes = work(disk)
    monkeypatch.undo()
    new = changed(old, changes)
    syncs = [i for i, op in enumerate(log) if op[0] == "sync"]
    flushed = syncs[-1]
    copy = tmp_path / "crash.vhdx"
    # Every prefix, and, since the disk may reorder writes between two barriers, every state
    # with all writes before the last barrier plus any one write issued after it.
    states: list[tuple[int, list[Op]]] = [(k, log[:k]) for k in range(len(log) + 1)]
    for k, op in enumerate(log):
        barrier = max((i for i in syncs if i < k), default=-1)
        if op[0] != "sync" and k > barrier + 1:
            states.append((barrier + 1, [*log[: barrier + 1], op]))
    for k, ops in states:
        copy.write_bytes(apply_ops(before, ops))
        with open_vhdx(copy) as disk:
            seen = disk.pread(SIZE, 0)
        assert_old_or_new(seen, old, new, k, len(log))
        if k > flushed:
            assert seen == bytes(new), f"crash after write {k}: flushed data is missing"
        if qemu:
            q = tmp_path / "q.vhdx"
            shutil.copy(copy, q)
            proc = qemu_check(q, "-r", "all")  # replays the log when one is live
            assert proc.returncode == 0, f"crash after write {k}: {proc.stdout}{proc.stderr}"
            assert qemu_raw(q, tmp_path / "q.raw") == seen, f"crash after write {k}"
    assert syncs


def _work(disk: VHDXDisk) -> list[tuple[int, bytes]]:
    changes = [
        (5 * MiB + 1000, payload(3000, 1)),  # a new block
        (100, payload(MiB, 2)),  # an old and a new block
        (7 * MiB - 512, payload(1024, 3)),  # two new blocks
    ]
    for offset, data in changes:
        disk.pwrite(data, offset)
    disk.flush()
    disk.pwrite(payload(512, 4), 3 * MiB)
    changes.append((3 * MiB, payload(512, 4)))
    disk.discard(2 * MiB, MiB)  # frees a whole block
    changes.append((2 * MiB, bytes(MiB)))
    return changes


def test_dynamic_crash_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "d.vhdx"
    with create_vhdx(image, SIZE, block_size=MiB) as disk:
        disk.pwrite(payload(3 * MiB, 9), 0)
    _crash_points(tmp_path, monkeypatch, image, _work, qemu=True)


def test_differencing_crash_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base.vhdx"
    with create_vhdx(base, SIZE, block_size=MiB) as disk:
        disk.pwrite(payload(SIZE, 8), 0)
    child = tmp_path / "child.vhdx"
    with create_vhdx(child, 0, type="differencing", parent=open_vhdx(base), block_size=MiB) as disk:
        disk.pwrite(payload(3 * MiB, 7), 0)
    # The crash copies sit beside the parent, so relative_path finds it (qemu cannot read these).
    _crash_points(tmp_path, monkeypatch, child, _work, qemu=False)
