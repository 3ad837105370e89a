"""`vhd check` offers only repairs that `vhd check --repair` performs (issue 12, item 11): for
images damaged in several places at once (where the check stops early), every finding that
carries a repair is gone after the repair."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import vhd
from tests.images import repair
from tests.model import checksum
from vhd.check import check

MiB = 1024 * 1024


def _edit(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at if at >= 0 else path.stat().st_size + at)
        f.write(data)


def _reseal(path: Path, at: int, record: int, field: int) -> None:
    """Recompute the checksum of the record at ``at`` (``record`` bytes, checksum at ``field``)."""
    raw = bytearray(path.read_bytes()[at : at + record])
    raw[field : field + 4] = b"\0\0\0\0"
    raw[field : field + 4] = struct.pack(">I", checksum(bytes(raw), field))
    _edit(path, at, bytes(raw))


def _zero_tail(p: Path) -> None:
    _edit(p, -512, bytes(512))


def _break_header_cookie(p: Path) -> None:
    _edit(p, 512, b"notspars")


def _bad_block_size(p: Path) -> None:
    _edit(p, 512 + 32, struct.pack(">I", 3000))  # header checksum now wrong too


def _bat_past_eof(p: Path) -> None:
    _edit(p, 512 + 16, struct.pack(">Q", 1 << 40))
    _reseal(p, 512, 1024, 36)


def _tail_checksum(p: Path) -> None:
    _edit(p, -512 + 64, b"\x12\x34\x56\x78")


def _no_reserved_feature(p: Path) -> None:
    for at in (0, p.stat().st_size - 512):
        _edit(p, at + 8, bytes(4))
        _reseal(p, at, 512, 64)


def _cut_511(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1)


DAMAGE: dict[str, list[Callable[[Path], None]]] = {
    "tail-zeroed": [_zero_tail],
    "tail-zeroed+header-cookie": [_zero_tail, _break_header_cookie],
    "tail-zeroed+block-size": [_zero_tail, _bad_block_size],
    "tail-checksum+bat-past-eof": [_tail_checksum, _bat_past_eof],
    "block-size+header-checksum": [_bad_block_size],
    "features+header-cookie": [_no_reserved_feature, _break_header_cookie],
    "511+header-cookie": [_cut_511, _break_header_cookie],
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_every_offered_repair_is_performed(tmp_path: Path, name: str) -> None:
    path = tmp_path / "d.vhd"
    with vhd.create(path, 1 * MiB, block_size=64 * 1024) as disk:
        disk.pwrite(b"data" * 1024, 0)
    for damage in DAMAGE[name]:
        damage(path)
    before = check(path)
    offered = {f.code for f in before.findings if f.repairable}
    plan, after = repair(path)
    if offered:
        assert not plan.empty, f"offered {offered}, planned nothing"
    left = {f.code for f in after.findings} & offered
    assert not left, f"offered a repair of {left} but --repair left them"


def test_fixed_truncated_with_a_bad_checksum(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    vhd.create(path, 1 * MiB, type="fixed").close()
    raw = path.read_bytes()
    path.write_bytes(raw[: 512 * 1024] + raw[-512:])  # data cut short
    _tail_checksum(path)
    before = check(path)
    offered = {f.code for f in before.findings if f.repairable}
    _plan, after = repair(path)
    assert not ({f.code for f in after.findings} & offered)
