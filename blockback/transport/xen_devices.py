"""The two Xen devices a dom0 backend opens (docs/blkif.md §4), one object per open handle,
everything explicit:

* :class:`GntDev` (``/dev/xen/gntdev``) -- ``map_grant_refs(domid, refs) -> index``;
  ``mmap(index, count, writable)``; ``unmap_grant_ref(index, count)``; ``map(domid, refs,
  writable) -> GrantMap`` (the three in one, all or nothing: a bad grant fails the ``mmap``,
  everything is undone, :class:`~blockback.errors.GrantError`); ``set_max_grants(n)``;
  ``grant_copy(ops) -> list[status]`` (one batched ``IOCTL_GNTDEV_GRANT_COPY``; each
  :class:`~blockback.transport.xen_abi.CopyOp` moves ``len(buffer)`` bytes between a local buffer
  and ``(domid, gref, offset)``, never across a 4 KiB frame); ``copy_raw(entries)`` (the same
  with raw local addresses, for the bounce pool's pinned pages).
* :class:`EvtchnDev` (``/dev/xen/evtchn``) -- ``bind_interdomain(domid, remote_port) -> local
  port``; ``bind_unbound_port(domid)``; ``unbind(port)``; ``notify(port)``; ``pending(max) ->
  ports`` (``read()``: each delivered port is masked); ``unmask(ports)`` (``write()``: re-enable,
  late EOI, XSA-332); ``reset()``; ``restrict_domid(domid)``; ``fileno()`` for ``poll``.

Every structure goes to ``fcntl.ioctl`` as a mutable buffer, never as an integer address: see
:data:`~blockback.transport.xen_abi.IoctlFn`.  Nothing here can run without a hypervisor; the
classes take the device path and an ``ioctl`` function so tests can drive them with fakes.
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
from collections.abc import Sequence
from typing import Any

from blockback.errors import GrantError
from blockback.transport.xen_abi import (
    GNTCOPY_DEST_GREF,
    GNTCOPY_SOURCE_GREF,
    IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_BIND_UNBOUND_PORT,
    IOCTL_EVTCHN_NOTIFY,
    IOCTL_EVTCHN_RESET,
    IOCTL_EVTCHN_RESTRICT_DOMID,
    IOCTL_EVTCHN_UNBIND,
    IOCTL_GNTDEV_GRANT_COPY,
    IOCTL_GNTDEV_MAP_GRANT_REF,
    IOCTL_GNTDEV_SET_MAX_GRANTS,
    IOCTL_GNTDEV_UNMAP_GRANT_REF,
    PAGE_SIZE,
    SEGMENT_FROM_GUEST,
    SEGMENT_TO_GUEST,
    STATUS,
    STATUS_AT,
    STATUS_PAD,
    CopyOp,
    EvtchnBindInterdomain,
    EvtchnBindUnboundPort,
    EvtchnNotify,
    EvtchnRestrictDomid,
    EvtchnUnbind,
    GntdevGrantCopy,
    GntdevSetMaxGrants,
    GntdevUnmapGrantRef,
    IoctlFn,
    RawCopy,
    check_frame,
)

log = logging.getLogger("blockback.xen")
GNTDEV_PATH = "/dev/xen/gntdev"
EVTCHN_PATH = "/dev/xen/evtchn"
_PORT = struct.Struct("=I")


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


class _Device:
    """An open Xen device node: its descriptor, for ``poll``, and an idempotent close."""

    fd = -1

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GntDev(_Device):
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
                check_frame(op.offset, length)
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
        buf = bytearray(SEGMENT_TO_GUEST.size * len(entries))
        pos = 0
        for domid, gref, offset, address, length, to_guest in entries:
            check_frame(offset, length)
            if to_guest:
                SEGMENT_TO_GUEST.pack_into(
                    buf, pos, address, gref, offset, domid, length, GNTCOPY_DEST_GREF, 0
                )
            else:
                SEGMENT_FROM_GUEST.pack_into(
                    buf, pos, gref, offset, domid, address, length, GNTCOPY_SOURCE_GREF, 0
                )
            pos += SEGMENT_TO_GUEST.size
        segments = (ctypes.c_char * len(buf)).from_buffer(buf)
        arg = GntdevGrantCopy(len(entries), ctypes.addressof(segments))
        try:
            self._ioctl(self.fd, IOCTL_GNTDEV_GRANT_COPY, arg, True)
        except OSError as exc:
            raise GrantError(f"IOCTL_GNTDEV_GRANT_COPY: {exc}", exc.errno or 0) from exc
        finally:
            del segments
        return [s for (s,) in STATUS.iter_unpack(buf[STATUS_AT:] + bytes(STATUS_PAD))]


class EvtchnDev(_Device):
    """One ``/dev/xen/evtchn`` handle (all the ports bound through it share its fd)."""

    def __init__(self, path: str = EVTCHN_PATH, *, ioctl: IoctlFn = fcntl.ioctl) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise OSError(
                errno.ENODEV, f"{path} not found: not a Xen dom0 (xen_evtchn not loaded?)"
            ) from exc
        self._ioctl = ioctl

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
