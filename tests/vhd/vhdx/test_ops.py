"""vhd commit, compact, resize and set-parent on VHDX and mixed VHD/VHDX chains (vhd.vhdx.ops,
vhd.lineage).  Contents are checked against bytearray models; qemu-img (``check -f vhdx`` and
``compare``) reads fixed and dynamic results; libvhdi (pyvhdi) reads every type, chains
included, and checks each child's recorded parent identity against its parent."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import vhd
from tests.interop.oracles import libvhdi_read
from tests.vhd.helpers import run_cli
from tests.vhd.vhdx.helpers import MiB, assert_qemu_clean, qemu_check, qemu_raw, run
from vhd import InUseError, ParentMismatchError
from vhd.commit import commit
from vhd.reparent import set_parent
from vhd.vhdx import VHDXDisk, create_vhdx, open_vhdx

ROOT = Path(__file__).resolve().parents[3]


def _writes(disk: vhd.Disk, model: bytearray, count: int, seed: int, align: int = 4096) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        length = rng.randrange(1, 5) * align
        offset = rng.randrange(0, (disk.size - length) // align + 1) * align
        data = rng.randbytes(length)
        disk.pwrite(data, offset)
        model[offset : offset + length] = data


def _read(path: Path) -> bytes:
    with vhd.open(path) as disk:
        return disk.pread(disk.size, 0)


def _qemu_after_crash(image: Path, model: bytes | None, tmp: Path) -> None:
    """qemu opens what a crash left: ``qemu-img check -r all`` on a copy replays a live log
    (qemu refuses that read-only), then the copy checks clean and reads ``model``."""
    copy = tmp / "crash-copy.vhdx"
    shutil.copyfile(image, copy)
    proc = qemu_check(copy, "-r", "all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_qemu_clean(copy)
    if model is not None:
        assert qemu_raw(copy, tmp / "crash-copy.raw") == model


def _libvhdi(chain: list[Path], tmp: Path) -> bytes:
    """The leaf of ``chain`` (base first) as libvhdi reads it, parent identities checked."""
    out = tmp / "libvhdi.raw"
    libvhdi_read(chain, out)
    return out.read_bytes()


def _qemu_same(image: Path, model: bytes, tmp: Path) -> None:
    rc, out = run_cli("check", str(image))
    assert rc == 0, out
    assert_qemu_clean(image)
    assert qemu_raw(image, tmp / "qemu.raw") == model
    raw = tmp / "model.raw"
    raw.write_bytes(model)
    proc = run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(image), str(raw))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _base(path: Path, size: int = 16 * MiB, seed: int = 1, **kw: object) -> bytearray:
    model = bytearray(size)
    with create_vhdx(path, size, block_size=MiB, **kw) as disk:  # type: ignore[arg-type]
        _writes(disk, model, 30, seed)
    return model


def _child(path: Path, parent: Path, model: bytearray, seed: int) -> None:
    with create_vhdx(path, 0, type="differencing", parent=vhd.open(parent), block_size=MiB) as d:
        _writes(d, model, 30, seed)


# -- commit --------------------------------------------------------------------------------


def test_commit_vhdx_child_into_dynamic_parent_relinks_grandchild(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.vhdx", tmp_path / "mid.vhdx", tmp_path / "top.avhdx"
    model = _base(base)
    _child(mid, base, model, 2)
    with vhd.open(mid, "r+") as d:
        d.discard(5 * MiB, MiB)  # a ZERO block: the parent must read zeros there after commit
        model[5 * MiB : 6 * MiB] = bytes(MiB)
    mid_model = bytes(model)
    _child(top, mid, model, 3)
    rc, out = run_cli("commit", str(mid))
    assert rc == 0, out
    assert "top.avhdx: now a child of" in out and not mid.exists()
    _qemu_same(base, mid_model, tmp_path)
    assert _read(top) == bytes(model)
    assert _libvhdi([base, top], tmp_path) == bytes(model)
    rc, out = run_cli("check", str(top))
    assert rc == 0, out


def test_commit_keep_records_the_parents_new_data_write_guid(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhdx", tmp_path / "child.vhdx"
    model = _base(base)
    _child(child, base, model, 4)
    rc, out = run_cli("commit", "--keep", str(child))
    assert rc == 0, out
    # Writing changed the parent's DataWriteGuid; the kept child names the new one.
    with open_vhdx(child) as disk:
        assert disk.pread(disk.size, 0) == bytes(model)
    assert _libvhdi([base, child], tmp_path) == bytes(model)
    assert _read(base) == bytes(model)


@pytest.mark.parametrize("fmt", ["vhd", "vhdx"])
def test_commit_mixed_chains(tmp_path: Path, fmt: str) -> None:
    """A VHDX child into a VHD parent, and a VHD child into a VHDX parent."""
    size = 16 * MiB
    model = bytearray(size)
    if fmt == "vhd":
        base, child = tmp_path / "base.vhd", tmp_path / "child.vhdx"
        with vhd.create(base, size) as disk:
            _writes(disk, model, 20, 5)
        _child(child, base, model, 6)
    else:
        base, child = tmp_path / "base.vhdx", tmp_path / "child.vhd"
        model = _base(base, size, 5)
        rc, out = run_cli("create", str(child), "--parent", str(base))
        assert rc == 0, out
        with vhd.open(child, "r+") as disk:
            _writes(disk, model, 20, 6)
    assert _libvhdi([base, child], tmp_path) == bytes(model)
    rc, out = run_cli("commit", str(child))
    assert rc == 0, out
    assert _read(base) == bytes(model)
    assert _libvhdi([base], tmp_path) == bytes(model)
    rc, out = run_cli("check", str(base))
    assert rc == 0, out


def test_commit_refuses_a_vhdx_in_use(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhdx", tmp_path / "child.vhdx"
    model = _base(base)
    _child(child, base, model, 7)
    before = base.read_bytes()
    with open_vhdx(base, "r+"), pytest.raises(InUseError):  # someone writes the parent
        commit(child)
    assert base.read_bytes() == before and child.exists()


# Runs a command with every file write of the VHDX code counted; the process SIGKILLs itself
# just before write number N (or prints how many writes a whole run makes).
_KILL_AT_WRITE = r"""
import os, signal, sys
import vhd.vhdx.disk, vhd.vhdx.ops
from vhdtools.cli import main
limit, calls = int(sys.argv[1]), [0]
real = vhd.vhdx.disk.write_all
def counted(*args, **kwargs):
    calls[0] += 1
    if calls[0] == limit:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
vhd.vhdx.disk.write_all = vhd.vhdx.ops.write_all = counted
rc = main(sys.argv[2:])
print(calls[0])
sys.exit(rc)
"""


def _kill_rounds(argv: list[str], files: list[Path], rounds: int, check: Callable[[], None]) -> int:
    """Count the VHDX writes of one whole run of ``vhd ARGV``, then run it again from the same
    start (``files`` restored) ``rounds`` times, killed by SIGKILL at writes spread over the
    whole run (data copies, log entries, headers, pages in place); ``check`` judges each
    state left.  Returns how many runs the kill cut short."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    saved = [(f, f.with_name(f.name + ".saved")) for f in files]
    for f, copy in saved:
        shutil.copyfile(f, copy)

    def restore() -> None:
        for f, copy in saved:
            shutil.copyfile(copy, f)

    def run_until(limit: int) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", _KILL_AT_WRITE, str(limit), *argv]
        return subprocess.run(
            command, cwd=ROOT, env=env, timeout=300, check=False, capture_output=True, text=True
        )

    whole = run_until(0)
    assert whole.returncode == 0, whole.stderr
    writes = int(whole.stdout.split()[-1])
    check()
    interrupted = 0
    for k in range(rounds):
        restore()
        proc = run_until(1 + (writes - 1) * k // max(1, rounds - 1))
        interrupted += proc.returncode == -signal.SIGKILL
        check()
    return interrupted


def test_sigkill_during_commit_loses_nothing(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhdx", tmp_path / "child.vhdx"
    size = 24 * MiB
    model = bytearray(size)
    with create_vhdx(base, size, block_size=MiB) as disk:
        _writes(disk, model, 40, 8)
    with create_vhdx(child, 0, type="differencing", parent=vhd.open(base), block_size=MiB) as d:
        for i in range(0, size, 2 * MiB):
            data = bytes([i // MiB % 250 + 1]) * (MiB + 4096)
            d.pwrite(data, i)
            model[i : i + len(data)] = data

    def unchanged() -> None:
        # Whatever was cut short, the chain reads exactly as before and the parent opens clean.
        assert _read(child) == bytes(model)
        _qemu_after_crash(base, None, tmp_path)

    argv = ["commit", "--keep", "-q", str(child)]
    assert _kill_rounds(argv, [base, child], 8, unchanged) == 8
    rc, out = run_cli("commit", str(child))
    assert rc == 0, out
    _qemu_same(base, bytes(model), tmp_path)


# -- compact -------------------------------------------------------------------------------


def test_compact_dynamic(tmp_path: Path) -> None:
    image = tmp_path / "d.vhdx"
    size = 32 * MiB
    model = bytearray(size)
    with create_vhdx(image, size, block_size=MiB) as disk:
        for b in range(0, 32, 2):
            data = bytes([b + 1]) * 8192
            disk.pwrite(data, b * MiB + 4096)
            model[b * MiB + 4096 : b * MiB + 4096 + 8192] = data
        for b in range(0, 32, 4):  # these blocks now hold only zeros
            disk.pwrite(bytes(MiB), b * MiB)
            model[b * MiB : (b + 1) * MiB] = bytes(MiB)
    before = image.stat().st_size
    rc, out = run_cli("compact", str(image))
    assert rc == 0, out
    assert "8 blocks freed" in out
    assert image.stat().st_size == before - 8 * MiB
    _qemu_same(image, bytes(model), tmp_path)
    assert _libvhdi([image], tmp_path) == bytes(model)


def test_compact_differencing_keeps_the_parent_valid(tmp_path: Path) -> None:
    base, child, top = tmp_path / "base.vhdx", tmp_path / "c.vhdx", tmp_path / "top.vhdx"
    model = _base(base)
    parent_model = bytes(model)
    _child(child, base, model, 9)
    with vhd.open(child, "r+") as disk:
        disk.pwrite(b"\x55" * 8192, 6 * MiB)
    # Clear that block's sector bits in the file, as a trim by Hyper-V leaves a block: present,
    # no sector its own (it reads the parent again).
    with open_vhdx(child, open_parent=False) as disk:
        bits = disk._bitmap_base(6)
        assert bits is not None
        at = bits + disk._bitmap_location(6)[1]
    with child.open("r+b") as f:
        f.seek(at)
        f.write(bytes(MiB // 512 // 8))
    model[6 * MiB : 7 * MiB] = parent_model[6 * MiB : 7 * MiB]
    _child(top, child, model, 10)
    before = child.stat().st_size
    rc, out = run_cli("compact", str(child))
    assert rc == 0, out
    assert "1 blocks freed" in out and child.stat().st_size < before
    # Compaction keeps the DataWriteGuid, so the grandchild still accepts its parent.
    assert _read(top) == bytes(model)
    assert _libvhdi([base, child, top], tmp_path) == bytes(model)


def test_compact_refuses_fixed_and_in_use(tmp_path: Path) -> None:
    fixed = tmp_path / "f.vhdx"
    create_vhdx(fixed, 4 * MiB, type="fixed", block_size=MiB).close()
    rc, out = run_cli("compact", str(fixed))
    assert rc == 2 and "fixed disk" in out
    dyn = tmp_path / "d.vhdx"
    _base(dyn)
    with open_vhdx(dyn):
        rc, out = run_cli("compact", str(dyn))
    assert rc == 2 and "in use" in out


def test_sigkill_during_compact_loses_nothing(tmp_path: Path) -> None:
    image = tmp_path / "d.vhdx"
    size = 48 * MiB
    model = bytearray(size)
    with create_vhdx(image, size, block_size=MiB) as disk:
        for b in range(48):
            data = bytes([b % 250 + 1]) * 4096 if b % 3 else bytes(4096)
            disk.pwrite(data, b * MiB)
            model[b * MiB : b * MiB + 4096] = data

    def unchanged() -> None:
        assert _read(image) == bytes(model)
        _qemu_after_crash(image, bytes(model), tmp_path)

    assert _kill_rounds(["compact", "-q", str(image)], [image], 8, unchanged) == 8
    rc, out = run_cli("compact", str(image))
    assert rc == 0, out
    _qemu_same(image, bytes(model), tmp_path)


# -- resize --------------------------------------------------------------------------------


@pytest.mark.parametrize("vtype", ["fixed", "dynamic"])
def test_resize_grow_and_shrink(tmp_path: Path, vtype: str) -> None:
    image = tmp_path / "d.vhdx"
    size = 8 * MiB + 512 * 3
    model = bytearray(size)
    with create_vhdx(image, size, type=vtype, block_size=MiB) as disk:
        _writes(disk, model, 20, 11, align=512)
        disk.pwrite(b"\x77" * 512, size - 512)
        model[size - 512 :] = b"\x77" * 512
    rc, out = run_cli("resize", str(image), "20M")
    assert rc == 0, out
    model += bytes(20 * MiB - size)
    _qemu_same(image, bytes(model), tmp_path)
    rc, out = run_cli("resize", "--shrink", str(image), "6M")
    assert rc == 2 and "pass --force" in out
    rc, out = run_cli("resize", "--shrink", "--force", str(image), "6M")
    assert rc == 0, out
    del model[6 * MiB :]
    _qemu_same(image, bytes(model), tmp_path)
    # Grown again: what lay past the shrunk end reads as zeros (qemu and libvhdi agree).
    rc, out = run_cli("resize", str(image), "12M")
    assert rc == 0, out
    model += bytes(6 * MiB)
    _qemu_same(image, bytes(model), tmp_path)
    assert _libvhdi([image], tmp_path) == bytes(model)


def test_resize_relocates_a_full_bat(tmp_path: Path) -> None:
    image = tmp_path / "d.vhdx"
    model = _base(image, 8 * MiB)
    # 1 MiB blocks: one MiB of BAT holds 128 Ki entries; 200 GiB needs more.
    rc, out = run_cli("resize", str(image), "200G")
    assert rc == 0, out
    with open_vhdx(image) as disk:
        assert disk.layout.bat_region.length > MiB
        assert disk.pread(8 * MiB, 0) == bytes(model)
        assert disk.pread(MiB, 199 * 1024 * MiB) == bytes(MiB)
    assert_qemu_clean(image)
    # Blocks written after the BAT moved to the end, then compacted: they move below it,
    # into the old BAT's space among others, and nothing lands inside the new one.
    with vhd.open(image, "r+") as disk:
        for i in range(4):
            disk.pwrite(b"\x42" * 4096, (100 + i) * 1024 * MiB)
        disk.pwrite(bytes(MiB), 0)
    model[:MiB] = bytes(MiB)
    rc, out = run_cli("compact", str(image))
    assert rc == 0 and "1 blocks freed" in out, out
    assert "0 moved" not in out
    with open_vhdx(image) as disk:
        assert disk.pread(8 * MiB, 0) == bytes(model)
        for i in range(4):
            assert disk.pread(4096, (100 + i) * 1024 * MiB) == b"\x42" * 4096
    rc, out = run_cli("check", str(image))
    assert rc == 0, out
    assert_qemu_clean(image)


def test_resize_grown_differencing_hides_the_parent(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhdx", tmp_path / "c.vhdx"
    model = _base(base, 16 * MiB)
    _child(child, base, model, 12)
    rc, out = run_cli("resize", "--shrink", "--force", str(child), str(5 * MiB + 4096))
    assert rc == 0, out
    rc, out = run_cli("resize", str(child), "16M")
    assert rc == 0, out
    # The parent holds data past the shrunk end: the grown child reads zeros there.
    expect = bytes(model[: 5 * MiB + 4096]) + bytes(16 * MiB - 5 * MiB - 4096)
    assert _read(child) == expect
    assert _libvhdi([base, child], tmp_path) == expect
    rc, out = run_cli("check", str(child))
    assert rc == 0, out


def test_resize_refuses_a_parent_with_children(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhdx", tmp_path / "c.vhdx"
    model = _base(base)
    _child(child, base, model, 16)
    before = base.read_bytes()
    rc, out = run_cli("resize", str(base), "32M")
    assert rc == 2 and "c.vhdx" in out and "DataWriteGuid" in out, out
    assert base.read_bytes() == before


def test_4k_native_resize_and_compact(tmp_path: Path) -> None:
    """qemu cannot open 4K-native VHDX; libvhdi reads them."""
    image = tmp_path / "d.vhdx"
    size = 8 * MiB
    model = bytearray(size)
    with create_vhdx(image, size, block_size=MiB, logical_sector_size=4096) as disk:
        _writes(disk, model, 20, 17)
        disk.pwrite(bytes(MiB), 3 * MiB)
        model[3 * MiB : 4 * MiB] = bytes(MiB)
    rc, out = run_cli("resize", str(image), str(12 * MiB + 512))
    assert rc == 2 and "4096-byte sector" in out
    rc, out = run_cli("resize", str(image), str(12 * MiB + 4096))
    assert rc == 0, out
    model += bytes(4 * MiB + 4096)
    rc, out = run_cli("compact", str(image))
    assert rc == 0 and "1 blocks freed" in out, out
    assert _read(image) == bytes(model)
    assert _libvhdi([image], tmp_path) == bytes(model)


# -- set-parent ----------------------------------------------------------------------------


def test_set_parent_after_a_move_and_on_a_middle_disk(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.vhdx", tmp_path / "mid.vhdx", tmp_path / "top.vhd"
    model = _base(base)
    _child(mid, base, model, 13)
    rc, out = run_cli("create", str(top), "--parent", str(mid))
    assert rc == 0, out
    with vhd.open(top, "r+") as disk:
        _writes(disk, model, 10, 14)
    store = tmp_path / "store"
    store.mkdir()
    os.rename(base, store / "moved.vhdx")
    rc, out = run_cli("set-parent", str(mid), str(store / "moved.vhdx"))
    assert rc == 0, out
    with open_vhdx(mid, open_parent=False) as disk:
        loc = disk.metadata.parent_locator
        assert loc is not None and loc.entries["relative_path"] == ".\\store\\moved.vhdx"
    # top (a VHD child of the VHDX mid) recorded mid's new time; the chain reads the same.
    assert _read(top) == bytes(model)
    assert _libvhdi([store / "moved.vhdx", mid, top], tmp_path) == bytes(model)
    rc, out = run_cli("check", str(top))
    assert rc == 0, out
    other = tmp_path / "other.vhdx"
    _base(other)
    with pytest.raises(ParentMismatchError):
        set_parent(mid, other)
    assert _read(top) == bytes(model)


def test_set_parent_across_formats(tmp_path: Path) -> None:
    """A VHD child follows its moved VHDX parent, and a VHDX child its moved VHD parent."""
    for base_name, child_name in (("b1.vhdx", "c1.vhd"), ("b2.vhd", "c2.vhdx")):
        base, child = tmp_path / base_name, tmp_path / child_name
        model = bytearray(8 * MiB)
        if base_name.endswith(".vhdx"):
            model = _base(base, 8 * MiB, 18)
        else:
            with vhd.create(base, 8 * MiB) as disk:
                _writes(disk, model, 10, 18)
        rc, out = run_cli("create", str(child), "--parent", str(base))
        assert rc == 0, out
        with vhd.open(child, "r+") as disk:
            _writes(disk, model, 10, 19)
        moved = tmp_path / "moved" / base_name
        moved.parent.mkdir(exist_ok=True)
        os.rename(base, moved)
        rc, out = run_cli("set-parent", str(child), str(moved))
        assert rc == 0, out
        assert _read(child) == bytes(model)
        assert _libvhdi([moved, child], tmp_path) == bytes(model)
        rc, out = run_cli("check", str(child))
        assert rc == 0, out


# -- mixed chains --------------------------------------------------------------------------


def test_vhd_child_of_vhdx_parent(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhdx", tmp_path / "child.vhd"
    model = _base(base)
    rc, out = run_cli("create", str(child), "--parent", str(base))
    assert rc == 0, out
    with vhd.open(child, "r+") as disk:
        assert isinstance(disk.parent, VHDXDisk)
        _writes(disk, model, 20, 15)
    assert _read(child) == bytes(model)
    assert _libvhdi([base, child], tmp_path) == bytes(model)
    rc, out = run_cli("info", "--chain", str(child))
    assert rc == 0 and "VHDX, dynamic" in out, out
    # Writing to the VHDX parent changes its DataWriteGuid: the child refuses it, as Hyper-V's do.
    with vhd.open(base, "r+") as disk:
        disk.pwrite(b"x", 0)
    rc, out = run_cli("check", str(child))
    assert rc != 0


def test_vhd_child_of_4k_vhdx_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    create_vhdx(base, 8 * MiB, logical_sector_size=4096, block_size=MiB).close()
    rc, out = run_cli("create", str(tmp_path / "c.vhd"), "--parent", str(base))
    assert rc == 2 and "4K-native" in out, out
    assert not (tmp_path / "c.vhd").exists()
