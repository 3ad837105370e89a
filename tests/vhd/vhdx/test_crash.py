"""Crash ordering for VHDX: replay every prefix of the writes the library issues (a crash after
each one) onto the image as it was, and open each result.

Every prefix (and every reordering of the writes between two barriers, one write at a time) must open (with our replay, read-only and so in memory) and read, sector by sector,
either the old or the new content; once the last flush has returned, the new content in full.
qemu (``qemu-img check -r all`` on a copy, its own log replay) must open every prefix too and
read what we read.  Writes reach the disk in the order issued between the ``fdatasync`` barriers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vhd.fileio
import vhd.vhdx.disk
from tests.strategies import payload
from tests.vhd.vhdx.helpers import MiB, qemu_check, qemu_raw
from vhd.vhdx import VHDXDisk, create_vhdx, open_vhdx

SIZE = 8 * MiB

Op = tuple[str, int, bytes | int]


def _record(monkeypatch: pytest.MonkeyPatch, log: list[Op]) -> None:
    mod = vhd.vhdx.disk
    real_write, real_punch = vhd.fileio.write_all, vhd.fileio.punch_hole
    real_sync, real_fsync, real_trunc = os.fdatasync, os.fsync, os.ftruncate

    def write_all(fd: int, data: Any, offset: int) -> None:
        log.append(("write", offset, bytes(data)))
        real_write(fd, data, offset)

    def punch_hole(fd: int, offset: int, length: int) -> None:
        log.append(("zero", offset, length))
        real_punch(fd, offset, length)

    def fdatasync(fd: int) -> None:
        log.append(("sync", 0, 0))
        real_sync(fd)

    def fsync(fd: int) -> None:
        log.append(("sync", 0, 0))
        real_fsync(fd)

    def ftruncate(fd: int, length: int) -> None:
        log.append(("size", length, 0))
        real_trunc(fd, length)

    monkeypatch.setattr(mod, "write_all", write_all)
    monkeypatch.setattr(mod, "punch_hole", punch_hole)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "ftruncate", ftruncate)


def _apply(image: bytes, ops: list[Op]) -> bytes:
    out = bytearray(image)
    for kind, offset, value in ops:
        if kind == "write":
            assert isinstance(value, bytes)
            if len(out) < offset + len(value):
                out.extend(bytes(offset + len(value) - len(out)))
            out[offset : offset + len(value)] = value
        elif kind == "zero":
            assert isinstance(value, int)
            end = min(len(out), offset + value)
            out[offset:end] = bytes(max(0, end - offset))
        elif kind == "size":
            del out[offset:]
            out.extend(bytes(offset - len(out)))
    return bytes(out)


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
    new = bytearray(old)
    for offset, data in changes:
        new[offset : offset + len(data)] = data
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
        copy.write_bytes(_apply(before, ops))
        with open_vhdx(copy) as disk:
            seen = disk.pread(SIZE, 0)
        for s in range(SIZE // 512):
            sector = seen[s * 512 : (s + 1) * 512]
            assert sector in (old[s * 512 : (s + 1) * 512], new[s * 512 : (s + 1) * 512]), (
                f"crash after write {k}/{len(log)}: sector {s} is neither old nor new"
            )
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
