"""vhd.convert's copy workers (vhd.convert._copy): every data chunk written once, in any order,
with the right bytes, whether a job carries one chunk or a run of them; progress only moves
forward and ends at the disk's size; a failing write is raised in the caller's thread; no
worker is left running (or writing) once the copy has returned or raised."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from vhd import convert
from vhd.convert import _copy
from vhd.source import open_source

MiB = 1 << 20


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vhd-convert")]


def _source(path: Path) -> bytes:
    # 4 MiB data, 4 MiB zeros, 2 MiB data, 1 MiB + 5 bytes data (a short last chunk)
    content = os.urandom(4 * MiB) + bytes(4 * MiB) + os.urandom(2 * MiB) + os.urandom(MiB + 5)
    path.write_bytes(content)
    return content


@pytest.fixture(params=[2 * MiB, 16 * MiB], ids=["job-per-chunk", "default-runs"])
def job_bytes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Jobs of one 2 MiB chunk (several jobs in flight on both workers) or of runs of them."""
    monkeypatch.setattr(convert, "_JOB_BYTES", request.param)
    return int(request.param)


def test_copy_writes_every_data_chunk_once(tmp_path: Path, job_bytes: int) -> None:
    content = _source(tmp_path / "src.raw")
    out = bytearray(len(content))
    seen: list[int] = []
    lock = threading.Lock()

    def write(buf: memoryview, off: int) -> None:
        with lock:
            seen.append(off)
            out[off : off + len(buf)] = buf

    with open_source(str(tmp_path / "src.raw")) as src:
        written = _copy(src, write, 2 * MiB, None)
    assert bytes(out) == content
    assert written == len(content) - 4 * MiB
    assert len(seen) == len(set(seen))
    assert not _workers()


def test_progress_moves_forward_to_the_end(tmp_path: Path, job_bytes: int) -> None:
    # Data, a hole, data, a hole, data: the holes are zero extents (SEEK_HOLE), over which
    # progress moves on without a job, and may not run ahead of jobs still in flight.
    path = tmp_path / "src.raw"
    content = bytearray(40 * MiB)
    with path.open("wb") as f:
        for start, end in ((0, 6 * MiB), (14 * MiB, 21 * MiB), (29 * MiB, 40 * MiB)):
            content[start:end] = os.urandom(end - start)
            f.seek(start)
            f.write(content[start:end])
    seen: list[int] = []
    out = bytearray(len(content))

    def write(buf: memoryview, off: int) -> None:
        out[off : off + len(buf)] = buf

    def progress(reached: int) -> None:
        # Everything before the position reported is written.
        assert out[:reached] == content[:reached]
        seen.append(reached)

    with open_source(str(path)) as src:
        _copy(src, write, 2 * MiB, progress)
    assert seen == sorted(seen)
    assert seen[-1] == len(content)
    assert out == content
    assert not _workers()


def test_copy_raises_a_failed_write_and_stops(tmp_path: Path, job_bytes: int) -> None:
    _source(tmp_path / "src.raw")
    calls: list[int] = []
    lock = threading.Lock()

    def write(buf: memoryview, off: int) -> None:
        with lock:
            calls.append(off)
        if off == 2 * MiB:
            raise OSError(28, "No space left on device")

    with open_source(str(tmp_path / "src.raw")) as src, pytest.raises(OSError) as info:
        _copy(src, write, 2 * MiB, None, "out.raw")
    assert info.value.errno == 28
    assert 2 * MiB in calls
    assert not _workers()  # joined: nothing writes after the error reached the caller
