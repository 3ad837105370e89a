"""Creating images (spec: "Creating a fixed / dynamic / differencing hard disk image").

Layouts written:

* fixed: ``size`` bytes of data (a sparse file) then the footer;
* dynamic: footer copy at 0, dynamic header at 512, the BAT at 0x600 padded with 0xFF to a
  512-byte multiple, then (differencing only) the locator payloads, each sector-aligned, and the
  trailing footer.  Data blocks are added later where the trailing footer is, 4 KiB-aligned.

The footer is laid out as Windows lays it out: creator code ``win `` (vhdkit's own version in the
creator version), ``current size`` = ``original size`` = the requested size (libvhdi reads the
latter), and the geometry is the spec's CHS, which never exceeds the size (blktap's ``vhd-util
check`` requires that).  qemu sizes ``win `` disks by the current size, so qemu-img, libvhdi,
blktap and Windows all see the exact size (see :mod:`vhd.geometry`).

A differencing child records its parent's unique id and modification time, the parent's file
name in the header (UTF-16BE) and three locators: W2ku (the absolute path, backslashes), W2ru
(``.\\``-relative to the child) and MacX (a ``file://`` URL).  W2ku/W2ru are UTF-16LE.  Their
``data_space`` is stored in **bytes**, rounded up to whole sectors, as Windows, blktap and
VirtualBox do (the spec's "sectors" is read by no tool that matters, and blktap's reader takes
values >= 512 as bytes).

The file is written under a temporary name next to the final one and renamed when complete
(:mod:`vhd.newfile`); :func:`write_layout` and :func:`open_new` let ``vhd convert`` fill an image
before it gets its name.
"""

from __future__ import annotations

import os
import stat

from .bat import MAX_ENTRIES, UNUSED
from .errors import InvalidArgumentError
from .fileio import open_block_device, write_all
from .footer import FOOTER_SIZE, DiskType, Footer, new_footer, vhd_timestamp
from .geometry import geometry_for_create
from .header import HEADER_SIZE, ParentLocator, new_header
from .layout import MAX_SIZE, MIN_CREATE_BLOCK_SIZE, block_size_ok
from .locator import (
    CODE_MACX,
    CODE_W2KU,
    CODE_W2RU,
    absolute_windows_path,
    encode_payload,
    posix_to_macx,
    relative_windows_path,
)
from .newfile import NewFile, naming

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from .disk import Disk

MiB = 1024 * 1024
DEFAULT_BLOCK_SIZE = 2 * MiB
# Microsoft's (and qemu's) cap for VHDs: 2040 GiB.
TABLE_OFFSET = 0x600


def create(
    path: str | os.PathLike[str],
    size: int | None = None,
    *,
    type: str = "dynamic",
    block_size: int = DEFAULT_BLOCK_SIZE,
    parent: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Disk:
    """Create an image and return it opened ``"r+"``."""
    spath = os.fspath(path)
    parent_path = os.fspath(parent) if parent is not None else None
    footer, parent_info = plan_create(size, type=type, block_size=block_size, parent=parent_path)
    if _is_block_device(spath):
        return _create_on_device(spath, footer, overwrite)
    # Written under a temporary name and renamed when complete (see vhd.newfile): an
    # interrupted create leaves nothing under the final name, and never touches what was there.
    with NewFile(spath, overwrite=overwrite) as new:
        write_layout(new.fd, spath, footer, block_size, parent_info)
        # The parent the caller named is used as named (wherever it is: the caller chose it).
        return new.publish_open(open_new(new, parent=parent_path))


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _create_on_device(path: str, footer: Footer, overwrite: bool) -> Disk:
    """A fixed VHD written in place on a block device (``vhd create --type fixed /dev/sdX``), as
    ``vhd convert`` writes raw output to one: no truncate (a device's size is fixed), the device
    must hold the disk and its footer, the disk's range is zeroed (BLKZEROOUT; the device's old
    content must not show through), and the footer goes in the device's last 512 bytes, where
    every reader looks for it (qemu, libvhdi and vhdkit read the data from offset 0 and take the
    size from the footer; bytes between the two are left alone).  A dynamic or differencing VHD
    grows at its end, which a device cannot: refused."""
    from .convert import zero_range  # (vhd.convert imports this module)
    from .image import open_locked

    if footer.type != DiskType.FIXED:
        raise InvalidArgumentError(
            "a block device holds only a fixed VHD (a dynamic or differencing one grows at its "
            "end, which a device cannot): use --type fixed",
            path=path,
        )
    fd, device_size = open_block_device(path, overwrite=overwrite)
    try:
        size = footer.current_size
        if device_size < size + FOOTER_SIZE:
            raise InvalidArgumentError(
                f"the device holds {device_size} bytes, less than the disk's {size} and its "
                f"{FOOTER_SIZE}-byte footer",
                path=path,
            )
        with naming(path):
            zero_range(fd, 0, size)
            write_all(fd, footer.build(), device_size - FOOTER_SIZE)
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return open_locked(fd, path)  # owns fd (and its lock) from here on


def plan_create(
    size: int | None, *, type: str, block_size: int, parent: str | None
) -> tuple[Footer, tuple[bytes, int, str] | None]:
    """Check the arguments of :func:`create`; the new footer, and the parent's unique id,
    timestamp and path for a differencing disk."""
    from .image import open as open_image

    parent_path = parent
    parent_id = bytes(16)
    if parent_path is not None:
        from .lineage import identity

        with open_image(parent_path, "r") as pdisk:
            psize = pdisk.size
            # A VHDX parent is named by its DataWriteGuid (vhd.lineage), a VHD by its unique id.
            parent_id = identity(pdisk).bytes
            if getattr(pdisk, "logical_sector_size", 512) != 512:
                raise InvalidArgumentError(
                    f"{parent_path} is a 4K-native VHDX: a VHD child has 512-byte sectors "
                    "(make the child a VHDX)"
                )
        if size is not None and size != psize:
            raise InvalidArgumentError(
                f"a differencing disk has its parent's size ({psize} bytes), not {size}"
            )
        size = psize
        disk_type = DiskType.DIFFERENCING
    else:
        if size is None:
            raise InvalidArgumentError("a size is needed (or a parent)")
        kinds = {"fixed": DiskType.FIXED, "dynamic": DiskType.DYNAMIC}
        if type not in kinds:
            raise InvalidArgumentError(f"type must be 'fixed' or 'dynamic', not {type!r}")
        disk_type = kinds[type]
    _check_size(size)
    if disk_type != DiskType.FIXED and (not block_size_ok(block_size, MIN_CREATE_BLOCK_SIZE)):
        raise InvalidArgumentError(
            f"block size {block_size} must be a power of two from 4 KiB to 256 MiB"
        )
    if disk_type != DiskType.FIXED and -(-size // block_size) > MAX_ENTRIES:
        raise InvalidArgumentError(
            f"a {size}-byte disk of {block_size}-byte blocks needs more than {MAX_ENTRIES} "
            "blocks, the most vhdkit opens: use larger blocks"
        )
    footer = new_footer(size=size, disk_type=disk_type, geometry=geometry_for_create(size))
    if parent_path is None:
        return footer, None
    return footer, (parent_id, vhd_timestamp(os.stat(parent_path).st_mtime), parent_path)


def open_new(new: NewFile, *, parent: str | None = None) -> Disk:
    """The image being written at ``new`` as a writable :class:`Disk` that shares ``new``'s
    lock (a ``dup`` of its descriptor), named by its final path; ``parent``: a differencing
    disk's parent, as the caller named it."""
    from .image import open_locked

    disk = open_locked(os.dup(new.fd), new.path, parent=parent)
    disk.path = new.final
    return disk


def write_layout(
    fd: int,
    path: str,
    footer: Footer,
    block_size: int,
    parent: tuple[bytes, int, str] | None,
) -> None:
    """Write an empty image's metadata into the new, empty file ``fd`` (to be named ``path``;
    ``parent`` is the parent's unique id, timestamp and path)."""
    size = footer.current_size
    if footer.type == DiskType.FIXED:
        os.ftruncate(fd, size + FOOTER_SIZE)
        write_all(fd, footer.build(), size)
        return
    entries = -(-size // block_size)
    bat_bytes = -(-entries * 4 // 512) * 512
    end = TABLE_OFFSET + bat_bytes
    locators: list[ParentLocator] = []
    payloads: list[tuple[int, bytes]] = []
    parent_name = ""
    parent_ts = 0
    parent_uid = bytes(16)
    if parent is not None:
        parent_uid, parent_ts, parent_path = parent
        parent_name = os.path.basename(parent_path)
        child_dir = os.path.dirname(os.path.abspath(path))
        texts = (
            (CODE_W2KU, absolute_windows_path(parent_path)),
            (CODE_W2RU, relative_windows_path(parent_path, child_dir)),
            (CODE_MACX, posix_to_macx(parent_path)),
        )
        for code, text in texts:
            data = encode_payload(code, text)
            space = max(512, -(-len(data) // 512) * 512)
            locators.append(
                ParentLocator(code=code, data_space=space, data_len=len(data), data_offset=end)
            )
            payloads.append((end, data))
            end += space
    header = new_header(
        table_offset=TABLE_OFFSET,
        max_table_entries=entries,
        block_size=block_size,
        parent_unique_id=parent_uid,
        parent_timestamp=parent_ts,
        parent_name=parent_name,
        locators=tuple(locators),
    )
    raw_footer = footer.build()
    os.ftruncate(fd, end + FOOTER_SIZE)
    write_all(fd, raw_footer, 0)
    write_all(fd, header.build(), FOOTER_SIZE)
    write_all(fd, UNUSED.to_bytes(4, "big") * (bat_bytes // 4), TABLE_OFFSET)
    for at, data in payloads:
        write_all(fd, data, at)
    write_all(fd, raw_footer, end)
    assert HEADER_SIZE + FOOTER_SIZE <= TABLE_OFFSET


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size <= 0:
        raise InvalidArgumentError(f"invalid size {size!r}")
    if size % 512:
        raise InvalidArgumentError(f"the size {size} is not a multiple of 512 bytes")
    if size > MAX_SIZE:
        raise InvalidArgumentError(
            f"{size} bytes is larger than the VHD maximum of 2040 GiB ({MAX_SIZE} bytes)"
        )
