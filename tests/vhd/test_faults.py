"""Fault injection: an I/O layer that fails a chosen write with EIO or ENOSPC, or cuts it short.
The library reports the error, and afterwards the image is consistent and repairable: ``vhd check
--repair`` leaves it clean, every write acknowledged by a completed flush reads back, and every
other page holds its old content or one of the failed or unacknowledged writes."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

import vhd
import vhd.disk
from tests.images import MiB
from tests.vhd.helpers import read_image, run_cli
from vhd.check import check

PAGE = 4096


class Faults:
    """Replaces ``vhd.disk.write_all``: the ``fail_at``-th call fails (after writing half of its
    bytes when ``short``)."""

    def __init__(self, fail_at: int, err: int, short: bool) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.err = err
        self.short = short
        self.fired = False
        self.real = getattr(vhd.disk, "write_all")  # noqa: B009 - mypy: not re-exported

    def __call__(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            self.fired = True
            if self.short:
                view = memoryview(data).cast("B")
                self.real(fd, view[: len(view) // 2], offset)
            raise OSError(self.err, "injected fault")
        self.real(fd, data, offset)


def workload(seed: int) -> Iterator[tuple[str, int, bytes]]:
    rng = random.Random(seed)
    for i in range(24):
        n = rng.randrange(1, 5)
        first = rng.randrange(0, (8 * MiB) // PAGE - n)
        yield "write", first * PAGE, rng.randbytes(n * PAGE)
        if i % 4 == 3:
            yield "flush", 0, b""


def run_with_fault(path: Path, base: bytes, fault: Faults, seed: int) -> None:
    acked = bytearray(base)
    pending: dict[int, list[bytes]] = {}
    unflushed: list[tuple[int, bytes]] = []
    raised = False
    disk = vhd.open(path, "r+")
    try:
        for op, offset, data in workload(seed):
            if op == "write":
                unflushed.append((offset, data))
                disk.pwrite(data, offset)
            else:
                disk.flush()
                for off, d in unflushed:
                    acked[off : off + len(d)] = d
                unflushed.clear()
    except OSError as exc:
        assert exc.errno == fault.err
        raised = True
    finally:
        try:
            disk.close()
        except OSError:
            raised = True
    setattr(vhd.disk, "write_all", fault.real)  # noqa: B010 - mypy: not re-exported
    assert raised == fault.fired
    for off, d in unflushed:
        for i in range(0, len(d), PAGE):
            pending.setdefault((off + i) // PAGE, []).append(d[i : i + PAGE])
    rc, out = run_cli("check", "--repair", str(path))
    assert rc == 0, out
    assert check(path, deep=True).clean
    got = read_image(path)
    for page in range(len(got) // PAGE):
        have = got[page * PAGE : (page + 1) * PAGE]
        if have != acked[page * PAGE : (page + 1) * PAGE]:
            assert have in pending.get(page, []), f"page {page}: acknowledged data lost"


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@pytest.mark.parametrize(
    ("err", "short"), [(errno.EIO, False), (errno.ENOSPC, False), (errno.ENOSPC, True)]
)
def test_failed_write_leaves_image_repairable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, err: int, short: bool
) -> None:
    size = 8 * MiB
    base = bytearray(size)
    if kind == "differencing":
        parent = tmp_path / "parent.vhd"
        with vhd.create(parent, size, block_size=64 * 1024) as disk:
            for i in range(0, size, 640 * 1024):
                disk.pwrite(bytes([i % 251 + 1]) * 8192, i)
            base[:] = disk.pread(size, 0)
    # Count the write calls of a fault-free run, then fail each one in turn (sampled).
    probe = Faults(0, err, short)
    monkeypatch.setattr(vhd.disk, "write_all", probe)
    path = tmp_path / "probe.vhd"

    def make(p: Path) -> vhd.Disk:
        if kind == "differencing":
            return vhd.create(p, parent=tmp_path / "parent.vhd", block_size=64 * 1024)
        return vhd.create(p, size, block_size=64 * 1024)

    make(path).close()
    start = probe.calls
    run_with_fault(path, bytes(base), probe, 5)
    total = probe.calls - start
    assert total > 20
    for n, fail_at in enumerate(sorted(random.Random(9).sample(range(1, total + 1), 12))):
        image = tmp_path / f"img{n}.vhd"
        make(image).close()
        fault = Faults(fail_at, err, short)
        monkeypatch.setattr(vhd.disk, "write_all", fault)
        run_with_fault(image, bytes(base), fault, 5)
        assert fault.fired


def test_failed_sync_in_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fdatasync failing with EIO inside flush(): the error reaches the caller, nothing written
    before the last successful flush is lost, and the image repairs clean."""
    path = tmp_path / "d.vhd"
    size = 8 * MiB
    vhd.create(path, size, block_size=64 * 1024).close()
    real = os.fdatasync
    acked = bytearray(size)
    with vhd.open(path, "r+") as disk:
        disk.pwrite(b"\x01" * 65536, 0)
        disk.flush()
        acked[:65536] = b"\x01" * 65536
        disk.pwrite(b"\x02" * 65536, 4 * MiB)

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "injected fdatasync failure")

        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(OSError):
            disk.flush()
        monkeypatch.setattr(os, "fdatasync", real)
    rc, out = run_cli("check", "--repair", str(path))
    assert rc == 0, out
    got = read_image(path)
    assert got[:65536] == acked[:65536]
    assert got[4 * MiB : 4 * MiB + 65536] in (bytes(65536), b"\x02" * 65536)
