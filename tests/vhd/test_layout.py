"""`vhd check` and `vhd.open(..., "r+")` judge block placement against the same metadata
regions (vhd.layout): a block that check leaves alone opens for writing, and a block that check
says overlaps metadata is refused by open; on every corpus image and on crafted ones."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import pytest

import vhd
import vhd.compact as vcompact
import vhd.resize as vresize
from tests.images import W2KU, craft
from tests.model import ModelImage, _put_checksum, spec_chs
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


# -- one rule for where metadata ends (vhd.metadata.metadata_end over metadata_regions) -------

_BS = 4 * KiB
_HUGE_SPACE = 1 << 30  # a locator claiming 1 GiB of space for a 20-byte path


def _odd_locator_image(path: Path) -> bytes:
    """A 1 MiB dynamic disk of 4 KiB blocks written from the spec (tests.model), whose parent
    locator claims 1 GiB of space (kept to 64 KiB by the one rule): block 1 at 128 KiB, block 9
    at 192 KiB (free space between them and below), block 200 holding only zeros at 256 KiB.
    Returns the guest content."""
    blocks = {1: 0x20000, 9: 0x30000, 200: 0x40000}  # block -> where its data starts
    craft(
        path,
        size=1 << 20,
        block_size=_BS,
        locators=[(W2KU, "C:\\\\p.vhd")],
        bat={b: (at - 512) // 512 for b, at in blocks.items()},
        file_size=0x40000 + _BS + 512,
    )
    raw = bytearray(path.read_bytes())
    content = bytearray(1 << 20)
    for block, at in blocks.items():
        raw[at - 512 : at] = b"\xff" + bytes(511)  # the bitmap: all 8 sectors hold data
        if block != 200:
            raw[at : at + _BS] = bytes([block]) * _BS
            content[block * _BS : (block + 1) * _BS] = bytes([block]) * _BS
    # The locator's data_space (header + 0x240 + 4): 1 GiB; the header checksum (at 36) again.
    header = bytearray(raw[0x200:0x600])
    header[0x244:0x248] = _HUGE_SPACE.to_bytes(4, "big")
    raw[0x200:0x600] = _put_checksum(header, 36)
    # The spec's geometry for 1 MiB (craft writes Windows' all-ones one, which check notes).
    footer = bytearray(raw[:512])
    footer[56:60] = struct.pack(">HBB", *spec_chs(1 << 20))
    raw[:512] = raw[-512:] = _put_checksum(footer, 64)
    path.write_bytes(bytes(raw))
    assert ModelImage(path).read_all() == bytes(content)
    return bytes(content)


@pytest.mark.parametrize("operation", ["compact", "shrink", "grow"])
def test_operations_end_metadata_where_check_does(tmp_path: Path, operation: str) -> None:
    """compact and resize place blocks and cut the file by the metadata regions vhd check
    judges them by: a locator's claimed space past the 64 KiB cap is neither reserved by them
    nor by check.  (Before one rule, compact and shrink kept 1 GiB of "metadata" and cut
    nothing, and grow reserved 1 GiB for the relocated locator: check found free space or
    orphan space after each.)"""
    path = tmp_path / "d.vhd"
    content = _odd_locator_image(path)
    before = check(path)
    assert before.clean and "free-space" in {f.code for f in before.findings}
    if operation == "compact":
        result = vcompact.compact(path)
        assert result.blocks_freed == 1 and result.blocks_moved == 2
    elif operation == "shrink":
        vresize.resize(path, 512 * KiB, shrink=True)
        content = content[: 512 * KiB]
    else:
        vresize.resize(path, 2 << 20)
        content += bytes(1 << 20)
    report = check(path, deep=True)
    codes = {f.code for f in report.findings}
    # (shrink and grow leave the gaps between blocks to compact.)
    unwanted = {"orphan-space", "free-space"} if operation == "compact" else {"orphan-space"}
    assert report.clean and not codes & unwanted, codes
    assert path.stat().st_size < 4 << 20  # nothing reserved for the claimed gigabyte
    assert ModelImage(path).read_all() == content
