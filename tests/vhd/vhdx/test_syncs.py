"""When VHDX writes are synced (MS-VHDX 2.2.2.1 header updates, 2.3 log transactions): an output
still under its temporary name (vhd convert, vhd.newfile) is seen by no one, so its session
headers are not synced; ``--sync`` still makes the whole image durable before it is published;
a published image syncs its session header updates as before.  Read back by qemu-img."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.vhd.vhdx.helpers import assert_qemu_clean, qemu_raw
from vhd.convert import convert
from vhd.source import open_source
from vhd.vhdx import create_vhdx, open_vhdx

MiB = 1 << 20


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


def _source(tmp_path: Path) -> tuple[Path, bytes]:
    content = os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(content)
    return src, content


def test_convert_to_vhdx_syncs_nothing_by_default(tmp_path: Path, syncs: list[int]) -> None:
    src, content = _source(tmp_path)
    with open_source(str(src)) as source:
        convert(source, str(tmp_path / "out.vhdx"), to="vhdx", block_size=MiB)
    assert syncs == []  # as qemu-img convert: the page cache writes it back
    assert_qemu_clean(tmp_path / "out.vhdx")
    assert qemu_raw(tmp_path / "out.vhdx", tmp_path / "back.raw") == content


def test_convert_to_vhdx_with_sync_is_durable_before_the_name(
    tmp_path: Path, syncs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, content = _source(tmp_path)
    out = tmp_path / "out.vhdx"
    seen_at_link: list[int] = []
    real_link = os.link

    def link(a: str, b: str, **kw: object) -> None:
        seen_at_link.append(len(syncs))
        real_link(a, b, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    with open_source(str(src)) as source:
        convert(source, str(out), to="vhdx", block_size=MiB, sync=True)
    # the log transaction's syncs (data, entries, header, in place, header) precede the name
    assert seen_at_link and seen_at_link[0] >= 5
    assert_qemu_clean(out)
    assert qemu_raw(out, tmp_path / "back.raw") == content


def test_published_vhdx_syncs_its_session_headers(tmp_path: Path, syncs: list[int]) -> None:
    image = tmp_path / "a.vhdx"
    create_vhdx(image, 8 * MiB, block_size=MiB).close()
    with open_vhdx(image, "r+") as disk:
        before = len(syncs)
        disk.pwrite(b"\x77" * 4096, 0)  # the session's first change: both headers, synced
        assert len(syncs) - before >= 2
    with create_vhdx(tmp_path / "b.vhdx", 8 * MiB, block_size=MiB) as disk:
        before = len(syncs)
        disk.pwrite(b"\x77" * 4096, 0)  # created and published: the same rule
        assert len(syncs) - before >= 2
    assert_qemu_clean(image)
    assert_qemu_clean(tmp_path / "b.vhdx")
