"""Crash ordering: replay every prefix of the writes the library issues (a crash after each
one) onto the image as it was, and check each result with the spec model.

Every prefix must be a valid image (footer at the end, BAT entries pointing inside the file) that
reads, sector by sector, either the old or the new content; writes made durable by a completed
``flush()`` must be there in every later prefix.  Writes are assumed to reach the disk in the
order they were issued between the ``fdatasync`` barriers the library places.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import vhd
import vhd.disk
import vhd.fileio
import vhd.metadata
from tests.model import ModelImage, model_chain
from tests.strategies import payload
from tests.vhd.harness import Op, apply_ops, assert_old_or_new, changed, record_io

KiB = 1024
SIZE = 256 * KiB
BLOCK = 16 * KiB


def _record(monkeypatch: pytest.MonkeyPatch, log: list[Op]) -> None:
    # The names vhd.disk and vhd.metadata (its BAT writes) imported from vhd.fileio are the
    # ones their code calls.
    record_io(
        monkeypatch,
        log,
        {
            vhd.disk: ("write_all", "write_zeros", "punch_hole"),
            vhd.metadata: ("write_all", "write_zeros"),
        },
    )


def _crash_points(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layers: list[Path],
    work: Callable[[vhd.Disk], list[tuple[int, bytes]]],
    old: bytes,
) -> None:
    leaf = layers[-1]
    before = bytearray(leaf.read_bytes())
    log: list[Op] = []
    _record(monkeypatch, log)
    with vhd.open(leaf, "r+") as disk:
        changes = work(disk)
    monkeypatch.undo()
    new = changed(old, changes)
    syncs = [i for i, op in enumerate(log) if op[0] == "sync"]
    assert syncs, "flush must sync"
    crash = tmp_path / "crash"
    crash.mkdir()
    for parent in layers[:-1]:
        (crash / parent.name).symlink_to(parent)
    copy = crash / leaf.name
    for k in range(len(log) + 1):
        copy.write_bytes(apply_ops(before, log[:k]))
        image = model_chain([*(crash / p.name for p in layers[:-1]), copy])
        seen = image.read_all()
        assert_old_or_new(seen, old, new, k, len(log))
        if k > syncs[-1]:
            assert seen == bytes(new), f"crash after write {k}: flushed data is missing"
        # The library opens every crash image too, and reads what the model reads.
        with vhd.open(copy) as disk:
            assert disk.pread(SIZE, 0) == seen


def _work(disk: vhd.Disk, released: bytes | None = None) -> list[tuple[int, bytes]]:
    """``released``: the parent's content on a differencing disk (discarded sectors show it)."""
    changes = [
        (5 * BLOCK + 1000, payload(3000, 1)),  # new block, partial sectors
        (100, payload(BLOCK, 2)),  # spans an old and a new block
        (9 * BLOCK - 512, payload(1024, 3)),  # two new blocks
    ]
    for offset, data in changes:
        disk.pwrite(data, offset)
    disk.flush()
    disk.pwrite(payload(512, 4), 15 * BLOCK)
    changes.append((15 * BLOCK, payload(512, 4)))
    if released is None:
        disk.discard(2 * BLOCK, BLOCK)  # frees a whole block
        changes.append((2 * BLOCK, bytes(BLOCK)))
        return changes
    # A differencing disk held blocks 11 and 12 before: discard frees block 11 and clears two
    # sectors of block 12 (the partly covered third stays); the parent shows there again.
    disk.discard(11 * BLOCK, BLOCK)
    changes.append((11 * BLOCK, released[11 * BLOCK : 12 * BLOCK]))
    disk.discard(12 * BLOCK + 512, 1024 + 100)
    changes.append((12 * BLOCK + 512, released[12 * BLOCK + 512 : 12 * BLOCK + 1536]))
    disk.write_zeroes(2 * BLOCK, BLOCK)  # zeros that hide the parent: written into the child
    changes.append((2 * BLOCK, bytes(BLOCK)))
    return changes


def test_dynamic_crash_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.vhd"
    with vhd.create(path, SIZE, block_size=BLOCK) as disk:
        disk.pwrite(payload(3 * BLOCK, 9), 0)
    old = ModelImage(path).read_all()
    _crash_points(tmp_path, monkeypatch, [path], _work, old)


def test_differencing_crash_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base.vhd"
    with vhd.create(base, SIZE, block_size=BLOCK) as disk:
        disk.pwrite(payload(SIZE, 8), 0)
    child = tmp_path / "child.vhd"
    with vhd.create(child, parent=base, block_size=BLOCK) as disk:
        disk.pwrite(payload(BLOCK, 7), 0)
        disk.pwrite(payload(2 * BLOCK, 6), 11 * BLOCK)
    old = model_chain([base, child]).read_all()
    parent_data = payload(SIZE, 8)
    _crash_points(tmp_path, monkeypatch, [base, child], lambda disk: _work(disk, parent_data), old)
