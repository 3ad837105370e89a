"""Repair of what crashes and bad copies leave in a VHD (``vhd check --repair``).

The plan is built from a :class:`~vhd.findings.CheckReport` (the image's layout and what the
rules decided) and is a list of :class:`Step`\\ s, each a few positioned writes (or a cut of the
file) followed by an ``fsync``, executed through :class:`~vhd.metadata.MetadataWriter`.
``--dry-run`` prints the plan; :func:`apply_plan` executes it.  What it mends:

* the trailing footer zeroed, damaged or cut off (restored from the copy at offset 0, placed after
  the last block) and the copy at offset 0 (restored from the trailing footer); bad footer
  checksums, the reserved feature bit, a 511-byte footer, a fixed disk's stray bytes between data
  and footer;
* the dynamic header's checksum and data offset, a stale parent timestamp;
* BAT entries past the end of the file, overlapping metadata or each other: the bad entry is
  unallocated and the guest range it held is reported as lost;
* a trailing footer in the wrong place after an interrupted allocation, and orphan space after
  the last block (the file is cut after the last block);
* (after a deep check) bitmap bits set past the disk end.

Order, so that a crash during the repair leaves an image at least as good as before: BAT entries
are unallocated first (that only gives up ranges that are lost anyway); then bitmaps and the
header; then the trailing footer is written at its new place (while the old one, if any, still
ends the file); then the file is cut; the copy at offset 0 comes last.  A repair never makes a
readable guest range unreadable: it drops only blocks that no reader can use, cuts only space no
BAT entry references, and a block that the file holds only in part is kept (its missing end reads
as zeros) rather than dropped.
"""

from __future__ import annotations

import itertools
import os

from . import lock
from .bat import UNUSED
from .findings import ERROR, WARNING, CheckReport, Finding, Findings, RepairFacts
from .footer import FOOTER_SIZE, DiskType
from .metadata import MetadataWriter, bat_sector_writes
from .record import Record, fill

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any

SECTOR = 512
# Offers that write the trailing footer at its place, and ones that rewrite the header.
_NEEDS_FOOTER_TARGET = frozenset(
    (
        "footer-tail-missing",
        "footer-checksum",
        "footer-511",
        "footer-features",
        "footer-data-offset",
    )
)
_NEEDS_HEADER = frozenset(("header-checksum", "header-data-offset"))
# Descriptions list this many blocks or ranges and count the rest.
_LISTED = 50


def _listing(items: list[str], total: int) -> str:
    more = f", and {total - len(items)} more" if total > len(items) else ""
    return ", ".join(items) + more


class Step(Record):
    _fields = ("description", "writes", "truncate")
    __slots__ = _fields
    description: str
    writes: list[tuple[int, bytes]]
    truncate: int | None

    def __init__(
        self,
        description: str,
        writes: list[tuple[int, bytes]] | None = None,
        truncate: int | None = None,
    ) -> None:
        fill(self, description, [] if writes is None else writes, truncate)

    def lines(self) -> list[str]:
        out = [self.description]
        for at, data in self.writes:
            out.append(f"  write {len(data)} bytes at {at:#x}")
        if self.truncate is not None:
            out.append(f"  cut the file to {self.truncate} bytes")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "writes": [{"offset": at, "length": len(data)} for at, data in self.writes],
            "truncate": self.truncate,
        }


class RepairPlan(Record):
    _fields = ("path", "steps", "lost", "unrepairable")
    __slots__ = _fields
    path: str
    steps: list[Step]
    lost: list[tuple[int, int, str]]  # (guest offset, length, why)
    unrepairable: list[Finding]

    def __init__(
        self,
        path: str,
        steps: list[Step],
        lost: list[tuple[int, int, str]],
        unrepairable: list[Finding],
    ) -> None:
        fill(self, path, steps, lost, unrepairable)

    @property
    def empty(self) -> bool:
        return not self.steps

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": [s.as_dict() for s in self.steps],
            "lost": [{"offset": o, "length": n, "reason": r} for o, n, r in self.lost],
            "unrepairable": [f.as_dict() for f in self.unrepairable],
        }


def withdraw_unkeepable(findings: Findings, fixes: RepairFacts) -> None:
    """Withdraw the offers a repair cannot keep: when the check stopped before it learnt where
    the trailing footer belongs (a damaged header or BAT), the footer cannot be rewritten;
    without a usable header, neither can the header."""
    for i, f in enumerate(findings):
        if f.repairable and (
            (f.code in _NEEDS_FOOTER_TARGET and fixes.footer_target < 0)
            or (f.code in _NEEDS_HEADER and fixes.header_fixed is None)
        ):
            findings[i] = f.replace(
                message=f"{f.message} (--repair cannot mend it while the errors above last)",
                repair=None,
            )


def plan_repair(report: CheckReport) -> RepairPlan:
    """What :func:`apply_plan` would do to mend the repairable findings of ``report``."""
    m, fx = report.layout, report.fixes
    c = m.choice
    steps: list[Step] = []
    lost: list[tuple[int, int, str]] = []
    unrepairable = [
        f for f in report.findings if f.severity in (ERROR, WARNING) and not f.repairable
    ]
    codes = {f.code for f in report.findings if f.repairable}
    if not codes or fx.footer_fixed is None:
        return RepairPlan(report.path, [], [], unrepairable)
    fd = os.open(report.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if m.sparse and fx.drop and m.header is not None:
            for block in fx.drop:  # ascending
                offset, length = m.block_extent(block)
                why = fx.drop[block]
                # Neighbouring blocks dropped for the same reason make one lost range (a
                # crafted table can drop millions).
                if lost and lost[-1][0] + lost[-1][1] == offset and lost[-1][2] == why:
                    lost[-1] = (lost[-1][0], lost[-1][1] + length, why)
                else:
                    lost.append((offset, length, why))
            dropped = list(itertools.islice(fx.drop, _LISTED))
            steps.append(
                Step(
                    "unallocate blocks "
                    + _listing([f"{b} ({fx.drop[b]})" for b in dropped], len(fx.drop))
                    + "; lost guest ranges: "
                    + _listing([f"{o:#x}+{n:#x}" for o, n, _ in lost[:_LISTED]], len(lost)),
                    bat_sector_writes(
                        lambda at: os.pread(fd, SECTOR, at),
                        m.header.table_offset,
                        dict.fromkeys(fx.drop, UNUSED),
                    ),
                )
            )
        if fx.bitmap_fixes and m.bat is not None:
            steps.append(
                Step(
                    "clear bitmap bits past the end of the disk in blocks "
                    + ", ".join(str(b) for b in sorted(fx.bitmap_fixes)),
                    [
                        (m.bat[b] * SECTOR, raw)
                        for b, raw in sorted(fx.bitmap_fixes.items())
                        if b not in fx.drop
                    ],
                )
            )
        if m.sparse and m.header is not None and fx.header_fixed is not None:
            new_header = fx.header_fixed.build()
            if new_header != m.header_raw:
                steps.append(
                    Step(
                        "rewrite the dynamic header (checksum, data offset, parent timestamp)",
                        [(m.header_offset, new_header)],
                    )
                )
        new_footer = fx.footer_fixed.build()
        target = fx.footer_target
        if target >= 0:
            tail_right = c.tail_ok and c.tail_offset == target and c.tail_raw == new_footer
            if not tail_right:
                where = "restore" if not c.tail_ok else "rewrite"
                steps.append(
                    Step(
                        f"{where} the trailing footer at {target:#x}"
                        + (" (from the copy at offset 0)" if not c.tail_ok and c.head_ok else ""),
                        [(target, new_footer)],
                    )
                )
            if m.file_size > target + FOOTER_SIZE:
                steps.append(
                    Step(
                        f"cut {m.file_size - target - FOOTER_SIZE} unreferenced bytes after the "
                        "trailing footer",
                        truncate=target + FOOTER_SIZE,
                    )
                )
        if m.disk_type in (DiskType.DYNAMIC, DiskType.DIFFERENCING) and c.head_raw != new_footer:
            steps.append(Step("write the footer copy at offset 0", [(0, new_footer)]))
    finally:
        os.close(fd)
    return RepairPlan(report.path, steps, lost, unrepairable)


def apply_plan(plan: RepairPlan) -> None:
    """Execute ``plan`` (each step synced before the next)."""
    if plan.empty:
        return
    fd = os.open(plan.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        lock.acquire(fd, plan.path, exclusive=True)
        # The plan's steps are already in the metadata writer's crash order (see above).
        writer = MetadataWriter.for_repair(fd)
        for step in plan.steps:
            writer.write_raw(step.writes, sync=step.truncate is None)
            if step.truncate is not None:
                writer.truncate(step.truncate)
    finally:
        os.close(fd)
