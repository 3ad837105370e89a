"""Crash safety for real: a writer process is killed with SIGKILL at random moments during
allocating writes to a dynamic and a differencing image, many rounds.  After ``vhd check
--repair`` every write acknowledged by a completed ``flush()`` reads back exactly, every page
touched only by unacknowledged writes holds either its old content or one of those writes, and
``vhd check`` is clean."""

from __future__ import annotations

from pathlib import Path

import pytest

import vhd
from tests.images import MiB, random_writes
from tests.vhd.harness import ROUNDS, killed_writers, verify
from tests.vhd.helpers import read_image, run_cli
from vhd.check import check


def kill_rounds(
    image: Path, tmp: Path, base: bytes, seed0: int, released: bytes | None = None
) -> tuple[int, int]:
    """Returns (writes acknowledged, rounds that left something to repair)."""
    acknowledged = 0
    repaired = 0
    rounds = killed_writers("vhd", image, tmp, seed0, 0.08, more=lambda: repaired == 0)
    for seed, writes, flushed in rounds:
        acknowledged += flushed + 1
        repaired += not check(image).clean
        rc, out = run_cli("check", "--repair", str(image))
        assert rc == 0, out
        assert check(image, deep=True).clean
        got = read_image(image)
        verify(base, got, writes, flushed, seed, released)
        base = got
    return acknowledged, repaired


@pytest.mark.timeout(600)
def test_sigkill_dynamic(tmp_path: Path) -> None:
    image = tmp_path / "dyn.vhd"
    # Many small blocks, so that every round still allocates.
    size = 128 * MiB
    vhd.create(image, size, block_size=16 * 1024).close()
    acknowledged, repaired = kill_rounds(image, tmp_path, bytes(size), 1)
    # The writer really got work done, and kills really interrupted allocations.
    assert acknowledged > ROUNDS and repaired > 0


@pytest.mark.timeout(600)
def test_sigkill_differencing(tmp_path: Path) -> None:
    parent = tmp_path / "parent.vhd"
    size = 128 * MiB
    model = bytearray(size)
    with vhd.create(parent, size, block_size=256 * 1024) as disk:
        random_writes(disk, model, 200, 7, max_len=64 * 1024)
    child = tmp_path / "child.vhd"
    vhd.create(child, parent=parent, block_size=16 * 1024).close()
    acknowledged, repaired = kill_rounds(child, tmp_path, bytes(model), 2, released=bytes(model))
    assert acknowledged > ROUNDS and repaired > 0
    assert read_image(parent) == bytes(model)
