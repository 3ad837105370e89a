"""Random corruption of valid images (Hypothesis): whatever bytes change, opening, reading,
listing extents, writing and discarding either work or raise a clean :class:`vhd.VHDError` —
never another exception, never a hang, never unbounded memory.

Mutations aim at the metadata (both footers, the header, the BAT, the locators, bitmaps) as well
as anywhere; with ``refix`` the footer and header checksums are recomputed afterwards, so that
absurd field values get past the checksum test and reach the structural checks.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vhd
from tests.images import build_hyperv
from tests.model import checksum
from tests.strategies import hsettings, payload
from tests.vhd import harness
from tests.vhd.harness import Seed, corrupted_copy, within_bounds

KiB = 1024
MiB = 1024 * KiB
SIZE = 256 * KiB
MAX_SECONDS = 10.0
MAX_PEAK = 48 * MiB
EXTENTS_WINDOW = 4 * MiB
INTERESTING = [0, 1, 7, 511, 512, 0x600, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE]


def _regions(path: Path) -> tuple[tuple[int, int], ...]:
    n = path.stat().st_size
    out = [(0, n), (n - 512, n)]
    raw = path.read_bytes()
    if raw[:8] == b"conectix":
        table = struct.unpack(">Q", raw[512 + 16 : 512 + 24])[0]
        out += [(0, 512), (512, 1536), (512, 600), (1088, 1280), (table, min(n, table + 512))]
        # The first block's bitmap and data start.
        entry = struct.unpack(">I", raw[table : table + 4])[0]
        if entry != 0xFFFFFFFF and entry * 512 + 1024 <= n:
            out.append((entry * 512, entry * 512 + 1024))
    return tuple(out)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Seed]:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    out: dict[str, Seed] = {}

    dyn = root / "dynamic.vhd"
    with vhd.create(dyn, SIZE, block_size=4 * KiB) as disk:
        for i in (0, 3, 17, 63):
            disk.pwrite(payload(3000, i), i * 4096 + 700)
    out["dynamic"] = Seed((dyn,), _regions(dyn))

    fixed = root / "fixed.vhd"
    with vhd.create(fixed, SIZE, type="fixed") as disk:
        disk.pwrite(payload(SIZE, 2), 0)
    out["fixed"] = Seed((fixed,), _regions(fixed))

    chain = root / "chain"
    chain.mkdir()
    with vhd.create(chain / "base.vhd", SIZE, block_size=8 * KiB) as disk:
        disk.pwrite(payload(SIZE // 2, 5), 0)
    with vhd.create(chain / "child.vhd", parent=chain / "base.vhd", block_size=4 * KiB) as disk:
        disk.pwrite(payload(5000, 6), 10000)
    child = chain / "child.vhd"
    out["differencing"] = Seed((chain / "base.vhd", child), _regions(child))

    hv = root / "hyperv"
    hv.mkdir()
    content = bytearray(SIZE)
    for i in range(0, SIZE, 20 * KiB):
        content[i : i + 1024] = payload(1024, i)
    pid = build_hyperv(hv / "p.vhd", size=SIZE, block_size=16 * KiB, content=bytes(content))
    content[4096:8192] = payload(4096, 9)
    build_hyperv(
        hv / "c.vhd",
        size=SIZE,
        block_size=16 * KiB,
        content=bytes(content),
        present=set(range(8, 16)),
        parent=("p.vhd", pid),
        seed=3,
    )
    out["hyperv-child"] = Seed((hv / "p.vhd", hv / "c.vhd"), _regions(hv / "c.vhd"))
    return out


def corruptions(regions: tuple[tuple[int, int], ...]) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    """Big-endian fields, as VHD's records are."""
    return harness.corruptions(regions, INTERESTING, ("byte", "u32", "u64", "zeros"), ">")


def _refix(raw: bytearray) -> None:
    """Recompute the checksums of both footers and of the header, where their cookies are."""
    for at in (0, len(raw) - 512):
        if at >= 0 and raw[at : at + 8] == b"conectix":
            raw[at + 64 : at + 68] = b"\0\0\0\0"
            raw[at + 64 : at + 68] = struct.pack(">I", checksum(bytes(raw[at : at + 512]), 64))
    if raw[:8] == b"conectix":
        base = struct.unpack(">Q", raw[16:24])[0]
        if base + 1024 <= len(raw) and raw[base : base + 8] == b"cxsparse":
            raw[base + 36 : base + 40] = b"\0\0\0\0"
            value = checksum(bytes(raw[base : base + 1024]), 36)
            raw[base + 36 : base + 40] = struct.pack(">I", value)


def _attempt(path: Path, offset: int, **kw: object) -> None:
    harness.attempt(path, offset, EXTENTS_WINDOW, **kw)


@pytest.mark.parametrize("kind", ["dynamic", "fixed", "differencing", "hyperv-child"])
def test_random_corruption_never_crashes(seeds: dict[str, Seed], kind: str) -> None:
    seed = seeds[kind]

    @given(muts=corruptions(seed.regions), refix=st.booleans(), offset=st.integers(0, 2**40))
    @hsettings(max_examples=150)
    def run(muts: list[tuple[int, bytes]], refix: bool, offset: int) -> None:
        with tempfile.TemporaryDirectory(prefix="vhd-fuzz-") as tmp:
            target, _ = corrupted_copy(seed, Path(tmp), muts, _refix if refix else None)
            with within_bounds(MAX_SECONDS, MAX_PEAK):
                _attempt(target, offset)
                _attempt(target, offset, strict=False)
                before = target.read_bytes()
                _attempt(target, offset, mode="r+")
                if target.read_bytes() != before:
                    # Whatever was written must read back through a fresh open, cleanly.
                    _attempt(target, offset, strict=False)

    run()


VHD_CLI = str(Path(sys.executable).with_name("vhd"))


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_random_corruption_cli(seeds: dict[str, Seed], kind: str) -> None:
    """The CLI on corrupted images: exit 0/1/2, errors in one line, never a traceback."""
    seed = seeds[kind]

    @given(muts=corruptions(seed.regions), refix=st.booleans())
    @hsettings(max_examples=8)
    def run(muts: list[tuple[int, bytes]], refix: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="vhd-fuzz-cli-") as tmp:
            target, raw = corrupted_copy(seed, Path(tmp), muts, _refix if refix else None)
            for args in (["info", "--json"], ["map"], ["check", "--deep"]):
                proc = subprocess.run(
                    [VHD_CLI, *args, str(target)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert "Traceback" not in proc.stderr, proc.stderr
                assert proc.returncode in (0, 1, 2), (args, proc.returncode, proc.stderr)
                if proc.returncode == 2:
                    errors = [
                        ln for ln in proc.stderr.splitlines() if not ln.startswith("vhd: warning:")
                    ]
                    assert len(errors) == 1 and errors[0].startswith("vhd: error: "), proc.stderr
            assert target.read_bytes() == raw, "read-only commands changed the file"

    run()
