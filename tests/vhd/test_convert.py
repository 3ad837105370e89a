"""``vhd.convert.data_runs``: the zero detection that keeps converted outputs sparse, against a
grain-by-grain reference (every 4 KiB grain that holds a non-zero byte is inside a run, every
run boundary is grain-aligned, and no run is all zeros at both ends), on a bytearray and on a
view of an anonymous map (convert's own page-aligned buffers)."""

from __future__ import annotations

import mmap

from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import hsettings
from vhd.convert import data_runs

GRAIN = 4096


def _reference(buf: bytearray, n: int) -> list[int]:
    """Indexes of the grains of ``buf[:n]`` that hold data."""
    return [g for g in range(-(-n // GRAIN)) if any(buf[g * GRAIN : min(n, (g + 1) * GRAIN)])]


@hsettings(max_examples=300)
@given(
    n=st.sampled_from([1, 100, 4096, 4097, 8 * 4096, 8 * 4096 + 100, 64 * 1024]),
    pokes=st.lists(
        st.tuples(st.integers(0, 64 * 1024), st.integers(1, 9000), st.sampled_from([1, 255])),
        max_size=5,
    ),
    extra=st.integers(0, 5000),
    mapped=st.booleans(),
)
def test_runs_cover_exactly_the_data_grains(
    n: int, pokes: list[tuple[int, int, int]], extra: int, mapped: bool
) -> None:
    buf = bytearray(n + extra)  # a buffer longer than the chunk, as the last chunk's is
    for at, length, value in pokes:
        if at < n:
            buf[at : min(n, at + length)] = bytes([value]) * (min(n, at + length) - at)
    if mapped:
        area = mmap.mmap(-1, len(buf))
        area[:] = buf
        runs = list(data_runs(memoryview(area), n))
    else:
        runs = list(data_runs(buf, n))
    covered = [g for a, b in runs for g in range(a // GRAIN, -(-b // GRAIN))]
    assert covered == _reference(buf, n)
    for a, b in runs:
        assert a % GRAIN == 0 and (b % GRAIN == 0 or b == n) and a < b <= n


def test_all_zero_and_all_data_chunks() -> None:
    n = 2 * 1024 * 1024
    assert list(data_runs(bytearray(n), n)) == []
    area = mmap.mmap(-1, n)
    assert list(data_runs(memoryview(area), n)) == []
    area[n - 1] = 1  # the last byte of the last 64 KiB slab
    assert list(data_runs(memoryview(area), n)) == [(n - GRAIN, n)]
    data = bytearray(b"\x01" * n)
    assert list(data_runs(data, n)) == [(0, n)]
    data[GRAIN : 2 * GRAIN] = bytes(GRAIN)  # one zero grain: two runs around it
    assert list(data_runs(data, n)) == [(0, GRAIN), (2 * GRAIN, n)]
    data[GRAIN] = 1  # a grain that starts with data is data
    assert list(data_runs(data, n)) == [(0, n)]
