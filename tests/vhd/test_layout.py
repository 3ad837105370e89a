"""`vhd check` and `vhd.open(..., "r+")` judge block placement against the same metadata
regions (vhd.layout): a block that check leaves alone opens for writing, and a block that check
says overlaps metadata is refused by open; on every corpus image and on crafted ones."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

import vhd
from vhd.check import check
from vhd.disk import SparseDisk
from vhd.errors import CorruptImageError
from vhd.header import HEADER_SIZE, DynamicHeader, ParentLocator
from vhd.locator import CODE_W2KU

KiB = 1024


def _agree(path: Path) -> bool:
    """Whether check and open agree on ``path``; returns whether it opened for writing."""
    report = check(path)
    overlaps = [f for f in report.findings if f.code == "bat-overlaps-metadata"]
    others = [f for f in report.findings if f.code in ("bat-past-eof", "bat-overlap")]
    try:
        vhd.open(path, "r+", open_parent=False, strict=False).close()
    except CorruptImageError as e:
        if "block" not in str(e):
            return False  # refused for something else (a bad checksum): not placement
        # open refuses a block over metadata exactly when check names one (or another bad
        # placement that check also names).
        assert overlaps or others, f"open refused what check accepts: {e}"
        return False
    assert not overlaps, f"check flags {overlaps[0].message} but open writes the image"
    return True


def _corpus_images(corpus: Path, tmp: Path) -> list[Path]:
    out = []
    for src in sorted(corpus.iterdir()):
        if src.name.endswith(".vhd.gz"):
            dst = tmp / src.name[: -len(".gz")]
            dst.write_bytes(gzip.decompress(src.read_bytes()))
        elif src.name.endswith(".vhd"):
            dst = tmp / src.name
            shutil.copyfile(src, dst)
        else:
            continue
        out.append(dst)
    return out


def test_corpus_check_and_open_agree(corpus: Path, tmp_path: Path) -> None:
    images = _corpus_images(corpus, tmp_path)
    checked: list[str] = []
    for path in images:
        with vhd.open(path, open_parent=False, strict=False) as disk:
            if disk.header is None:
                continue  # fixed: no BAT
        checked.append(path.name)
        _agree(path)
    assert checked


def _with_locator(path: Path, offset: int, space: int, data_len: int) -> None:
    """Give the image's header a locator at ``offset`` claiming ``space`` bytes."""
    with vhd.open(path, open_parent=False) as disk:
        at = disk.footer.data_offset
    raw = bytearray(path.read_bytes())
    header = DynamicHeader.parse(raw[at : at + HEADER_SIZE])
    slots = list(header.locators)
    slots[0] = ParentLocator(
        code=CODE_W2KU, data_space=space, data_len=data_len, data_offset=offset
    )
    raw[at : at + HEADER_SIZE] = header.replace(locators=tuple(slots)).build()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("space", "writable"),
    [
        # The locator's space beyond 64 KiB is not trusted (a crafted header may claim 4 GiB):
        # the block right after that cap is data, for check and open alike.
        (1024 * KiB, True),
        # A locator whose space covers the block: both refuse it.
        (64 * KiB, False),
    ],
)
def test_crafted_locator_space(tmp_path: Path, space: int, writable: bool) -> None:
    path = tmp_path / "d.vhd"
    # 64 MiB of 4 KiB blocks: a 64 KiB BAT at 0x600, the first block right after it.
    with vhd.create(path, 64 << 20, block_size=4 * KiB) as disk:
        table = disk.header.table_offset if disk.header else 0
        disk.pwrite(b"\x55" * 4096, 0)
    with vhd.open(path, open_parent=False) as disk:
        assert isinstance(disk, SparseDisk)
        first = disk.bat[0] * 512
    offset = table if space > 64 * KiB else first - 4 * KiB
    assert first >= offset + 64 * KiB or space <= 64 * KiB
    _with_locator(path, offset, space, 16)
    assert _agree(path) is writable
