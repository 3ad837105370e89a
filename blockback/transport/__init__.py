"""Transports: how a backend reaches guest memory and event channels (simulated or real Xen)."""

from __future__ import annotations

from collections.abc import Iterable


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
