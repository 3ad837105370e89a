"""Where things lie in a VHD file, read one way for every reader (spec: "Hard Disk Footer
Format", "Dynamic Disk Header Format", "Block Allocation Table", "Parent Locator Entry").

Two parts, both free of policy:

* **Arithmetic** over parsed records: the limits of the records' fields (:data:`MAX_SIZE`, block
  sizes) and :func:`metadata_regions`, the footer copy, header, BAT and locator payloads that no
  data block may overlap.
* **The layout step** (:func:`read_layout`): a file in, a :class:`Layout` out — the footer to
  trust and why (:class:`FooterChoice`), the dynamic header, the BAT, the block spans and the
  metadata regions — plus a :class:`RawFinding` where the structure stops making sense (the
  layout goes no further than the file allows).  It judges nothing: :func:`vhd.open` applies its
  strictness to the layout to build a :class:`~vhd.disk.Disk`, and ``vhd check``
  (:mod:`vhd.check`) turns it into findings with a severity.  The few later reads ``vhd check``
  needs (BAT padding, locator payloads, sector bitmaps, a read of every block) go through the
  layout's narrow readers, so the two can never parse the file differently.

Every size read from the file is checked against the file's size before it is used, so a damaged
image costs bounded time and memory.
"""

from __future__ import annotations

import os
import stat
from array import array
from collections.abc import Callable

from .bat import MAX_ENTRIES, BlockAllocationTable
from .errors import ForeignFormatError, NotAVHDError
from .footer import COOKIE, FOOTER_SIZE, DiskType, Footer, checksum_ok
from .header import HEADER_SIZE, DynamicHeader, ParentLocator
from .locator import MAX_LOCATOR_BYTES
from .probe import HEAD_BYTES, TAIL_BYTES, ImageFormat, probe, refusal
from .record import FrozenRecord, Record, fill

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from .chain import LocatorInfo

SECTOR = 512
MiB = 1 << 20

# The largest disk Microsoft's and qemu's tools create or open: 2040 GiB (0xFF000000 sectors).
MAX_SIZE = 0xFF000000 * SECTOR
# Block sizes are powers of two.  Images from other tools are read with blocks down to one
# sector; vhdkit creates blocks of at least 4 KiB (a whole bitmap byte per 512-byte sector run
# of 8 sectors, and 4 KiB-aligned data).
MIN_BLOCK_SIZE = SECTOR
MIN_CREATE_BLOCK_SIZE = 8 * SECTOR
MAX_BLOCK_SIZE = 256 * MiB
# The later reads of ``vhd check`` go in chunks of this size; BAT padding is scanned this far.
_CHUNK = 4 * MiB
_PADDING_SCAN = 64 * MiB


def block_size_ok(bs: int, minimum: int = MIN_BLOCK_SIZE) -> bool:
    """Whether ``bs`` is a power of two from ``minimum`` to :data:`MAX_BLOCK_SIZE`."""
    return minimum <= bs <= MAX_BLOCK_SIZE and not bs & (bs - 1)


def table_end(header: DynamicHeader) -> int:
    """The end of the BAT the header declares, padded to whole sectors."""
    return header.table_offset + -(-header.max_table_entries * 4 // SECTOR) * SECTOR


def locator_extent(loc: ParentLocator) -> int:
    """How many bytes at its data offset an in-use parent locator's payload holds: its data
    length or its space, whichever is larger, the space capped at :data:`MAX_LOCATOR_BYTES`
    (a crafted or odd data_space must not reserve gigabytes).  0 for a locator not in use or
    claiming more data than the cap: it is not trusted as a region (``vhd check`` reports it)."""
    if not loc.in_use or loc.data_len > MAX_LOCATOR_BYTES:
        return 0
    return max(loc.data_len, min(loc.space_bytes, MAX_LOCATOR_BYTES))


def metadata_regions(header_offset: int, header: DynamicHeader) -> list[tuple[int, int, str]]:
    """``(start, end, label)`` of the footer copy, the dynamic header at ``header_offset``, the
    sector-padded BAT and each in-use parent locator's payload (:func:`locator_extent`).  The
    one rule for what no block may overlap: ``vhd check``, :func:`vhd.open` and the operations
    that place blocks (:func:`vhd.metadata.metadata_end`) all read it here."""
    regions = [
        (0, FOOTER_SIZE, "the footer copy"),
        (header_offset, header_offset + HEADER_SIZE, "the dynamic header"),
        (header.table_offset, table_end(header), "the BAT"),
    ]
    for slot, loc in enumerate(header.locators):
        if length := locator_extent(loc):
            regions.append((loc.data_offset, loc.data_offset + length, f"parent locator {slot}"))
    return regions


# -- reading -----------------------------------------------------------------------------------

Reader = Callable[[int, int, int], bytes]


def _pread(fd: int, length: int, offset: int) -> bytes:
    return os.pread(fd, length, offset)


# Every read of the layout step and its readers goes through this hook, so tests can prove which
# parts of a file are read (and that no read is unbounded).
read_hook: Reader = _pread


def _read(fd: int, length: int, offset: int) -> bytes:
    return read_hook(fd, length, offset)


class RawFinding(FrozenRecord):
    """Where the layout step had to stop, as a fact: a ``code`` shared with ``vhd check``'s
    finding of the same name and a message; the reader decides how grave it is."""

    _fields = ("code", "message")
    __slots__ = _fields
    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        fill(self, code, message)


class FooterChoice(FrozenRecord):
    """The footer to trust and why, with what the file holds at both ends.

    ``source`` is ``"tail"``, ``"tail-511"`` (a pre-2004 511-byte footer) or ``"head"`` (the copy
    at offset 0 of a dynamic or differencing disk); ``reason`` is ``"tail"`` (a valid trailing
    footer), ``"head"`` (the trailing one missing or damaged, the copy valid), ``"tail-checksum"``
    (the trailing one with a bad checksum, no valid copy) or ``"head-checksum"`` (no trailing
    one, the copy with a bad checksum).  ``offset`` is where the footer in use ends the data: the
    trailing footer's offset, or the file size when the copy at offset 0 is used."""

    _fields = (
        "footer", "offset", "source", "reason", "checksum_ok",
        "tail_raw", "tail_offset", "tail_ok", "head_raw", "head_ok",
    )  # fmt: skip

    __slots__ = _fields
    footer: Footer
    offset: int
    source: str
    reason: str
    checksum_ok: bool
    tail_raw: bytes  # the trailing footer's bytes (511 for a 511-byte one); b"" without
    tail_offset: int  # where a trailing footer (valid or not) sits; -1 when there is none
    tail_ok: bool
    head_raw: bytes  # the first 512 bytes of the file
    head_ok: bool  # a footer with a good checksum at offset 0

    def __init__(
        self,
        footer: Footer,
        offset: int,
        source: str,
        reason: str,
        checksum_ok: bool,
        tail_raw: bytes = b"",
        tail_offset: int = -1,
        tail_ok: bool = False,
        head_raw: bytes = b"",
        head_ok: bool = False,
    ) -> None:
        fill(
            self,
            footer,
            offset,
            source,
            reason,
            checksum_ok,
            tail_raw,
            tail_offset,
            tail_ok,
            head_raw,
            head_ok,
        )

    @property
    def head_cookie(self) -> bool:
        return self.head_raw[:8] == COOKIE

    @property
    def head_footer(self) -> Footer | None:
        return Footer.parse(self.head_raw) if self.head_cookie else None


def _refuse_foreign(head: bytes, tail: bytes, path: str) -> None:
    """Raise ForeignFormatError, naming the format, if the file is a qcow2/VMDK/VHDX/... image."""
    fmt = probe(head, tail)
    if fmt not in (ImageFormat.RAW, ImageFormat.VHD):
        raise ForeignFormatError(refusal(fmt, path), path=path, format=fmt)


def locate_footer(fd: int, size: int, path: str) -> FooterChoice:
    """Pick the footer to trust: a trailing footer with a good checksum (512 bytes, or 511 in a
    file of 512·n + 511 bytes), else the copy at offset 0 of a dynamic or differencing disk, else
    whichever of the two has a cookie.  Raises :class:`~vhd.errors.NotAVHDError` (or
    :class:`~vhd.errors.ForeignFormatError` naming another format) when neither has one."""
    if size < FOOTER_SIZE - 1:
        _refuse_foreign(_read(fd, HEAD_BYTES, 0), b"", path)
        raise NotAVHDError(f"the file is only {size} bytes, too small for a VHD", path=path)
    tail_raw, tail_offset = b"", -1
    if size >= FOOTER_SIZE and (raw := _read(fd, FOOTER_SIZE, size - FOOTER_SIZE))[:8] == COOKIE:
        tail_raw, tail_offset = raw, size - FOOTER_SIZE
    elif size % SECTOR == 511 and (raw := _read(fd, 511, size - 511))[:8] == COOKIE:
        tail_raw, tail_offset = raw, size - 511
    head = _read(fd, FOOTER_SIZE, 0) if size >= FOOTER_SIZE else b""
    tail_ok = bool(tail_raw) and checksum_ok(tail_raw)
    head_ok = head[:8] == COOKIE and checksum_ok(head)
    head_sparse = head[:8] == COOKIE and Footer.parse(head).disk_type in (3, 4)
    tail_source = "tail-511" if len(tail_raw) == 511 else "tail"
    facts = dict(
        tail_raw=tail_raw, tail_offset=tail_offset, tail_ok=tail_ok, head_raw=head, head_ok=head_ok
    )
    if tail_ok:
        footer, offset, source, reason = Footer.parse(tail_raw), tail_offset, tail_source, "tail"
    elif head_sparse and head_ok:
        footer, offset, source, reason = Footer.parse(head), size, "head", "head"
    elif tail_raw:
        footer, offset, source = Footer.parse(tail_raw), tail_offset, tail_source
        reason = "tail-checksum"
    elif head_sparse:
        footer, offset, source, reason = Footer.parse(head), size, "head", "head-checksum"
    else:
        _refuse_foreign(
            _read(fd, HEAD_BYTES, 0), _read(fd, TAIL_BYTES, max(0, size - TAIL_BYTES)), path
        )
        raise NotAVHDError(
            "no VHD footer ('conectix') at the end or the start of the file: not a VHD image "
            "(a raw disk?)",
            path=path,
        )
    return FooterChoice(
        footer,
        offset,
        source,
        reason,
        reason in ("tail", "head"),
        **facts,  # type: ignore[arg-type]
    )


class Layout(Record):
    """What a VHD file holds and where (see the module docstring).  ``header`` is set once a
    header was read at the footer's data offset (even one with a bad cookie), ``bat`` once the
    table was read; ``stop`` says why the step went no further, if it stopped."""

    _fields = (
        "path", "file_size", "choice", "fd", "header_offset", "header_raw", "header", "bat",
        "stop", "block_device",
    )  # fmt: skip

    __slots__ = _fields
    _hidden = frozenset({"fd"})
    path: str
    file_size: int
    choice: FooterChoice
    fd: int
    header_offset: int
    header_raw: bytes
    header: DynamicHeader | None
    bat: BlockAllocationTable | None
    stop: RawFinding | None
    block_device: bool  # the image is a block device (a fixed VHD ends in its last sector)

    def __init__(
        self,
        path: str,
        file_size: int,
        choice: FooterChoice,
        fd: int,
        header_offset: int = 0,
        header_raw: bytes = b"",
        header: DynamicHeader | None = None,
        bat: BlockAllocationTable | None = None,
        stop: RawFinding | None = None,
        block_device: bool = False,
    ) -> None:
        fill(
            self,
            path,
            file_size,
            choice,
            fd,
            header_offset,
            header_raw,
            header,
            bat,
            stop,
            block_device,
        )

    @property
    def footer(self) -> Footer:
        return self.choice.footer

    @property
    def disk_type(self) -> DiskType | None:
        return self.footer.type

    @property
    def sparse(self) -> bool:
        return self.disk_type in (DiskType.DYNAMIC, DiskType.DIFFERENCING)

    @property
    def size(self) -> int:
        """The disk size readers use: the footer's, cut to whole sectors."""
        return self.footer.current_size // SECTOR * SECTOR

    @property
    def bat_count(self) -> int:
        return len(self.bat) if self.bat is not None else 0

    @property
    def data_limit(self) -> int:
        """Where the data area ends: the trailing footer (valid or not), or the end of the file."""
        return self.choice.tail_offset if self.choice.tail_offset >= 0 else self.file_size

    # -- the header's arithmetic -------------------------------------------------------------

    def regions(self) -> list[tuple[int, int, str]]:
        """The metadata regions no block may overlap (:func:`metadata_regions`)."""
        assert self.header is not None
        return metadata_regions(self.header_offset, self.header)

    def block_extent(self, block: int) -> tuple[int, int]:
        """(guest offset, length) of a block."""
        assert self.header is not None
        bs = self.header.block_size
        return block * bs, min(bs, self.size - block * bs)

    def block_ends(self) -> Callable[[int, int], int]:
        """``end(start, block)``: the end in the file of ``block`` stored at ``start``, its bitmap
        and the data the disk size needs (a last block may be partial).  A closure over plain
        integers: rules call it once or more per allocated block."""
        assert self.header is not None
        bs, bmb, size = self.header.block_size, self.header.bitmap_bytes, self.size

        def end(start: int, block: int) -> int:
            return start + bmb + min(bs, size - block * bs)

        return end

    def spans(self) -> tuple[array[int], array[int]]:
        """``(file starts, block numbers)`` of the allocated blocks in block order.  Two machine
        integers per block, built from C-level passes (:meth:`BlockAllocationTable.allocated_indices`,
        map): a crafted table of 4 Mi entries costs passes of C loops, not Python steps per block,
        and a sparse table costs what its allocated blocks do."""
        assert self.bat is not None
        blocks = self.bat.allocated_indices()
        entries = self.bat.entries
        picked = entries if len(blocks) == len(entries) else map(entries.__getitem__, blocks)
        starts = array("Q", map(SECTOR.__mul__, picked))
        return starts, blocks

    # -- narrow readers (for ``vhd check``: bounded, through :data:`read_hook`) -------------

    def bat_padding_used(self) -> bool:
        """Whether the table entries past the disk size hold anything but 0xFF: read in chunks,
        stopping at the first one (a header may claim 2^32 - 1 entries), and at most
        ``_PADDING_SCAN`` bytes of them."""
        assert self.header is not None
        start = self.header.table_offset + self.bat_count * 4
        end = min(self.header.table_offset + self.header.max_table_entries * 4,
                  start + _PADDING_SCAN)  # fmt: skip
        pos = start
        while pos < end:
            chunk = _read(self.fd, min(_CHUNK, end - pos), pos)
            if not chunk:
                return False
            if chunk.strip(b"\xff"):
                return True
            pos += len(chunk)
        return False

    def locator_payload(self, slot: int) -> bytes:
        """The payload of parent locator ``slot`` (its data length, at most what the file holds;
        the caller has bounded the length)."""
        assert self.header is not None
        loc = self.header.locators[slot]
        return _read(self.fd, loc.data_len, loc.data_offset)

    def locators(self) -> list[LocatorInfo]:
        """Every used locator decoded (:func:`vhd.chain.read_locators`)."""
        from .chain import read_locators  # vhd.chain reads footers through this module

        assert self.header is not None
        return read_locators(self.fd, self.file_size, self.header)

    def bitmap(self, block: int) -> bytes:
        """The sector bitmap of an allocated block (short where the file ends)."""
        assert self.header is not None and self.bat is not None
        return _read(self.fd, self.header.bitmap_bytes, self.bat[block] * SECTOR)

    def unreadable(self, start: int, length: int) -> tuple[str, int, str] | None:
        """Read ``length`` bytes from ``start`` in chunks: ``None`` when all could be read, else
        ``("read-error", offset, reason)`` or ``("read-short", where it ends, "")``."""
        pos, end = start, start + length
        while pos < end:
            n = min(_CHUNK, end - pos)
            try:
                got = len(_read(self.fd, n, pos))
            except OSError as exc:
                return "read-error", pos, str(exc)
            if got < n:
                return "read-short", pos + got, ""
            pos += n
        return None


def read_layout(fd: int, path: str, file_size: int) -> Layout:
    """The layout step: the footer, then (for a dynamic or differencing disk) the header and the
    BAT, as far as the file allows; see :class:`Layout`.  Raises only when no footer is found."""
    layout = Layout(path, file_size, locate_footer(fd, file_size, path), fd)
    layout.block_device = stat.S_ISBLK(os.fstat(fd).st_mode)
    footer = layout.footer
    if footer.type not in (DiskType.FIXED, DiskType.DYNAMIC, DiskType.DIFFERENCING):
        layout.stop = RawFinding(
            "footer-disk-type",
            f"disk type {footer.disk_type} is not fixed (2), dynamic (3) or differencing (4)",
        )
        return layout
    if footer.type == DiskType.FIXED:
        return layout
    layout.stop = _read_header(layout) or _read_bat(layout)
    return layout


def _read_header(layout: Layout) -> RawFinding | None:
    at, fsize = layout.footer.data_offset, layout.file_size
    if at % SECTOR or at < FOOTER_SIZE or at + HEADER_SIZE > fsize:
        return RawFinding(
            "header-offset",
            f"the dynamic header offset {at:#x} is not inside the file ({fsize} bytes)",
        )
    layout.header_offset = at
    layout.header_raw = raw = _read(layout.fd, HEADER_SIZE, at)
    layout.header = h = DynamicHeader.parse(raw)
    if not h.cookie_ok:
        return RawFinding("header-cookie", f"no dynamic header ('cxsparse') at offset {at:#x}")
    bs = h.block_size
    if not block_size_ok(bs):
        return RawFinding(
            "header-block-size", f"block size {bs} is not a power of two from 512 B to 256 MiB"
        )
    size = layout.size
    needed = -(-size // bs)
    if h.max_table_entries < needed:
        return RawFinding(
            "header-max-table-entries",
            f"the BAT has {h.max_table_entries} entries but a {size}-byte disk needs {needed}",
        )
    if needed > MAX_ENTRIES:
        return RawFinding(
            "header-table-too-large",
            f"a {size}-byte disk of {bs}-byte blocks needs a table of {needed} entries, more "
            f"than vhdkit holds in memory ({MAX_ENTRIES})",
        )
    return None


def _read_bat(layout: Layout) -> RawFinding | None:
    h = layout.header
    assert h is not None
    at, length = h.table_offset, h.max_table_entries * 4
    if at % SECTOR or at + length > layout.file_size:
        return RawFinding(
            "bat-offset",
            f"the BAT ({h.max_table_entries} entries at {at:#x}) does not fit in the file",
        )
    if at < FOOTER_SIZE or (
        at < layout.header_offset + HEADER_SIZE and at + length > layout.header_offset
    ):
        return RawFinding("bat-overlaps-header", "the BAT overlaps the footer copy or the header")
    # Only the entries the disk size needs are used (as blktap does); the rest are padding.
    count = -(-layout.size // h.block_size)
    raw = _read(layout.fd, count * 4, at)
    if len(raw) < count * 4:
        return RawFinding("bat-offset", "the BAT is cut short by the end of the file")
    layout.bat = BlockAllocationTable.from_bytes(raw, count)
    return None
