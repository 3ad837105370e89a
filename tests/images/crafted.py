"""Crafted hostile images for the hostile-input suite (spec: "Hard Disk Footer Format", "Dynamic
Disk Header Format", "Parent Locator Entry", "Block Allocation Table").

Every image is written from the spec's records (:mod:`tests.model`'s encoders), not by the
library under test, so a library bug cannot make a crafted image harmless by accident.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

from tests.model import DIFFERENCING, DYNAMIC, FIXED, build_footer, build_header
from vhd.check import CheckReport, check
from vhd.repair import RepairPlan, apply_plan, plan_repair

SECTOR = 512
W2KU = 0x57326B75
W2RU = 0x57327275
MACX = 0x4D616358


def _align(value: int, to: int = SECTOR) -> int:
    return -(-value // to) * to


def new_id(seed: int) -> bytes:
    return uuid.UUID(int=seed + 1, version=4).bytes


def craft(
    path: Path,
    *,
    size: int,
    block_size: int = 4096,
    entries: int | None = None,
    unique_id: bytes | None = None,
    parent_id: bytes | None = None,
    parent_name: str = "",
    locators: list[tuple[int, str]] = (),  # type: ignore[assignment]
    bat: dict[int, int] | None = None,
    bat_fill: bytes = b"\xff",
    file_size: int | None = None,
) -> Path:
    """A dynamic disk (differencing when ``parent_id`` is given) laid out as qemu does.

    ``locators`` are (code, text) pairs, encoded as their kind requires (UTF-16LE for W2ku and
    W2ru, UTF-8 for MacX).  ``bat`` maps block -> sector; other entries are ``bat_fill`` bytes
    repeated (0xFF: unallocated).  ``entries`` (default: what the size needs) may claim more
    than the file holds: the file is then extended sparsely to hold the table.  ``file_size``
    extends the file (sparsely) before the trailing footer.
    """
    needed = -(-size // block_size)
    entries = needed if entries is None else entries
    table_offset = 0x600
    table_bytes = _align(entries * 4)
    payloads: list[tuple[int, bytes]] = []
    records: list[tuple[int, int, int, int]] = []
    at = table_offset + table_bytes
    for code, text in locators:
        raw = text.encode("utf-16-le") if code in (W2KU, W2RU) else text.encode("utf-8")
        space = _align(max(len(raw), 1))
        records.append((code, space, len(raw), at))
        payloads.append((at, raw))
        at += space
    end = max(at, file_size - SECTOR if file_size is not None else 0)
    disk_type = DIFFERENCING if parent_id is not None else DYNAMIC
    footer = build_footer(
        size=size,
        disk_type=disk_type,
        unique_id=unique_id if unique_id is not None else new_id(0),
    )
    header = build_header(
        table_offset=table_offset,
        entries=entries,
        block_size=block_size,
        parent_id=parent_id if parent_id is not None else bytes(16),
        parent_name=parent_name,
        locators=records,
    )
    with open(path, "wb") as f:
        f.write(footer)
        f.write(header)
        # The table: written in pieces so that a huge claimed table costs no memory here.
        f.seek(table_offset)
        if bat_fill != b"\0":
            chunk = bat_fill * (1 << 20)
            # At most 16 MiB of it: past that, the table is a hole (zero entries).
            left = min(table_bytes, 16 << 20)
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        for block, sector in (bat or {}).items():
            f.seek(table_offset + block * 4)
            f.write(struct.pack(">I", sector))
        for offset, raw in payloads:
            f.seek(offset)
            f.write(raw)
        f.truncate(end)
        f.seek(end)
        f.write(footer)
    return path


def craft_fixed(
    path: Path, size: int, *, data: dict[int, bytes] | None = None, unique_id: bytes | None = None
) -> Path:
    """A fixed disk of ``size`` bytes, sparse except for ``data`` (offset -> bytes)."""
    with open(path, "wb") as f:
        for offset, raw in (data or {}).items():
            f.seek(offset)
            f.write(raw)
        f.truncate(size)
        f.seek(size)
        f.write(build_footer(size=size, disk_type=FIXED, unique_id=unique_id or new_id(7)))
    return path


def footer_id(path: Path) -> bytes:
    """The unique id of a VHD (from its trailing footer)."""
    with open(path, "rb") as f:
        f.seek(-SECTOR, os.SEEK_END)
        return f.read(SECTOR)[68:84]


def repair(path: Path) -> tuple[RepairPlan, CheckReport]:
    """What ``vhd check --repair`` does: check, plan, apply; the plan and a fresh check."""
    report = check(path)
    plan = plan_repair(report)
    if plan.empty:
        return plan, report
    apply_plan(plan)
    return plan, check(path)
