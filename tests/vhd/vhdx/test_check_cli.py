"""``vhd check`` on VHDX keeps the promises the command makes for VHD (README, "Checking,
repairing and maintaining images"; Safety: locks): parents are followed as the other commands on
one's own images follow them, ``--confine-parents`` applies the serving policy, an image in use
is exit 2 (one line) unless ``-U``, ``-q`` prints nothing, and a missing parent is a finding
about a child whose own structures are still checked.  And ``vhd info`` shows a live log's
sequence in text as in ``--json``."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lockhelpers import Holder
from tests.vhd.helpers import run_cli
from tests.vhd.vhdx.helpers import MiB, assert_qemu_clean, qemu_create, qemu_write
from tests.vhd.vhdx.test_fuzz import _live_log
from vhd.vhdx import create_vhdx, open_vhdx


def _chain_in_two_folders(tmp_path: Path) -> tuple[Path, Path]:
    """base in a/, its child in b/ made by ``vhd create`` (relative_path ``..\\a\\base.vhdx``)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = tmp_path / "a" / "base.vhdx"
    with create_vhdx(base, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"p" * 4096, 0)
    child = tmp_path / "b" / "c.vhdx"
    assert run_cli("create", str(child), "--parent", str(base))[0] == 0
    return base, child


def test_check_follows_the_locators_like_info_map_and_convert(tmp_path: Path) -> None:
    base, child = _chain_in_two_folders(tmp_path)
    assert run_cli("info", str(child))[0] == 0  # info reads the chain ...
    rc, out = run_cli("check", str(child))  # ... so check must too
    assert (rc, out) == (0, f"{child}: vhdx differencing, {4 * MiB} bytes: clean\n")
    rc, out = run_cli("check", "--confine-parents", str(child))
    assert rc == 1 and "outside the allowed folders" in out, out
    # the child's own type and size are known even when its parent is not found
    assert out.startswith(f"{child}: vhdx differencing, {4 * MiB} bytes: 1 problem(s)"), out
    rc, out = run_cli("check", "--confine-parents", "--parent-dir", str(base.parent), str(child))
    assert rc == 0, out


def test_a_missing_parent_does_not_hide_the_childs_own_problems(tmp_path: Path) -> None:
    base, child = _chain_in_two_folders(tmp_path)
    with open_vhdx(child, "r+", parent_dirs=[str(base.parent)]) as disk:
        disk.pwrite(b"c" * 4096, MiB)
    _live_log(child)
    base.unlink()
    rc, out = run_cli("check", str(child))
    assert rc == 1 and "not found" in out and "the log is live" in out, out


def test_check_of_an_image_in_use_is_exit_2_and_minus_u_reads_it(tmp_path: Path) -> None:
    image = tmp_path / "busy.vhdx"
    create_vhdx(image, 4 * MiB, block_size=MiB).close()
    with Holder(image, "r+"):
        rc, out = run_cli("check", str(image))
        assert rc == 2 and out.count("\n") == 1 and "in use" in out, out
        rc, out = run_cli("check", "--json", str(image))
        assert rc == 2 and "in use" in json.loads(out)["error"], out
        rc, out = run_cli("check", "-U", str(image))
        assert rc == 0 and out.endswith("clean\n"), out


def test_check_quiet_prints_nothing(tmp_path: Path) -> None:
    image = tmp_path / "q.vhdx"
    create_vhdx(image, 4 * MiB, block_size=MiB).close()
    assert run_cli("check", "-q", str(image)) == (0, "")
    live = tmp_path / "l.vhdx"
    with create_vhdx(live, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"x" * 4096, 0)
    _live_log(live)
    assert run_cli("check", "-q", str(live)) == (1, "")


def test_deep_reads_every_allocated_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--deep was ignored for VHDX; now a block the file cannot give back is found (a read
    error injected under the third block's data; the metadata check never reads there)."""
    image = tmp_path / "d.vhdx"
    with create_vhdx(image, 4 * MiB, block_size=MiB) as disk:
        for block in range(4):
            disk.pwrite(b"d" * 4096, block * MiB)
        bad = disk.bat[2] & ~(MiB - 1)
    real = os.pread

    def failing(fd: int, n: int, offset: int) -> bytes:
        if offset <= bad < offset + n:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", failing)
    assert run_cli("check", str(image))[0] == 0
    rc, out = run_cli("check", "--deep", str(image))
    assert rc == 1 and "block 2: read error" in out, out
    monkeypatch.setattr(os, "pread", real)
    assert run_cli("check", "--deep", str(image))[0] == 0


def test_info_text_shows_the_live_logs_sequence(tmp_path: Path) -> None:
    """The log state in text as in --json: entries, their sequence numbers, the file offsets."""
    image = tmp_path / "l.vhdx"
    with create_vhdx(image, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"x" * 4096, 0)
    _live_log(image)
    rc, out = run_cli("info", "--json", str(image))
    log = json.JSONDecoder().raw_decode(out)[0]["log"]
    rc, text = run_cli("info", str(image))
    assert rc == 0 and log["sequence"], text
    want = f"sequence {log['sequence'][0]}..{log['sequence'][-1]}; FlushedFileOffset "
    assert want + f"{log['flushed_file_offset']}, LastFileOffset" in text, text


_KILLED_WRITER = """
import os, signal, sys, vhd
disk = vhd.open(sys.argv[1], "r+")
disk.pwrite(b"o" * 4096, 3 * 2**20)  # a new block, never flushed: its space is orphaned
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_repair_cuts_the_orphan_space_a_crash_leaves(tmp_path: Path) -> None:
    """A writer killed before its flush leaves an allocated, unreferenced block at the end of
    the file (MS-VHDX: nothing names it); check finds it, --repair cuts the file back."""
    image = tmp_path / "o.vhdx"
    with create_vhdx(image, 8 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"k" * 4096, 0)
    size = image.stat().st_size
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(image)], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert image.stat().st_size == size + MiB
    rc, out = run_cli("check", str(image))
    # free space, not damage (MS-VHDX allows it; qemu-img leaves some in every new VHDX)
    assert rc == 0 and f"note: {MiB} bytes after the last block" in out, out
    rc, out = run_cli("check", "--repair", str(image))
    assert rc == 0 and "repaired: cut the file" in out, out
    assert image.stat().st_size == size
    assert_qemu_clean(image)
    with open_vhdx(image) as disk:
        assert disk.pread(4096, 0) == b"k" * 4096 and disk.pread(4096, 3 * MiB) == bytes(4096)


def test_qemu_made_fixed_vhdx_checks_clean(tmp_path: Path) -> None:
    """qemu-img's fixed VHDX keeps every block's space in ZERO entries with a FileOffsetMB
    (LeaveBlocksAllocated): neither 'not FULLY_PRESENT' nor orphan space, before or after a
    write, and --repair cuts nothing."""
    image = tmp_path / "qf.vhdx"
    qemu_create(image, 20 * MiB, block_size=MiB, subformat="fixed")
    assert_qemu_clean(image)
    assert run_cli("check", str(image)) == (0, f"{image}: vhdx fixed, {20 * MiB} bytes: clean\n")
    qemu_write(image, "write -P 0x5a 3M 4k")
    size = image.stat().st_size
    assert run_cli("check", "--repair", str(image))[0] == 0
    assert image.stat().st_size == size


def test_a_new_qemu_made_dynamic_vhdx_checks_clean(tmp_path: Path) -> None:
    """qemu-img starts a new VHDX's data at 8 MiB and keeps the 4 MiB before it free: check
    says so in a note and exits 0 (it had called every qemu-made VHDX damaged); --repair cuts
    the free space, and qemu-img still checks the image clean and writes to it."""
    image = tmp_path / "q.vhdx"
    qemu_create(image, 1 << 30)
    rc, out = run_cli("check", str(image))
    assert rc == 0 and f"{image}: vhdx dynamic, {1 << 30} bytes: clean" in out, out
    assert "note: 4194304 bytes after the last block" in out, out
    rc, out = run_cli("check", "--repair", str(image))
    assert rc == 0 and "repaired: cut the file at 0x400000" in out, out
    assert_qemu_clean(image)
    qemu_write(image, "write -P 0x5a 1M 4k")
    assert_qemu_clean(image)
    assert run_cli("check", str(image)) == (0, f"{image}: vhdx dynamic, {1 << 30} bytes: clean\n")
    with open_vhdx(image) as disk:
        assert disk.pread(4096, MiB) == b"\x5a" * 4096
