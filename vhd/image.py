"""Opening an image: locate and validate the footer, the dynamic header and the BAT, then build
the right :class:`~vhd.disk.Disk` (spec: "Hard Disk Footer Format", "Dynamic Disk Header Format").

Footer recovery follows what real damage looks like: the trailing footer is used when it is valid;
if it is missing or damaged, the copy at offset 0 of a dynamic or differencing disk is used (read
only, with a warning), and files of 512·n + 511 bytes are read with the 511-byte footer of images
older than Virtual PC 2004.  Checksum mismatches raise :class:`~vhd.errors.ChecksumError` unless
the caller opens with ``strict=False`` (then they are listed in ``Disk.warnings``).

Every size read from the file is checked against the file's size before it is used, so a damaged
image costs bounded time and memory.

The file is locked (:mod:`vhd.lock`) before anything is read: shared for ``"r"`` and for every
parent of a chain, exclusive for ``"r+"``, none with ``force_share``.
"""

from __future__ import annotations

import functools
import itertools
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from .bat import MAX_ENTRIES, BlockAllocationTable
from .chain import ParentPolicy, read_locators, resolve_parent
from .disk import Disk, FixedDisk, SparseDisk
from .errors import (
    ChecksumError,
    CorruptImageError,
    ForeignFormatError,
    InvalidArgumentError,
    NotAVHDError,
    UnsupportedFeatureError,
    VHDError,
)
from .fileio import file_size, open_image_file, read_exact, read_upto
from .footer import COOKIE, FOOTER_SIZE, VERSION, DiskType, Footer, checksum_ok
from .header import HEADER_SIZE, DynamicHeader
from .header import VERSION as HEADER_VERSION
from .header import checksum_ok as header_checksum_ok
from .layout import block_size_ok, metadata_regions
from .probe import HEAD_BYTES, ImageFormat, is_vhdx_file, probe, refusal


@dataclass(frozen=True, slots=True)
class FooterChoice:
    footer: Footer
    offset: int
    source: str  # "tail", "tail-511", "head"
    checksum_ok: bool
    warnings: tuple[str, ...]


def locate_footer(fd: int, size: int, path: str) -> FooterChoice:
    """Pick the footer to trust, as described in the module docstring (no strictness applied)."""
    if size < FOOTER_SIZE - 1:
        _refuse_foreign(read_upto(fd, HEAD_BYTES, 0), b"", path)
        raise NotAVHDError(f"the file is only {size} bytes, too small for a VHD", path=path)
    options: list[tuple[str, int, bytes]] = []
    if size >= FOOTER_SIZE:
        options.append(("tail", size - FOOTER_SIZE, read_upto(fd, FOOTER_SIZE, size - FOOTER_SIZE)))
    if size % 512 == 511:
        options.append(("tail-511", size - 511, read_upto(fd, 511, size - 511)))
    head = read_upto(fd, FOOTER_SIZE, 0) if size >= FOOTER_SIZE else b""
    tails = [(src, off, raw) for src, off, raw in options if raw[:8] == COOKIE]
    head_ok = head[:8] == COOKIE and Footer.parse(head).disk_type in (3, 4)
    good_tail = [t for t in tails if checksum_ok(t[2])]
    warnings: list[str] = []
    if good_tail:
        src, off, raw = good_tail[0]
        footer = Footer.parse(raw)
        if src == "tail-511":
            warnings.append("the image ends in a 511-byte footer (made before Virtual PC 2004)")
        if footer.disk_type in (3, 4):
            if not head_ok:
                warnings.append("the footer copy at offset 0 is missing or damaged")
            elif head != footer.build() and head != raw:
                warnings.append("the footer copy at offset 0 differs from the trailing footer")
        return FooterChoice(footer, off, src, True, tuple(warnings))
    if head_ok and checksum_ok(head):
        warnings.append(
            "the trailing footer is missing or damaged; using the copy at offset 0 "
            "(vhd check --repair restores it)"
        )
        return FooterChoice(Footer.parse(head), size, "head", True, tuple(warnings))
    if tails:
        src, off, raw = tails[0]
        return FooterChoice(Footer.parse(raw), off, src, False, tuple(warnings))
    if head_ok:
        warnings.append("the trailing footer is missing or damaged; using the copy at offset 0")
        return FooterChoice(Footer.parse(head), size, "head", False, tuple(warnings))
    _refuse_foreign(read_upto(fd, HEAD_BYTES, 0), options[0][2] if options else b"", path)
    raise NotAVHDError(
        "no VHD footer ('conectix') at the end or the start of the file: not a VHD image "
        "(a raw disk?)",
        path=path,
    )


def _refuse_foreign(head: bytes, tail: bytes, path: str) -> None:
    """Raise ForeignFormatError, naming the format, if the file is a qcow2/VMDK/VHDX/... image."""
    fmt = probe(head, tail)
    if fmt not in (ImageFormat.RAW, ImageFormat.VHD):
        raise ForeignFormatError(refusal(fmt, path), path=path, format=fmt)


def open(
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    strict: bool = True,
    parent_dirs: Sequence[str] = (),
    allow_parent_mismatch: bool = False,
    parent: str | os.PathLike[str] | None = None,
    open_parent: bool = True,
    parent_policy: ParentPolicy | None = None,
    force_share: bool = False,
    _seen: frozenset[tuple[int, int]] = frozenset(),
    _expect: tuple[int, int] | None = None,
) -> Disk:
    """Open a VHD image.  See :mod:`vhd` for the parameters."""
    if mode not in ("r", "r+"):
        raise InvalidArgumentError(f"mode must be 'r' or 'r+', not {mode!r}")
    if force_share and mode != "r":
        raise InvalidArgumentError("force_share is for read-only opens")
    spath = os.fspath(path)
    # VHDX (MS-VHDX) is probed by content, its "vhdxfile" identifier at offset 0; its package
    # is imported only for one (a VHD command's start-up does not pay for it).
    if is_vhdx_file(spath):
        from .vhdx import open_vhdx

        return open_vhdx(
            spath,
            mode,
            parent_dirs=parent_dirs,
            parent=parent,
            open_parent=open_parent,
            allow_parent_mismatch=allow_parent_mismatch,
            parent_policy=parent_policy,
            _seen=_seen,
            _expect=_expect,
            force_share=force_share,
        )
    writable = mode == "r+"
    fd, st = open_image_file(spath, writable=writable, force_share=force_share, expect=_expect)
    try:
        return _open_fd(
            fd,
            spath,
            writable,
            strict=strict,
            policy=(parent_policy or ParentPolicy()).with_dirs(parent_dirs),
            allow_parent_mismatch=allow_parent_mismatch,
            parent=os.fspath(parent) if parent is not None else None,
            open_parent=open_parent,
            force_share=force_share,
            seen=_seen | {(st.st_dev, st.st_ino)},
        )
    except BaseException:
        os.close(fd)
        raise


def open_locked(fd: int, path: str, *, parent: str | None = None) -> Disk:
    """A writable :class:`Disk` on ``fd``, which the caller opened read-write and locked
    exclusively (:mod:`vhd.newfile`: an image being written under its temporary name), with
    the ``parent`` the caller named for a differencing disk; the disk owns ``fd`` from here on,
    even on failure."""
    try:
        st = os.fstat(fd)
        return _open_fd(
            fd,
            path,
            True,
            strict=True,
            policy=ParentPolicy(),
            allow_parent_mismatch=False,
            parent=parent,
            open_parent=True,
            seen=frozenset({(st.st_dev, st.st_ino)}),
        )
    except BaseException:
        os.close(fd)
        raise


def _open_fd(
    fd: int,
    path: str,
    writable: bool,
    *,
    strict: bool,
    policy: ParentPolicy,
    allow_parent_mismatch: bool,
    parent: str | None,
    open_parent: bool,
    force_share: bool = False,
    seen: frozenset[tuple[int, int]],
) -> Disk:
    fsize = file_size(fd)
    choice = locate_footer(fd, fsize, path)
    footer = choice.footer
    warnings = list(choice.warnings)

    def problem(message: str, error: type[VHDError] = CorruptImageError) -> None:
        if strict:
            raise error(message, path=path)
        warnings.append(message)

    if not choice.checksum_ok:
        problem(
            f"footer checksum mismatch (stored {footer.checksum:#010x}, computed "
            f"{Footer.parse(footer.build()).checksum:#010x})",
            ChecksumError,
        )
    disk_type = footer.type
    if disk_type not in (DiskType.FIXED, DiskType.DYNAMIC, DiskType.DIFFERENCING):
        raise UnsupportedFeatureError(
            f"disk type {footer.disk_type} is not fixed (2), dynamic (3) or differencing (4)",
            path=path,
        )
    if footer.version != VERSION:
        problem(f"unknown file format version {footer.version:#010x}", UnsupportedFeatureError)
    if footer.current_size % 512:
        problem(f"the disk size {footer.current_size} is not a multiple of 512")
        footer = footer.replace(current_size=footer.current_size // 512 * 512)
    if writable and choice.source == "head":
        raise CorruptImageError(
            "the trailing footer is missing or damaged; run 'vhd check --repair' before writing",
            path=path,
        )
    if writable and not choice.checksum_ok:
        raise ChecksumError(
            "the footer checksum does not match; run 'vhd check --repair' before writing",
            path=path,
        )

    common = dict(
        path=path,
        fd=fd,
        writable=writable,
        footer=footer,
        footer_offset=choice.offset,
        file_size=fsize,
        warnings=warnings,
    )
    if disk_type == DiskType.FIXED:
        if choice.offset < footer.current_size:
            raise CorruptImageError(
                f"fixed disk of {footer.current_size} bytes, but its footer is at offset "
                f"{choice.offset}: the data is truncated",
                path=path,
            )
        if choice.offset > footer.current_size and not stat.S_ISBLK(os.fstat(fd).st_mode):
            # (on a block device the footer is in the last sector, however large the device)
            warnings.append(
                f"{choice.offset - footer.current_size} unused bytes between the data and the footer"
            )
        return FixedDisk(**common)  # type: ignore[arg-type]

    header = _read_header(fd, fsize, footer, path, problem)
    bat = _read_bat(fd, fsize, footer, header, path)
    disk = SparseDisk(
        header=header,
        bat=bat,
        parent=None,
        differencing=disk_type == DiskType.DIFFERENCING,
        **common,  # type: ignore[arg-type]
    )
    try:
        if writable:
            _check_writable_layout(disk, header)
        if disk_type == DiskType.DIFFERENCING and open_parent:
            locators = read_locators(fd, fsize, header)
            disk.parent = resolve_parent(  # type: ignore[assignment]
                path,
                header,
                locators,
                # Parents are opened read-only, so they are locked shared (or not at all).
                opener=functools.partial(open, force_share=force_share),
                policy=policy,
                allow_mismatch=allow_parent_mismatch,
                strict=strict,
                seen=seen,
                explicit=parent,
            )
            assert disk.parent is not None
            from .lineage import identity  # a VHDX parent: its DataWriteGuid

            if identity(disk.parent).bytes != header.parent_unique_id:
                # A mismatch allowed by the caller is reported on the child, which is the disk
                # the caller holds (resolve_parent can only note it on the parent).
                warnings.append(
                    f"parent {disk.parent.path} has another unique id than the child records; "
                    "used anyway"
                )
            if disk.parent.size != disk.size:
                warnings.append(
                    f"the parent is {disk.parent.size} bytes, the child {disk.size}: reads past "
                    "the parent's end return zeros"
                )
    except BaseException:
        # The caller closes fd; don't let the half-built disk close it a second time.
        disk._closed = True
        raise
    return disk


def _read_header(fd: int, fsize: int, footer: Footer, path: str, problem: object) -> DynamicHeader:
    at = footer.data_offset
    if at % 512 or at < FOOTER_SIZE or at + HEADER_SIZE > fsize:
        raise CorruptImageError(
            f"the dynamic header offset {at:#x} is not inside the file ({fsize} bytes)",
            path=path,
        )
    raw = read_exact(fd, HEADER_SIZE, at, path=path)
    header = DynamicHeader.parse(raw)
    if not header.cookie_ok:
        raise CorruptImageError(f"no dynamic header ('cxsparse') at offset {at:#x}", path=path)
    report = problem  # callable(message, error)
    if not header_checksum_ok(raw):
        report(  # type: ignore[operator]
            f"dynamic header checksum mismatch (stored {header.checksum:#010x})", ChecksumError
        )
    if header.version != HEADER_VERSION:
        report(  # type: ignore[operator]
            f"unknown dynamic header version {header.version:#010x}", UnsupportedFeatureError
        )
    bs = header.block_size
    if not block_size_ok(bs):
        raise CorruptImageError(
            f"invalid block size {bs} (must be a power of two from 512 B to 256 MiB)", path=path
        )
    needed = -(-footer.current_size // bs)
    if header.max_table_entries < needed:
        raise CorruptImageError(
            f"the BAT has {header.max_table_entries} entries but a {footer.current_size}-byte "
            f"disk needs {needed}",
            path=path,
        )
    if needed > MAX_ENTRIES:
        raise UnsupportedFeatureError(
            f"a {footer.current_size}-byte disk of {bs}-byte blocks needs a table of {needed} "
            f"entries, more than vhdkit holds in memory ({MAX_ENTRIES})",
            path=path,
        )
    return header


def _read_bat(
    fd: int, fsize: int, footer: Footer, header: DynamicHeader, path: str
) -> BlockAllocationTable:
    count = -(-footer.current_size // header.block_size)
    length = header.max_table_entries * 4
    at = header.table_offset
    if at % 512 or at + length > fsize:
        raise CorruptImageError(
            f"the BAT ({header.max_table_entries} entries at {at:#x}) does not fit in the file",
            path=path,
        )
    if at < footer.data_offset + HEADER_SIZE and at + length > footer.data_offset:
        raise CorruptImageError("the BAT overlaps the dynamic header", path=path)
    if at < FOOTER_SIZE:
        raise CorruptImageError("the BAT overlaps the footer copy at offset 0", path=path)
    # Only the entries the disk size needs are used (as blktap does); the rest are padding.
    raw = read_exact(fd, count * 4, at, path=path)
    bat = BlockAllocationTable.from_bytes(raw, count)
    # Read-only opens too: a block over metadata reads metadata as data, and a crafted table
    # of millions of such entries (all zero: every block at offset 0) would cost per-block work
    # in every reader.  vhd check reports them one by one and --repair unallocates them.
    bad = bat.first_misplaced(
        span=header.bitmap_bytes + header.block_size,
        last_span=header.bitmap_bytes + footer.current_size - (count - 1) * header.block_size,
        file_size=fsize,
        regions=metadata_regions(footer.data_offset, header),
    )
    if bad is not None:
        block, entry, where = bad
        raise CorruptImageError(
            f"block {block} (BAT entry {entry:#x}) lies {where}: the BAT is damaged "
            "('vhd check' lists every bad entry, 'vhd check --repair' unallocates them)",
            path=path,
        )
    return bat


def _check_writable_layout(disk: SparseDisk, header: DynamicHeader) -> None:
    """Before writing, every allocated block must lie before the trailing footer, where new
    blocks will go; otherwise a new block could overwrite an old one."""
    limit = disk.footer_offset
    # Metadata a block must not overlap, or a write into the block would overwrite it: the
    # footer copy, the header, the BAT and the locator payloads, as `vhd check` sees them.
    metadata = [(start, end) for start, end, _ in metadata_regions(disk.footer.data_offset, header)]
    spans: list[tuple[int, int, int]] = []
    for block, entry in disk.bat.allocated():
        start = entry * 512
        end = (
            start
            + header.bitmap_bytes
            + min(header.block_size, disk.size - block * header.block_size)
        )
        clash = any(start < m_end and m_start < end for m_start, m_end in metadata)
        if end > limit or start < 512 or clash:
            raise CorruptImageError(
                f"block {block} (at {start:#x}) lies outside the data area or over metadata; "
                "run 'vhd check --repair' before writing",
                path=disk.path,
            )
        spans.append((start, end, block))
    # Two blocks sharing file space would overwrite each other's data.
    spans.sort()
    for (_, end, block), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise CorruptImageError(
                f"blocks {block} and {other} overlap in the file; run 'vhd check --repair' "
                "before writing",
                path=disk.path,
            )
