"""Transports: how a backend reaches guest memory and event channels (simulated or real Xen).

The protocols here are what the blkif data path (:mod:`blockback.backend`, docs/blkif.md §3)
needs from the hypervisor layer: grant references mapped or copied (§1, grant tables), event
channels, and the shared ring pages.  :mod:`blockback.transport.sim` implements them over files
and a socket, :mod:`blockback.transport.xen` over Linux's gntdev and evtchn devices.  A new
transport implements :class:`Transport` and nothing else has to change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from blockback.ring import RingMemory


class Mapping(Protocol):
    """Guest buffers mapped for one request."""

    buffers: list[memoryview]

    def release(self) -> None: ...


class GrantMapper(Protocol):
    """Access to one frontend's granted pages."""

    # True for a transport that moves data by grant copy: the ring then calls
    # :meth:`finish_mappings` once per batch of finished requests, before writing their
    # responses.  A transport that maps the pages needs nothing done before ``release()``.
    copies_data: bool

    def map_segments(self, segments: Sequence[tuple[int, int, int]], writable: bool) -> Mapping:
        """Map ``(gref, offset, length)`` segments all or nothing; raise OSError on a bad grant."""
        ...

    def copy_pages(self, grefs: Sequence[int]) -> list[bytes]:
        """Private copies of whole granted pages (indirect descriptors); OSError on a bad grant."""
        ...

    def finish_mappings(self, items: Sequence[tuple[Mapping, bool]]) -> list[bool]:
        """Copy the read data of each ``(mapping, ok)`` out to the guest where ``ok``; one
        answer a mapping, False where the copy failed (the request is then answered ERROR).
        Only called when :attr:`copies_data`."""
        ...


class EventChannel(Protocol):
    # True once the other end is known to be gone: the ring stops polling the channel (a dead
    # peer's descriptor would poll readable for ever).
    peer_closed: bool

    def fileno(self) -> int: ...
    def notify(self) -> None: ...
    def ack(self) -> int: ...
    def close(self) -> None: ...


class Transport(Protocol):
    """What a connected device needs from the hypervisor layer (simulated or real)."""

    def map_ring(self, domid: int, refs: Sequence[int]) -> RingMemory: ...
    def unmap_ring(self, memory: RingMemory) -> None: ...
    def grant_mapper(self, domid: int) -> GrantMapper: ...
    def bind_interdomain(self, domid: int, port: int) -> EventChannel: ...
    def close(self) -> None: ...


def coalesced_views(view: memoryview, spans: Iterable[tuple[int, int]]) -> list[memoryview]:
    """Views of ``view`` for ``(offset, length)`` spans, merging each span that starts where the
    previous one ended (a segment ending a page and the next starting the following page), so
    one contiguous guest range costs one read or write."""
    buffers: list[memoryview] = []
    start = end = -1
    for base, length in spans:
        if base == end:
            end += length
            continue
        if start >= 0:
            buffers.append(view[start:end])
        start, end = base, base + length
    if start >= 0:
        buffers.append(view[start:end])
    return buffers
