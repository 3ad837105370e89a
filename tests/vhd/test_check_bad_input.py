"""Bad input: damaged images (random bytes in the footers, header, BAT and locators, extreme field
values, truncation) give a clean error (exit 2) or findings (exit 1), in bounded time, and the
plain check never changes the file.  A repair of them never crashes, and when it reports the image
clean, the image opens and reads end to end."""

from __future__ import annotations

import random
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest

import vhd
from tests.images import MiB, build_hyperv, make_chain, make_dynamic, sha
from tests.vhd.helpers import run_cli

CASES = 100

# (offset, format) of fields whose extreme values are interesting: footer then header.
FIELDS = [
    (8, ">I"), (12, ">I"), (16, ">Q"), (40, ">Q"), (48, ">Q"), (56, ">I"), (60, ">I"),
    (512 + 8, ">Q"), (512 + 16, ">Q"), (512 + 24, ">I"), (512 + 28, ">I"), (512 + 32, ">I"),
    (512 + 576 + 4, ">I"), (512 + 576 + 8, ">I"), (512 + 576 + 16, ">Q"),
]  # fmt: skip
EXTREMES = [0, 1, 511, 512, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 1 << 40]


def mutate(raw: bytearray, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:  # random bytes in the metadata
        for _ in range(rng.randrange(1, 8)):
            region = rng.choice([(0, 512), (512, 1536), (1536, 0x2000), (len(raw) - 512, len(raw))])
            lo, hi = region[0], min(region[1], len(raw))
            if hi > lo:
                raw[rng.randrange(lo, hi)] = rng.randrange(256)
    elif kind == 1:  # an extreme value in a field, in one or both footers
        at, fmt = rng.choice(FIELDS)
        value = rng.choice(EXTREMES) & (0xFFFFFFFF if fmt == ">I" else 0xFFFFFFFFFFFFFFFF)
        packed = struct.pack(fmt, value)
        raw[at : at + len(packed)] = packed
        if at < 512 and rng.random() < 0.5:
            tail = len(raw) - 512 + at
            raw[tail : tail + len(packed)] = packed
    elif kind == 2:  # truncation
        return bytes(raw[: rng.randrange(0, len(raw))])
    elif kind == 3:  # a BAT entry pointing anywhere
        at = 0x600 + 4 * rng.randrange(0, 8)
        raw[at : at + 4] = struct.pack(
            ">I", rng.choice([0, 1, 3, 0x7FFFFFFF, rng.randrange(1 << 32)])
        )
    else:  # zero a whole record
        lo = rng.choice([0, 512, len(raw) - 512])
        raw[lo : lo + 512] = bytes(512)
    return bytes(raw)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("bases")
    make_dynamic(tmp / "d.vhd", 4 * MiB)
    with vhd.create(tmp / "f.vhd", MiB, type="fixed") as disk:
        disk.pwrite(b"f" * 4096, 0)
    parent, _child, _ = make_chain(tmp, 4 * MiB)
    content = bytes(range(256)) * (4 * MiB // 256)
    build_hyperv(tmp / "hv.vhd", size=4 * MiB, block_size=MiB, content=content)
    return {
        name: (tmp / name).read_bytes() for name in ("d.vhd", "f.vhd", "child.vhd", "hv.vhd")
    } | {"parent": parent.read_bytes()}


def test_damaged_images(tmp_path: Path, bases: dict[str, bytes]) -> None:
    rng = random.Random(1234)
    (tmp_path / "parent.vhd").write_bytes(bases["parent"])
    names = ["d.vhd", "f.vhd", "child.vhd", "hv.vhd"]
    outcomes = {0: 0, 1: 0, 2: 0}
    tracemalloc.start()
    try:
        for case in range(CASES):
            name = names[case % len(names)]
            path = tmp_path / name
            path.write_bytes(mutate(bytearray(bases[name]), rng))
            before = sha(path)
            started = time.monotonic()
            rc, out = run_cli("check", "--deep", str(path))
            assert time.monotonic() - started < 5, f"case {case}: slow"
            assert rc in (0, 1, 2), out
            assert "Traceback" not in out
            assert sha(path) == before, f"case {case}: the check changed the file"
            outcomes[rc] += 1
            if rc == 0:  # clean by the check: the library must open and read it too
                with vhd.open(path, "r") as disk:
                    disk.pread(disk.size, 0)
            fixed = tmp_path / f"fixed-{name}"
            shutil.copy(path, fixed)
            rc2, out2 = run_cli("check", "--repair", str(fixed))
            assert rc2 in (0, 1, 2), out2
            if rc2 == 0:
                with vhd.open(fixed, "r") as disk:
                    disk.pread(disk.size, 0)
            fixed.unlink()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB
    # The mutations really produced both kinds of outcome.
    assert outcomes[1] > 10 and outcomes[2] > 5, outcomes
