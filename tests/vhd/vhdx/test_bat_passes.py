"""The C-level BAT passes of vhd.vhdx.placement, and the extents, ``vhd info`` statistics and
``vhd check`` rules built on them, against the per-entry code they replaced (kept here as the
model), on random small tables (Hypothesis: states, offsets, reserved bits, chunk ratios, and
windows small enough that every pass crosses window edges).  A legal 64 TiB disk of 1 MiB
blocks has 64 Mi entries: the passes must give what a step per entry gave, and take a Python
step only per allocated entry (counted below, not timed), and an open must hold the table
once (traced below).
"""

from __future__ import annotations

import itertools
import tracemalloc
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.vhd.vhdx.helpers import misplaced_model
from vhd.disk import Extent
from vhd.vhdx import check as vcheck
from vhd.vhdx import create_vhdx, open_vhdx, placement
from vhd.vhdx import records as r
from vhd.vhdx.disk import VHDXDisk, bat_entries, chunk_ratio
from vhd.vhdx.inspect import describe_vhdx

MiB = 1 << 20
GiB = 1 << 30

# An entry: offset in MiB (small: around the regions and the file), a state, junk in bits 3-19
# (rarely: most real entries have none).
_entry = st.builds(
    lambda mib, state, junk: (mib * MiB) | (junk & 0xFFFF8) | state,
    st.integers(0, 48),
    st.integers(0, 7),
    st.one_of(st.just(0), st.just(0), st.integers(0, 0xFFFFF)),
)
_window = st.sampled_from([1, 2, 3, 8, 64, placement.WINDOW])


def _lows(bat: list[int]) -> list[int]:
    return [e & 0xFF for e in bat]


# -- the passes, one by one ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    bat=st.lists(_entry, min_size=1, max_size=60),
    stride=st.integers(2, 6),
    window=_window,
    data=st.data(),
)
def test_passes_match_a_step_per_entry(
    bat: list[int], stride: int, window: int, data: st.DataObject
) -> None:
    table = array("Q", bat)
    n = len(bat)
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start, n + 3))  # past the table too
    classes = data.draw(st.sampled_from([placement.STATES, bytes(range(256))]))
    with mock.patch.object(placement, "WINDOW", window):
        assert placement.states(table, start, min(stop, n)) == bytes(e & 7 for e in bat[start:stop])
        # run_end: the first payload entry after `start` of another class (bitmaps skipped)
        if stop > start:
            want = classes[bat[start] & 0xFF]
            expect = next(
                (
                    i
                    for i in range(start + 1, min(stop, n))
                    if i % stride != stride - 1 and classes[bat[i] & 0xFF] != want
                ),
                stop,
            )
            assert placement.run_end(table, start, stop, stride, classes) == expect
        counts = Counter(e & 7 for i, e in enumerate(bat[:stop]) if i % stride != stride - 1)
        assert placement.count_payload_states(table, min(stop, n), stride) == [
            counts[s] for s in range(8)
        ]
        chunks = data.draw(st.integers(0, n // stride + 2))
        assert placement.bitmap_states(table, chunks, stride) == bytes(
            bat[c * stride + stride - 1] & 7 for c in range(chunks) if c * stride + stride - 1 < n
        )
        keep = bytes(1 if e & 7 >= 6 else 0 for e in range(256))
        assert list(placement.flagged(table, start, min(stop, n), keep)) == [
            i for i in range(start, min(stop, n)) if bat[i] & 7 >= 6
        ]
        assert list(placement.with_reserved_bits(table, start, min(stop, n))) == [
            i for i in range(start, min(stop, n)) if bat[i] & 0xFFFF8
        ]
        assert list(placement.nonzero_entries(table, start, min(stop, n))) == [
            i for i in range(start, min(stop, n)) if bat[i]
        ]
        named = [e for e in bat if e & r.OFFSET_MASK]
        assert placement.highest(table) == ((bat.index(max(named)), max(named)) if named else None)
        regions = [(MiB, 2 * MiB, "log"), (3 * MiB, 4 * MiB, "BAT"), (6 * MiB, 7 * MiB, "meta")]
        assert placement.first_misplaced(
            table, chunk_ratio=stride - 1, block_size=2 * MiB, regions=regions
        ) == misplaced_model(bat, stride - 1, 2 * MiB, regions)


# -- extents ------------------------------------------------------------------------------------


def _extents_model(disk: VHDXDisk, start: int, end: int) -> Iterator[Extent]:
    """The per-block walk vhd.vhdx.disk had before the run passes."""
    bs = disk.block_size
    pos = start
    while pos < end:
        block = pos // bs
        block_end = min((block + 1) * bs, end)
        entry = disk.bat[block + block // disk._ratio]
        state = entry & r.STATE_MASK
        if state == r.PayloadState.FULLY_PRESENT:
            base = disk._block_offset(block, entry) - block * bs
            yield from disk._present_extents(base, pos, block_end)
        elif state == r.PayloadState.NOT_PRESENT and disk._differencing:
            yield from disk._parent_extents(pos, block_end)
        elif state in (0, 1, 2, 3):
            yield Extent(pos, block_end - pos, None)
        else:
            raise AssertionError("the test draws no other state")
        pos = block_end


def _merge(extents: Iterator[Extent]) -> list[tuple[int, int, int | None]]:
    out: list[tuple[int, int, int | None]] = []
    for e in extents:
        if e.length <= 0:
            continue
        if out and out[-1][2] == e.layer and out[-1][0] + out[-1][1] == e.offset:
            out[-1] = (out[-1][0], out[-1][1] + e.length, e.layer)
        else:
            out.append((e.offset, e.length, e.layer))
    return out


@pytest.fixture(scope="module")
def small_chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24 MiB parent with data in some blocks, and its differencing child, 1 MiB blocks."""
    where = tmp_path_factory.mktemp("chain")
    with create_vhdx(where / "base.vhdx", 24 * MiB, block_size=MiB) as base:
        for b in (1, 2, 7, 20):
            base.pwrite(bytes([b]) * 4096, b * MiB)
        with create_vhdx(
            where / "child.vhdx", 24 * MiB, type="differencing", block_size=MiB, parent=base
        ) as child:
            for b in range(0, 24, 3):  # blocks whose data the random entries may name
                child.pwrite(b"c" * MiB, b * MiB)
    return where


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    states=st.lists(st.sampled_from([0, 0, 0, 1, 2, 3, 6]), min_size=24, max_size=24),
    ratio=st.integers(1, 6),
    which=st.sampled_from(["base", "child"]),
    window=_window,
    data=st.data(),
)
def test_extents_match_a_step_per_block(
    small_chain: Path, states: list[int], ratio: int, which: str, window: int, data: st.DataObject
) -> None:
    with open_vhdx(small_chain / f"{which}.vhdx") as disk:
        entries = (disk.bat[b + b // disk._ratio] for b in range(24))
        offsets = [e & r.OFFSET_MASK for e in entries if e & 7 >= 6]  # blocks with data
        assert offsets
        # The same disk with a small chunk ratio: bitmap entries interleaved every few blocks
        disk._ratio = ratio
        table = array("Q", bytes(8 * (24 + 24 // ratio + 2)))
        for b, s in enumerate(states):
            table[b + b // ratio] = (data.draw(st.sampled_from(offsets)) | 6) if s == 6 else s
        for c in range(len(table) // (ratio + 1)):  # junk in the bitmap entries: skipped
            table[c * (ratio + 1) + ratio] = data.draw(st.integers(0, 7))
        disk.bat = table
        offset = data.draw(st.integers(0, disk.size - 1))
        length = data.draw(st.integers(1, disk.size - offset))
        with mock.patch.object(placement, "WINDOW", window):
            got = _merge(disk.extents(offset, length))
        assert got == _merge(_extents_model(disk, offset, offset + length))


# -- vhd info and vhd check ---------------------------------------------------------------------


def _info_model(disk: VHDXDisk) -> dict[str, object]:
    """vhd info's BAT statistics as a step per entry gave them."""
    ratio = chunk_ratio(disk.metadata.block_size, disk.metadata.logical_sector_size)
    blocks = -(-disk.size // disk.metadata.block_size)
    states: Counter[str] = Counter()
    for b in range(blocks):
        state = disk.bat[b + b // ratio] & r.STATE_MASK
        states[r.PAYLOAD_STATE_NAMES.get(state, f"RESERVED_{state}")] += 1
    bitmaps = sum(
        1
        for c in range(-(-blocks // ratio))
        if c * (ratio + 1) + ratio < len(disk.bat)
        and disk.bat[c * (ratio + 1) + ratio] & r.STATE_MASK == r.BitmapState.PRESENT
    )
    return {
        "payload_blocks": blocks,
        "chunk_ratio": ratio,
        "states": dict(sorted(states.items())),
        "sector_bitmap_blocks_present": bitmaps,
    }


def _check_model(disk: VHDXDisk) -> list[str]:
    """vhd check's BAT rules as a step per entry gave them (vhd.vhdx.check before the passes)."""
    problems: list[str] = []
    md = disk.metadata
    ratio = chunk_ratio(md.block_size, md.logical_sector_size)
    blocks = -(-disk.size // md.block_size)
    fsize = disk.file_size
    spans = vcheck._structures(disk)
    used: list[tuple[int, int, str]] = []
    bitmap_present: set[int] = set()
    for c in range(-(-blocks // ratio)):
        index = c * (ratio + 1) + ratio
        if index >= len(disk.bat):
            continue
        entry = disk.bat[index]
        state = entry & r.STATE_MASK
        if state == r.BitmapState.PRESENT:
            if not md.has_parent:
                problems.append(f"sector bitmap entry {index} is PRESENT without a parent")
            bitmap_present.add(c)
            used.append((entry & r.OFFSET_MASK, (entry & r.OFFSET_MASK) + MiB, f"bitmap {c}"))
        elif state != r.BitmapState.NOT_PRESENT:
            problems.append(f"sector bitmap entry {index} has the reserved state {state}")
    for b in range(blocks):
        index = b + b // ratio
        entry = disk.bat[index]
        state = entry & r.STATE_MASK
        if entry & 0xFFFF8:
            problems.append(f"BAT entry {index} (block {b}) has reserved bits set")
        if state in (4, 5):
            problems.append(f"block {b} has the reserved state {state}")
            continue
        if state == 7:
            if not md.has_parent:
                problems.append(f"block {b} is PARTIALLY_PRESENT in a disk without parent")
            elif b // ratio not in bitmap_present:
                problems.append(f"block {b} is PARTIALLY_PRESENT but has no sector bitmap")
        if state in (6, 7):
            off = entry & r.OFFSET_MASK
            used.append((off, off + md.block_size, f"block {b}"))
    for lo, hi, name in used:
        if lo < MiB or hi > fsize:
            problems.append(f"{name} at [{lo}, {hi}) lies outside the file ({fsize} bytes)")
        for slo, shi, sname in spans:
            if lo < shi and slo < hi:
                problems.append(f"{name} at [{lo}, {hi}) overlaps the {sname}")
    used.sort()
    for (_, ahi, aname), (blo, _, bname) in itertools.pairwise(used):
        if blo < ahi:
            problems.append(f"{aname} and {bname} overlap at file offset {blo}")
    if not md.has_parent and md.leave_blocks_allocated:
        for b in range(blocks):
            if disk.bat[b + b // ratio] & r.STATE_MASK == 0:
                problems.append(f"block {b} of a fixed disk is NOT_PRESENT")
                break
    return problems


def _data_end_model(disk: VHDXDisk) -> int:
    end = max(hi for _, hi, _ in vcheck._structures(disk))
    bat = disk.bat
    if len(bat):
        top = max(bat)
        if top & r.OFFSET_MASK:
            ratio = chunk_ratio(disk.metadata.block_size, disk.metadata.logical_sector_size)
            bitmap = (bat.index(top) + 1) % (ratio + 1) == 0
            length = MiB if bitmap else disk.metadata.block_size
            end = max(end, (top & r.OFFSET_MASK) + length)
    return -(-end // MiB) * MiB


@pytest.fixture(scope="module")
def ratio16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Disks of 256 MiB blocks and 512-byte sectors: a chunk ratio of 16, so a small table
    interleaves sector bitmap entries (a sparse 10 GiB base and its child)."""
    where = tmp_path_factory.mktemp("ratio16")
    size = 40 * 256 * MiB + 512  # a short last block too
    with (
        create_vhdx(where / "base.vhdx", size, block_size=256 * MiB) as base,
        create_vhdx(
            where / "child.vhdx", size, type="differencing", block_size=256 * MiB, parent=base
        ),
    ):
        pass
    return where


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from(["base", "child"]),
    fixed=st.booleans(),
    fill=st.lists(st.tuples(st.integers(0, 43), _entry), max_size=40),
    file_mib=st.integers(64, 16 * 1024),
    window=_window,
)
def test_check_and_info_match_a_step_per_entry(
    ratio16: Path,
    which: str,
    fixed: bool,
    fill: list[tuple[int, int]],
    file_mib: int,
    window: int,
) -> None:
    with open_vhdx(ratio16 / f"{which}.vhdx", open_parent=False) as disk:
        assert chunk_ratio(disk.block_size, disk.logical_sector_size) == 16
        for index, entry in fill:
            # offsets past the 48 MiB the strategy draws, block-sized, so blocks fit the file
            disk.bat[index] = entry if entry & 7 < 6 else entry + (entry >> 20) * 255 * MiB
        disk.file_size = file_mib * MiB
        disk.metadata.leave_blocks_allocated = fixed and which == "base"
        with mock.patch.object(placement, "WINDOW", window):
            report = vcheck.VHDXCheckReport(disk.path)
            vcheck._check_bat(disk, report)
            assert report.problems == _check_model(disk)
            assert vcheck._data_end(disk) == _data_end_model(disk)
            assert describe_vhdx(disk, chain=False)["bat"] == _info_model(disk)


def test_a_crafted_table_lists_at_most_fifty_problems_of_a_kind(ratio16: Path) -> None:
    with open_vhdx(ratio16 / "base.vhdx") as disk:
        for b in range(40):
            disk.bat[b + b // 16] = 4 | 0x8  # a reserved state and a reserved bit, each entry
        with mock.patch.object(vcheck, "MAX_LISTED", 10):
            report = vcheck.VHDXCheckReport(disk.path)
            vcheck._check_bat(disk, report)
    assert sum(p.startswith("BAT entry") for p in report.problems) == 10
    assert sum(p.endswith("has the reserved state 4") for p in report.problems) == 10
    assert "30 more reserved bits problems like the above (not listed)" in report.problems
    assert "30 more state problems like the above (not listed)" in report.problems


def test_blocks_beyond_what_the_file_holds_are_counted_not_kept(ratio16: Path) -> None:
    """A crafted table can name the same space 64 Mi times: the overlap rules keep no more
    blocks than the file has room for (1 MiB each), and the rest are said once."""
    with open_vhdx(ratio16 / "base.vhdx") as disk:
        for b in range(40):
            disk.bat[b + b // 16] = (8 * MiB) | 6
        disk.file_size = 30 * MiB
        report = vcheck.VHDXCheckReport(disk.path)
        used = vcheck._check_bat(disk, report)
    assert len(used) == 30
    assert sum("lies outside the file" in p for p in report.problems) == 40
    assert report.problems[-1] == (
        "40 blocks and bitmaps are allocated but the file has room for 30: 10 more overlap "
        "others or lie outside it (not listed)"
    )


# -- a Python step only per allocated entry (counted, not timed) --------------------------------


class _CountingTable(array):  # type: ignore[type-arg]
    """An ``array('Q')`` that counts its entries read one at a time."""

    reads = 0

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        if isinstance(index, int):
            _CountingTable.reads += 1
        return super().__getitem__(index)


def test_an_empty_quarter_tebibyte_takes_no_step_per_entry(tmp_path: Path) -> None:
    """256 Ki blocks of 1 MiB: extents, vhd info's statistics and vhd check's rules read
    entries one by one only around the few allocated blocks (the per-entry code read each)."""
    image = tmp_path / "big.vhdx"
    with create_vhdx(image, 256 * GiB, block_size=MiB) as disk:
        disk.pwrite(b"x" * 4096, 100 * GiB)
        disk.pwrite(b"y" * 4096, 200 * GiB)
    with open_vhdx(image) as disk:
        count = bat_entries(disk.size, disk.block_size, disk.logical_sector_size, False)
        assert len(disk.bat) >= count > 256 * 1024
        disk.bat = _CountingTable("Q", disk.bat.tobytes())
        _CountingTable.reads = 0
        extents = _merge(disk.extents())
        assert [e[2] for e in extents] == [None, 0, None, 0, None]
        assert disk.extents(3 * GiB, MiB).__next__() == Extent(3 * GiB, MiB, None)
        info = describe_vhdx(disk, chain=False)["bat"]
        assert info["states"] == {"FULLY_PRESENT": 2, "NOT_PRESENT": 256 * 1024 - 2}
        report = vcheck.VHDXCheckReport(disk.path)
        vcheck._check_bat(disk, report)
        assert report.problems == []
        vcheck._data_end(disk)
        assert _CountingTable.reads < 100


def test_compact_of_an_empty_quarter_tebibyte_takes_no_step_per_entry(tmp_path: Path) -> None:
    """vhd compact's passes (empty blocks to free, blocks to pack) visit only the entries with
    space: it read each of 256 Ki entries (an empty 64 TiB disk of 1 MiB blocks: 85 s)."""
    from vhd.vhdx import ops

    image = tmp_path / "big.vhdx"
    with create_vhdx(image, 256 * GiB, block_size=MiB) as disk:
        disk.pwrite(b"x" * 4096, 100 * GiB)
        disk.pwrite(bytes(4096), 200 * GiB)  # a block that holds only zeros: freed
    with open_vhdx(image, "r+") as disk:
        disk.bat = _CountingTable("Q", disk.bat.tobytes())
        _CountingTable.reads = 0
        freed = ops._free_empty(disk, None)
        assert len(freed) == 1
        assert len(ops._blocks_in_file(disk)) == 1
        assert _CountingTable.reads < 100
        disk.bat = array("Q", disk.bat.tobytes())
    with open_vhdx(image) as disk:
        assert disk.pread(4096, 100 * GiB) == b"x" * 4096
        assert disk.pread(4096, 200 * GiB) == bytes(4096)


def test_resize_of_a_sparse_quarter_tebibyte_takes_no_step_per_entry(tmp_path: Path) -> None:
    """Shrinking walks only the windows of the dropped entries that hold something, growing
    sets the new entries in one slice: each read every entry one by one (an empty 64 TiB disk
    of 1 MiB blocks: shrink to 32 TiB 18 s, grow back 55 s)."""
    from vhd.chain import ParentPolicy
    from vhd.vhdx import ops

    image = tmp_path / "big.vhdx"
    with create_vhdx(image, 256 * GiB, block_size=MiB) as disk:
        disk.pwrite(b"x" * 4096, 100 * GiB)
        disk.pwrite(b"y" * 4096, 200 * GiB)
    with open_vhdx(image, "r+") as disk:
        disk.bat = _CountingTable("Q", disk.bat.tobytes())
        _CountingTable.reads = 0
        assert ops._shrink(disk, 128 * GiB, force=True) == 1
        assert _CountingTable.reads < 100
        disk.bat = array("Q", disk.bat.tobytes())
    with open_vhdx(image, "r+") as disk:
        assert disk.size == 128 * GiB
        disk.bat = _CountingTable("Q", disk.bat.tobytes())
        _CountingTable.reads = 0
        ops._grow(disk, 512 * GiB, ParentPolicy())
        assert _CountingTable.reads < 100
        disk.bat = array("Q", disk.bat.tobytes())
    with open_vhdx(image) as disk:
        assert disk.size == 512 * GiB
        assert disk.pread(4096, 100 * GiB) == b"x" * 4096
        assert disk.pread(4096, 200 * GiB) == bytes(4096)
        assert _merge(disk.extents()) == [
            (0, 100 * GiB, None),
            (100 * GiB, 4096, 0),
            (100 * GiB + 4096, 412 * GiB - 4096, None),
        ]
    report = vcheck.check_vhdx(str(image))
    assert (report.problems, report.notes) == ([], [])


def test_an_open_holds_the_table_once(tmp_path: Path) -> None:
    """The BAT is read into its array: no ``bytes`` of the same size on the way (4 MiB here)."""
    image = tmp_path / "big.vhdx"
    create_vhdx(image, 512 * GiB, block_size=MiB).close()
    tracemalloc.start()
    try:
        with open_vhdx(image) as disk:
            table = len(disk.bat) * 8
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert table >= 4 * MiB
    # the table, plus the passes' windows (placement.WINDOW entries: 1 MiB of table at a time)
    assert peak < table + 2 * placement.WINDOW * 8, (peak, table)


def test_check_of_a_child_holds_no_third_table(tmp_path: Path) -> None:
    """vhd check reads the child's own structures, then opens the chain to find its parent:
    the first table is let go by then (two 4 MiB tables here, never three)."""
    with (
        create_vhdx(tmp_path / "base.vhdx", 512 * GiB, block_size=MiB) as base,
        create_vhdx(
            tmp_path / "child.vhdx", 512 * GiB, type="differencing", block_size=MiB, parent=base
        ) as child,
    ):
        table = len(child.bat) * 8
    tracemalloc.start()
    try:
        report = vcheck.check_vhdx(str(tmp_path / "child.vhdx"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.problems == []
    assert table >= 4 * MiB
    assert peak < 2 * table + 2 * placement.WINDOW * 8, (peak, table)


def test_vhd_resize_holds_one_table(tmp_path: Path) -> None:
    """vhd resize reads the size for a relative SIZE through a handle of its own: that handle's
    table was still referenced while the resize held a second one (a 64 TiB shrink of 1 MiB
    blocks peaked at 1040 MiB against its 512 MiB table)."""
    from tests.vhd.helpers import run_cli

    image = tmp_path / "big.vhdx"
    create_vhdx(image, 4096 * GiB, block_size=MiB).close()
    with open_vhdx(image) as disk:
        table = len(disk.bat) * 8
    tracemalloc.start()
    try:
        rc, out = run_cli("resize", "--shrink", str(image), "-2T")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 0, out
    assert table >= 32 * MiB
    # the table, and the shrink's walk of 1 MiB windows (a slice, its bytes, zeros to compare)
    assert peak < table + 4 * placement.WINDOW * 8 + MiB, (peak, table)
