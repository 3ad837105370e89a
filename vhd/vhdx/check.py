"""``vhd check`` for VHDX: every rule of MS-VHDX 1.0 that an open does not already enforce, and
``--repair`` for what a crash or a torn write leaves.

Checked: both header copies (signature, CRC-32C, version) and both region tables (CRC-32C, equal
contents); the log (a live LogGuid means a replay is pending); BAT entries (reserved states and
bits, PARTIALLY_PRESENT only with a parent and a present sector bitmap, sector bitmap entries
only in differencing disks, offsets 1 MiB-aligned, inside the file, not overlapping each other
or the headers, log, BAT and metadata regions).  Whatever makes the open of the file itself
fail is reported as the one problem, except what says nothing about the image (it is in use:
:class:`~vhd.lock.InUseError`; it cannot be read: ``OSError``), which is raised, as
:func:`vhd.check.check` raises it ("cannot open", the CLI's exit 2).  A differencing disk's own
structures are checked with or without its parent; the parent is then looked for under
``parent_policy`` (the CLI's: the locators as written, or ``--confine-parents``) and a parent
that cannot be opened is one more problem.

With ``deep``: every allocated payload block and sector bitmap block inside the file is read
(in 4 MiB chunks; a read error or a short read is a problem naming the block), as ``vhd check
--deep`` reads every block of a VHD.

Space after the last structure and block is orphaned (a writer killed before its flush
allocated it); ``--repair`` cuts the file there -- never in a fixed disk, whose file must keep
room for every block (qemu-img preallocates it unreferenced).

Repairs: the log is replayed (an ``r+`` open does it), a damaged header copy is rewritten from
the current one (the header update procedure), a damaged region table copy from its twin, the
orphaned tail cut (computed again after the replay, from the BAT the log left).
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Callable, Sequence

from ..chain import ParentPolicy
from ..errors import VHDError
from ..findings import ERROR, INFO, MAX_FINDINGS_PER_CODE, Finding, Severity
from ..lock import InUseError
from ..record import Record, fill
from . import placement
from . import records as r
from .disk import VHDXDisk, chunk_ratio, open_vhdx


class VHDXCheckReport(Record):
    """The findings of one check, in :mod:`vhd.findings`' vocabulary (a code, a severity, a
    message, the repair ``--repair`` would make), as ``vhd check`` gives them for VHD: errors
    are problems (exit 1), ``info`` findings are notes, true of the image but not wrong with it
    (exit 0)."""

    _fields = ("path", "findings", "repaired", "type", "size")
    __slots__ = _fields
    path: str
    findings: list[Finding]
    repaired: list[str]
    type: str
    size: int

    def __init__(
        self,
        path: str,
        findings: list[Finding] | None = None,
        repaired: list[str] | None = None,
        type: str = "?",
        size: int = 0,
    ) -> None:
        fill(
            self,
            path,
            [] if findings is None else findings,
            [] if repaired is None else repaired,
            type,
            size,
        )

    def error(self, code: str, message: str, repair: str | None = None) -> None:
        self.findings.append(Finding(code, ERROR, message, repair))

    def note(self, code: str, message: str, repair: str | None = None) -> None:
        self.findings.append(Finding(code, INFO, message, repair))

    @property
    def problems(self) -> list[str]:
        return [f.message for f in self.findings if f.severity is not INFO]

    @property
    def notes(self) -> list[str]:
        return [f.message for f in self.findings if f.severity is INFO]

    @property
    def repairable(self) -> list[str]:
        """What ``--repair`` would mend, problems and notes (it also cuts orphan space)."""
        return [f.repair for f in self.findings if f.repair is not None]

    @property
    def clean(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "format": "vhdx",
            "type": self.type,
            "size": self.size,
            "clean": self.clean,
            "counts": {
                sev.value: sum(1 for f in self.findings if f.severity == sev) for sev in Severity
            },
            "findings": [f.as_dict() for f in self.findings],
            "repaired": self.repaired,
        }


def _structures(disk: VHDXDisk) -> list[tuple[int, int, str]]:
    h = disk.current_header
    out = [(0, r.MiB, "header section")]
    if h.log_length:
        out.append((h.log_offset, h.log_offset + h.log_length, "log"))
    for reg in (disk.layout.bat_region, disk.layout.metadata_region):
        out.append((reg.file_offset, reg.file_offset + reg.length, f"{reg.name} region"))
    return out


# Problems of one kind listed by _check_bat; the rest are counted in one more line.  A crafted
# BAT can break a rule for each of its 64 Mi entries (as vhd.findings does for VHD).
MAX_LISTED = MAX_FINDINGS_PER_CODE
# Low bytes of payload entries that need a look: reserved states 4 and 5, FULLY_PRESENT and
# PARTIALLY_PRESENT (blocks); bits 3-19 are found by placement.with_reserved_bits.
_NOTABLE = bytes(1 if b & r.STATE_MASK >= 4 else 0 for b in range(256))
_NOT_PRESENT = bytes(1 if b & r.STATE_MASK == r.PayloadState.NOT_PRESENT else 0 for b in range(256))  # fmt: skip


class _Listed:
    """Findings by kind, the first MAX_LISTED of each kept in order, the rest counted."""

    def __init__(self) -> None:
        self.lines: list[Finding] = []
        self.counts: dict[str, int] = {}
        self.codes: dict[str, str] = {}

    def add(self, kind: str, code: str, line: str) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        self.codes[kind] = code
        if n <= MAX_LISTED:
            self.lines.append(Finding(code, ERROR, line))

    def summary(self) -> list[Finding]:
        return [
            Finding(
                self.codes[kind],
                ERROR,
                f"{n - MAX_LISTED} more {kind} problems like the above (not listed)",
            )
            for kind, n in self.counts.items()
            if n > MAX_LISTED
        ]


def _check_bat(disk: VHDXDisk, report: VHDXCheckReport) -> list[tuple[int, int, str]]:
    """The BAT rules; returns the file ranges of the allocated blocks and bitmaps.

    C-level passes (:mod:`vhd.vhdx.placement`) find the entries that need a look -- sector
    bitmap entries that are not NOT_PRESENT, payload entries with reserved bits, a reserved
    state or a block -- and only those take Python steps: an empty 64 Ti disk of 1 MiB blocks
    (64 Mi entries) takes none.  Problems are listed up to MAX_LISTED of a kind, and blocks are
    kept for the overlap rules only up to what the file has room for (more must overlap or lie
    outside it, which is said once): memory stays bounded on a crafted table."""
    md = disk.metadata
    bat = disk.bat
    ratio = chunk_ratio(md.block_size, md.logical_sector_size)
    stride = ratio + 1
    blocks = -(-disk.size // md.block_size)
    fsize = disk.file_size
    spans = _structures(disk)
    used: list[tuple[int, int, str]] = []
    room = fsize // r.MiB  # blocks are 1 MiB at least, 1 MiB aligned, past the first MiB
    too_many = 0
    early = _Listed()  # the rules of entries, in BAT order
    late = _Listed()  # the rules of the space they name, in the order of `used`

    def place(lo: int, hi: int, name: str) -> None:
        nonlocal too_many
        if lo < r.MiB or hi > fsize:
            late.add(
                "outside",
                "block-outside-file",
                f"{name} at [{lo}, {hi}) lies outside the file ({fsize} bytes)",
            )
        for slo, shi, sname in spans:
            if lo < shi and slo < hi:
                late.add(
                    "structure",
                    "block-over-structure",
                    f"{name} at [{lo}, {hi}) overlaps the {sname}",
                )
        if len(used) < room:
            used.append((lo, hi, name))
        else:
            too_many += 1

    bitmap_present: set[int] = set()
    bitmap_states = placement.bitmap_states(bat, -(-blocks // ratio), stride)
    for c in placement.flagged_bytes(bitmap_states):
        index = c * stride + ratio
        entry = bat[index]
        state = entry & r.STATE_MASK
        if state == r.BitmapState.PRESENT:
            if not md.has_parent:
                early.add(
                    "bitmap",
                    "bitmap-without-parent",
                    f"sector bitmap entry {index} is PRESENT without a parent",
                )
            bitmap_present.add(c)
            place(entry & r.OFFSET_MASK, (entry & r.OFFSET_MASK) + r.MiB, f"bitmap {c}")
        else:
            early.add(
                "bitmap",
                "bitmap-state-reserved",
                f"sector bitmap entry {index} has the reserved state {state}",
            )
    payload_stop = blocks + (blocks - 1) // ratio if blocks else 0
    notable = heapq.merge(
        placement.with_reserved_bits(bat, 0, payload_stop),
        placement.flagged(bat, 0, payload_stop, _NOTABLE),
    )
    for index, _ in itertools.groupby(notable):
        if index % stride == ratio:
            continue  # a sector bitmap entry: looked at above
        b = index - index // stride
        entry = bat[index]
        state = entry & r.STATE_MASK
        if entry & 0xFFFF8:
            early.add(
                "reserved bits",
                "bat-reserved-bits",
                f"BAT entry {index} (block {b}) has reserved bits set",
            )
        if state in (4, 5):
            early.add("state", "block-state-reserved", f"block {b} has the reserved state {state}")
            continue
        if state == r.PayloadState.PARTIALLY_PRESENT:
            if not md.has_parent:
                early.add(
                    "state",
                    "partial-without-parent",
                    f"block {b} is PARTIALLY_PRESENT in a disk without parent",
                )
            elif b // ratio not in bitmap_present:
                early.add(
                    "state",
                    "partial-without-bitmap",
                    f"block {b} is PARTIALLY_PRESENT but has no sector bitmap",
                )
        if state in (r.PayloadState.FULLY_PRESENT, r.PayloadState.PARTIALLY_PRESENT):
            off = entry & r.OFFSET_MASK
            place(off, off + md.block_size, f"block {b}")
    report.findings += early.lines + late.lines
    pairs = _Listed()
    used.sort()
    for (_, ahi, aname), (blo, _, bname) in itertools.pairwise(used):
        if blo < ahi:
            pairs.add(
                "overlap", "blocks-overlap", f"{aname} and {bname} overlap at file offset {blo}"
            )
    report.findings += pairs.lines + early.summary() + late.summary() + pairs.summary()
    if too_many:
        report.error(
            "blocks-exceed-file",
            f"{len(used) + too_many} blocks and bitmaps are allocated but the file has room for "
            f"{room}: {too_many} more overlap others or lie outside it (not listed)",
        )
    if not md.has_parent and md.leave_blocks_allocated:
        # LeaveBlocksAllocated (2.6.2.1): blocks SHOULD NOT become NOT_PRESENT.  ZERO is fine:
        # qemu-img makes its fixed disks with every block ZERO over preallocated space.
        for index in placement.flagged(bat, 0, payload_stop, _NOT_PRESENT):
            if index % stride != ratio:
                report.error("fixed-block-missing", f"block {index - index // stride} of a fixed disk is NOT_PRESENT")  # fmt: skip
                break
    return used


def _fixed(disk: VHDXDisk) -> bool:
    """LeaveBlocksAllocated without a parent (2.6.2.1): the file MUST NOT shrink below what
    allocating every block takes, so its tail is never orphan space (qemu-img preallocates it
    and leaves the blocks ZERO with no offset until written)."""
    md = disk.metadata
    return bool(md.leave_blocks_allocated) and not md.has_parent


def _data_end(disk: VHDXDisk) -> int:
    """Where the last structure or the space of the last BAT entry ends, 1 MiB-aligned
    (MS-VHDX 2.2: regions and blocks are): past it nothing names the file's space.  Every entry
    with a FileOffsetMB counts, whatever its state: qemu-img's fixed disks keep their space in
    ZERO blocks (LeaveBlocksAllocated), and a writer may turn them FULLY_PRESENT in place."""
    end = max(hi for _, hi, _ in _structures(disk))
    # The offset is the entry's high bits: the largest entry names the last space.
    found = placement.highest(disk.bat)
    if found is not None:
        index, top = found
        if top & r.OFFSET_MASK:
            ratio = chunk_ratio(disk.metadata.block_size, disk.metadata.logical_sector_size)
            bitmap = (index + 1) % (ratio + 1) == 0
            length = r.MiB if bitmap else disk.metadata.block_size
            end = max(end, (top & r.OFFSET_MASK) + length)
    return -(-end // r.MiB) * r.MiB


_CHUNK = 4 * r.MiB


def _read_all(
    path: str,
    used: list[tuple[int, int, str]],
    file_size: int,
    report: VHDXCheckReport,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Read every allocated range that lies in the file (the rest is a problem already): a
    block the media cannot give back is found now, not when a guest reads it."""
    ranges = [(lo, min(hi, file_size), name) for lo, hi, name in used if lo < file_size]
    total = sum(hi - lo for lo, hi, _ in ranges)
    done = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for lo, hi, name in ranges:
            pos = lo
            while pos < hi:
                n = min(_CHUNK, hi - pos)
                try:
                    got = len(os.pread(fd, n, pos))
                except OSError as exc:
                    report.error(
                        "block-unreadable", f"{name}: read error at file offset {pos}: {exc}"
                    )
                    break
                if got < n:
                    report.error(
                        "block-truncated", f"{name}: the file ends at {pos + got} inside it"
                    )
                    break
                pos += n
                done += n
                if progress is not None:
                    progress(done, total)
            done += hi - pos
    finally:
        os.close(fd)


def check_vhdx(
    path: str,
    *,
    repair: bool = False,
    parent_dirs: Sequence[str] | None = None,
    parent_policy: ParentPolicy | None = None,
    force_share: bool = False,
    deep: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> VHDXCheckReport:
    """Check ``path``; ``progress(bytes done, bytes)`` follows ``deep``'s block reads."""
    report = VHDXCheckReport(path)
    dirs = tuple(parent_dirs or ())
    try:
        # The file on its own first: its structures are checked whether or not its parent is
        # found (the parent is opened below, as one more rule); blocks over its structures are
        # listed by the rules below, not refused by the open.
        disk = open_vhdx(path, open_parent=False, force_share=force_share, misplaced_blocks=True)
    except InUseError:
        raise  # "cannot open", not a finding about the image
    except VHDError as exc:
        report.error("image-invalid", str(exc))
        return report
    with disk:
        report.type = disk.type.label
        report.size = disk.size
        lay = disk.layout
        for i, (h, err) in enumerate(zip(lay.headers, lay.header_errors, strict=True)):
            if h is None:
                report.error(
                    "header-invalid",
                    f"header {i + 1} is invalid: {err}",
                    f"rewrite header {i + 1} from the current one",
                )
        tables = lay.region_tables
        for i, (t, err) in enumerate(zip(tables, lay.region_errors, strict=True)):
            if t is None:
                report.error(
                    "region-table-invalid",
                    f"region table {i + 1} is invalid: {err}",
                    f"rewrite region table {i + 1} from its twin",
                )
        t0, t1 = tables
        if t0 is not None and t1 is not None and t0.entries != t1.entries:
            report.error("region-tables-differ", "the two region tables differ")
        if disk.current_header.log_guid != r.ZERO_GUID:
            report.error("log-live", "the log is live: it must be replayed", "replay the log")
        allocated = _check_bat(disk, report)
        end = _data_end(disk)
        if disk.file_size > end and not _fixed(disk):
            # Free space, which MS-VHDX allows anywhere, not damage: qemu-img's every new VHDX
            # keeps 4 MiB free before its data starts at 8 MiB.  A writer killed between growing
            # the file for a block and its flush leaves the same (a whole block or more).
            report.note(
                "orphan-space",
                f"{disk.file_size - end} bytes after the last block at {end:#x} are referenced "
                "by nothing (kept free by the writer, or left by an interrupted allocation)",
                f"cut the file at {end:#x}",
            )
        if deep:
            _read_all(path, allocated, disk.file_size, report, progress)
        differencing = disk.type.label == "differencing"
    # Let its table go before the chain is opened: a 64 TiB disk's is 512 MiB, and the chain
    # (and a repair's second check) hold their own.
    del disk
    if differencing:
        try:
            open_vhdx(
                path, parent_dirs=dirs, parent_policy=parent_policy, force_share=force_share
            ).close()
        except InUseError:
            raise
        except VHDError as exc:
            report.error("parent-unusable", str(exc))
    # What can be mended is mended even when other problems stay (a missing parent, a bad BAT
    # entry): each repair stands alone (the log replay is what every open of Hyper-V's does,
    # header and region copies come from their valid twins, the cut keeps every referenced
    # byte), as qemu-img check -r repairs what it can.  What remains is listed afterwards.
    if repair and report.repairable:
        _repair(path, report, dirs, parent_policy)
    return report


def _repair(
    path: str,
    report: VHDXCheckReport,
    parent_dirs: Sequence[str],
    parent_policy: ParentPolicy | None,
) -> None:
    cut = any(f.code == "orphan-space" for f in report.findings)
    with open_vhdx(path, "r+", open_parent=False) as disk:  # replays the log, clears LogGuid
        lay = disk.layout
        if any(h is None for h in lay.headers):
            disk._write_header(True)  # the non-current (damaged) copy gets seq + 1
            disk._write_header(True)
        good = next(t for t in lay.region_tables if t is not None)
        for i, t in enumerate(lay.region_tables):
            if t is None:
                disk._write_region_table(i, good)
        # After the replay (the open's): the BAT as the log left it says where the data ends.
        end = _data_end(disk)
        cut = cut and disk.file_size > end and not _fixed(disk)
        if cut:
            disk._truncate(end)
    report.repaired = [f.repair for f in report.findings if f.repair and f.code != "orphan-space"]
    if cut:
        report.repaired.append(f"cut the file at {end:#x}")
    after = check_vhdx(path, parent_dirs=parent_dirs, parent_policy=parent_policy)
    report.findings = after.findings
