"""vhd set-parent: after the parent moves, the child is retargeted (name, timestamp, W2ku, W2ru,
MacX), opens again with the same content, checks clean, and libvhdi reads the chain; a parent with
another unique id needs --force; Hyper-V-laid-out children and the dfvfs corpus child work."""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from pathlib import Path

import vhd
from tests.images import MiB, build_hyperv, make_chain
from tests.model import _put_checksum, model_chain
from tests.vhd.helpers import libvhdi_read, read_image, run_cli
from vhd.chain import read_locators
from vhd.check import check
from vhd.footer import Footer
from vhd.locator import CODE_MACX, CODE_W2KU, CODE_W2RU


def locator_texts(child: Path) -> dict[int, str]:
    with vhd.open(child, "r", open_parent=False) as disk:
        assert disk.header is not None
        infos = read_locators(disk.fd, disk.file_size, disk.header)
        return {i.code: i.text or "" for i in infos}


def test_moved_parent(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path)
    moved = tmp_path / "elsewhere" / "deeper" / "renamed-parent.vhd"
    moved.parent.mkdir(parents=True)
    shutil.move(parent, moved)
    rc, out = run_cli("check", str(child))
    assert rc == 1 and "parent-not-found" in out
    rc, out = run_cli("set-parent", str(child), str(moved))
    assert rc == 0, out
    assert read_image(child) == model
    texts = locator_texts(child)
    assert texts[CODE_W2KU] == str(moved).replace("/", "\\")
    assert texts[CODE_W2RU] == ".\\elsewhere\\deeper\\renamed-parent.vhd"
    assert texts[CODE_MACX] == "file://" + str(moved)
    with vhd.open(child, "r", open_parent=False) as disk:
        assert disk.header is not None and disk.header.parent_name == "renamed-parent.vhd"
    report = check(child, deep=True)
    assert report.clean, [f.message for f in report.problems]
    assert libvhdi_read([child, moved], len(model)) == model


def test_unique_id_mismatch_needs_force(tmp_path: Path) -> None:
    _parent, child, model = make_chain(tmp_path)
    other = tmp_path / "other.vhd"
    with vhd.create(other, len(model)) as disk:
        disk.pwrite(b"\x42" * 4096, 0)
    before = child.read_bytes()
    rc, out = run_cli("set-parent", str(child), str(other))
    assert rc == 2 and "--force" in out
    assert child.read_bytes() == before
    rc, out = run_cli("set-parent", "--force", str(child), str(other))
    assert rc == 0 and "warning" in out
    with vhd.open(child) as disk:
        assert disk.parent is not None and disk.parent.path == str(other)
    assert check(child).clean


def test_hyperv_child_long_path_grows_file(tmp_path: Path) -> None:
    size = 4 * MiB
    content = bytes(range(256)) * (size // 256)
    pid = build_hyperv(tmp_path / "p.vhd", size=size, block_size=MiB, content=content)
    child_content = bytearray(content)
    child_content[8192:16384] = b"\xee" * 8192
    build_hyperv(
        tmp_path / "c.vhd",
        size=size,
        block_size=MiB,
        content=bytes(child_content),
        present=set(range(16, 32)),
        parent=("p.vhd", pid),
        seed=6,
    )
    target = tmp_path / ("x" * 200) / ("y" * 200) / "parent.vhd"
    target.parent.mkdir(parents=True)
    shutil.move(tmp_path / "p.vhd", target)
    size_before = (tmp_path / "c.vhd").stat().st_size
    rc, out = run_cli("set-parent", str(tmp_path / "c.vhd"), str(target))
    assert rc == 0, out
    assert (tmp_path / "c.vhd").stat().st_size > size_before  # MacX needed new space
    assert read_image(tmp_path / "c.vhd") == bytes(child_content)
    report = check(tmp_path / "c.vhd", deep=True)
    assert report.clean, [f.message for f in report.problems]
    with vhd.open(tmp_path / "c.vhd", "r+") as disk:  # and it still takes new blocks
        disk.pwrite(b"\x11" * 4096, 3 * MiB)
        child_content[3 * MiB : 3 * MiB + 4096] = b"\x11" * 4096
    assert read_image(tmp_path / "c.vhd") == bytes(child_content)
    assert check(tmp_path / "c.vhd", deep=True).clean


def test_corpus_child_gets_a_parent(corpus: Path, tmp_path: Path) -> None:
    """The dfvfs Windows child lacks its parent: make one with the recorded id and attach it."""
    child = tmp_path / "fat-differential.vhd"
    shutil.copy(corpus / "fat-differential.vhd", child)
    os.chmod(child, 0o644)
    with vhd.open(child, "r", open_parent=False) as disk:
        assert disk.header is not None
        want_id = disk.header.parent_unique_id
        size = disk.size
    parent = tmp_path / "parents" / "fat-parent.vhd"
    parent.parent.mkdir()
    with vhd.create(parent, size) as disk:
        disk.pwrite(b"\x33" * size, 0)
    raw = bytearray(parent.read_bytes())
    footer = Footer.parse(raw[-512:]).replace(unique_id=want_id).build()
    raw[:512] = footer
    raw[-512:] = footer
    parent.write_bytes(bytes(raw))
    rc, out = run_cli("set-parent", str(child), str(parent))
    assert rc == 0, out
    got = read_image(child)
    # libvhdi misreads sector-granular bitmaps (docs/vhd-format.md): the spec model is the oracle.
    assert model_chain([parent, child]).read_all() == got
    assert b"\x33" * 4096 in got and got != b"\x33" * size
    report = check(child)
    assert report.clean, [f.message for f in report.problems]
    assert uuid.UUID(bytes=want_id)


def test_untrusted_locator_is_not_rewritten_in_place(tmp_path: Path) -> None:
    """A locator claiming more than 64 KiB of data is no region (vhd.layout.locator_extent: vhd
    check reports it, open and compact do not reserve it), so set-parent does not write the new
    path at its offset either: here that offset is block data, which must stay as it was."""
    parent, child, model = make_chain(tmp_path)
    with vhd.open(child, "r", open_parent=False) as disk:
        assert disk.header is not None
        header_at = disk.footer.data_offset
        block_data = min(e for _b, e in disk.bat.allocated()) * 512 + 512  # the first block's
        slot = next(i for i, loc in enumerate(disk.header.locators) if loc.code == CODE_W2KU)
    raw = bytearray(child.read_bytes())
    header = bytearray(raw[header_at : header_at + 1024])
    entry = 0x240 + 24 * slot  # (code, data_space, data_len, reserved, data_offset)
    header[entry : entry + 24] = struct.pack(">IIIIQ", CODE_W2KU, 1 << 20, 1 << 17, 0, block_data)
    raw[header_at : header_at + 1024] = _put_checksum(header, 36)
    child.write_bytes(bytes(raw))
    assert "locator-length" in {f.code for f in check(child).findings}
    moved = tmp_path / "moved" / "parent.vhd"
    moved.parent.mkdir()
    shutil.move(parent, moved)
    rc, out = run_cli("set-parent", str(child), str(moved))
    assert rc == 0, out
    assert model_chain([moved, child]).read_all() == model
    assert locator_texts(child)[CODE_W2KU] == str(moved).replace("/", "\\")
