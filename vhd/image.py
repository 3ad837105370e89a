"""Opening an image: the layout step (:mod:`vhd.layout`) reads the footer, the dynamic header and
the BAT; this module applies the open's strictness to that layout and builds the right
:class:`~vhd.disk.Disk` (spec: "Hard Disk Footer Format", "Dynamic Disk Header Format").

Footer recovery follows what real damage looks like: the trailing footer is used when it is valid;
if it is missing or damaged, the copy at offset 0 of a dynamic or differencing disk is used (read
only, with a warning), and files of 512·n + 511 bytes are read with the 511-byte footer of images
older than Virtual PC 2004.  Checksum mismatches raise :class:`~vhd.errors.ChecksumError` unless
the caller opens with ``strict=False`` (then they are listed in ``Disk.warnings``).

The file is locked (:mod:`vhd.lock`) before anything is read: shared for ``"r"`` and for every
parent of a chain, exclusive for ``"r+"``, none with ``force_share``.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence

from .chain import ParentPolicy, resolve_parent
from .disk import Disk, FixedDisk, FoundImage, SparseDisk
from .errors import (
    ChecksumError,
    CorruptImageError,
    InvalidArgumentError,
    UnsupportedFeatureError,
    VHDError,
)
from .fileio import file_size, open_image_file
from .footer import VERSION, DiskType, Footer
from .header import VERSION as HEADER_VERSION
from .header import checksum_ok as header_checksum_ok
from .layout import FooterChoice, Layout, locate_footer, read_layout
from .probe import is_vhdx_file

__all__ = ["footer_warnings", "locate_footer", "open", "open_locked"]

# Where the layout step stops on a part vhdkit does not support, rather than a damaged one.
_UNSUPPORTED = frozenset(("footer-disk-type", "header-table-too-large"))


def footer_warnings(choice: FooterChoice) -> list[str]:
    """What a reader is told about the footer ``choice`` (the open's wording of its reason)."""
    warnings: list[str] = []
    if choice.reason == "tail":
        if choice.source == "tail-511":
            warnings.append("the image ends in a 511-byte footer (made before Virtual PC 2004)")
        if choice.footer.disk_type in (3, 4):
            head, copy = choice.head_raw, choice.head_footer
            if copy is None or copy.disk_type not in (3, 4):
                warnings.append("the footer copy at offset 0 is missing or damaged")
            elif head != choice.footer.build() and head != choice.tail_raw:
                warnings.append("the footer copy at offset 0 differs from the trailing footer")
    elif choice.reason == "head":
        warnings.append(
            "the trailing footer is missing or damaged; using the copy at offset 0 "
            "(vhd check --repair restores it)"
        )
    elif choice.reason == "head-checksum":
        warnings.append("the trailing footer is missing or damaged; using the copy at offset 0")
    return warnings


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
    layout = read_layout(fd, path, fsize)
    choice = layout.choice
    footer = choice.footer
    warnings = footer_warnings(choice)

    def problem(message: str, error: type[VHDError] = CorruptImageError) -> None:
        if strict:
            raise error(message, path=path)
        warnings.append(message)

    def stopped(*codes: str) -> None:
        """Raise the layout step's stop if it is one of ``codes`` (at the point of the open
        where that part is judged, so errors come in the same order as the file's parts)."""
        if layout.stop is not None and layout.stop.code in codes:
            error = (
                UnsupportedFeatureError if layout.stop.code in _UNSUPPORTED else CorruptImageError
            )
            raise error(layout.stop.message, path=path)

    if not choice.checksum_ok:
        problem(
            f"footer checksum mismatch (stored {footer.checksum:#010x}, computed "
            f"{Footer.parse(footer.build()).checksum:#010x})",
            ChecksumError,
        )
    disk_type = footer.type
    stopped("footer-disk-type")
    assert disk_type is not None
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

    found = FoundImage(
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
        if choice.offset > footer.current_size and not layout.block_device:
            # (on a block device the footer is in the last sector, however large the device)
            warnings.append(
                f"{choice.offset - footer.current_size} unused bytes between the data and the footer"
            )
        return FixedDisk(found)

    stopped("header-offset", "header-cookie")
    header = layout.header
    assert header is not None
    if not header_checksum_ok(layout.header_raw):
        problem(f"dynamic header checksum mismatch (stored {header.checksum:#010x})", ChecksumError)
    if header.version != HEADER_VERSION:
        problem(f"unknown dynamic header version {header.version:#010x}", UnsupportedFeatureError)
    if layout.stop is not None:
        stopped(layout.stop.code)
    bat = layout.bat
    assert bat is not None
    # Read-only opens too: a block over metadata reads metadata as data, and a crafted table
    # of millions of such entries (all zero: every block at offset 0) would cost per-block work
    # in every reader.  vhd check reports them one by one and --repair unallocates them.
    bad = bat.first_misplaced(
        span=header.bitmap_bytes + header.block_size,
        last_span=header.bitmap_bytes + footer.current_size - (len(bat) - 1) * header.block_size,
        file_size=fsize,
        regions=layout.regions(),
    )
    if bad is not None:
        block, entry, where = bad
        raise CorruptImageError(
            f"block {block} (BAT entry {entry:#x}) lies {where}: the BAT is damaged "
            "('vhd check' lists every bad entry, 'vhd check --repair' unallocates them)",
            path=path,
        )
    disk = SparseDisk(
        found,
        header=header,
        bat=bat,
        parent=None,
        differencing=disk_type == DiskType.DIFFERENCING,
    )
    try:
        if writable:
            _check_writable_layout(layout)
        if disk_type == DiskType.DIFFERENCING and open_parent:
            disk.parent = resolve_parent(  # type: ignore[assignment]
                path,
                header,
                layout.locators(),
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
        disk._disown_fd()
        raise
    return disk


def _check_writable_layout(layout: Layout) -> None:
    """Before writing, every allocated block must lie before the trailing footer, where new
    blocks will go; otherwise a new block could overwrite an old one."""
    limit = layout.data_limit
    # Metadata a block must not overlap, or a write into the block would overwrite it: the
    # footer copy, the header, the BAT and the locator payloads, as `vhd check` sees them.
    metadata = [(start, end) for start, end, _ in layout.regions()]
    spans: list[tuple[int, int, int]] = []
    block_end = layout.block_ends()
    for start, block in zip(*layout.spans(), strict=True):
        end = block_end(start, block)
        clash = any(start < m_end and m_start < end for m_start, m_end in metadata)
        if end > limit or start < 512 or clash:
            raise CorruptImageError(
                f"block {block} (at {start:#x}) lies outside the data area or over metadata; "
                "run 'vhd check --repair' before writing",
                path=layout.path,
            )
        spans.append((start, end, block))
    # Two blocks sharing file space would overwrite each other's data.
    spans.sort()
    for (_, end, block), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise CorruptImageError(
                f"blocks {block} and {other} overlap in the file; run 'vhd check --repair' "
                "before writing",
                path=layout.path,
            )
