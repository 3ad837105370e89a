"""Crash safety for real: a writer process is killed with SIGKILL at random moments during
allocating writes to a dynamic and a differencing image, many rounds.  After ``vhd check
--repair`` every write acknowledged by a completed ``flush()`` reads back exactly, every page
touched only by unacknowledged writes holds either its old content or one of those writes, and
``vhd check`` is clean."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhd
from tests.vhd.crash_writer import PAGE, payload
from tests.vhd.helpers import MiB, random_writes, read_image, run_cli
from vhd.check import check

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 20


def parse_log(text: str) -> tuple[list[tuple[int, int, int, bool]], int]:
    """(seq, offset, length, is_discard) of every operation begun, and the last flushed seq."""
    writes: list[tuple[int, int, int, bool]] = []
    flushed = -1
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] in ("W", "D") and len(parts) == 4:
            writes.append((int(parts[1]), int(parts[2]), int(parts[3]), parts[0] == "D"))
        elif parts[0] == "F" and len(parts) == 2:
            flushed = int(parts[1])
    return writes, flushed


def verify(
    base: bytes,
    got: bytes,
    writes: list[tuple[int, int, int, bool]],
    flushed: int,
    seed: int,
    released: bytes | None = None,
) -> None:
    """``released``: what a discarded range reads as (the parent's data on a differencing disk,
    whose discard releases sectors to the parent; None: zeros)."""
    model = bytearray(base)
    pending: dict[int, list[bytes]] = {}
    for seq, offset, length, discard in writes:
        if discard:
            data = bytes(length) if released is None else released[offset : offset + length]
        else:
            data = payload(seed, seq, length)
        if seq <= flushed:
            model[offset : offset + length] = data
        else:
            for i in range(0, length, PAGE):
                pending.setdefault((offset + i) // PAGE, []).append(data[i : i + PAGE])
    assert len(got) == len(model)
    if got == model:
        return
    for page in range(len(model) // PAGE):
        have = got[page * PAGE : (page + 1) * PAGE]
        want = bytes(model[page * PAGE : (page + 1) * PAGE])
        if have == want:
            continue
        assert have in pending.get(page, []), f"page {page} lost an acknowledged write"


def kill_rounds(
    image: Path, tmp: Path, base: bytes, seed0: int, released: bytes | None = None
) -> tuple[int, int]:
    """Returns (writes acknowledged, rounds that left something to repair)."""
    rng = random.Random(seed0)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    acknowledged = 0
    repaired = 0
    for round_ in range(ROUNDS):
        seed = seed0 * 1000 + round_
        log = tmp / f"log{round_}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.vhd.crash_writer",
                str(image),
                str(log),
                str(seed),
            ],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while not (log.exists() and log.read_bytes().startswith(b"R")):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                assert time.monotonic() < deadline
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.08))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        writes, flushed = parse_log(log.read_text())
        acknowledged += flushed + 1
        repaired += not check(image).clean
        rc, out = run_cli("check", "--repair", str(image))
        assert rc == 0, out
        assert check(image, deep=True).clean
        got = read_image(image)
        verify(base, got, writes, flushed, seed, released)
        base = got
    return acknowledged, repaired


@pytest.mark.timeout(240)
def test_sigkill_dynamic(tmp_path: Path) -> None:
    image = tmp_path / "dyn.vhd"
    # Many small blocks, so that every round still allocates.
    size = 128 * MiB
    vhd.create(image, size, block_size=16 * 1024).close()
    acknowledged, repaired = kill_rounds(image, tmp_path, bytes(size), 1)
    # The writer really got work done, and kills really interrupted allocations.
    assert acknowledged > ROUNDS and repaired > 0


@pytest.mark.timeout(240)
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
