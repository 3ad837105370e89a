"""The Linux ABI of ``/dev/xen/gntdev`` and ``/dev/xen/evtchn`` (docs/blkif.md §4): ioctl numbers
and argument structures, and the byte image of a grant-copy segment.

Layouts and ioctl numbers come from Linux's uapi headers as shipped in Debian's ``libxen-dev``
(``/usr/include/xen/sys/gntdev.h``, ``/usr/include/xen/sys/evtchn.h``; grant-copy flags from
``xen/grant_table.h``). Every ioctl is ``_IOC(_IOC_NONE, type, nr, sizeof(struct))``;
``tests/blockback/test_xen_layout.py`` compiles ``xen_layout.c`` against those headers and checks
every number, size and offset below, and the byte image of a grant-copy segment.  Only the ioctls
the devices (:mod:`blockback.transport.xen_devices`) issue are here.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PAGE_SIZE = 4096

# ``fcntl.ioctl(fd, request, arg, mutate_flag)``.  Every argument that is a structure goes as the
# ctypes object itself (a writable buffer) with mutate_flag=True, never as ``addressof(obj)``:
# CPython converts an integer argument to a C ``int``, so a real heap address (above 2**31 on
# x86_64) raises OverflowError before the kernel is reached.  With a buffer, CPython hands the
# kernel a real pointer and copies what the kernel wrote (index, port, status) back into it.
IoctlFn = Callable[[int, int, Any, bool], Any]
# One grant-copy segment with a raw local address: (domid, gref, offset, address, length, to_guest).
RawCopy = tuple[int, int, int, int, int, bool]

# --- ioctl numbers (asm-generic/ioctl.h) -----------------------------------------------------------

_IOC_NONE = 0
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (ord(kind) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


# --- gntdev.h structures -------------------------------------------------------------------------


class GntdevGrantRef(ctypes.Structure):
    _fields_ = (("domid", ctypes.c_uint32), ("ref", ctypes.c_uint32))


class GntdevMapGrantRef(ctypes.Structure):
    """``struct ioctl_gntdev_map_grant_ref`` with ``refs[1]``: the ioctl size; real calls append
    ``count - 1`` more refs (the kernel reads ``count`` entries)."""

    _fields_ = (
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("index", ctypes.c_uint64),
        ("refs", GntdevGrantRef * 1),
    )


class GntdevUnmapGrantRef(ctypes.Structure):
    _fields_ = (("index", ctypes.c_uint64), ("count", ctypes.c_uint32), ("pad", ctypes.c_uint32))


class GntdevSetMaxGrants(ctypes.Structure):
    _fields_ = (("count", ctypes.c_uint32),)


class GntCopyForeign(ctypes.Structure):
    _fields_ = (("ref", ctypes.c_uint32), ("offset", ctypes.c_uint16), ("domid", ctypes.c_uint16))


class GntCopyPtr(ctypes.Union):
    _fields_ = (("virt", ctypes.c_void_p), ("foreign", GntCopyForeign))


class GntdevGrantCopySegment(ctypes.Structure):
    _fields_ = (
        ("source", GntCopyPtr),
        ("dest", GntCopyPtr),
        ("len", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    )


class GntdevGrantCopy(ctypes.Structure):
    _fields_ = (("count", ctypes.c_uint), ("segments", ctypes.c_void_p))


IOCTL_GNTDEV_MAP_GRANT_REF = _ioc(_IOC_NONE, "G", 0, ctypes.sizeof(GntdevMapGrantRef))
IOCTL_GNTDEV_UNMAP_GRANT_REF = _ioc(_IOC_NONE, "G", 1, ctypes.sizeof(GntdevUnmapGrantRef))
IOCTL_GNTDEV_SET_MAX_GRANTS = _ioc(_IOC_NONE, "G", 3, ctypes.sizeof(GntdevSetMaxGrants))
IOCTL_GNTDEV_GRANT_COPY = _ioc(_IOC_NONE, "G", 8, ctypes.sizeof(GntdevGrantCopy))

GNTCOPY_SOURCE_GREF = 1 << 0  # xen/grant_table.h
GNTCOPY_DEST_GREF = 1 << 1
GNTST_OKAY = 0

# --- evtchn.h structures -------------------------------------------------------------------------


class EvtchnBindInterdomain(ctypes.Structure):
    _fields_ = (("remote_domain", ctypes.c_uint), ("remote_port", ctypes.c_uint))


class EvtchnBindUnboundPort(ctypes.Structure):
    _fields_ = (("remote_domain", ctypes.c_uint),)


class EvtchnUnbind(ctypes.Structure):
    _fields_ = (("port", ctypes.c_uint),)


class EvtchnNotify(ctypes.Structure):
    _fields_ = (("port", ctypes.c_uint),)


class EvtchnRestrictDomid(ctypes.Structure):
    _fields_ = (("domid", ctypes.c_uint16),)


IOCTL_EVTCHN_BIND_INTERDOMAIN = _ioc(_IOC_NONE, "E", 1, ctypes.sizeof(EvtchnBindInterdomain))
IOCTL_EVTCHN_BIND_UNBOUND_PORT = _ioc(_IOC_NONE, "E", 2, ctypes.sizeof(EvtchnBindUnboundPort))
IOCTL_EVTCHN_UNBIND = _ioc(_IOC_NONE, "E", 3, ctypes.sizeof(EvtchnUnbind))
IOCTL_EVTCHN_NOTIFY = _ioc(_IOC_NONE, "E", 4, ctypes.sizeof(EvtchnNotify))
IOCTL_EVTCHN_RESET = _ioc(_IOC_NONE, "E", 5, 0)
IOCTL_EVTCHN_RESTRICT_DOMID = _ioc(_IOC_NONE, "E", 6, ctypes.sizeof(EvtchnRestrictDomid))


@dataclass
class CopyOp:
    """One grant-copy segment: ``buffer`` (local) <-> ``(domid, gref, offset)`` (foreign).

    ``to_guest`` copies the local buffer into the guest's page; otherwise the guest's bytes land
    in ``buffer`` (which must then be writable). ``offset + len(buffer)`` must not pass 4096.
    """

    domid: int
    gref: int
    offset: int
    buffer: Any
    to_guest: bool = False


# struct gntdev_grant_copy_segment (24 bytes): source @0 and dest @8 (a pointer, or {u32 ref,
# u16 offset, u16 domid}), len u16 @16, flags u16 @18, status i16 @20, 2 bytes of padding.
SEGMENT_TO_GUEST = struct.Struct("=QIHHHHh2x")
SEGMENT_FROM_GUEST = struct.Struct("=IHHQHHh2x")
STATUS = struct.Struct("=h22x")  # one status per segment, read from offset 20
STATUS_AT = 20
STATUS_PAD = 20


def check_frame(offset: int, length: int) -> None:
    # The hypervisor refuses a foreign side crossing its 4 KiB frame; say so before the ioctl.
    if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
        raise ValueError(f"copy of {length} bytes at {offset} crosses a 4 KiB frame")


def encode_copy_segment(op: CopyOp, address: int) -> bytes:
    """The byte image of one segment for a local buffer at ``address`` (layout tests use it)."""
    seg = GntdevGrantCopySegment()
    foreign = GntCopyForeign(op.gref, op.offset, op.domid)
    if op.to_guest:
        seg.source.virt = address
        seg.dest.foreign = foreign
        seg.flags = GNTCOPY_DEST_GREF
    else:
        seg.source.foreign = foreign
        seg.dest.virt = address
        seg.flags = GNTCOPY_SOURCE_GREF
    seg.len = memoryview(op.buffer).nbytes
    return bytes(seg)
