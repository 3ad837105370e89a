"""The core CLI commands (``vhd create/info/convert/map/compare``): exit codes 0/1/2, one-line
errors without tracebacks, and outputs checked against the spec model and the library."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vhd
from tests.conftest import need_tool
from tests.images import vhd_image
from tests.model import ModelImage, model_chain
from tests.strategies import payload
from tests.tools.startup import loaded_modules

VHD_CLI = str(Path(sys.executable).with_name("vhd"))
KiB = 1024
MiB = 1024 * KiB


def cli(*args: str | Path, expect: int) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [VHD_CLI, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    if expect == 2:
        errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("vhd: warning:")]
        assert len(errors) == 1 and errors[0].startswith("vhd: error: "), proc.stderr
    return proc


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path, bytes]:
    base = vhd_image(
        tmp_path / "base.vhd", 2 * MiB, block_size=64 * KiB, writes=[(0, payload(300 * KiB, 1))]
    )
    writes = [(100 * KiB + 3, payload(5000, 2)), (2 * MiB - 4096, payload(4096, 3))]
    child = vhd_image(tmp_path / "child.vhd", parent=base, block_size=16 * KiB, writes=writes)
    return base.path, child.path, child.content


@pytest.mark.parametrize(
    ("args", "kind", "size"),
    [
        (["10M"], 3, 10 * MiB),
        (["1536K", "--type", "fixed"], 2, 1536 * KiB),
        (["1G", "--block-size", "64K"], 3, 1 << 30),
        (["513K"], 3, 513 * KiB),
    ],
)
def test_create(tmp_path: Path, args: list[str], kind: int, size: int) -> None:
    image = tmp_path / "x.vhd"
    cli("create", image, *args, expect=0)
    model = ModelImage(image)
    assert model.footer.disk_type == kind
    assert model.size == model.footer.original_size == size
    if "--block-size" in args:
        assert model.block_size == 64 * KiB


def test_create_errors(tmp_path: Path) -> None:
    image = tmp_path / "x.vhd"
    cli("create", image, "12Q", expect=2)
    cli("create", image, "1000", expect=2)  # not whole sectors
    cli("create", image, "3T", expect=2)  # beyond 2040 GiB
    assert not image.exists()
    cli("create", image, "1M", expect=0)
    before = image.read_bytes()
    cli("create", image, "2M", expect=2)  # exists
    assert image.read_bytes() == before
    cli("create", image, "2M", "--force", expect=0)
    assert ModelImage(image).size == 2 * MiB
    cli("create", tmp_path / "c.vhd", "--parent", tmp_path / "missing.vhd", expect=2)


def test_create_child(tmp_path: Path, chain: tuple[Path, Path, bytes]) -> None:
    base, _, _ = chain
    kid = tmp_path / "kid.vhd"
    cli("create", kid, "--parent", base, expect=0)
    image = model_chain([base, kid])
    assert image.footer.disk_type == 4
    assert image.read_all() == ModelImage(base).read_all()


def test_info(tmp_path: Path, chain: tuple[Path, Path, bytes]) -> None:
    base, child, _ = chain
    out = json.loads(cli("info", "--json", child, expect=0).stdout)
    assert out["type"] == "differencing" and out["size"] == 2 * MiB
    assert out["footer"]["current_size"]["raw"] == 2 * MiB
    text = cli("info", child, expect=0).stdout
    assert "differencing" in text
    cli("info", tmp_path / "nope.vhd", expect=2)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(payload(10000, 4))
    cli("info", junk, expect=2)
    base.rename(tmp_path / "moved.vhd")
    # The parent is gone: info still describes the child and warns, or fails in one line.
    proc = subprocess.run([VHD_CLI, "info", str(child)], capture_output=True, text=True, timeout=60)
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr
    assert "base.vhd" in proc.stderr


def test_convert_flattens_a_chain(tmp_path: Path, chain: tuple[Path, Path, bytes]) -> None:
    _, child, content = chain
    flat = tmp_path / "flat.raw"
    cli("convert", child, flat, expect=0)
    assert flat.read_bytes() == content
    out = tmp_path / "flat.vhd"
    cli("convert", child, out, "--block-size", "4K", expect=0)
    model = ModelImage(out)
    assert model.footer.disk_type == 3 and model.block_size == 4 * KiB
    assert model.read_all() == content
    fixed = tmp_path / "fixed.vhd"
    cli("convert", "--type", "fixed", flat, fixed, expect=0)
    assert ModelImage(fixed).read_all() == content
    cli("convert", child, flat, expect=2)  # exists
    cli("convert", tmp_path / "missing.vhd", tmp_path / "o.raw", expect=2)


def test_convert_azure(tmp_path: Path) -> None:
    src = tmp_path / "odd.raw"
    data = payload(3 * MiB + 4096, 5)
    with src.open("wb") as f:
        f.write(data)
        f.truncate(21 * MiB + 4096)  # not a whole MiB; above Azure's 20 MiB minimum
    out = tmp_path / "azure.vhd"
    cli("convert", "--azure", src, out, expect=0)
    model = ModelImage(out)
    assert model.footer.disk_type == 2
    assert model.size == 22 * MiB and out.stat().st_size == 22 * MiB + 512
    assert model.read_all() == data + bytes(22 * MiB - len(data))
    # Below Azure's 20 MiB minimum the disk is grown to 20 MiB (zeros at the end).
    small = tmp_path / "small.raw"
    small.write_bytes(data)
    cli("convert", "--azure", small, tmp_path / "small.vhd", expect=0)
    model = ModelImage(tmp_path / "small.vhd")
    assert model.size == 20 * MiB and model.footer.disk_type == 2
    assert model.read_all() == data + bytes(20 * MiB - len(data))


def test_map(chain: tuple[Path, Path, bytes]) -> None:
    base, child, _ = chain
    runs = json.loads(cli("map", "--json", child, expect=0).stdout)
    with vhd.open(child) as disk:
        expected = list(disk.extents())
    merged: list[list[int | None]] = []  # rows are also cut where the file offset jumps
    for r in runs:
        if merged and merged[-1][2] == r["layer"] and merged[-1][0] + merged[-1][1] == r["offset"]:
            merged[-1][1] += r["length"]
        else:
            merged.append([r["offset"], r["length"], r["layer"]])
    assert [tuple(m) for m in merged] == [tuple(e) for e in expected]
    image = model_chain([base, child])
    for r in runs:
        assert image.layer(r["offset"] // 512) == r["layer"]
        assert image.layer((r["offset"] + r["length"]) // 512 - 1) == r["layer"]


def test_compare(tmp_path: Path, chain: tuple[Path, Path, bytes]) -> None:
    base, child, content = chain
    raw = tmp_path / "same.raw"
    raw.write_bytes(content)
    cli("compare", child, raw, expect=0)
    cli("compare", raw, child, expect=0)
    cli("compare", base, child, expect=1)
    changed = bytearray(content)
    changed[2 * MiB - 1] ^= 1
    raw.write_bytes(bytes(changed))
    cli("compare", child, raw, expect=1)
    cli("compare", child, tmp_path / "missing.raw", expect=2)


def test_map_json_host_offsets(tmp_path: Path, chain: tuple[Path, Path, bytes]) -> None:
    """host_offset is where each run's bytes are in its layer's file: the bytes there are the
    guest's, and for a single dynamic image they equal qemu-img map's "offset" (a host offset;
    qemu's guest offset is "start")."""
    base, child, content = chain
    rows = json.loads(cli("map", "--json", child, expect=0).stdout)
    assert rows[0]["guest_offset"] == 0
    assert sum(r["length"] for r in rows) == len(content)
    for r in rows:
        assert r["offset"] == r["guest_offset"]  # the old key, kept
        if r["data"]:
            with open(r["path"], "rb") as f:
                f.seek(r["host_offset"])
                got = f.read(r["length"])
            want = content[r["guest_offset"] : r["guest_offset"] + r["length"]]
            assert got == want
        else:
            assert r["host_offset"] is None
    qemu = subprocess.run(
        [need_tool("qemu-img"), "map", "-f", "vpc", "--output=json", str(base)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = [e for e in json.loads(qemu.stdout) if e["data"]]
    ours = [r for r in json.loads(cli("map", "--json", base, expect=0).stdout) if r["data"]]
    assert ours
    for r in ours:  # qemu reports whole blocks, we report sector runs: same file positions
        (e,) = [e for e in theirs if e["start"] <= r["guest_offset"] < e["start"] + e["length"]]
        assert r["host_offset"] == e["offset"] + r["guest_offset"] - e["start"], (r, e)


def test_disk_type_prints_its_name(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    with vhd.create(image, MiB) as disk:
        assert str(disk.type) == "dynamic" and f"{disk.type}" == "dynamic"
        assert disk.type == 3 and int(disk.type) == 3


def test_info_shows_all_8_locator_slots(chain: tuple[Path, Path, bytes]) -> None:
    _, child, _ = chain
    text = cli("info", child, expect=0).stdout
    for slot in range(8):
        assert f"slot {slot} " in text
    assert len(re.findall(r"slot \d empty", text)) == 5  # W2ku, W2ru, MacX used
    slots = json.loads(cli("info", "--json", child, expect=0).stdout)["locator_slots"]
    assert [s["slot"] for s in slots] == list(range(8))
    assert [s["in_use"] for s in slots].count(True) == 3


# What a command that only reads VHDs must not import at start-up (issue 9 item 17: the
# interpreter's start-up and imports are most of `vhd compare`'s time on sparse pairs).
# dataclasses brings inspect (ast, dis, tokenize) and compiles each class's methods; pkgutil
# brings importlib.util; uuid brings platform; shutil (argparse's terminal width) bz2 and lzma;
# urllib.parse brings ipaddress; ctypes is only for punching holes and page-aligned buffers.
_HEAVY = (
    "construct", "vhd.vhdx", "concurrent.futures", "logging", "secrets", "fractions", "traceback",
    "dataclasses", "inspect", "pkgutil", "importlib.util", "uuid", "platform", "shutil", "bz2",
    "lzma", "urllib", "datetime",
)  # fmt: skip
# Only compare's reading path (a pair holding data) needs its worker threads, and typing with
# them (vhd.workers is Generic), and ctypes for its page-aligned buffers (vhd.buffers); a command
# that reads no data imports none of them.
_READING_ONLY = ("typing", "queue", "vhd.workers", "ctypes")


def test_vhd_commands_import_only_what_they_need(tmp_path: Path) -> None:
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    vhd.create(a, 64 << 20).close()
    vhd.create(b, 64 << 20).close()
    # A pair holding data takes compare's reading path (its worker threads) too.
    c, d = tmp_path / "c.vhd", tmp_path / "d.vhd"
    for path in (c, d):
        with vhd.create(path, 64 << 20) as disk:
            disk.pwrite(b"\x5a" * (3 << 20), 1 << 20)
    commands = (("compare", a, b), ("compare", c, d), ("info", c), ("map", c), ("check", c))
    for args in (*commands, ("--version",)):
        loaded = loaded_modules(*args)
        assert "vhd" in loaded and "vhdtools.cli" in loaded
        heavy = sorted(m for m in loaded if m.split(".")[0] in _HEAVY or m.startswith(_HEAVY))
        assert not heavy, f"vhd {args[0]} imports {heavy}"
        if args != ("compare", c, d):
            assert not set(_READING_ONLY) & loaded, f"vhd {args[0]} imports {_READING_ONLY}"
        else:
            assert "vhd.workers" in loaded  # the reading path did run
