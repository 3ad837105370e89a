"""The real Xen transport for dom0: ``/dev/xen/gntdev`` and ``/dev/xen/evtchn`` (docs/blkif.md §4).

Layouts and ioctl numbers come from Linux's uapi headers as shipped in Debian's ``libxen-dev``
(``/usr/include/xen/sys/gntdev.h``, ``/usr/include/xen/sys/evtchn.h``; grant-copy flags from
``xen/grant_table.h``). Every ioctl is ``_IOC(_IOC_NONE, type, nr, sizeof(struct))``;
``tests/blockback/test_xen_layout.py`` compiles ``xen_layout.c`` against those headers and checks
every number, size and offset below, and the byte image of a grant-copy segment.
Every structure goes to ``fcntl.ioctl`` as a mutable buffer (the ctypes object, mutate_flag set),
never as an integer address: see ``IoctlFn``.

Interface (two layers)
----------------------

Low level, one object per open device, everything explicit:

* :class:`GntDev` -- ``map_grant_refs(domid, refs) -> index``; ``mmap(index, count, writable)``;
  ``unmap_grant_ref(index, count)``; ``map(domid, refs, writable) -> GrantMap`` (the three in one,
  all or nothing: a bad grant fails the ``mmap``, everything is undone, :class:`GrantError`);
  ``set_max_grants(n)``; ``grant_copy(ops) -> list[status]`` (one batched
  ``IOCTL_GNTDEV_GRANT_COPY``; each :class:`CopyOp` moves ``len(buffer)`` bytes between a local
  buffer and ``(domid, gref, offset)``, never across a 4 KiB frame); ``copy_raw(entries)`` (the
  same with raw local addresses, for the bounce pool's pinned pages).
* :class:`EvtchnDev` -- ``bind_interdomain(domid, remote_port) -> local port``;
  ``bind_unbound_port(domid)``; ``unbind(port)``; ``notify(port)``; ``pending(max) -> ports``
  (``read()``: each delivered port is masked); ``unmask(ports)`` (``write()``: re-enable, late EOI,
  XSA-332); ``reset()``; ``restrict_domid(domid)``; ``fileno()`` for ``select``/``poll``.

High level, the ``blockback.backend.Transport`` protocol (the same shape as ``transport/sim.py``):

* :class:`XenTransport` -- ``map_ring(domid, refs) -> RingMemory`` (one gntdev mapping of all
  ring pages, read-write), ``unmap_ring(memory)``, ``grant_mapper(domid) -> XenGrantMapper``,
  ``bind_interdomain(domid, port) -> XenEventChannel``.
* :class:`XenGrantMapper` -- ``map_segments([(gref, offset, length)], writable) -> mapping``;
  ``finish_mappings([(mapping, ok)]) -> [delivered]``; ``copy_pages(grefs) -> [bytes]`` by grant
  copy (indirect descriptor pages: a private copy, read once, XSA-155).  Two data paths
  (``XenTransport(data_path=...)``):

  - ``"copy"`` (default; what current QEMU and tapdisk do, docs/blkif.md §3-4): the mapping's one
    ``buffer`` is a pooled, page-aligned local bounce buffer (:class:`BouncePool`, per
    connection, bounded).  A blkif WRITE's guest data is grant-copied into it at map time (one
    batched ioctl per request), so the disk write reads private memory; a blkif READ is copied
    out by ``finish_mappings``, which the ring calls once per batch of finished requests before
    writing their responses (one ioctl per wake-up).  Every segment's status is checked: any
    failure makes the request's response ERROR.  No map/unmap hypercalls, no TLB shootdowns.
  - ``"map"``: the guest pages are mapped (gntdev map + mmap) and ``buffers`` are memoryviews
    into them; ``release()`` unmaps before the response.
* :class:`XenEventChannel` -- its own ``/dev/xen/evtchn`` handle, so one ring has one fd:
  ``fileno()``, ``notify()``, ``ack() -> n`` (drain pending, bounded, then unmask), ``close()``.

Nothing here can run without a hypervisor; the classes take the device paths and an ``ioctl``
function so tests can drive them with fakes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from blockback.ring import ViewRingMemory
from blockback.transport import coalesced_views

log = logging.getLogger("blockback.xen")
PAGE_SIZE = 4096
GNTDEV_PATH = "/dev/xen/gntdev"
EVTCHN_PATH = "/dev/xen/evtchn"

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


class GntdevGetOffsetForVaddr(ctypes.Structure):
    _fields_ = (
        ("vaddr", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class GntdevSetMaxGrants(ctypes.Structure):
    _fields_ = (("count", ctypes.c_uint32),)


class GntdevUnmapNotify(ctypes.Structure):
    _fields_ = (
        ("index", ctypes.c_uint64),
        ("action", ctypes.c_uint32),
        ("event_channel_port", ctypes.c_uint32),
    )


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
IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR = _ioc(_IOC_NONE, "G", 2, ctypes.sizeof(GntdevGetOffsetForVaddr))
IOCTL_GNTDEV_SET_MAX_GRANTS = _ioc(_IOC_NONE, "G", 3, ctypes.sizeof(GntdevSetMaxGrants))
IOCTL_GNTDEV_SET_UNMAP_NOTIFY = _ioc(_IOC_NONE, "G", 7, ctypes.sizeof(GntdevUnmapNotify))
IOCTL_GNTDEV_GRANT_COPY = _ioc(_IOC_NONE, "G", 8, ctypes.sizeof(GntdevGrantCopy))

UNMAP_NOTIFY_CLEAR_BYTE = 0x1
UNMAP_NOTIFY_SEND_EVENT = 0x2
GNTCOPY_SOURCE_GREF = 1 << 0  # xen/grant_table.h
GNTCOPY_DEST_GREF = 1 << 1
GNTST_OKAY = 0

# --- evtchn.h structures -------------------------------------------------------------------------


class EvtchnBindVirq(ctypes.Structure):
    _fields_ = (("virq", ctypes.c_uint),)


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


IOCTL_EVTCHN_BIND_VIRQ = _ioc(_IOC_NONE, "E", 0, ctypes.sizeof(EvtchnBindVirq))
IOCTL_EVTCHN_BIND_INTERDOMAIN = _ioc(_IOC_NONE, "E", 1, ctypes.sizeof(EvtchnBindInterdomain))
IOCTL_EVTCHN_BIND_UNBOUND_PORT = _ioc(_IOC_NONE, "E", 2, ctypes.sizeof(EvtchnBindUnboundPort))
IOCTL_EVTCHN_UNBIND = _ioc(_IOC_NONE, "E", 3, ctypes.sizeof(EvtchnUnbind))
IOCTL_EVTCHN_NOTIFY = _ioc(_IOC_NONE, "E", 4, ctypes.sizeof(EvtchnNotify))
IOCTL_EVTCHN_RESET = _ioc(_IOC_NONE, "E", 5, 0)
IOCTL_EVTCHN_RESTRICT_DOMID = _ioc(_IOC_NONE, "E", 6, ctypes.sizeof(EvtchnRestrictDomid))

_PORT = struct.Struct("=I")


class GrantError(OSError):
    """A grant could not be mapped or copied (bad, revoked or read-only reference)."""

    def __init__(self, message: str, code: int = errno.EFAULT) -> None:
        super().__init__(code, message)


def _buffer_address(buf: Any) -> tuple[int, Any]:
    """The address of a buffer's first byte, and an object keeping it alive (no copy)."""
    if isinstance(buf, bytes):
        keep: Any = ctypes.c_char_p(buf)
        return ctypes.cast(keep, ctypes.c_void_p).value or 0, keep
    view = memoryview(buf)
    if view.readonly:
        raise TypeError("grant copy needs a writable local buffer (or bytes as a source)")
    keep = (ctypes.c_char * view.nbytes).from_buffer(view)
    return ctypes.addressof(keep), keep


# --- /dev/xen/gntdev -----------------------------------------------------------------------------


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


class GrantMap:
    """Guest pages mapped into our address space (one gntdev mapping). ``close()`` unmaps."""

    def __init__(self, dev: GntDev, index: int, count: int, mm: mmap.mmap) -> None:
        self.dev = dev
        self.index = index
        self.count = count
        self.mmap = mm
        self.view = memoryview(mm)
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.view.release()
        try:
            self.mmap.close()
        except BufferError:
            # Someone still holds a slice of the pages: the munmap happens when it is collected.
            # Never raise here (a release runs on the response path); leave the reservation to
            # the fd's close rather than unmapping pages that are still in use.
            log.error("gntdev mapping %#x still referenced; unmapped later", self.index)
            return
        with contextlib.suppress(OSError):
            self.dev.unmap_grant_ref(self.index, self.count)


class GntDev:
    """``/dev/xen/gntdev``: map guest grants, and copy to and from them."""

    def __init__(
        self,
        path: str = GNTDEV_PATH,
        *,
        ioctl: IoctlFn = fcntl.ioctl,
        max_grants: int | None = None,
    ) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise GrantError(
                f"{path} not found: not a Xen dom0 (or the xen_gntdev module is not loaded)",
                errno.ENODEV,
            ) from exc
        self.path = path
        self._ioctl = ioctl
        if max_grants is not None:
            try:
                self.set_max_grants(max_grants)
            except BaseException:
                self.close()  # no fd leaks out of a failed constructor
                raise

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_max_grants(self, count: int) -> None:
        arg = GntdevSetMaxGrants(count)
        self._ioctl(self.fd, IOCTL_GNTDEV_SET_MAX_GRANTS, arg, True)

    def map_grant_refs(self, domid: int, refs: Sequence[int]) -> int:
        """Reserve a mapping of ``refs`` of ``domid``; returns the mmap offset (``index``)."""
        if not refs:
            raise ValueError("no grant references to map")
        count = len(refs)
        buf = ctypes.create_string_buffer(16 + 8 * count)
        struct.pack_into("=II", buf, 0, count, 0)
        for i, ref in enumerate(refs):
            struct.pack_into("=II", buf, 16 + 8 * i, domid, ref)
        try:
            self._ioctl(self.fd, IOCTL_GNTDEV_MAP_GRANT_REF, buf, True)
        except OSError as exc:
            raise GrantError(
                f"IOCTL_GNTDEV_MAP_GRANT_REF of {count} refs: {exc}", exc.errno or 0
            ) from exc
        index: int = struct.unpack_from("=Q", buf, 8)[0]
        return index

    def unmap_grant_ref(self, index: int, count: int) -> None:
        arg = GntdevUnmapGrantRef(index, count, 0)
        self._ioctl(self.fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, arg, True)

    def mmap(self, index: int, count: int, writable: bool) -> mmap.mmap:
        """Map the pages (PROT_READ alone makes gntdev map the grants read-only)."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(self.fd, count * PAGE_SIZE, flags=mmap.MAP_SHARED, prot=prot, offset=index)

    def map(self, domid: int, refs: Sequence[int], writable: bool) -> GrantMap:
        """All or nothing: the mmap performs the grant map hypercall and fails on a bad ref."""
        index = self.map_grant_refs(domid, refs)
        try:
            mm = self.mmap(index, len(refs), writable)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.unmap_grant_ref(index, len(refs))
            raise GrantError(f"cannot map grants {list(refs)} of domain {domid}: {exc}") from exc
        return GrantMap(self, index, len(refs), mm)

    def map_ring(self, domid: int, refs: Sequence[int], writable: bool = True) -> GrantMap:
        """The shared ring pages, contiguous in one mapping."""
        return self.map(domid, refs, writable)

    def grant_copy(self, ops: Sequence[CopyOp]) -> list[int]:
        """One batched IOCTL_GNTDEV_GRANT_COPY; returns each segment's status (0 = GNTST_okay)."""
        if not ops:
            return []
        entries: list[RawCopy] = []
        keep: list[Any] = []
        try:
            for op in ops:
                length = memoryview(op.buffer).nbytes
                _check_frame(op.offset, length)
                address, holder = _buffer_address(op.buffer)
                keep.append(holder)
                entries.append((op.domid, op.gref, op.offset, address, length, op.to_guest))
            return self.copy_raw(entries)
        finally:
            del keep

    def copy_raw(self, entries: Sequence[RawCopy]) -> list[int]:
        """One batched IOCTL_GNTDEV_GRANT_COPY of ``(domid, gref, offset, address, length,
        to_guest)`` entries whose local side is a raw address the caller keeps valid (the bounce
        pool's pages); returns each segment's status."""
        if not entries:
            return []
        # Packed with two precompiled structs rather than ctypes field by field (3x cheaper per
        # segment); the byte image is the one encode_copy_segment gives (tests compare them).
        buf = bytearray(_SEGMENT_TO_GUEST.size * len(entries))
        pos = 0
        for domid, gref, offset, address, length, to_guest in entries:
            _check_frame(offset, length)
            if to_guest:
                _SEGMENT_TO_GUEST.pack_into(
                    buf, pos, address, gref, offset, domid, length, GNTCOPY_DEST_GREF, 0
                )
            else:
                _SEGMENT_FROM_GUEST.pack_into(
                    buf, pos, gref, offset, domid, address, length, GNTCOPY_SOURCE_GREF, 0
                )
            pos += _SEGMENT_TO_GUEST.size
        segments = (ctypes.c_char * len(buf)).from_buffer(buf)
        arg = GntdevGrantCopy(len(entries), ctypes.addressof(segments))
        try:
            self._ioctl(self.fd, IOCTL_GNTDEV_GRANT_COPY, arg, True)
        except OSError as exc:
            raise GrantError(f"IOCTL_GNTDEV_GRANT_COPY: {exc}", exc.errno or 0) from exc
        finally:
            del segments
        return [s for (s,) in _STATUS.iter_unpack(buf[_STATUS_AT:] + bytes(_STATUS_PAD))]


# struct gntdev_grant_copy_segment (24 bytes): source @0 and dest @8 (a pointer, or {u32 ref,
# u16 offset, u16 domid}), len u16 @16, flags u16 @18, status i16 @20, 2 bytes of padding.
_SEGMENT_TO_GUEST = struct.Struct("=QIHHHHh2x")
_SEGMENT_FROM_GUEST = struct.Struct("=IHHQHHh2x")
_STATUS = struct.Struct("=h22x")  # one status per segment, read from offset 20
_STATUS_AT = 20
_STATUS_PAD = 20


def _check_frame(offset: int, length: int) -> None:
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


# --- /dev/xen/evtchn -----------------------------------------------------------------------------


class EvtchnDev:
    """One ``/dev/xen/evtchn`` handle (all the ports bound through it share its fd)."""

    def __init__(self, path: str = EVTCHN_PATH, *, ioctl: IoctlFn = fcntl.ioctl) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise OSError(
                errno.ENODEV, f"{path} not found: not a Xen dom0 (xen_evtchn not loaded?)"
            ) from exc
        self._ioctl = ioctl

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        arg = EvtchnBindInterdomain(domid, remote_port)
        port: int = self._ioctl(self.fd, IOCTL_EVTCHN_BIND_INTERDOMAIN, arg, True)
        return port

    def bind_unbound_port(self, domid: int) -> int:
        arg = EvtchnBindUnboundPort(domid)
        port: int = self._ioctl(self.fd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, arg, True)
        return port

    def unbind(self, port: int) -> None:
        arg = EvtchnUnbind(port)
        self._ioctl(self.fd, IOCTL_EVTCHN_UNBIND, arg, True)

    def notify(self, port: int) -> None:
        arg = EvtchnNotify(port)
        self._ioctl(self.fd, IOCTL_EVTCHN_NOTIFY, arg, True)

    def reset(self) -> None:
        self._ioctl(self.fd, IOCTL_EVTCHN_RESET, 0, False)  # no argument

    def restrict_domid(self, domid: int) -> None:
        arg = EvtchnRestrictDomid(domid)
        self._ioctl(self.fd, IOCTL_EVTCHN_RESTRICT_DOMID, arg, True)

    def pending(self, max_ports: int = 64) -> list[int]:
        """Ports that fired (each is masked until :meth:`unmask`); [] if none."""
        try:
            data = os.read(self.fd, _PORT.size * max_ports)
        except (BlockingIOError, InterruptedError):
            return []
        usable = len(data) - len(data) % _PORT.size
        return [p for (p,) in _PORT.iter_unpack(data[:usable])]

    def unmask(self, ports: Sequence[int]) -> None:
        """Re-enable ports after handling them (the late EOI of XSA-332)."""
        if ports:
            os.write(self.fd, b"".join(_PORT.pack(p) for p in ports))


# --- the backend.Transport protocol ---------------------------------------------------------------


class XenRingMemory(ViewRingMemory):
    """A ring in a gntdev mapping (keeps the mapping so ``unmap_ring`` can release it)."""

    __slots__ = ("grant_map",)

    def __init__(self, grant_map: GrantMap) -> None:
        super().__init__(grant_map.view)
        self.grant_map = grant_map


class XenMapping:
    """The guest buffers of one request; ``release()`` unmaps them (before the response)."""

    __slots__ = ("_map", "buffers")

    def __init__(self, grant_map: GrantMap, buffers: list[memoryview]) -> None:
        self._map: GrantMap | None = grant_map
        self.buffers = buffers

    def release(self) -> None:
        if self._map is None:
            return
        for b in self.buffers:
            b.release()
        self.buffers = []
        grant_map, self._map = self._map, None
        grant_map.close()


DATA_PATHS = ("copy", "map")
# Bounce pages kept for reuse per frontend domain: 64 base requests (11 pages) or four full
# 1024-segment indirect ones.  What is in flight beyond it is allocated and dropped on return, so
# memory is bounded by the ring depth (in flight) plus this (pooled).
DEFAULT_POOL_BYTES = 16 << 20


class _Bounce:
    """One page-aligned anonymous mapping of ``pages`` pages, with its address cached (the
    ctypes view pins the mmap, so the address stays valid for the object's life)."""

    __slots__ = ("_pin", "address", "mmap", "pages")

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.mmap = mmap.mmap(-1, pages * PAGE_SIZE)
        self._pin = (ctypes.c_char * (pages * PAGE_SIZE)).from_buffer(self.mmap)
        self.address = ctypes.addressof(self._pin)


class BouncePool:
    """Reused local buffers for grant copy: free lists by power-of-two page count, at most
    ``max_bytes`` kept free.  Thread-safe (the queues of one device share it)."""

    def __init__(self, max_bytes: int = DEFAULT_POOL_BYTES) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[_Bounce]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()
        self.allocated = 0  # bounce mappings ever created (tests: reuse keeps this small)
        self.in_use = 0

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def get(self, nbytes: int) -> _Bounce:
        pages = 1 << max(0, (-(-nbytes // PAGE_SIZE) - 1).bit_length())
        with self._lock:
            self.in_use += 1
            free = self._free.get(pages)
            if free:
                self._free_bytes -= pages * PAGE_SIZE
                return free.pop()
            self.allocated += 1
        return _Bounce(pages)

    def put(self, bounce: _Bounce) -> None:
        size = bounce.pages * PAGE_SIZE
        with self._lock:
            self.in_use -= 1
            if self._free_bytes + size <= self.max_bytes:
                self._free.setdefault(bounce.pages, []).append(bounce)
                self._free_bytes += size
        # else: dropped; the mapping goes away with the object


class XenCopyMapping:
    """The data of one request in a private bounce buffer (grant copy, docs/blkif.md §3).

    ``buffers`` is one contiguous buffer of the request's length, segment after segment.  For a
    request whose data flows into the guest (blkif READ) :meth:`finish` copies it out -- only if
    the I/O succeeded, so stale pool bytes never reach a guest -- and reports whether every
    segment's copy succeeded; ``release()`` returns the buffer to the pool."""

    __slots__ = ("_bounce", "_mapper", "buffers", "finished", "segments", "to_guest")

    def __init__(
        self,
        mapper: XenGrantMapper,
        bounce: _Bounce,
        segments: Sequence[tuple[int, int, int]],
        length: int,
        to_guest: bool,
    ) -> None:
        self._mapper = mapper
        self._bounce: _Bounce | None = bounce
        self.segments = segments
        self.to_guest = to_guest
        self.finished: bool | None = None
        self.buffers = [memoryview(bounce.mmap)[:length]]

    def copies(self) -> list[RawCopy]:
        """The grant-copy entries moving this request's segments (to or from the guest)."""
        assert self._bounce is not None, "mapping already released"
        domid = self._mapper.domid
        address = self._bounce.address
        to_guest = self.to_guest
        out: list[RawCopy] = []
        for gref, offset, length in self.segments:
            out.append((domid, gref, offset, address, length, to_guest))
            address += length
        return out

    def finish(self, ok: bool) -> bool:
        """Deliver the data to the guest (if it goes there and ``ok``); False if it failed."""
        if self.finished is None:
            self._mapper.finish_mappings([(self, ok)])
        return bool(self.finished)

    def release(self) -> None:
        if self._bounce is None:
            return
        for b in self.buffers:
            b.release()
        self.buffers = []
        bounce, self._bounce = self._bounce, None
        self._mapper.pool.put(bounce)


class XenGrantMapper:
    """Grant access to one frontend domain's pages (``blockback.backend.GrantMapper``).

    ``data_path="copy"`` (the default, as QEMU and tapdisk do): request data goes through pooled
    bounce buffers moved by batched ``IOCTL_GNTDEV_GRANT_COPY`` -- no map/unmap hypercalls, no
    TLB shootdowns, immune to XSA-229.  ``data_path="map"``: the guest pages are mapped (gntdev
    map + mmap) and the disk reads and writes them in place."""

    copies_data = True  # finish_mappings copies read data out (a no-op for mapped requests)

    def __init__(
        self,
        dev: GntDev,
        domid: int,
        data_path: str = "copy",
        pool: BouncePool | None = None,
    ) -> None:
        if data_path not in DATA_PATHS:
            raise ValueError(f"data_path must be one of {DATA_PATHS}, not {data_path!r}")
        self.dev = dev
        self.domid = domid
        self.data_path = data_path
        self.pool = pool if pool is not None else BouncePool()
        self.copy_ioctls = 0
        self.copy_failures = 0

    def map_segments(
        self, segments: Sequence[tuple[int, int, int]], writable: bool
    ) -> XenMapping | XenCopyMapping:
        for _, offset, length in segments:
            if offset < 0 or length <= 0 or offset + length > PAGE_SIZE:
                raise GrantError(
                    f"segment {offset}+{length} does not fit a 4 KiB page", errno.EINVAL
                )
        if self.data_path == "map":
            return self._map_segments(segments, writable)
        return self._copy_segments(segments, writable)

    def _copy_segments(
        self, segments: Sequence[tuple[int, int, int]], writes_guest: bool
    ) -> XenCopyMapping:
        """Bounce buffer for the request; guest data (blkif WRITE) copied in now, in one ioctl,
        so the disk write reads private memory the guest cannot change underneath it."""
        total = sum(length for _, _, length in segments)
        mapping = XenCopyMapping(
            self, self.pool.get(total), tuple(segments), total, to_guest=writes_guest
        )
        if writes_guest:
            return mapping  # filled by the disk read, copied out by finish()
        try:
            self.copy_ioctls += 1
            statuses = self.dev.copy_raw(mapping.copies())
            bad = [(s, st) for s, st in zip(segments, statuses, strict=True) if st != GNTST_OKAY]
            if bad:
                self.copy_failures += 1
                (gref, _, _), status = bad[0]
                raise GrantError(
                    f"grant copy from ref {gref} of domain {self.domid}: status {status} "
                    f"({len(bad)} of {len(segments)} segments failed)"
                )
        except BaseException:
            mapping.release()
            raise
        mapping.finished = True
        return mapping

    def finish_mappings(self, items: Sequence[tuple[Any, bool]]) -> list[bool]:
        """Complete many requests with one batched grant copy: ``(mapping, ok)`` pairs, ``ok``
        meaning the disk I/O succeeded.  Returns, per pair, whether the data reached its
        destination (every segment status GNTST_okay); a request that failed, or whose copy
        failed, must be answered ERROR.  Mappings that are not copy mappings are left alone."""
        results = [True] * len(items)
        entries: list[RawCopy] = []
        owners: list[tuple[int, int, int]] = []  # (item index, first entry, entry count)
        for i, (mapping, ok) in enumerate(items):
            if not isinstance(mapping, XenCopyMapping):
                continue
            if mapping.finished is not None:
                results[i] = mapping.finished and ok
                continue
            if not ok:  # the disk read failed: nothing goes to the guest
                mapping.finished = results[i] = False
                continue
            copies = mapping.copies()
            owners.append((i, len(entries), len(copies)))
            entries.extend(copies)
        if not entries:
            return results
        self.copy_ioctls += 1
        try:
            statuses = self.dev.copy_raw(entries)
        except (OSError, ValueError) as exc:
            log.error("grant copy to domain %d: %s", self.domid, exc)
            statuses = [-1] * len(entries)
        for i, first, count in owners:
            good = all(st == GNTST_OKAY for st in statuses[first : first + count])
            if not good:
                self.copy_failures += 1
                log.warning("grant copy to domain %d failed for one request", self.domid)
            items[i][0].finished = good
            results[i] = good
        return results

    def _map_segments(self, segments: Sequence[tuple[int, int, int]], writable: bool) -> XenMapping:
        """One page per segment in one mapping; adjacent whole-page runs become one buffer."""
        grant_map = self.dev.map(self.domid, [g for g, _, _ in segments], writable)
        buffers = coalesced_views(
            grant_map.view, ((i * PAGE_SIZE + off, n) for i, (_, off, n) in enumerate(segments))
        )
        return XenMapping(grant_map, buffers)

    def copy_pages(self, grefs: Sequence[int]) -> list[bytes]:
        """Private copies of whole pages by one batched grant copy (read once: XSA-155)."""
        pages = [bytearray(PAGE_SIZE) for _ in grefs]
        ops = [CopyOp(self.domid, g, 0, page) for g, page in zip(grefs, pages, strict=True)]
        self.copy_ioctls += 1
        statuses = self.dev.grant_copy(ops)
        for gref, status in zip(grefs, statuses, strict=True):
            if status != GNTST_OKAY:
                raise GrantError(
                    f"grant copy of ref {gref} of domain {self.domid}: status {status}"
                )
        return [bytes(p) for p in pages]


class XenEventChannel:
    """One bound interdomain port on its own evtchn handle (``blockback.backend.EventChannel``)."""

    def __init__(self, dev: EvtchnDev, local_port: int, remote_port: int) -> None:
        self.dev = dev
        self.port = local_port
        self.remote_port = remote_port
        self.notifications_sent = 0
        self.peer_closed = False  # on Xen the peer's going away is seen in xenstore

    def fileno(self) -> int:
        return self.dev.fileno()

    def notify(self) -> None:
        self.notifications_sent += 1
        self.dev.notify(self.port)

    def ack(self, max_ports: int = 64) -> int:
        """Take what fired (bounded), then unmask it; returns how many deliveries there were."""
        ports = self.dev.pending(max_ports)
        if ports:
            self.dev.unmask(sorted(set(ports)))
        return len(ports)

    def close(self) -> None:
        if self.dev.fd < 0:
            return
        with contextlib.suppress(OSError):
            self.dev.unbind(self.port)
        self.dev.close()


class XenTransport:
    """The dom0 transport: rings and data by gntdev, event channels by evtchn."""

    def __init__(
        self,
        gntdev_path: str = GNTDEV_PATH,
        evtchn_path: str = EVTCHN_PATH,
        *,
        ioctl: IoctlFn = fcntl.ioctl,
        max_grants: int | None = None,
        data_path: str = "copy",
        pool_bytes: int = DEFAULT_POOL_BYTES,
    ) -> None:
        if data_path not in DATA_PATHS:
            raise ValueError(f"data_path must be one of {DATA_PATHS}, not {data_path!r}")
        self.data_path = data_path
        self.pool_bytes = pool_bytes
        self.evtchn_path = evtchn_path
        self._ioctl = ioctl
        self.gntdev = GntDev(gntdev_path, ioctl=ioctl, max_grants=max_grants)

    def map_ring(self, domid: int, refs: Sequence[int]) -> XenRingMemory:
        return XenRingMemory(self.gntdev.map_ring(domid, refs, writable=True))

    def unmap_ring(self, memory: Any) -> None:
        if isinstance(memory, XenRingMemory):
            memory.view.release()
            memory.grant_map.close()

    def grant_mapper(self, domid: int) -> XenGrantMapper:
        """One mapper (and bounce pool) per connection: the pool goes away with the device."""
        return XenGrantMapper(self.gntdev, domid, self.data_path, BouncePool(self.pool_bytes))

    def bind_interdomain(self, domid: int, port: int) -> XenEventChannel:
        dev = EvtchnDev(self.evtchn_path, ioctl=self._ioctl)
        try:
            local = dev.bind_interdomain(domid, port)
        except BaseException:
            dev.close()
            raise
        return XenEventChannel(dev, local, port)

    def close(self) -> None:
        self.gntdev.close()
