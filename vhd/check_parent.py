"""The parent rules of ``vhd check`` (spec: "Parent Locator Entry", "Parent Unique ID", "Parent
Time Stamp"): each parent locator's bounds, space and encoding, and the parent it leads to.

Rules over a :class:`~vhd.layout.Layout`: payloads are read through the layout's narrow reader,
the parent is found and opened as :func:`vhd.open` would (:func:`vhd.chain.resolve_parent`).
"""

from __future__ import annotations

import functools
import os

from .chain import ParentPolicy, resolve_parent
from .errors import ChainLoopError, ParentMismatchError, ParentNotFoundError, VHDError
from .findings import ERROR, INFO, WARNING, Findings, RepairFacts
from .footer import FOOTER_SIZE, DiskType, vhd_timestamp
from .layout import Layout
from .locator import (
    CODE_MAC,
    CODE_MACX,
    CODE_NAMES,
    CODE_W2KU,
    CODE_W2RU,
    MAX_LOCATOR_BYTES,
    code_name,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any

SECTOR = 512


def locator_rules(layout: Layout, out: Findings) -> None:
    """The parent locators of a differencing disk (and stray ones of a dynamic disk)."""
    h = layout.header
    assert h is not None
    used = [(slot, loc) for slot, loc in enumerate(h.locators) if loc.in_use]
    if layout.disk_type != DiskType.DIFFERENCING:
        if used:
            out.add(INFO, "locators-unused", "a dynamic disk carries parent locators")
        return
    if h.parent_unique_id == bytes(16):
        out.add(INFO, "parent-raw", "the parent unique id is zero (a blktap raw parent)")
    if not used and not h.parent_name:
        out.add(ERROR, "parent-unnamed", "no parent locator and no parent name")
    elif not h.parent_name:
        out.add(WARNING, "parent-name-empty", "the header's parent name is empty")
    if "\ufffd" in h.parent_name:
        out.add(WARNING, "parent-name-encoding", "the parent name is not valid UTF-16BE")
    regions = layout.regions()
    for slot, loc in used:
        where = f"parent locator {slot} ({code_name(loc.code)})"
        if loc.code not in CODE_NAMES:
            out.add(WARNING, "locator-code", f"{where}: unknown platform code")
        if loc.data_len > MAX_LOCATOR_BYTES:
            out.add(ERROR, "locator-length", f"{where}: data length {loc.data_len} is absurd")
            continue
        if loc.data_offset % SECTOR:
            out.add(WARNING, "locator-align", f"{where}: data not sector-aligned")
        if loc.data_offset + loc.data_len > layout.file_size:
            out.add(ERROR, "locator-past-eof", f"{where}: data lies past the end of the file")
            continue
        if loc.data_space < SECTOR and loc.data_space:
            out.add(
                INFO,
                "locator-space-sectors",
                f"{where}: data_space {loc.data_space} counts sectors (as the spec says); "
                "Windows, blktap and VirtualBox store bytes",
            )
        elif loc.data_space % SECTOR:
            out.add(
                WARNING,
                "locator-space",
                f"{where}: data_space {loc.data_space} is neither sectors nor whole sectors of "
                "bytes",
            )
        if loc.data_len > loc.space_bytes:
            out.add(
                ERROR,
                "locator-overflow",
                f"{where}: {loc.data_len} bytes of data in {loc.space_bytes} bytes of space",
            )
        start, end = loc.data_offset, loc.data_offset + max(loc.data_len, 1)
        for rstart, rend, label in regions:
            if label != f"parent locator {slot}" and start < rend and end > rstart and loc.data_len:
                out.add(ERROR, "locator-overlap", f"{where}: data overlaps {label}")
        if loc.data_offset < FOOTER_SIZE and loc.data_len:
            continue
        _payload(out, where, loc.code, layout.locator_payload(slot))


def _payload(out: Findings, where: str, code: int, raw: bytes) -> None:
    """The encoding rules of one locator's payload."""
    if code in (CODE_W2KU, CODE_W2RU):
        if len(raw) % 2:
            out.add(WARNING, "locator-encoding", f"{where}: odd length for UTF-16LE")
        try:
            text = raw[: len(raw) // 2 * 2].decode("utf-16-le").split("\0", 1)[0]
        except UnicodeDecodeError:
            out.add(WARNING, "locator-encoding", f"{where}: not valid UTF-16LE")
            return
        if code == CODE_W2RU and not text.startswith(".\\"):
            out.add(
                WARNING,
                "locator-w2ru-prefix",
                f"{where}: relative path {text!r} does not start with '.\\' "
                "(vhd set-parent rewrites it)",
            )
        if text.startswith(".\\") and code == CODE_W2KU:
            out.add(
                INFO,
                "locator-w2ku-relative",
                f"{where}: holds a relative path (as blktap writes)",
            )
    elif code == CODE_MACX:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.add(WARNING, "locator-encoding", f"{where}: not valid UTF-8")
            return
        if not text.startswith("file://"):
            out.add(WARNING, "locator-macx-url", f"{where}: not a file:// URL")
    elif code == CODE_MAC:
        out.add(INFO, "locator-mac-alias", f"{where}: a Mac alias cannot be resolved")


def parent_rules(
    layout: Layout, fixes: RepairFacts, out: Findings, policy: ParentPolicy, *, force_share: bool
) -> None:
    """The parent itself: found under ``policy``, its unique id, its timestamp and size."""
    from .image import open as open_image

    h, size = layout.header, layout.footer.current_size
    assert h is not None
    try:
        parent: Any = resolve_parent(
            layout.path,
            h,
            layout.locators(),
            opener=functools.partial(open_image, force_share=force_share),
            policy=policy,
            allow_mismatch=False,
            strict=False,
            seen=frozenset(),
        )
    except ParentNotFoundError as exc:
        out.add(ERROR, "parent-not-found", f"{exc} (vhd set-parent CHILD PARENT retargets it)")
        return
    except ParentMismatchError as exc:
        out.add(ERROR, "parent-mismatch", str(exc))
        return
    except ChainLoopError as exc:
        out.add(ERROR, "parent-loop", str(exc))
        return
    except (VHDError, OSError) as exc:
        out.add(ERROR, "parent-unreadable", f"the parent cannot be opened: {exc}")
        return
    try:
        ts = vhd_timestamp(os.stat(parent.path).st_mtime)
        if h.parent_timestamp == 0:
            out.add(
                INFO,
                "parent-timestamp-zero",
                "the parent timestamp is 0 (as Windows 10 diskpart writes)",
            )
        elif h.parent_timestamp != ts:
            out.add(
                WARNING,
                "parent-timestamp",
                f"the recorded parent timestamp ({h.parent_timestamp}) is not the parent's "
                f"modification time ({ts}): the parent changed or was copied (Virtual PC and "
                "FATtools refuse such a child)",
                "record the parent's modification time",
            )
            assert fixes.header_fixed is not None
            fixes.header_fixed = fixes.header_fixed.replace(parent_timestamp=ts)
        if parent.size != size:
            # Legitimate after a resize of either: the core reads zeros past the parent.
            out.add(INFO, "parent-size", f"the parent is {parent.size} bytes, the child {size}")
        for warning in parent.warnings:
            out.add(WARNING, "parent-warning", f"parent {parent.path}: {warning}")
    finally:
        parent.close()
