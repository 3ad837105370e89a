"""Build dynamic and differencing images laid out the way Windows/Hyper-V lays them out.

The library creates images qemu-style (BAT at 0x600, blocks packed), so this small builder (from
the spec, via :mod:`tests.model`'s record encoders) makes the other layout real files show
(docs/vhd-format.md, "Windows layout"): data 4 KiB-aligned with a stride of block + 4 KiB (the
bitmap sits in the last sector before the data), blocks allocated out of order, the BAT padded
with 0xFF to 4 KiB, and for differencing disks the W2ku locator at 0x1000, the BAT at 0x2000 and
the W2ru locator right after the BAT (0x3000 for small tables), data_space in bytes.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

from tests.images.crafted import W2KU, W2RU
from tests.model import DIFFERENCING, DYNAMIC, SECTOR, bitmap_bytes, build_footer, build_header

PAGE = 4096


def _align(value: int, to: int = PAGE) -> int:
    return -(-value // to) * to


def build_hyperv(
    path: str | Path,
    *,
    size: int,
    block_size: int,
    content: bytes,
    present: set[int] | None = None,
    parent: tuple[str, bytes] | None = None,
    seed: int = 0,
    unique_id: bytes | None = None,
) -> bytes:
    """Write an image of ``size`` bytes holding ``content`` at the ``present`` sectors.

    ``present`` defaults to every sector whose content is not all zeros.  With ``parent`` =
    (parent file name, parent unique id) the image is a differencing child whose absent sectors
    come from the parent.  Returns the new image's unique id (``unique_id``, or one derived
    from ``seed``).
    """
    assert len(content) == size and size % SECTOR == 0
    if present is None:
        present = {
            s for s in range(size // SECTOR) if content[s * SECTOR : (s + 1) * SECTOR].strip(b"\0")
        }
    if unique_id is None:
        unique_id = uuid.UUID(int=random.Random(seed).getrandbits(128), version=4).bytes
    entries = -(-size // block_size)
    spb = block_size // SECTOR
    bm_bytes = bitmap_bytes(block_size)
    image = bytearray(SECTOR + 1024)
    locators: list[tuple[int, int, int, int]] = []
    payloads: list[tuple[int, bytes]] = []
    if parent is None:
        table_offset = 0x600
        meta_end = _align(table_offset + entries * 4)
    else:
        name = parent[0]
        w2ku = ("C:\\Hyper-V\\" + name).encode("utf-16-le")
        w2ru = (".\\" + name).encode("utf-16-le")
        table_offset = 0x2000
        bat_end = table_offset + _align(entries * 4)
        locators = [(W2KU, PAGE, len(w2ku), 0x1000), (W2RU, PAGE, len(w2ru), bat_end)]
        payloads = [(0x1000, w2ku), (bat_end, w2ru)]
        meta_end = bat_end + PAGE
    bat_area = _align(entries * 4)
    bat = [0xFFFFFFFF] * entries
    used = sorted({s // spb for s in present})
    random.Random(seed).shuffle(used)
    stride = _align(bm_bytes + block_size)
    data_at = _align(meta_end + bm_bytes)
    blocks: list[tuple[int, int]] = []
    for block in used:
        bat[block] = (data_at - bm_bytes) // SECTOR
        blocks.append((block, data_at))
        data_at += stride
    end = data_at - stride + block_size if blocks else meta_end
    image.extend(bytes(max(0, end - len(image))))
    table = b"".join(e.to_bytes(4, "big") for e in bat)
    image[table_offset : table_offset + bat_area] = table.ljust(bat_area, b"\xff")
    for at, blob in payloads:
        image[at : at + len(blob)] = blob
    for block, data in blocks:
        bits = bytearray(bm_bytes)
        for inner in range(spb):
            s = block * spb + inner
            if s in present and s * SECTOR < size:
                bits[inner // 8] |= 0x80 >> (inner % 8)
                image[data + inner * SECTOR : data + (inner + 1) * SECTOR] = content[
                    s * SECTOR : (s + 1) * SECTOR
                ]
        image[data - bm_bytes : data] = bits
    disk_type = DIFFERENCING if parent is not None else DYNAMIC
    footer = build_footer(size=size, disk_type=disk_type, unique_id=unique_id, geometry=(0, 0, 0))
    header = build_header(
        table_offset=table_offset,
        entries=entries,
        block_size=block_size,
        parent_id=parent[1] if parent else bytes(16),
        parent_name=("C:\\Hyper-V\\" + parent[0]) if parent else "",
        locators=locators,
    )
    image[0:SECTOR] = footer
    image[SECTOR : SECTOR + 1024] = header
    image += footer
    Path(path).write_bytes(bytes(image))
    return unique_id
