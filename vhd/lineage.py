"""Who is whose parent, whatever the format: the per-format seam of the chain operations
(``vhd commit``, ``vhd set-parent``, finding children).

A child names its parent by an identity (spec: VHD "Dynamic Disk Header Format", Parent Unique
ID; MS-VHDX 2.6.2.6.3, parent_linkage):

* a VHD parent's identity is its footer's unique id, which never changes;
* a VHDX parent's identity is its header's DataWriteGuid, which changes whenever its data
  changes (2.2.2), so writing into a parent (a commit) orphans its other children, as in
  Hyper-V.

Mixed chains (a VHDX child of a VHD parent, a VHD child of a VHDX parent) record the same
identities: a VHDX child's parent_linkage holds the VHD's unique id, a VHD child's parent unique
id holds the VHDX's DataWriteGuid (what libvhdi calls each file's identifier, and compares).
The operations below dispatch on the child's format; everything else in the chain operations
goes through the :class:`~vhd.disk.Disk` API.
"""

from __future__ import annotations

from .chain import ParentPolicy, footer_identity
from .disk import Disk
from .footer import uuid_text

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    import uuid
    from typing import TypeGuard

    from .guid import AnyGuid
    from .vhdx import VHDXDisk


def _is_vhdx(disk: Disk) -> TypeGuard[VHDXDisk]:
    # By the class attribute, not isinstance: importing vhd.vhdx for the
    # check would cost every VHD command its start-up (tests/tools/test_cli.py).
    return getattr(disk, "format", "vhd") == "vhdx"


def identity(disk: Disk) -> AnyGuid:
    """What a child of ``disk`` records to name it."""
    import uuid

    if _is_vhdx(disk):
        return disk.current_header.data_write_guid
    return uuid.UUID(bytes=disk.footer.unique_id)


def identity_text(disk: Disk) -> str:
    """``str(identity(disk))``; for a VHD without the uuid module, whose import (platform behind
    it) would cost ``vhd info`` about 3 ms."""
    return str(identity(disk)) if _is_vhdx(disk) else uuid_text(disk.footer.unique_id)


def recorded_parent_texts(child: Disk) -> list[str]:
    """:func:`recorded_parents` as sorted text; for a VHD without the uuid module."""
    if _is_vhdx(child):
        return sorted(str(u) for u in recorded_parents(child))
    assert child.header is not None
    return [uuid_text(child.header.parent_unique_id)]


def identity_of_file(path: str) -> uuid.UUID | None:
    """:func:`identity` of the image at ``path`` from its headers or footer alone (None: not a
    readable VHD or VHDX regular file)."""
    import uuid

    found = footer_identity(path, devices=False)
    return None if found is None else uuid.UUID(bytes=found[1])


def recorded_parents(child: Disk) -> set[AnyGuid]:
    """The identities a differencing ``child`` names its parent by."""
    if _is_vhdx(child):
        from .vhdx.ops import linkages

        return linkages(child)
    import uuid

    assert child.header is not None
    return {uuid.UUID(bytes=child.header.parent_unique_id)}


def find_parent(child: Disk, policy: ParentPolicy | None = None) -> Disk:
    """The parent of ``child`` (opened with ``open_parent=False``, perhaps locked exclusively
    by the caller), opened read-only as :func:`vhd.open` would find it."""
    if _is_vhdx(child):
        from .vhdx.ops import find_parent as find_vhdx_parent

        return find_vhdx_parent(child, policy or ParentPolicy())
    from .children import find_parent as find_vhd_parent

    return find_vhd_parent(child, policy)


def retarget(child: Disk, parent_path: str, parent_id: AnyGuid) -> tuple[int, list[str]]:
    """Point ``child`` (open ``"r+"``) at ``parent_path`` of identity ``parent_id``; returns
    (bytes the file grew by, warnings)."""
    from .reparent import retarget as retarget_vhd

    if _is_vhdx(child):
        from .vhdx.ops import retarget as retarget_vhdx

        return 0, retarget_vhdx(child, parent_path, parent_id)
    return retarget_vhd(child, parent_path, parent_id.bytes)


def record_parent_change(child: Disk, parent_path: str) -> None:
    """The parent at ``parent_path`` changed but ``child`` reads the same through it: a VHD
    child records its new modification time, a VHDX child its new DataWriteGuid."""
    from .reparent import record_parent_time

    if _is_vhdx(child):
        from .vhdx.ops import record_parent_identity

        record_parent_identity(child, parent_path)
    else:
        record_parent_time(child, parent_path)


def prepare_commit(child: Disk, parent: Disk, child_children: list[Disk]) -> None:
    """Before a commit first writes into ``parent`` (open ``"r+"``): a VHDX parent's
    DataWriteGuid is about to change (2.2.2), so the new one is chosen now and the child
    learns it first.  A VHDX child accepts both (parent_linkage2), so an interrupted commit
    leaves a chain that opens.  A VHD child holds one id: the parent's new identity is made
    durable first, then the child's record, leaving a window of two syncs in which a crash
    leaves the child naming the parent's old identity over unchanged data (``vhd set-parent
    CHILD PARENT --force`` mends that).  The child's own children record its new time."""
    from .metadata import MetadataWriter

    if not _is_vhdx(parent) or parent._session:
        return
    import uuid

    from .vhdx.ops import accept_next_identity, data_session

    upcoming = uuid.uuid4()
    if _is_vhdx(child):
        accept_next_identity(child, identity(parent), upcoming)
        data_session(parent, upcoming)
    else:
        data_session(parent, upcoming)
        assert child.header is not None
        MetadataWriter(child).write_header(child.header.replace(parent_unique_id=upcoming.bytes))
    for grandchild in child_children:
        record_parent_change(grandchild, child.path)
