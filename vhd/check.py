"""Validation of a VHD image against the spec and against what real readers accept (``vhd check``).

Every rule of docs/vhd-format.md that a file can break is checked here, and each result is a
structured :class:`Finding` (severity, code, message, whether ``--repair`` mends it and how), so
the CLI can print it or emit JSON and :mod:`vhd.repair` can act on it.

Rules, by structure:

* **Hard disk footer** (trailing copy, and the copy at offset 0 of dynamic/differencing disks):
  cookie, checksum, file format version, feature bit 0x2, disk type, data offset, size a multiple
  of 512; a 511-byte footer (pre-2004 Virtual PC); head vs tail copies; interop lints: C·H·S vs
  current size for the creators qemu ≤ 9 sizes by C·H·S, original vs current size (libvhdi reads
  the original), the 2040 GiB cap, Azure's whole-MiB rule for fixed disks.
* **Dynamic header**: cookie, checksum, version, data offset, block size (power of two; blktap
  stops at 2 MiB), max table entries vs the size, the BAT's place.
* **BAT**: entries past the end of the file or of the data area, overlapping metadata (footer
  copy, header, BAT, locator payloads) or each other, data not 4 KiB-aligned, orphan space
  between the last block and the trailing footer (left by an interrupted allocation).
* **Parent locators**: bounds, overlaps, encodings (UTF-16LE for W2ku/W2ru, ``file://`` for
  MacX), data_space in sectors vs bytes, the ``.\\`` prefix of W2ru; the parent itself (found,
  unique id, stale timestamp, size).
* With ``deep=True`` only: sector bitmaps (bits set past the disk end, empty blocks) and a read of
  every data block.  The metadata check never reads data blocks or bitmaps.

The analysis also records the facts :mod:`vhd.repair` needs (the footer to trust, where the
trailing footer belongs, which BAT entries to drop), in :class:`ImageModel`.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import operator
import os
import re
import stat
from array import array
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import bitmap as bm
from . import lock
from .bat import MAX_ENTRIES, UNUSED, BlockAllocationTable
from .chain import ParentPolicy, read_locators, resolve_parent
from .errors import (
    ChainLoopError,
    ForeignFormatError,
    NotAVHDError,
    ParentMismatchError,
    ParentNotFoundError,
    VHDError,
)
from .footer import (
    COOKIE,
    CREATOR_APP,
    CREATOR_VERSION,
    FEATURE_RESERVED,
    FEATURE_TEMPORARY,
    FIXED_DATA_OFFSET,
    FOOTER_SIZE,
    QEMU_CURRENT_SIZE_CREATORS,
    VERSION,
    DiskType,
    Footer,
    checksum_ok,
    vhd_timestamp,
)
from .geometry import MAX_GEOMETRY, chs_from_size, packed
from .header import COOKIE as HEADER_COOKIE
from .header import HEADER_SIZE, UNUSED_DATA_OFFSET, DynamicHeader
from .header import VERSION as HEADER_VERSION
from .header import checksum_ok as header_checksum_ok
from .layout import MAX_SIZE, block_size_ok, metadata_regions
from .locator import (
    CODE_MAC,
    CODE_MACX,
    CODE_NAMES,
    CODE_W2KU,
    CODE_W2RU,
    MAX_LOCATOR_BYTES,
    code_name,
)
from .probe import HEAD_BYTES, TAIL_BYTES, ImageFormat, probe, refusal

SECTOR = 512
PAGE = 4096
MiB = 1024 * 1024
# Creators whose images qemu <= 9 sizes from current size; any other is sized by C*H*S.
AZURE_MIN_SIZE = 20 * MiB
AZURE_MAX_SIZE = 32 * 1024 * 1024 * MiB
_DEEP_CHUNK = 4 * MiB
_PADDING_SCAN = 64 * MiB

# Repairs that write the trailing footer at its place, and ones that rewrite the header.
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

# Findings listed per kind (code); the rest are counted in one more finding.
MAX_FINDINGS_PER_CODE = 50

ERROR = "error"
WARNING = "warning"
INFO = "info"


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of a check: ``severity`` is error, warning or info; ``repair`` says what
    ``vhd check --repair`` would do (empty when it cannot mend it)."""

    severity: str
    code: str
    message: str
    repairable: bool = False
    repair: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "repairable": self.repairable,
            "repair": self.repair,
        }


class DropMap(MutableMapping[int, str]):
    """block -> why ``--repair`` unallocates it, in one byte per block of the table.

    A crafted BAT can give millions of blocks to drop; a dict of them would cost hundreds of
    MiB.  Each distinct reason text is kept once (the first 255); later new texts read as
    "overlaps another block".
    """

    _OTHER = "overlaps another block"

    def __init__(self, count: int = 0) -> None:
        self._kind = bytearray(count)
        self._texts: list[str] = ["", self._OTHER]
        self._index: dict[str, int] = {self._OTHER: 1}
        self._len = 0

    def _grow(self, block: int) -> None:
        if block >= len(self._kind):
            self._kind.extend(bytes(block + 1 - len(self._kind)))

    def __setitem__(self, block: int, why: str) -> None:
        kind = self._index.get(why)
        if kind is None:
            if len(self._texts) < 256:
                kind = self._index[why] = len(self._texts)
                self._texts.append(why)
            else:
                kind = 1
        if block < 0:
            return  # only the text is registered (mark_new, mark_runs)
        self._grow(block)
        if not self._kind[block]:
            self._len += 1
        self._kind[block] = kind

    def mark_new(self, blocks: Iterator[int], why: str, listed: int) -> tuple[int, list[int]]:
        """Drop each of ``blocks`` not dropped yet, for ``why``: how many were new, and the
        first ``listed`` of them (a crafted table has millions; one tight loop, no calls)."""
        self[-1] = why  # registers the text (block -1: see __setitem__)
        kind, codes = self._index.get(why, 1), self._kind
        new: list[int] = []
        count = 0
        for block in blocks:
            if not codes[block]:
                codes[block] = kind
                count += 1
                if len(new) < listed:
                    new.append(block)
        self._len += count
        return count, new

    def mark_runs(self, first: int, end: int, why: str) -> int:
        """Drop blocks [first, end) not dropped yet, for ``why``, at C speed: how many."""
        self[-1] = why
        kind, codes = self._index.get(why, 1), self._kind
        segment = bytes(codes[first:end])
        count = segment.count(0)
        codes[first:end] = segment.translate(bytes([kind]) + bytes(range(1, 256)))
        self._len += count
        return count

    def flags(self) -> bytearray:
        """One byte per block, non-zero where the block is dropped."""
        return self._kind

    def __getitem__(self, block: int) -> str:
        if not 0 <= block < len(self._kind) or not self._kind[block]:
            raise KeyError(block)
        return self._texts[self._kind[block]]

    def __delitem__(self, block: int) -> None:
        self[block]  # raises KeyError for a block not dropped
        self._kind[block] = 0
        self._len -= 1

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and 0 <= block < len(self._kind) and bool(self._kind[block])

    def __iter__(self) -> Iterator[int]:
        """The dropped blocks in ascending order (found at C speed)."""
        kind = self._kind
        pos = 0
        while True:
            hit = _NONZERO.search(kind, pos)
            if hit is None:
                return
            yield hit.start()
            pos = hit.start() + 1

    def __len__(self) -> int:
        return self._len


_NONZERO = re.compile(b"[^\\x00]")


@dataclass
class ImageModel:
    """What the analysis learnt about the file: the basis for :mod:`vhd.repair`."""

    path: str
    file_size: int
    tail_raw: bytes = b""  # the last 512 bytes (or 511 for a 511-byte footer)
    tail_offset: int = -1  # where the trailing footer in use sits; -1 when there is none
    tail_ok: bool = False
    head_raw: bytes = b""
    head_ok: bool = False
    footer: Footer | None = None  # the footer to trust (from the tail, or else the head)
    footer_fixed: Footer | None = None  # the same with repairable field problems corrected
    disk_type: DiskType | None = None
    header_offset: int = 0
    header_raw: bytes = b""
    header: DynamicHeader | None = None
    header_fixed: DynamicHeader | None = None
    bat: array[int] | None = None  # entries for the blocks the size needs
    bat_count: int = 0
    bitmap_bytes: int = 0
    # block -> reason: entries that repair unallocates (their guest ranges are lost).
    drop: DropMap = field(default_factory=DropMap)
    # Where the trailing footer belongs once the drops are done (end of the last block or of
    # the metadata); for fixed disks the current size.
    footer_target: int = -1
    bitmap_fixes: dict[int, bytes] = field(default_factory=dict)  # block -> corrected bitmap
    metadata_end: int = 0

    @property
    def sparse(self) -> bool:
        return self.disk_type in (DiskType.DYNAMIC, DiskType.DIFFERENCING)

    def block_extent(self, block: int) -> tuple[int, int]:
        """(guest offset, length) of a block."""
        assert self.header is not None and self.footer is not None
        bs = self.header.block_size
        return block * bs, min(bs, self.footer.current_size - block * bs)


@dataclass
class CheckReport:
    path: str
    findings: list[Finding]
    model: ImageModel
    deep: bool = False

    @property
    def problems(self) -> list[Finding]:
        """Errors and warnings: what makes ``vhd check`` exit 1."""
        return [f for f in self.findings if f.severity in (ERROR, WARNING)]

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def repairable(self) -> list[Finding]:
        return [f for f in self.findings if f.repairable]

    def as_dict(self) -> dict[str, Any]:
        model = self.model
        return {
            "path": self.path,
            "type": model.disk_type.label if model.disk_type is not None else None,
            "size": model.footer.current_size if model.footer is not None else None,
            "file_size": model.file_size,
            "deep": self.deep,
            "clean": self.clean,
            "counts": {
                sev: sum(1 for f in self.findings if f.severity == sev)
                for sev in (ERROR, WARNING, INFO)
            },
            "findings": [f.as_dict() for f in self.findings],
        }


Reader = Callable[[int, int, int], bytes]


def _pread(fd: int, length: int, offset: int) -> bytes:
    return os.pread(fd, length, offset)


# Every read of the check goes through this hook, so tests can prove which parts are read.
read_hook: Reader = _pread


def _read(fd: int, length: int, offset: int) -> bytes:
    return read_hook(fd, length, offset)


def _refuse_foreign(fd: int, fsize: int, path: str) -> None:
    """A qcow2/VMDK/VHDX/... file gets its format named (see :mod:`vhd.probe`)."""
    fmt = probe(_read(fd, HEAD_BYTES, 0), _read(fd, TAIL_BYTES, max(0, fsize - TAIL_BYTES)))
    if fmt not in (ImageFormat.RAW, ImageFormat.VHD):
        raise ForeignFormatError(refusal(fmt, path), path=path, format=fmt)


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
    footer at all, and ``OSError`` when it cannot be read; every other problem is a finding."""
    spath = os.fspath(path)
    fd = os.open(spath, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise NotAVHDError("not a regular file or block device", path=spath)
        if not force_share:
            # A reader's shared lock: a writer elsewhere would make the findings meaningless.
            lock.acquire(fd, spath, exclusive=False)
        checker = _Checker(fd, spath, os.lseek(fd, 0, os.SEEK_END))
        checker.force_share = force_share
        policy = (parent_policy or ParentPolicy()).with_dirs(parent_dirs)
        checker.progress = progress  # (bytes done, bytes) of --deep's block reads
        try:
            checker.run(deep=deep, policy=policy, check_parent=check_parent)
        except NotAVHDError:
            _refuse_foreign(fd, checker.fsize, spath)
            raise
        return CheckReport(spath, checker.findings, checker.model, deep)
    finally:
        os.close(fd)


class _Checker:
    def __init__(self, fd: int, path: str, fsize: int) -> None:
        self.fd = fd
        self.path = path
        self.fsize = fsize
        self.force_share = False
        self.findings: list[Finding] = []
        self.model = ImageModel(path=path, file_size=fsize)
        # code -> (findings made, the first one): a crafted BAT can break a rule millions of
        # times; the report lists the first few of each kind and counts the rest.
        self._per_code: dict[str, list[Any]] = {}
        self.progress: Callable[[int, int], None] | None = None

    def add(
        self, severity: str, code: str, message: str, repair: str = "", *, fix: bool = False
    ) -> None:
        seen = self._per_code.setdefault(code, [0, None])
        seen[0] += 1
        if seen[0] > MAX_FINDINGS_PER_CODE:
            return
        finding = Finding(severity, code, message, fix, repair if fix else "")
        if seen[1] is None:
            seen[1] = finding
        self.findings.append(finding)

    def count_more(self, code: str, more: int) -> None:
        """Count ``more`` findings of ``code`` past the listed ones (after ``add`` of those)."""
        if more > 0:
            self._per_code[code][0] += more

    def summarise(self) -> None:
        """One finding for the findings of each kind past the first few."""
        for code, (count, first) in self._per_code.items():
            if count > MAX_FINDINGS_PER_CODE:
                more = count - MAX_FINDINGS_PER_CODE
                self.findings.append(
                    Finding(
                        first.severity,
                        code,
                        f"{more} more like the above (not listed)",
                        first.repairable,
                        "the same for each" if first.repairable else "",
                    )
                )

    # -- footer -----------------------------------------------------------------------------

    def run(self, *, deep: bool, policy: ParentPolicy, check_parent: bool) -> None:
        try:
            self._run(deep=deep, policy=policy, check_parent=check_parent)
        finally:
            self.summarise()
            self.settle_repairs()

    def settle_repairs(self) -> None:
        """Withdraw the offers :mod:`vhd.repair` cannot keep: when the analysis stopped before
        it learnt where the trailing footer belongs (a damaged header or BAT), the footer
        cannot be rewritten; without a usable header, neither can the header."""
        m = self.model
        for i, f in enumerate(self.findings):
            if not f.repairable:
                continue
            if (f.code in _NEEDS_FOOTER_TARGET and m.footer_target < 0) or (
                f.code in _NEEDS_HEADER and m.header_fixed is None
            ):
                self.findings[i] = replace(
                    f,
                    message=f"{f.message} (--repair cannot mend it while the errors above last)",
                    repairable=False,
                    repair="",
                )

    def _run(self, *, deep: bool, policy: ParentPolicy, check_parent: bool) -> None:
        if not self.check_footer():
            return
        m = self.model
        assert m.footer is not None
        if m.disk_type == DiskType.FIXED:
            self.check_fixed(deep)
            return
        if not self.check_header():
            return
        if not self.check_bat():
            return
        self.check_locators()
        if m.disk_type == DiskType.DIFFERENCING and check_parent:
            self.check_parent(policy)
        if deep:
            self.check_blocks_deep()

    def check_footer(self) -> bool:
        fd, fsize, m = self.fd, self.fsize, self.model
        if fsize < FOOTER_SIZE - 1:
            raise NotAVHDError(
                f"the file is only {fsize} bytes, too small for a VHD", path=self.path
            )
        tail = _read(fd, FOOTER_SIZE, fsize - FOOTER_SIZE) if fsize >= FOOTER_SIZE else b""
        tail511 = _read(fd, 511, fsize - 511) if fsize % 512 == 511 else b""
        head = _read(fd, FOOTER_SIZE, 0) if fsize >= FOOTER_SIZE else b""
        m.head_raw = head
        head_cookie = head[:8] == COOKIE
        m.head_ok = head_cookie and checksum_ok(head)
        tail_footer: Footer | None = None
        if tail[:8] == COOKIE:
            m.tail_raw, m.tail_offset = tail, fsize - FOOTER_SIZE
            m.tail_ok = checksum_ok(tail)
            tail_footer = Footer.parse(tail)
        elif tail511[:8] == COOKIE:
            m.tail_raw, m.tail_offset = tail511, fsize - 511
            m.tail_ok = checksum_ok(tail511)
            tail_footer = Footer.parse(tail511)
            self.add(
                WARNING,
                "footer-511",
                "the image ends in a 511-byte footer (made before Virtual PC 2004); libvhdi and "
                "most tools cannot open it",
                "rewrite the footer as a full 512-byte footer",
                fix=True,
            )
        head_footer = Footer.parse(head) if head_cookie else None
        head_sparse = head_footer is not None and head_footer.disk_type in (3, 4)

        if tail_footer is not None and m.tail_ok:
            m.footer = tail_footer
        elif head_footer is not None and head_sparse and m.head_ok:
            m.footer = head_footer
            what = "damaged (bad checksum)" if tail_footer is not None else "missing"
            self.add(
                ERROR,
                "footer-tail-missing",
                f"the trailing footer is {what}; the copy at offset 0 is intact",
                "write the copy from offset 0 as the trailing footer, after the last block",
                fix=True,
            )
        elif tail_footer is not None:
            m.footer = tail_footer
            self.add(
                ERROR,
                "footer-checksum",
                f"footer checksum mismatch (stored {tail_footer.checksum:#010x}, computed "
                f"{Footer.parse(tail_footer.build()).checksum:#010x})",
                "recompute the footer checksum",
                fix=True,
            )
        elif head_footer is not None and head_sparse:
            m.footer = head_footer
            self.add(
                ERROR,
                "footer-tail-missing",
                "the trailing footer is missing and the copy at offset 0 has a bad checksum",
                "recompute the checksum of the copy at offset 0 and write it as the trailing "
                "footer",
                fix=True,
            )
        else:
            raise NotAVHDError(
                "no VHD footer ('conectix') at the end or the start of the file: not a VHD image",
                path=self.path,
            )
        f = m.footer
        fixed = f
        m.disk_type = f.type
        if f.type not in (DiskType.FIXED, DiskType.DYNAMIC, DiskType.DIFFERENCING):
            self.add(
                ERROR,
                "footer-disk-type",
                f"disk type {f.disk_type} is not fixed (2), dynamic (3) or differencing (4)",
            )
            return False
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
                fix=True,
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
        fixed = self.lint_geometry(f, fixed)
        if f.type == DiskType.FIXED:
            if f.data_offset != FIXED_DATA_OFFSET:
                sev = INFO if f.data_offset == 0xFFFFFFFF else WARNING
                self.add(
                    sev,
                    "footer-data-offset",
                    f"a fixed disk's data offset should be all ones, not {f.data_offset:#x}",
                    "set the data offset to 0xffffffffffffffff",
                    fix=True,
                )
                fixed = fixed.replace(data_offset=FIXED_DATA_OFFSET)
        else:
            if not head_cookie:
                self.add(
                    ERROR,
                    "footer-head-missing",
                    "the footer copy at offset 0 is missing (qemu refuses the image)",
                    "write the trailing footer's copy at offset 0",
                    fix=True,
                )
            elif not m.head_ok:
                self.add(
                    ERROR,
                    "footer-head-checksum",
                    "the footer copy at offset 0 has a bad checksum (qemu refuses the image)",
                    "write the trailing footer's copy at offset 0",
                    fix=True,
                )
            elif m.tail_ok and head_footer is not None and head_footer.build() != fixed.build():
                diff = [
                    name
                    for name in (
                        "current_size",
                        "original_size",
                        "disk_type",
                        "unique_id",
                        "data_offset",
                        "geometry",
                        "timestamp",
                        "features",
                    )
                    if getattr(head_footer, name) != getattr(f, name)
                ]
                self.add(
                    WARNING if diff != ["timestamp"] else INFO,
                    "footer-head-differs",
                    "the footer copy at offset 0 differs from the trailing footer"
                    + (f" ({', '.join(diff)})" if diff else "")
                    + "; qemu reads the copy, most other tools the trailing one",
                    "write the trailing footer's copy at offset 0",
                    fix=True,
                )
        m.footer_fixed = fixed
        return True

    def lint_geometry(self, f: Footer, fixed: Footer) -> Footer:
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
                fix=True,
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
        elif geo != chs_from_size(size) and f.creator_app in QEMU_CURRENT_SIZE_CREATORS:
            self.add(
                INFO,
                "geometry",
                f"geometry {tuple(geo)} is not the spec's C/H/S for {size} bytes "
                f"({tuple(chs_from_size(size))})",
            )
        return fixed

    # -- fixed ------------------------------------------------------------------------------

    def check_fixed(self, deep: bool) -> None:
        m = self.model
        assert m.footer is not None
        size = m.footer.current_size
        at = m.tail_offset if m.tail_offset >= 0 else self.fsize
        m.footer_target = size
        if at < size:
            self.add(
                ERROR,
                "fixed-truncated",
                f"fixed disk of {size} bytes, but the file holds only {at} bytes of data: "
                f"the last {size - at} bytes are missing",
            )
            m.footer_target = -1
        elif at > size and stat.S_ISBLK(os.fstat(self.fd).st_mode):
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
                fix=True,
            )
        if size % MiB:
            self.add(
                INFO,
                "azure-size",
                f"the size is not a whole number of MiB: Azure refuses it "
                f"(vhd convert --azure rounds it up to {-(-size // MiB) * MiB})",
            )
        if deep and at >= size:
            self._read_all(0, size, "the data")

    def _read_all(self, start: int, length: int, what: str) -> None:
        pos = start
        end = start + length
        while pos < end:
            n = min(_DEEP_CHUNK, end - pos)
            try:
                got = len(_read(self.fd, n, pos))
            except OSError as exc:
                self.add(ERROR, "read-error", f"reading {what} at {pos:#x} failed: {exc}")
                return
            if got < n:
                self.add(ERROR, "read-short", f"{what} ends early at {pos + got:#x}")
                return
            pos += n

    # -- dynamic header -----------------------------------------------------------------------

    def check_header(self) -> bool:
        m, fd = self.model, self.fd
        f = m.footer
        assert f is not None
        at = f.data_offset
        if at % SECTOR or at < FOOTER_SIZE or at + HEADER_SIZE > self.fsize:
            self.add(
                ERROR,
                "header-offset",
                f"the dynamic header offset {at:#x} is not inside the file ({self.fsize} bytes)",
            )
            return False
        raw = _read(fd, HEADER_SIZE, at)
        m.header_offset = at
        m.header_raw = raw
        h = DynamicHeader.parse(raw)
        m.header = h
        fixed = h
        if h.cookie != HEADER_COOKIE:
            self.add(ERROR, "header-cookie", f"no dynamic header ('cxsparse') at offset {at:#x}")
            return False
        if not header_checksum_ok(raw):
            self.add(
                ERROR,
                "header-checksum",
                f"dynamic header checksum mismatch (stored {h.checksum:#010x}, computed "
                f"{DynamicHeader.parse(h.build()).checksum:#010x})",
                "recompute the header checksum",
                fix=True,
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
                fix=True,
            )
            fixed = fixed.replace(data_offset=UNUSED_DATA_OFFSET)
        bs = h.block_size
        if not block_size_ok(bs):
            self.add(
                ERROR,
                "header-block-size",
                f"block size {bs} is not a power of two from 512 B to 256 MiB",
            )
            return False
        if bs > 2 * MiB:
            self.add(INFO, "block-size-large", f"block size {bs} is over 2 MiB: blktap refuses it")
        needed = -(-f.current_size // bs)
        if h.max_table_entries < needed:
            self.add(
                ERROR,
                "header-max-table-entries",
                f"the BAT has {h.max_table_entries} entries but a {f.current_size}-byte disk "
                f"needs {needed}",
            )
            return False
        if needed > MAX_ENTRIES:
            self.add(
                ERROR,
                "header-table-too-large",
                f"a {f.current_size}-byte disk of {bs}-byte blocks needs a table of {needed} "
                f"entries, more than vhdkit holds in memory ({MAX_ENTRIES})",
            )
            return False
        if h.max_table_entries > needed:
            self.add(
                INFO,
                "bat-larger",
                f"the BAT has {h.max_table_entries} entries, {h.max_table_entries - needed} more "
                "than the size needs (Azure refuses that)",
            )
        m.header_fixed = fixed
        m.bitmap_bytes = h.bitmap_bytes
        return True

    # -- BAT ----------------------------------------------------------------------------------

    def metadata_regions(self) -> list[tuple[int, int, str]]:
        h = self.model.header
        assert h is not None
        return metadata_regions(self.model.header_offset, h)

    def _padding_used(self, start: int, end: int) -> bool:
        """Whether the table entries past the disk size hold anything but 0xFF: read in
        chunks, stopping at the first one (a header may claim 2^32 - 1 entries), and at most
        ``_PADDING_SCAN`` bytes of them (only a note depends on it)."""
        end = min(end, start + _PADDING_SCAN)
        pos = start
        while pos < end:
            chunk = _read(self.fd, min(_DEEP_CHUNK, end - pos), pos)
            if not chunk:
                return False
            if chunk.strip(b"\xff"):
                return True
            pos += len(chunk)
        return False

    def check_bat(self) -> bool:
        m, fd = self.model, self.fd
        f, h = m.footer, m.header
        assert f is not None and h is not None
        at = h.table_offset
        count = -(-f.current_size // h.block_size)
        length = h.max_table_entries * 4
        if at % SECTOR or at + length > self.fsize:
            self.add(
                ERROR,
                "bat-offset",
                f"the BAT ({h.max_table_entries} entries at {at:#x}) does not fit in the file",
            )
            return False
        if at < FOOTER_SIZE or (
            at < m.header_offset + HEADER_SIZE and at + length > m.header_offset
        ):
            self.add(ERROR, "bat-overlaps-header", "the BAT overlaps the footer copy or the header")
            return False
        raw = _read(fd, count * 4, at)
        if len(raw) < count * 4:
            self.add(ERROR, "bat-offset", "the BAT is cut short by the end of the file")
            return False
        table = BlockAllocationTable.from_bytes(raw, count)
        m.bat = table.entries
        m.bat_count = count
        m.drop = DropMap(count)
        if h.max_table_entries > count and self._padding_used(at + count * 4, at + length):
            self.add(
                INFO,
                "bat-entries-past-size",
                "BAT entries beyond the disk size are allocated (ignored by every reader)",
            )
        regions = self.metadata_regions()
        meta_end = max(end for _, end, _ in regions)
        m.metadata_end = meta_end
        bs = h.block_size
        bmb = h.bitmap_bytes
        size = f.current_size
        # Where the data area ends: the trailing footer, or the end of the file without one.
        limit = m.tail_offset if m.tail_ok else self.fsize
        if not m.tail_ok and m.tail_offset >= 0 and m.footer is not None:
            # A tail footer with only a bad checksum still marks the end of the data.
            limit = m.tail_offset
        # Per allocated block only two machine integers (its BAT entry is its start): a crafted
        # table allocates millions of blocks, and tuples of Python ints would cost gigabytes.
        # Built, like the rule checks below, from C-level iterators (map, filter, compress):
        # a table of 4 Mi crafted entries costs passes of C loops, not Python steps per block.
        entries = table.entries
        is_allocated = bytes(map(UNUSED.__ne__, entries))
        starts = array("Q", map(SECTOR.__mul__, itertools.compress(entries, is_allocated)))
        indices = array("I", itertools.compress(range(count), is_allocated))
        allocated = len(indices)
        misaligned = allocated - operator.countOf(map(PAGE.__rmod__, map(bmb.__add__, starts)), 0)

        def needed_end(start: int, block: int) -> int:
            return start + bmb + min(bs, size - block * bs)

        def lost(block: int) -> str:
            g, n = block * bs, min(bs, size - block * bs)
            return f"guest bytes {g:#x}-{g + n:#x} ({n} bytes)"

        drop = m.drop
        lowest, highest = (min(starts), max(starts)) if allocated else (0, -1)
        span = bmb + bs
        last = count - 1
        # Blocks over metadata (the first region in this order names the finding), then blocks
        # whose bitmap lies past the data area.  Each rule is a range of entries for a full
        # block; the last block, which the size may cut, is judged exactly.
        rules = [(rstart, rend, label, f"overlaps {label}") for rstart, rend, label in regions]
        rules.append((limit - bmb + span, UNUSED * SECTOR, "", "past the end of the file"))
        for rstart, rend, label, reason in rules:
            bad = range(max(0, (rstart - span) // SECTOR + 1), min(UNUSED, -(-rend // SECTOR)))
            if not bad or lowest >= bad.stop * SECTOR or highest < bad.start * SECTOR:
                continue
            # compress stops at the shorter input: the last block is left out, and judged here
            blocks: Iterator[int] = itertools.compress(range(last), map(bad.__contains__, entries))
            end_start = entries[last] * SECTOR
            if end_start // SECTOR in bad and (
                not label or (end_start < rend and needed_end(end_start, last) > rstart)
            ):
                blocks = itertools.chain(blocks, (last,))
            total, first = drop.mark_new(blocks, reason, MAX_FINDINGS_PER_CODE)
            for block in first:
                start = entries[block] * SECTOR
                if label:
                    self.add(
                        ERROR,
                        "bat-overlaps-metadata",
                        f"block {block} at {start:#x} overlaps {label} ({rstart:#x}-{rend:#x})",
                        f"unallocate block {block}: {lost(block)} are lost (read as "
                        + ("the parent's" if m.disk_type == DiskType.DIFFERENCING else "zeros")
                        + ")",
                        fix=True,
                    )
                else:
                    self.add(
                        ERROR,
                        "bat-past-eof",
                        f"block {block} at {start:#x} lies past the end of the data "
                        f"(file {self.fsize} bytes)",
                        f"unallocate block {block}: {lost(block)} are lost",
                        fix=True,
                    )
            self.count_more(
                "bat-overlaps-metadata" if label else "bat-past-eof", total - len(first)
            )
        # Overlaps between blocks: the lower block number keeps the space.  Runs of blocks
        # sharing one entry (an all-equal crafted table is one run of millions) are settled
        # first, run by run at C speed: each block of a run overlaps the run's first block.
        dropped = drop.flags()
        repeats = itertools.compress(
            range(1, count),
            map(operator.and_, map(operator.eq, entries, itertools.islice(entries, 1, None)),
                itertools.islice(is_allocated, 1, None)),
        )  # fmt: skip
        run_end = 0
        for block in repeats:
            if block < run_end:
                continue
            run_end = table.run_end(block)
            winner = block - 1
            if dropped[winner]:
                continue  # the same entry: dropped for the same metadata rule
            new = drop.mark_runs(block, run_end, f"overlaps block {winner}")
            for loser in range(block, min(run_end, block + MAX_FINDINGS_PER_CODE)):
                self.add(
                    ERROR,
                    "bat-overlap",
                    f"blocks {winner} and {loser} overlap in the file "
                    f"(at {entries[winner] * SECTOR:#x} and {entries[loser] * SECTOR:#x})",
                    f"unallocate block {loser}: {lost(loser)} are lost",
                    fix=True,
                )
            self.count_more("bat-overlap", new - min(new, MAX_FINDINGS_PER_CODE))
        # The rest are sorted once by (start, block), packed into one integer each.
        shift = max(allocated, 1).bit_length()
        mask = (1 << shift) - 1
        keep = bytes(map(operator.not_, map(dropped.__getitem__, indices)))
        kept = sorted(
            itertools.compress(
                map(operator.or_, map(operator.lshift, starts, itertools.repeat(shift)),
                    range(allocated)),
                keep,
            )
        )  # fmt: skip
        del keep
        # A sweep over the blocks in file order: ``active`` is a heap (by block number) of the
        # kept blocks whose space may reach the current start.  Blocks that ended before it or
        # were dropped are removed when they come to the top; each block is pushed and popped
        # once, so the whole sweep is n log n however the blocks overlap.
        active: list[tuple[int, int, int]] = []  # (block, start, needed end)
        for key in kept:
            start, block = key >> shift, indices[key & mask]
            nend = needed_end(start, block)
            while True:
                while active and (active[0][2] <= start or active[0][0] in drop):
                    heapq.heappop(active)
                if not active:
                    heapq.heappush(active, (block, start, nend))
                    break
                other, other_start, _ = active[0]
                loser, winner = max(block, other), min(block, other)
                drop[loser] = f"overlaps block {winner}"
                self.add(
                    ERROR,
                    "bat-overlap",
                    f"blocks {winner} and {loser} overlap in the file "
                    f"(at {other_start:#x} and {start:#x})",
                    f"unallocate block {loser}: {lost(loser)} are lost",
                    fix=True,
                )
                if loser == block:
                    break
                heapq.heappop(active)
        del active
        data_end = meta_end
        # Survivors in file order (``kept`` is sorted by start): the data end, and
        # unreferenced space between blocks (after discards), which compact reclaims.
        pos = meta_end
        holes = 0
        for key in kept:
            start, block = key >> shift, indices[key & mask]
            if block in drop:
                continue
            full = start + bmb + bs
            nend = needed_end(start, block)
            # A block ends at its full size when the file holds it; a last partial block may
            # have been stored short.
            end = full if full <= limit else nend
            if nend > limit:
                short = nend - self.fsize
                self.add(
                    ERROR,
                    "block-past-footer",
                    f"block {block} at {start:#x} runs past the trailing footer"
                    + (f" and {short} bytes past the end of the file" if short > 0 else ""),
                    f"move the trailing footer after block {block}"
                    + (
                        f"; its {short} bytes missing from the file read as zeros"
                        if short > 0
                        else ""
                    ),
                    fix=True,
                )
            data_end = max(data_end, end)
            if start - pos >= bs + bmb:
                holes += start - pos
            pos = max(pos, full)
        del kept
        if misaligned:
            self.add(
                INFO,
                "bat-misaligned",
                f"{misaligned} of {allocated} blocks have data not 4 KiB-aligned "
                "(slower on 4 KiB-sector storage)",
            )
        target = -(-data_end // SECTOR) * SECTOR
        m.footer_target = target
        # Windows leaves the footer where the next block's bitmap would go (up to 4 KiB - 512
        # after the last block): that is layout, not orphan space.
        slack = min(PAGE, bmb + bs)
        if m.tail_ok and target <= m.tail_offset < target + slack:
            m.footer_target = m.tail_offset
        elif m.tail_ok and m.tail_offset >= target + slack:
            gap = m.tail_offset - target
            self.add(
                WARNING,
                "orphan-space",
                f"{gap} bytes after the last block at {target:#x} are referenced by nothing "
                "(left by an interrupted allocation or a shrink)",
                f"move the trailing footer to {target:#x} and cut the file there",
                fix=True,
            )
        elif (
            m.tail_ok
            and m.tail_offset < target
            and not any(f.code == "block-past-footer" for f in self.findings)
        ):
            self.add(
                ERROR,
                "footer-misplaced",
                f"the trailing footer at {m.tail_offset:#x} lies inside the data area",
                f"move it to {target:#x}",
                fix=True,
            )
        if holes:
            self.add(INFO, "free-space", f"{holes} bytes between blocks are unused (vhd compact)")
        return True

    # -- locators and parent -------------------------------------------------------------------

    def check_locators(self) -> None:
        m = self.model
        h = m.header
        assert h is not None
        differencing = m.disk_type == DiskType.DIFFERENCING
        used = [(slot, loc) for slot, loc in enumerate(h.locators) if loc.in_use]
        if not differencing:
            if used:
                self.add(INFO, "locators-unused", "a dynamic disk carries parent locators")
            return
        if h.parent_unique_id == bytes(16):
            self.add(INFO, "parent-raw", "the parent unique id is zero (a blktap raw parent)")
        if not used and not h.parent_name:
            self.add(ERROR, "parent-unnamed", "no parent locator and no parent name")
        elif not h.parent_name:
            self.add(WARNING, "parent-name-empty", "the header's parent name is empty")
        if "\ufffd" in h.parent_name:
            self.add(WARNING, "parent-name-encoding", "the parent name is not valid UTF-16BE")
        regions = self.metadata_regions()
        for slot, loc in used:
            kind = code_name(loc.code)
            where = f"parent locator {slot} ({kind})"
            if loc.code not in CODE_NAMES:
                self.add(WARNING, "locator-code", f"{where}: unknown platform code")
            if loc.data_len > MAX_LOCATOR_BYTES:
                self.add(ERROR, "locator-length", f"{where}: data length {loc.data_len} is absurd")
                continue
            if loc.data_offset % SECTOR:
                self.add(WARNING, "locator-align", f"{where}: data not sector-aligned")
            if loc.data_offset + loc.data_len > self.fsize:
                self.add(ERROR, "locator-past-eof", f"{where}: data lies past the end of the file")
                continue
            if loc.data_space < SECTOR and loc.data_space:
                self.add(
                    INFO,
                    "locator-space-sectors",
                    f"{where}: data_space {loc.data_space} counts sectors (as the spec says); "
                    "Windows, blktap and VirtualBox store bytes",
                )
            elif loc.data_space % SECTOR:
                self.add(
                    WARNING,
                    "locator-space",
                    f"{where}: data_space {loc.data_space} is neither sectors nor whole sectors of "
                    "bytes",
                )
            if loc.data_len > loc.space_bytes:
                self.add(
                    ERROR,
                    "locator-overflow",
                    f"{where}: {loc.data_len} bytes of data in {loc.space_bytes} bytes of space",
                )
            me = (loc.data_offset, loc.data_offset + max(loc.data_len, 1))
            for rstart, rend, label in regions:
                if label == f"parent locator {slot}":
                    continue
                if me[0] < rend and me[1] > rstart and loc.data_len:
                    self.add(ERROR, "locator-overlap", f"{where}: data overlaps {label}")
            if loc.data_offset < FOOTER_SIZE and loc.data_len:
                continue
            raw = _read(self.fd, loc.data_len, loc.data_offset)
            if loc.code in (CODE_W2KU, CODE_W2RU):
                if len(raw) % 2:
                    self.add(WARNING, "locator-encoding", f"{where}: odd length for UTF-16LE")
                try:
                    text = raw[: len(raw) // 2 * 2].decode("utf-16-le").split("\0", 1)[0]
                except UnicodeDecodeError:
                    self.add(WARNING, "locator-encoding", f"{where}: not valid UTF-16LE")
                    continue
                if loc.code == CODE_W2RU and not text.startswith(".\\"):
                    self.add(
                        WARNING,
                        "locator-w2ru-prefix",
                        f"{where}: relative path {text!r} does not start with '.\\' "
                        "(vhd set-parent rewrites it)",
                    )
                if text.startswith(".\\") and loc.code == CODE_W2KU:
                    self.add(
                        INFO,
                        "locator-w2ku-relative",
                        f"{where}: holds a relative path (as blktap writes)",
                    )
            elif loc.code == CODE_MACX:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.add(WARNING, "locator-encoding", f"{where}: not valid UTF-8")
                    continue
                if not text.startswith("file://"):
                    self.add(WARNING, "locator-macx-url", f"{where}: not a file:// URL")
            elif loc.code == CODE_MAC:
                self.add(INFO, "locator-mac-alias", f"{where}: a Mac alias cannot be resolved")

    def check_parent(self, policy: ParentPolicy) -> None:
        from .image import open as open_image

        m = self.model
        h = m.header
        assert h is not None
        try:
            locators = read_locators(self.fd, self.fsize, h)
            parent: Any = resolve_parent(
                self.path,
                h,
                locators,
                opener=functools.partial(open_image, force_share=self.force_share),
                policy=policy,
                allow_mismatch=False,
                strict=False,
                seen=frozenset(),
            )
        except ParentNotFoundError as exc:
            self.add(ERROR, "parent-not-found", f"{exc} (vhd set-parent CHILD PARENT retargets it)")
            return
        except ParentMismatchError as exc:
            self.add(ERROR, "parent-mismatch", str(exc))
            return
        except ChainLoopError as exc:
            self.add(ERROR, "parent-loop", str(exc))
            return
        except (VHDError, OSError) as exc:
            self.add(ERROR, "parent-unreadable", f"the parent cannot be opened: {exc}")
            return
        try:
            ts = vhd_timestamp(os.stat(parent.path).st_mtime)
            if h.parent_timestamp == 0:
                self.add(
                    INFO,
                    "parent-timestamp-zero",
                    "the parent timestamp is 0 (as Windows 10 diskpart writes)",
                )
            elif h.parent_timestamp != ts:
                self.add(
                    WARNING,
                    "parent-timestamp",
                    f"the recorded parent timestamp ({h.parent_timestamp}) is not the parent's "
                    f"modification time ({ts}): the parent changed or was copied (Virtual PC and "
                    "FATtools refuse such a child)",
                    "record the parent's modification time",
                    fix=True,
                )
                assert m.header_fixed is not None
                m.header_fixed = m.header_fixed.replace(parent_timestamp=ts)
            assert m.footer is not None
            if parent.size != m.footer.current_size:
                # Legitimate after a resize of either: the core reads zeros past the parent.
                self.add(
                    INFO,
                    "parent-size",
                    f"the parent is {parent.size} bytes, the child {m.footer.current_size}",
                )
            for warning in parent.warnings:
                self.add(WARNING, "parent-warning", f"parent {parent.path}: {warning}")
        finally:
            parent.close()

    # -- deep ---------------------------------------------------------------------------------

    def check_blocks_deep(self) -> None:
        m = self.model
        h, f, bat = m.header, m.footer, m.bat
        assert h is not None and f is not None and bat is not None
        bs = h.block_size
        spb = bs // SECTOR
        used = (spb + 7) // 8
        empty = 0
        for block in range(m.bat_count):
            if self.progress is not None:
                self.progress((block + 1) * bs, m.bat_count * bs)
            entry = bat[block]
            if entry == UNUSED or block in m.drop:
                continue
            start = entry * SECTOR
            raw = _read(self.fd, m.bitmap_bytes, start)
            if len(raw) < m.bitmap_bytes:
                self.add(ERROR, "bitmap-short", f"block {block}: the bitmap is cut short")
                continue
            bits = bytearray(raw[:used])
            needed = -(-min(bs, f.current_size - block * bs) // SECTOR)
            if needed < spb and not bm.all_equal(bits, needed, spb, False):
                # qemu and blktap set every bit of a new block, so this is common and harmless
                # (readers stop at the disk size): a note that --repair tidies.
                self.add(
                    INFO,
                    "bitmap-past-end",
                    f"block {block}: bits are set for sectors past the end of the disk",
                    "clear those bits",
                    fix=True,
                )
                fixed = bytearray(raw)
                bm.set_range(fixed, needed, spb, False)
                m.bitmap_fixes[block] = bytes(fixed)
            if raw[used:].strip(b"\0"):
                self.add(INFO, "bitmap-padding", f"block {block}: bitmap padding is not zero")
            if not bm.any_set(bits, needed):
                empty += 1
            data = start + m.bitmap_bytes
            have = max(0, min(needed * SECTOR, self.fsize - data))
            if have:
                self._read_all(data, have, f"block {block}")
        if empty:
            self.add(
                INFO,
                "blocks-empty",
                f"{empty} allocated blocks have no bitmap bit set (vhd compact reclaims them)",
            )


def azure_target_size(size: int) -> int:
    """The size ``vhd convert --azure`` gives a disk: rounded up to a whole MiB, at least 20 MiB."""
    return max(AZURE_MIN_SIZE, -(-size // MiB) * MiB)


def azure_check(path: str | os.PathLike[str]) -> list[str]:
    """Problems that make Azure refuse the image as an uploaded disk; empty when it accepts it.

    Azure takes fixed VHDs whose virtual size is a whole number of MiB (file = N MiB + 512),
    from 20 MiB to 32 TiB, with a valid 512-byte trailing footer.
    """
    try:
        report = check(path, check_parent=False)
    except (VHDError, OSError) as exc:
        return [str(exc)]
    out: list[str] = []
    m = report.model
    f = m.footer
    if f is None:
        return ["no valid footer"]
    if m.disk_type != DiskType.FIXED:
        label = m.disk_type.label if m.disk_type is not None else "unknown"
        out.append(f"the disk is {label}, Azure needs a fixed VHD")
    size = f.current_size
    if size % MiB:
        out.append(f"the size {size} is not a whole number of MiB")
    if size < AZURE_MIN_SIZE:
        out.append(f"the size {size} is below Azure's 20 MiB minimum")
    if size > AZURE_MAX_SIZE:
        out.append(f"the size {size} is above Azure's 32 TiB maximum")
    if m.disk_type == DiskType.FIXED and m.file_size != size + FOOTER_SIZE:
        out.append(f"the file is {m.file_size} bytes, not size + 512 = {size + FOOTER_SIZE}")
    for finding in report.findings:
        if finding.severity == ERROR or finding.code in ("footer-features", "footer-511"):
            out.append(finding.message)
    return out
