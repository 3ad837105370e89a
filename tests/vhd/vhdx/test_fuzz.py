"""Random corruption of valid VHDX images (Hypothesis): whatever bytes change in the file
identifier, headers, region tables, log, metadata table and items, parent locator, BAT or data,
opening (read-only and r+), reading, listing extents, writing and discarding either work or
raise a clean :class:`vhd.VHDError` — never another exception, never a hang, never unbounded
memory, and a read-only open never writes.  With ``refix`` the CRC-32C of headers, region tables
and log entries is recomputed, so that absurd values get past the checksums to the structural
checks."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import hsettings, payload
from tests.vhd import harness
from tests.vhd.harness import Seed, corrupted_copy, within_bounds
from tests.vhd.vhdx.helpers import current_header
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import records as r
from vhd.vhdx.crc import crc32c_with_zeroed_field

MiB = 1024 * 1024
MAX_SECONDS = 10.0
MAX_PEAK = 48 * MiB
EXTENTS_WINDOW = 64 * MiB
INTERESTING = [0, 1, 6, 7, 511, 512, 4096, MiB, 0x7FFFFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1]


def _regions(path: Path) -> tuple[tuple[int, int], ...]:
    with open_vhdx(path, open_parent=False) as disk:
        h = disk.current_header
        meta = disk.layout.metadata_region.file_offset
        bat = disk.layout.bat_region.file_offset
        first = next(
            (
                e & r.OFFSET_MASK
                for e in disk.bat
                if e & r.STATE_MASK == r.PayloadState.FULLY_PRESENT
            ),
            0,
        )
    n = path.stat().st_size
    out = [
        (0, n),
        (0, 16),
        (r.HEADER_OFFSETS[0], r.HEADER_OFFSETS[0] + 80),
        (r.HEADER_OFFSETS[1], r.HEADER_OFFSETS[1] + 80),
        (r.REGION_TABLE_OFFSETS[0], r.REGION_TABLE_OFFSETS[0] + 80),
        (r.REGION_TABLE_OFFSETS[1], r.REGION_TABLE_OFFSETS[1] + 80),
        (h.log_offset, h.log_offset + 160),
        (meta, meta + 32 + 32 * 6),
        (meta + 65536, meta + 65536 + 400),
        (bat, bat + 64),
    ]
    if first:
        out.append((first, first + 1024))
    return tuple(out)


def _live_log(path: Path) -> None:
    """Make the last transaction's log entries live again (as if killed before clearing)."""
    raw = bytearray(path.read_bytes())
    at, head = current_header(raw)
    entry = r.LOG_ENTRY_HEADER.parse(bytes(raw[head.log_offset : head.log_offset + 64]))
    raw[at : at + 4096] = head.replace(log_guid=r.guid(entry.log_guid)).build()
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Seed]:
    root = tmp_path_factory.mktemp("vhdx-fuzz")
    out: dict[str, Seed] = {}
    dyn = root / "dynamic.vhdx"
    with create_vhdx(dyn, 6 * MiB, block_size=MiB) as disk:
        for i in (0, 3, 5):
            disk.pwrite(payload(3000, i), i * MiB + 700)
    out["dynamic"] = Seed((dyn,), _regions(dyn))
    fixed = root / "fixed.vhdx"
    with create_vhdx(fixed, 3 * MiB, type="fixed", block_size=MiB) as disk:
        disk.pwrite(payload(3 * MiB, 2), 0)
    out["fixed"] = Seed((fixed,), _regions(fixed))
    chain = root / "chain"
    chain.mkdir()
    with create_vhdx(chain / "base.vhdx", 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(payload(2 * MiB, 5), 0)
    child = chain / "child.vhdx"
    with create_vhdx(
        child, 0, type="differencing", parent=open_vhdx(chain / "base.vhdx"), block_size=MiB
    ) as disk:
        disk.pwrite(payload(5000, 6), 10000)
    out["differencing"] = Seed((chain / "base.vhdx", child), _regions(child))
    live = root / "live.vhdx"
    shutil.copy(dyn, live)
    _live_log(live)
    with open_vhdx(live) as disk:
        assert disk.layout.replayed is not None
    out["live-log"] = Seed((live,), _regions(live))
    return out


def corruptions(regions: tuple[tuple[int, int], ...]) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    """Little-endian fields, as VHDX's records are."""
    return harness.corruptions(regions, INTERESTING, ("byte", "u16", "u32", "u64", "zeros"), "<")


def _refix(raw: bytearray) -> None:
    """Recompute the CRC-32C of headers, region tables and the first log entry."""
    for at, size in [(o, r.HEADER_SIZE) for o in r.HEADER_OFFSETS] + [
        (o, r.REGION_TABLE_SIZE) for o in r.REGION_TABLE_OFFSETS
    ]:
        if bytes(raw[at : at + 4]) in (b"head", b"regi"):
            raw[at + 4 : at + 8] = crc32c_with_zeroed_field(raw[at : at + size], 4).to_bytes(
                4, "little"
            )
    for at in r.HEADER_OFFSETS:
        if raw[at : at + 4] != b"head":
            continue
        log = int.from_bytes(raw[at + 72 : at + 80], "little")
        if log + 64 <= len(raw) and raw[log : log + 4] == b"loge":
            length = int.from_bytes(raw[log + 8 : log + 12], "little")
            if 0 < length <= MiB and log + length <= len(raw):
                crc = crc32c_with_zeroed_field(raw[log : log + length], 4)
                raw[log + 4 : log + 8] = crc.to_bytes(4, "little")


def _attempt(path: Path, offset: int, mode: str = "r") -> None:
    harness.attempt(path, offset, EXTENTS_WINDOW, mode=mode)


@pytest.mark.parametrize("kind", ["dynamic", "fixed", "differencing", "live-log"])
def test_random_corruption_never_crashes(seeds: dict[str, Seed], kind: str) -> None:
    seed = seeds[kind]

    @given(muts=corruptions(seed.regions), refix=st.booleans(), offset=st.integers(0, 2**40))
    @hsettings(max_examples=80, deadline=None)
    def run(muts: list[tuple[int, bytes]], refix: bool, offset: int) -> None:
        with tempfile.TemporaryDirectory(prefix="vhdx-fuzz-") as tmp:
            target, _ = corrupted_copy(seed, Path(tmp), muts, _refix if refix else None)
            with within_bounds(MAX_SECONDS, MAX_PEAK):
                before = target.read_bytes()
                _attempt(target, offset)
                assert target.read_bytes() == before, "a read-only open wrote to the file"
                _attempt(target, offset, mode="r+")
                _attempt(target, offset)

    run()
