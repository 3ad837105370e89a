"""vhd resize: grow and shrink fixed, dynamic and differencing disks (qemu and Hyper-V layouts).
qemu-img info shows the new size, qemu-img (fixed/dynamic) and libvhdi read the content (libvhdi
sizes from the original size, so the first min(sizes) are compared), vhd check is clean, and a
kill at any moment leaves an image that repairs clean with the data intact."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import vhd
import vhd.resize as vresize
from tests.images import MiB, build_hyperv, make_chain, random_writes
from tests.vhd.harness import stopped_runs
from tests.vhd.helpers import libvhdi_read, qemu_info, qemu_raw, read_image, run_cli
from vhd.check import check
from vhd.footer import Footer


def verify(
    path: Path, want: bytes, tmp: Path, *, qemu: bool = True, chain: list[Path] | None = None
) -> None:
    assert read_image(path) == want
    report = check(path, deep=True)
    assert report.clean, [f.message for f in report.problems]
    if qemu:
        assert qemu_info(path)["virtual-size"] == len(want)
        assert qemu_raw(path, tmp / "q.raw") == want
    footer = Footer.parse(path.read_bytes()[-512:])
    n = min(len(want), footer.original_size)
    assert libvhdi_read(chain or [path], n) == want[:n]


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_grow_and_shrink(tmp_path: Path, kind: str, require_tool: object) -> None:
    path = tmp_path / "d.vhd"
    size = 6 * MiB
    model = bytearray(size)
    with vhd.create(path, size, type=kind) as disk:
        random_writes(disk, model, 20, 1)
    rc, out = run_cli("resize", str(path), "20M")
    assert rc == 0, out
    model += bytes(14 * MiB)
    verify(path, bytes(model), tmp_path)
    with vhd.open(path, "r+") as disk:  # the new space is usable
        disk.pwrite(b"\x77" * 8192, 19 * MiB)
        model[19 * MiB : 19 * MiB + 8192] = b"\x77" * 8192
    assert footer_sizes(path) == (size, 20 * MiB)
    # Shrinking needs --shrink, and refuses to drop data without --force.
    rc, out = run_cli("resize", str(path), "10M")
    assert rc == 2 and "--shrink" in out
    rc, out = run_cli("resize", str(path), "10M", "--shrink")
    assert rc == 2 and "data lies past the new end" in out
    with vhd.open(path, "r+") as disk:
        disk.discard(10 * MiB, 10 * MiB)
    model[10 * MiB :] = bytes(10 * MiB)
    rc, out = run_cli("resize", str(path), "10M", "--shrink")
    assert rc == 0, out
    verify(path, bytes(model[: 10 * MiB]), tmp_path)
    # --force drops data.  A relative size needs no "--" before it (it works with one too).
    rc, out = run_cli("resize", "--shrink", "--force", str(path), "-4M")
    assert rc == 0, out
    verify(path, bytes(model[: 6 * MiB]), tmp_path)
    rc, out = run_cli("resize", "--shrink", "--force", str(path), "--", "-2M")
    assert rc == 0, out
    verify(path, bytes(model[: 4 * MiB]), tmp_path)


def footer_sizes(path: Path) -> tuple[int, int]:
    f = Footer.parse(path.read_bytes()[-512:])
    return f.original_size, f.current_size


def test_grow_dynamic_relocates_blocks(tmp_path: Path, require_tool: object) -> None:
    """A BAT at 0x600 with one sector of room: growing past 128 blocks moves the first blocks."""
    path = tmp_path / "d.vhd"
    bs = 64 * 1024
    size = 128 * bs
    model = bytearray(size)
    with vhd.create(path, size, block_size=bs) as disk:
        random_writes(disk, model, 40, 2)
    new = 1000 * bs
    rc, out = run_cli("resize", str(path), str(new))
    assert rc == 0, out
    assert "relocated" in out
    model += bytes(new - size)
    verify(path, bytes(model), tmp_path)
    with vhd.open(path, "r+") as disk:
        random_writes(disk, model, 40, 3)
    verify(path, bytes(model), tmp_path)


def test_grow_hyperv_differencing(tmp_path: Path) -> None:
    """Windows layout: locators at 0x1000 and after the BAT at 0x2000; the BAT grows over them."""
    size = 2 * MiB
    bs = 4096  # 512 entries: the BAT fills 0x2000-0x3000 and the W2ru locator sits at 0x3000
    content = bytes(random.Random(5).randbytes(size))
    pid = build_hyperv(tmp_path / "p.vhd", size=size, block_size=bs, content=content)
    child_content = bytearray(content)
    child_content[4096 : 4096 + 8192] = b"\xcc" * 8192
    build_hyperv(
        tmp_path / "c.vhd",
        size=size,
        block_size=bs,
        content=bytes(child_content),
        present=set(range(8, 24)),
        parent=("p.vhd", pid),
        seed=8,
    )
    new = 16 * MiB  # 4096 entries: the BAT grows over the locator and the first blocks
    rc, out = run_cli("resize", str(tmp_path / "c.vhd"), str(new))
    assert rc == 0, out
    assert "relocated" in out
    got = read_image(tmp_path / "c.vhd")
    assert got[:size] == bytes(child_content) and not got[size:].strip(b"\0")
    assert len(got) == new
    report = check(tmp_path / "c.vhd", deep=True)
    assert report.clean, [f.message for f in report.problems]
    assert libvhdi_read([tmp_path / "c.vhd", tmp_path / "p.vhd"], size) == bytes(child_content)


def test_grow_child_of_chain(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path)
    rc, out = run_cli("resize", str(child), "+8M")
    assert rc == 0, out
    assert read_image(child) == model + bytes(8 * MiB)
    assert libvhdi_read([child, parent], len(model)) == model


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_crash_during_resize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Stop the resize after each of its synced steps: the image always repairs clean and holds
    the old data (at the old or the new size)."""
    base = tmp_path / "base.vhd"
    bs = 64 * 1024
    size = 128 * bs
    model = bytearray(size)
    with vhd.create(base, size, type=kind, block_size=bs) as disk:
        random_writes(disk, model, 40, 4)
    raw = base.read_bytes()
    step = 0
    for step, path, _finished in stopped_runs(
        monkeypatch, raw, tmp_path / "r", lambda path: vresize.resize(path, 1000 * bs)
    ):
        rc, out = run_cli("check", "--repair", str(path))
        assert rc == 0, f"step {step}: {out}"
        got = read_image(path)
        assert got[:size] == bytes(model), f"step {step}"
        assert not got[size:].strip(b"\0")
    assert step >= 3


def test_grow_hyperv_dynamic(tmp_path: Path, require_tool: object) -> None:
    """Windows dynamic layout, out-of-order 4 KiB-aligned blocks right after the 4 KiB-padded BAT:
    growing the BAT relocates the first blocks, as Resize-VHD does."""
    size = 4 * MiB
    bs = 4096
    content = bytearray(random.Random(9).randbytes(size))
    for hole in range(0, size, 3 * 65536):
        content[hole : hole + 65536] = bytes(65536)
    path = tmp_path / "hv.vhd"
    build_hyperv(path, size=size, block_size=bs, content=bytes(content), seed=9)
    rc, out = run_cli("resize", str(path), "16M")
    assert rc == 0 and "relocated" in out, out
    want = bytes(content) + bytes(12 * MiB)
    verify(path, want, tmp_path)


def test_grow_past_the_table_bound_is_refused(tmp_path: Path) -> None:
    """vhd.open refuses a disk needing more than vhd.bat.MAX_ENTRIES blocks (hostile headers):
    resize must not make such a disk, or the user's own image would no longer open."""
    from vhd.bat import MAX_ENTRIES

    path = tmp_path / "small-blocks.vhd"
    with vhd.create(path, 64 * 2**20, block_size=4096):
        pass
    too_big = (MAX_ENTRIES + 1) * 4096
    with pytest.raises(vhd.InvalidArgumentError, match="needs more than"):
        vresize.resize(path, too_big)
    with vhd.open(path) as disk:
        assert disk.size == 64 * 2**20


@pytest.mark.parametrize("fmt", ["vhd", "vhdx"])
def test_cli_grows_a_child_whose_parent_is_in_a_folder_above(tmp_path: Path, fmt: str) -> None:
    """`vhd resize` is a command the user runs on their own images: it follows the parent
    locators as written, like commit and convert (a child made with --parent ../base was refused
    with a hint to an option resize does not have)."""
    (tmp_path / "base").mkdir()
    (tmp_path / "kids").mkdir()
    base = tmp_path / "base" / f"base.{fmt}"
    child = tmp_path / "kids" / f"child.{fmt}"
    rc, out = run_cli("create", str(base), "4M")
    assert rc == 0, out
    rc, out = run_cli("create", str(child), "--parent", str(base))  # locators: ../base/...
    assert rc == 0, out
    rc, out = run_cli("resize", str(child), "6M")
    assert rc == 0, out
    with vhd.open(child, parent_policy=vhd.ParentPolicy.trusting()) as disk:
        assert disk.size == 6 * MiB and disk.pread(4096, 5 * MiB) == bytes(4096)
