"""The one image factory of the tests: every VHD and VHDX a test starts from is made here.

Two kinds, kept apart on purpose:

- Library-made images (:func:`vhd_image`, :func:`vhdx_image`, :func:`make_chain`,
  :func:`make_dynamic`): created and written through ``vhd.create``/``create_vhdx``, so they
  have the layout the library writes (qemu's: "Dynamic Disk Header Format", BAT at 0x600,
  blocks packed).  Each returns the guest content it wrote, computed from the writes themselves
  (the model), never read back through the reader under test.
- Spec-made images (:func:`craft`, :func:`craft_fixed` in :mod:`tests.images.crafted`;
  :func:`build_hyperv` in :mod:`tests.images.hyperv`): written record by record from the
  format document's encoders in :mod:`tests.model`, never by the library, so a library bug
  cannot make a crafted or Windows-laid-out image harmless by accident.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vhd
from tests.images.crafted import MACX, W2KU, W2RU, craft, craft_fixed, footer_id, new_id, repair
from tests.images.hyperv import build_hyperv
from vhd.footer import vhd_timestamp
from vhd.header import DynamicHeader

__all__ = [
    "MACX",
    "W2KU",
    "W2RU",
    "Image",
    "KiB",
    "MiB",
    "build_hyperv",
    "craft",
    "craft_fixed",
    "footer_id",
    "image",
    "make_chain",
    "make_dynamic",
    "new_id",
    "pin_parent_time",
    "random_writes",
    "repair",
    "sha",
    "vhd_image",
    "vhdx_image",
]

KiB = 1024
MiB = 1024 * KiB

# (offset, bytes) written in order.
Write = tuple[int, bytes]


@dataclass(frozen=True)
class Image:
    """A file the factory made and the guest content it holds (by the model)."""

    path: Path
    content: bytes


def sha(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a whole file, read in 1 MiB pieces: shows that an operation left it
    untouched."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def random_writes(
    disk: vhd.Disk,
    model: bytearray,
    count: int,
    seed: int,
    *,
    align: int = 4096,
    max_len: int = 3 * 4096,
) -> None:
    """``count`` random ``align``-aligned writes (1..max_len bytes) to ``disk``, mirrored in
    ``model``; the same seed gives the same writes."""
    rng = random.Random(seed)
    for _ in range(count):
        length = rng.randrange(1, max_len // align + 1) * align
        offset = rng.randrange(0, (disk.size - length) // align + 1) * align
        data = rng.randbytes(length)
        disk.pwrite(data, offset)
        model[offset : offset + length] = data


def _fill(
    disk: vhd.Disk,
    model: bytearray,
    writes: Iterable[Write],
    count: int,
    seed: int,
    align: int,
    max_len: int,
) -> bytes:
    if count:
        random_writes(disk, model, count, seed, align=align, max_len=max_len)
    for offset, data in writes:
        disk.pwrite(data, offset)
        model[offset : offset + len(data)] = data
    return bytes(model)


def vhd_image(
    path: str | Path,
    size: int | None = None,
    *,
    type: str = "dynamic",
    block_size: int | None = None,
    parent: Image | None = None,
    writes: Iterable[Write] = (),
    random_count: int = 0,
    seed: int = 1,
    align: int = 4096,
    max_len: int = 3 * 4096,
) -> Image:
    """A VHD made by ``vhd.create``: ``type`` fixed or dynamic, or differencing on ``parent``
    (its size unless ``size`` is given).  First ``random_count`` random writes (see
    :func:`random_writes`), then ``writes`` in order."""
    path = Path(path)
    kw: dict[str, object] = {} if block_size is None else {"block_size": block_size}
    if parent is not None:
        model = bytearray(parent.content)
        disk = vhd.create(path, size, parent=parent.path, **kw)  # type: ignore[arg-type]
    else:
        assert size is not None, "a disk without a parent needs a size"
        model = bytearray(size)
        disk = vhd.create(path, size, type=type, **kw)  # type: ignore[arg-type]
    with disk:
        if len(model) < disk.size:
            model += bytes(disk.size - len(model))
        content = _fill(disk, model, writes, random_count, seed, align, max_len)
    return Image(path, content)


def vhdx_image(
    path: str | Path,
    size: int = 0,
    *,
    type: str = "dynamic",
    block_size: int | None = None,
    logical_sector_size: int = 512,
    parent: Image | None = None,
    writes: Iterable[Write] = (),
    random_count: int = 0,
    seed: int = 1,
    align: int = 4096,
    max_len: int = 3 * 4096,
) -> Image:
    """A VHDX made by ``create_vhdx``: fixed or dynamic, or differencing on ``parent`` (a VHD
    or VHDX; its size and sector size), written as :func:`vhd_image` does."""
    from vhd.vhdx import create_vhdx

    path = Path(path)
    kw: dict[str, int] = {} if block_size is None else {"block_size": block_size}
    if parent is not None:
        model = bytearray(parent.content)
        disk = create_vhdx(path, size, type="differencing", parent=vhd.open(parent.path), **kw)
    else:
        model = bytearray(size)
        disk = create_vhdx(path, size, type=type, logical_sector_size=logical_sector_size, **kw)
    with disk:
        if len(model) < disk.size:
            model += bytes(disk.size - len(model))
        content = _fill(disk, model, writes, random_count, seed, align, max_len)
    return Image(path, content)


def image(path: str | Path, size: int | None = None, **kwargs: Any) -> Image:
    """:func:`vhdx_image` for a ``.vhdx``/``.avhdx`` path, else :func:`vhd_image`: for tests
    that run on both formats (front ends over a format-neutral ``Disk``)."""
    if Path(path).suffix in (".vhdx", ".avhdx"):
        return vhdx_image(path, size or 0, **kwargs)
    return vhd_image(path, size, **kwargs)


def pin_parent_time(child: Path, parent: Path, when: int) -> None:
    """Give ``parent`` the mtime ``when`` and record the same in ``child``'s header (the
    "Parent Time Stamp" field), so the chain checks clean and any later change shows."""
    raw = bytearray(child.read_bytes())
    header = DynamicHeader.parse(raw[512:1536]).replace(parent_timestamp=vhd_timestamp(when))
    raw[512:1536] = header.build()
    child.write_bytes(bytes(raw))
    os.utime(parent, (when, when))


def make_dynamic(path: Path, size: int = 8 * MiB, *, writes: int = 20, seed: int = 1) -> bytes:
    """A dynamic VHD with ``writes`` random 4 KiB-aligned writes; returns its content."""
    return vhd_image(path, size, random_count=writes, seed=seed).content


def make_chain(tmp: Path, size: int = 8 * MiB, seed: int = 2) -> tuple[Path, Path, bytes]:
    """parent.vhd <- child.vhd in ``tmp``, 15 random writes each; the parent time is pinned
    (:func:`pin_parent_time`).  Returns the paths and what the child reads."""
    parent = vhd_image(tmp / "parent.vhd", size, random_count=15, seed=seed)
    child = vhd_image(tmp / "child.vhd", parent=parent, random_count=15, seed=seed + 100)
    pin_parent_time(child.path, parent.path, 1_700_000_000)
    return parent.path, child.path, child.content
