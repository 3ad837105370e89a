"""Creating VHDX files (MS-VHDX 1.0, 2.1 layout), laid out as Hyper-V does: file identifier,
two headers, two region tables in the first 1 MiB; a 1 MiB log at 1 MiB; the metadata region
(1 MiB) at 2 MiB; the BAT after it, 1 MiB-aligned; payload blocks after that.

Fixed disks have LeaveBlocksAllocated set and every block FULLY_PRESENT; dynamic disks start
with every block NOT_PRESENT; differencing disks set HasParent and carry a parent locator whose
parent_linkage is the parent's DataWriteGuid (a VHD parent: its unique id).
"""

from __future__ import annotations

import os

from ..disk import Disk
from ..errors import InvalidArgumentError
from ..fileio import write_all
from ..guid import Guid
from ..newfile import NewFile, naming
from . import records as r
from .disk import VHDXDisk, bat_entries, chunk_ratio, open_vhdx_locked, parent_identity

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (vhd.record)
if TYPE_CHECKING:
    from ..guid import AnyGuid

MiB = r.MiB
DEFAULT_BLOCK_SIZE = 32 * MiB
LOG_SIZE = 1 * MiB
CREATOR = "vhdkit"


def create_vhdx(
    path: str | os.PathLike[str] | NewFile,
    size: int,
    *,
    type: str = "dynamic",
    block_size: int = DEFAULT_BLOCK_SIZE,
    logical_sector_size: int = 512,
    physical_sector_size: int = 4096,
    parent: Disk | None = None,
    overwrite: bool = False,
) -> VHDXDisk:
    """Create a VHDX and return it open read-write.  ``type`` is fixed, dynamic or differencing
    (then ``parent`` is an open :class:`Disk`; its size is the child's unless ``size`` is
    larger).  Written under a temporary name and renamed when complete (:mod:`vhd.newfile`).
    ``path`` may instead be an unpublished :class:`~vhd.newfile.NewFile`: the layout is written
    into it and the disk returned on a copy of its locked descriptor, named by its final path;
    the caller fills it, flushes and publishes (``vhd convert``)."""
    spath = path.final if isinstance(path, NewFile) else os.fspath(path)
    if type not in ("fixed", "dynamic", "differencing"):
        raise InvalidArgumentError(f"unknown VHDX type {type!r} (fixed, dynamic, differencing)")
    if (type == "differencing") != (parent is not None):
        raise InvalidArgumentError("a differencing VHDX needs a parent, and only it takes one")
    if parent is not None:
        size = max(size, parent.size)
        lss_parent = getattr(parent, "logical_sector_size", 512)
        logical_sector_size = lss_parent
    if logical_sector_size not in (512, 4096) or physical_sector_size not in (512, 4096):
        raise InvalidArgumentError("sector sizes are 512 or 4096")
    if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
        raise InvalidArgumentError("the block size is a power of 2 from 1 MiB to 256 MiB")
    if size <= 0 or size % logical_sector_size or size > r.MAX_VIRTUAL_SIZE:
        raise InvalidArgumentError(
            f"the size must be a positive multiple of {logical_sector_size}, at most 64 TiB"
        )
    differencing = type == "differencing"
    count = bat_entries(size, block_size, logical_sector_size, differencing)
    bat_length = max(MiB, -(-count * 8 // MiB) * MiB)
    log_offset = 1 * MiB
    meta_offset = log_offset + LOG_SIZE
    bat_offset = meta_offset + MiB
    data_offset = bat_offset + bat_length

    data_write_guid = Guid.random()
    header = r.Header(
        sequence_number=1,
        file_write_guid=Guid.random(),
        data_write_guid=data_write_guid,
        log_guid=r.ZERO_GUID,
        log_version=0,
        version=1,
        log_length=LOG_SIZE,
        log_offset=log_offset,
    )
    regions = r.RegionTable(
        (
            r.Region(r.BAT_REGION, bat_offset, bat_length, True),
            r.Region(r.METADATA_REGION, meta_offset, MiB, True),
        )
    )
    flags = (r.LEAVE_BLOCKS_ALLOCATED if type == "fixed" else 0) | (
        r.HAS_PARENT if differencing else 0
    )
    items: list[tuple[AnyGuid, bytes, bool]] = [
        (
            r.FILE_PARAMETERS,
            r.FILE_PARAMETERS_STRUCT.build({"block_size": block_size, "flags": flags}),
            False,
        ),
        (r.VIRTUAL_DISK_SIZE, size.to_bytes(8, "little"), True),
        (r.LOGICAL_SECTOR_SIZE, logical_sector_size.to_bytes(4, "little"), True),
        (r.PHYSICAL_SECTOR_SIZE, physical_sector_size.to_bytes(4, "little"), True),
        (r.VIRTUAL_DISK_ID, Guid.random().bytes_le, True),
    ]
    if parent is not None:
        items.append((r.PARENT_LOCATOR, _locator(spath, parent).build(), False))
    if isinstance(path, NewFile):
        return _write_new(path, items, header, regions, meta_offset, bat_offset, bat_length,
                          data_offset, type, size, block_size, logical_sector_size, parent)  # fmt: skip
    # Written under a temporary name and renamed when complete (vhd.newfile), as VHD: an
    # interrupted create leaves nothing under the final name, and never touches what was there.
    with NewFile(spath, overwrite=overwrite) as new:
        disk = _write_new(new, items, header, regions, meta_offset, bat_offset, bat_length,
                          data_offset, type, size, block_size, logical_sector_size, parent)  # fmt: skip
        return new.publish_open(disk)


def _write_new(
    new: NewFile,
    items: list[tuple[AnyGuid, bytes, bool]],
    header: r.Header,
    regions: r.RegionTable,
    meta_offset: int,
    bat_offset: int,
    bat_length: int,
    data_offset: int,
    type: str,
    size: int,
    block_size: int,
    logical_sector_size: int,
    parent: Disk | None,
) -> VHDXDisk:
    entries: list[r.MetadataEntry] = []
    blobs = bytearray()
    at = r.METADATA_TABLE_SIZE
    for item_id, blob, virtual in items:
        entries.append(r.MetadataEntry(item_id, at + len(blobs), len(blob), False, virtual, True))
        blobs += blob
        blobs += bytes(-len(blobs) % 8)
    fd = new.fd
    with naming(new.final):
        write_all(fd, r.FileIdentifier(CREATOR).build(), 0)
        for off in r.HEADER_OFFSETS:
            write_all(fd, header.build(), off)
        for off in r.REGION_TABLE_OFFSETS:
            write_all(fd, regions.build(), off)
        write_all(fd, r.build_metadata_table(entries) + bytes(blobs), meta_offset)
        end = data_offset
        if type == "fixed":
            bat = bytearray(bat_length)
            ratio = chunk_ratio(block_size, logical_sector_size)
            blocks = -(-size // block_size)
            for b in range(blocks):
                value = (data_offset + b * block_size) | r.PayloadState.FULLY_PRESENT
                i = b + b // ratio
                bat[8 * i : 8 * i + 8] = value.to_bytes(8, "little")
            write_all(fd, bat, bat_offset)
            end = data_offset + blocks * block_size
        os.ftruncate(fd, end)
    # The disk shares new's lock (a dup of its descriptor) and goes by the final name.
    return open_vhdx_locked(
        os.dup(fd), new.final, parent=parent, unpublished=None if new.in_place else new
    )


def _locator(child: str, parent: Disk) -> r.ParentLocator:
    """The parent locator of a new child (:func:`vhd.vhdx.ops.locator_for`, as set-parent
    writes it), naming ``parent`` by its identity."""
    ident = parent_identity(parent)
    if ident is None:
        raise InvalidArgumentError("the parent has no identity a child can record")
    # (imported here: only a differencing disk has a locator, and vhd.vhdx.ops, the maintenance
    # operations, would cost every VHDX command its import)
    from .ops import locator_for

    return locator_for(child, parent.path, Guid.parse(ident))
