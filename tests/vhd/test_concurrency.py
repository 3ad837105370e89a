"""Concurrency: many threads pread/pwrite/discard/flush one Disk at once.  Each thread owns the
4 KiB pages p with p % THREADS == its number (so threads share blocks and race to allocate them)
and checks every read of its pages against its own model; at the end the whole disk, reopened,
must equal the union of the models, and ``vhd check`` must be clean."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

import vhd
from tests.images import MiB, random_writes
from tests.vhd.helpers import read_image
from vhd.check import check

PAGE = 4096
THREADS = 8
OPS = 400


def hammer(
    disk: vhd.Disk, model: bytearray, errors: list[BaseException], released: bytes | None = None
) -> None:
    """``released``: what a discarded page reads as (a differencing disk's parent; None: zeros)."""
    pages = disk.size // PAGE

    def worker(t: int) -> None:
        rng = random.Random(t)
        mine = list(range(t, pages, THREADS))
        try:
            for _ in range(OPS):
                page = rng.choice(mine)
                at = page * PAGE
                op = rng.random()
                if op < 0.45:
                    # Any offset and length inside the page: partial sectors too.
                    lo = rng.randrange(0, PAGE)
                    hi = rng.randrange(lo + 1, PAGE + 1)
                    data = rng.randbytes(hi - lo)
                    disk.pwrite(data, at + lo)
                    model[at + lo : at + hi] = data
                elif op < 0.85:
                    got = disk.pread(PAGE, at)
                    assert got == model[at : at + PAGE], f"thread {t} page {page}"
                elif op < 0.90:
                    disk.discard(at, PAGE)
                    gone = bytes(PAGE) if released is None else released[at : at + PAGE]
                    model[at : at + PAGE] = gone
                elif op < 0.95:
                    disk.write_zeroes(at, PAGE)
                    model[at : at + PAGE] = bytes(PAGE)
                else:
                    disk.flush()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads)


@pytest.mark.parametrize("kind", ["fixed", "dynamic", "differencing"])
def test_threads_against_model(tmp_path: Path, kind: str) -> None:
    size = 4 * MiB
    model = bytearray(size)
    path = tmp_path / "d.vhd"
    released = None
    if kind == "differencing":
        parent = tmp_path / "p.vhd"
        with vhd.create(parent, size, block_size=64 * 1024) as pdisk:
            random_writes(pdisk, model, 60, 3)
        released = bytes(model)
        disk = vhd.create(path, parent=parent, block_size=64 * 1024)
    else:
        disk = vhd.create(path, size, type=kind, block_size=64 * 1024)
    errors: list[BaseException] = []
    with disk:
        hammer(disk, model, errors, released)
        assert not errors, errors[0]
        assert disk.pread(size, 0) == bytes(model)
    assert read_image(path) == bytes(model)
    report = check(path, deep=True)
    assert report.clean, [f.message for f in report.problems]
