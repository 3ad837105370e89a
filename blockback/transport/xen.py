"""The real Xen transport for dom0 (docs/blkif.md §3-4): the :class:`blockback.transport.Transport`
protocol over ``/dev/xen/gntdev`` and ``/dev/xen/evtchn`` (:mod:`~blockback.transport.xen_devices`;
the ioctl ABI is :mod:`~blockback.transport.xen_abi`).

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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
from collections.abc import Sequence
from typing import Any

from blockback.errors import GrantError
from blockback.ring import ViewRingMemory
from blockback.transport import coalesced_views
from blockback.transport.bounce import DEFAULT_POOL_BYTES, Bounce, BouncePool
from blockback.transport.xen_abi import GNTST_OKAY, PAGE_SIZE, CopyOp, IoctlFn, RawCopy
from blockback.transport.xen_devices import EVTCHN_PATH, GNTDEV_PATH, EvtchnDev, GntDev, GrantMap

log = logging.getLogger("blockback.xen")


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
        bounce: Bounce,
        segments: Sequence[tuple[int, int, int]],
        length: int,
        to_guest: bool,
    ) -> None:
        self._mapper = mapper
        self._bounce: Bounce | None = bounce
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
