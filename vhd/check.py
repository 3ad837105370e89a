"""The rules of ``vhd check``: a VHD image judged against the spec and against what real readers
accept (spec: "Hard Disk Footer Format", "Dynamic Disk Header Format"; the "Block Allocation
Table" rules are in :mod:`vhd.check_blocks`, the "Parent Locator Entry" ones in
:mod:`vhd.check_parent`).

The file is read once, by the layout step (:func:`vhd.layout.read_layout`), the same step
:func:`vhd.open` builds on; the rules here read nothing themselves and turn that
:class:`~vhd.layout.Layout` into :class:`~vhd.findings.Finding`\\ s with a severity, leaving what
``--repair`` needs in :class:`~vhd.findings.RepairFacts` (:mod:`vhd.repair` acts on it).

Rules, by structure:

* **Hard disk footer** (trailing copy, and the copy at offset 0 of dynamic/differencing disks):
  cookie, checksum, file format version, feature bit 0x2, disk type, data offset, size a multiple
  of 512; a 511-byte footer (pre-2004 Virtual PC); head vs tail copies; interop lints: C·H·S vs
  current size for the creators qemu ≤ 9 sizes by C·H·S, original vs current size (libvhdi reads
  the original), the 2040 GiB cap, Azure's whole-MiB rule for fixed disks.
* **Dynamic header**: cookie, checksum, version, data offset, block size (power of two; blktap
  stops at 2 MiB), max table entries vs the size, the BAT's place.
* **BAT** (:mod:`vhd.check_blocks`): entries past the end of the file or of the data area,
  overlapping metadata (footer copy, header, BAT, locator payloads) or each other, data not
  4 KiB-aligned, orphan space between the last block and the trailing footer.
* **Parent locators** (:mod:`vhd.check_parent`): bounds, overlaps, encodings (UTF-16LE for W2ku/W2ru, ``file://`` for
  MacX), data_space in sectors vs bytes, the ``.\\`` prefix of W2ru; the parent itself (found,
  unique id, stale timestamp, size).
* With ``deep=True`` only: sector bitmaps (bits set past the disk end, empty blocks) and a read of
  every data block.  The metadata check never reads data blocks or bitmaps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from .azure import azure_check, azure_target_size
from .chain import ParentPolicy
from .check_blocks import bat_rules, bitmap_rules, read_failure
from .check_parent import locator_rules, parent_rules
from .fileio import open_image_file
from .findings import (
    ERROR,
    INFO,
    MAX_FINDINGS_PER_CODE,
    WARNING,
    CheckReport,
    Finding,
    Findings,
    RepairFacts,
    Severity,
)
from .footer import (
    CREATOR_APP,
    CREATOR_VERSION,
    FEATURE_RESERVED,
    FEATURE_TEMPORARY,
    FIXED_DATA_OFFSET,
    QEMU_CURRENT_SIZE_CREATORS,
    VERSION,
    DiskType,
    Footer,
)
from .geometry import MAX_GEOMETRY, chs_from_size, packed
from .header import UNUSED_DATA_OFFSET, DynamicHeader
from .header import VERSION as HEADER_VERSION
from .header import checksum_ok as header_checksum_ok
from .layout import MAX_SIZE, Layout, read_layout
from .record import Record, fill
from .repair import withdraw_unkeepable

__all__ = [
    "ERROR",
    "INFO",
    "MAX_FINDINGS_PER_CODE",
    "WARNING",
    "CheckReport",
    "Finding",
    "Severity",
    "azure_check",
    "azure_target_size",
    "check",
]

SECTOR = 512
MiB = 1024 * 1024
# Fields compared between the footer copy at offset 0 and the trailing footer, for the message.
_FOOTER_FIELDS = (
    "current_size",
    "original_size",
    "disk_type",
    "unique_id",
    "data_offset",
    "geometry",
    "timestamp",
    "features",
)


def check(
    path: str | os.PathLike[str],
    *,
    deep: bool = False,
    parent_dirs: Sequence[str] = (),
    check_parent: bool = True,
    parent_policy: ParentPolicy | None = None,
    progress: Callable[[int, int], None] | None = None,
    force_share: bool = False,
) -> CheckReport:
    """Check an image.  Raises :class:`~vhd.errors.NotAVHDError` when the file holds no VHD
    footer at all, and ``OSError`` when it cannot be read; every other problem is a finding.
    ``progress(bytes done, bytes)`` follows ``deep``'s block reads."""
    spath = os.fspath(path)
    # Opened, vetted and locked as vhd.open does (a reader's shared lock: a writer elsewhere
    # would make the findings meaningless; a FIFO is refused, not waited on).
    fd, _ = open_image_file(spath, writable=False, force_share=force_share)
    try:
        layout = read_layout(fd, spath, os.lseek(fd, 0, os.SEEK_END))
    except BaseException:
        os.close(fd)
        raise
    rules = _Rules(layout, RepairFacts(), Findings(), force_share)
    try:
        policy = (parent_policy or ParentPolicy()).with_dirs(parent_dirs)
        rules.run(deep=deep, policy=policy, check_parent=check_parent, progress=progress)
    finally:
        os.close(fd)
        # The report keeps the layout's facts; its readers must not read a reused descriptor.
        layout.fd = -1
        rules.out.summarise()
        withdraw_unkeepable(rules.out, rules.fixes)
    return CheckReport(spath, rules.out, layout, rules.fixes, deep)


class _Rules(Record):
    _fields = ("layout", "fixes", "out", "force_share")
    __slots__ = _fields
    layout: Layout
    fixes: RepairFacts
    out: Findings
    force_share: bool

    def __init__(
        self, layout: Layout, fixes: RepairFacts, out: Findings, force_share: bool
    ) -> None:
        fill(self, layout, fixes, out, force_share)

    def add(self, severity: Severity, code: str, message: str, repair: str | None = None) -> None:
        self.out.add(severity, code, message, repair)

    def stopped(self, *codes: str) -> bool:
        """Report where the layout step stopped, if it stopped at one of ``codes``."""
        stop = self.layout.stop
        if stop is None or stop.code not in codes:
            return False
        self.add(ERROR, stop.code, stop.message)
        return True

    def run(
        self,
        *,
        deep: bool,
        policy: ParentPolicy,
        check_parent: bool,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        if not self.footer():
            return
        if self.layout.disk_type == DiskType.FIXED:
            self.fixed(deep)
            return
        if not self.header():
            return
        if self.stopped("bat-offset", "bat-overlaps-header"):
            return
        bat_rules(self.layout, self.fixes, self.out)
        locator_rules(self.layout, self.out)
        if self.layout.disk_type == DiskType.DIFFERENCING and check_parent:
            parent_rules(self.layout, self.fixes, self.out, policy, force_share=self.force_share)
        if deep:
            bitmap_rules(self.layout, self.fixes, self.out, progress)

    # -- footer -----------------------------------------------------------------------------

    def footer(self) -> bool:
        choice = self.layout.choice
        f = choice.footer
        if len(choice.tail_raw) == 511:
            self.add(
                WARNING,
                "footer-511",
                "the image ends in a 511-byte footer (made before Virtual PC 2004); libvhdi and "
                "most tools cannot open it",
                "rewrite the footer as a full 512-byte footer",
            )
        if choice.reason == "head":
            what = "damaged (bad checksum)" if choice.tail_raw else "missing"
            self.add(
                ERROR,
                "footer-tail-missing",
                f"the trailing footer is {what}; the copy at offset 0 is intact",
                "write the copy from offset 0 as the trailing footer, after the last block",
            )
        elif choice.reason == "tail-checksum":
            self.add(
                ERROR,
                "footer-checksum",
                f"footer checksum mismatch (stored {f.checksum:#010x}, computed "
                f"{Footer.parse(f.build()).checksum:#010x})",
                "recompute the footer checksum",
            )
        elif choice.reason == "head-checksum":
            self.add(
                ERROR,
                "footer-tail-missing",
                "the trailing footer is missing and the copy at offset 0 has a bad checksum",
                "recompute the checksum of the copy at offset 0 and write it as the trailing "
                "footer",
            )
        if self.stopped("footer-disk-type"):
            return False
        fixed = f
        if f.version != VERSION:
            self.add(
                ERROR,
                "footer-version",
                f"file format version {f.version:#010x} is not 0x00010000 (libvhdi and blktap "
                "refuse it)",
            )
        if not f.features & FEATURE_RESERVED:
            self.add(
                WARNING,
                "footer-features",
                f"features {f.features:#010x} lack the reserved bit 0x2 the spec says must be set",
                "set feature bit 0x2",
            )
            fixed = fixed.replace(features=f.features | FEATURE_RESERVED)
        if f.features & FEATURE_TEMPORARY:
            self.add(INFO, "footer-temporary", "the 'temporary' feature bit (0x1) is set")
        if f.saved_state:
            self.add(INFO, "footer-saved-state", "the saved-state flag is set")
        size = f.current_size
        if size % SECTOR:
            self.add(ERROR, "footer-size", f"the disk size {size} is not a multiple of 512")
            return False
        if size == 0:
            self.add(WARNING, "footer-size-zero", "the disk size is 0")
        if size > MAX_SIZE:
            self.add(
                WARNING,
                "size-over-2040g",
                f"the disk is {size} bytes, more than the 2040 GiB Microsoft and qemu accept",
            )
        if f.original_size != size:
            self.add(
                INFO,
                "size-original",
                f"original size {f.original_size} differs from current size {size}: libvhdi "
                "reports the original size",
            )
        fixed = self.geometry(f, fixed)
        if f.type == DiskType.FIXED:
            if f.data_offset != FIXED_DATA_OFFSET:
                self.add(
                    INFO if f.data_offset == 0xFFFFFFFF else WARNING,
                    "footer-data-offset",
                    f"a fixed disk's data offset should be all ones, not {f.data_offset:#x}",
                    "set the data offset to 0xffffffffffffffff",
                )
                fixed = fixed.replace(data_offset=FIXED_DATA_OFFSET)
        elif not choice.head_cookie:
            self.add(
                ERROR,
                "footer-head-missing",
                "the footer copy at offset 0 is missing (qemu refuses the image)",
                "write the trailing footer's copy at offset 0",
            )
        elif not choice.head_ok:
            self.add(
                ERROR,
                "footer-head-checksum",
                "the footer copy at offset 0 has a bad checksum (qemu refuses the image)",
                "write the trailing footer's copy at offset 0",
            )
        elif choice.tail_ok and (head := choice.head_footer) and head.build() != fixed.build():
            diff = [name for name in _FOOTER_FIELDS if getattr(head, name) != getattr(f, name)]
            self.add(
                WARNING if diff != ["timestamp"] else INFO,
                "footer-head-differs",
                "the footer copy at offset 0 differs from the trailing footer"
                + (f" ({', '.join(diff)})" if diff else "")
                + "; qemu reads the copy, most other tools the trailing one",
                "write the trailing footer's copy at offset 0",
            )
        self.fixes.footer_fixed = fixed
        return True

    def geometry(self, f: Footer, fixed: Footer) -> Footer:
        """Lint C/H/S against the readers that use it; returns ``fixed`` with the geometry
        mended when blktap would refuse it."""
        geo = f.geometry
        size = f.current_size
        chs = chs_from_size(size)
        if packed(geo) > packed(chs):
            # blktap's check rule (vhd-util-check.c): XenServer refuses the image.  The fix writes
            # the spec's CHS, and Windows' creator code where qemu would then size the disk by
            # C*H*S (vhdkit's images before 2026-11 were 'vhdk' with the maximum geometry).
            keep = f.creator_app in QEMU_CURRENT_SIZE_CREATORS or chs.total_bytes == size
            self.add(
                WARNING,
                "geometry-too-large",
                f"geometry {geo.cylinders}/{geo.heads}/{geo.sectors} is larger than the spec's "
                f"C/H/S for {size} bytes ({'/'.join(map(str, chs))}): vhd-util check "
                "(XenServer) rejects it",
                "write the spec's C/H/S"
                + ("" if keep else " and creator 'win ' (so that qemu keeps the exact size)"),
            )
            fixed = fixed.replace(cylinders=chs.cylinders, heads=chs.heads, sectors=chs.sectors)
            if not keep:
                fixed = fixed.replace(creator_app=CREATOR_APP, creator_version=CREATOR_VERSION)
            return fixed
        if geo == MAX_GEOMETRY:
            return fixed
        if f.creator_app not in QEMU_CURRENT_SIZE_CREATORS and geo.total_bytes != size:
            self.add(
                WARNING,
                "size-chs",
                f"creator {f.creator_app!r} with geometry {geo.cylinders}/{geo.heads}/"
                f"{geo.sectors}: qemu-img <= 9 sizes this disk from C*H*S as "
                f"{geo.total_bytes} bytes, not {size}",
            )
        elif geo.total_bytes > size:
            self.add(
                WARNING,
                "size-chs-larger",
                f"the geometry covers {geo.total_bytes} bytes, more than the disk's {size}",
            )
        elif geo != chs and f.creator_app in QEMU_CURRENT_SIZE_CREATORS:
            self.add(
                INFO,
                "geometry",
                f"geometry {tuple(geo)} is not the spec's C/H/S for {size} bytes ({tuple(chs)})",
            )
        return fixed

    # -- fixed ------------------------------------------------------------------------------

    def fixed(self, deep: bool) -> None:
        size = self.layout.footer.current_size
        at = self.layout.data_limit
        self.fixes.footer_target = size
        if at < size:
            self.add(
                ERROR,
                "fixed-truncated",
                f"fixed disk of {size} bytes, but the file holds only {at} bytes of data: "
                f"the last {size - at} bytes are missing",
            )
            self.fixes.footer_target = -1
        elif at > size and self.layout.block_device:
            # A fixed VHD on a block device (vhd create --type fixed /dev/X): the footer is in
            # the device's last sector, where readers look; the space before it is the device's.
            self.add(
                INFO,
                "fixed-gap",
                f"{at - size} bytes of the device lie between the data and the footer",
            )
        elif at > size:
            self.add(
                WARNING,
                "fixed-gap",
                f"{at - size} bytes lie between the data and the footer (not part of the disk)",
                f"move the footer to offset {size} and cut the file there",
            )
        if size % MiB:
            self.add(
                INFO,
                "azure-size",
                f"the size is not a whole number of MiB: Azure refuses it "
                f"(vhd convert --azure rounds it up to {-(-size // MiB) * MiB})",
            )
        if deep and at >= size and (bad := self.layout.unreadable(0, size)):
            read_failure(self.out, bad, "the data")

    # -- dynamic header -----------------------------------------------------------------------

    def header(self) -> bool:
        if self.stopped("header-offset", "header-cookie"):
            return False
        h, f = self.layout.header, self.layout.footer
        assert h is not None
        fixed = h
        if not header_checksum_ok(self.layout.header_raw):
            self.add(
                ERROR,
                "header-checksum",
                f"dynamic header checksum mismatch (stored {h.checksum:#010x}, computed "
                f"{DynamicHeader.parse(h.build()).checksum:#010x})",
                "recompute the header checksum",
            )
        if h.version != HEADER_VERSION:
            self.add(
                ERROR,
                "header-version",
                f"dynamic header version {h.version:#010x} is not 0x00010000",
            )
        if h.data_offset != UNUSED_DATA_OFFSET:
            self.add(
                WARNING,
                "header-data-offset",
                f"the header's data offset is {h.data_offset:#x}, not all ones (blktap refuses it)",
                "set it to 0xffffffffffffffff",
            )
            fixed = fixed.replace(data_offset=UNUSED_DATA_OFFSET)
        if self.stopped("header-block-size"):
            return False
        if h.block_size > 2 * MiB:
            self.add(
                INFO,
                "block-size-large",
                f"block size {h.block_size} is over 2 MiB: blktap refuses it",
            )
        if self.stopped("header-max-table-entries", "header-table-too-large"):
            return False
        needed = -(-f.current_size // h.block_size)
        if h.max_table_entries > needed:
            self.add(
                INFO,
                "bat-larger",
                f"the BAT has {h.max_table_entries} entries, {h.max_table_entries - needed} more "
                "than the size needs (Azure refuses that)",
            )
        self.fixes.header_fixed = fixed
        return True
