"""A bytearray-backed stand-in for ``vhd.Disk`` (same positional I/O methods) for unit tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import vhd


@dataclass(frozen=True)
class FakeExtent:
    offset: int
    length: int
    layer: int | None


class FakeDisk:
    """Thread-safe in-memory disk; allocation is tracked per ``grain`` bytes like a VHD block."""

    def __init__(self, size: int, *, read_only: bool = False, grain: int = 64 * 1024) -> None:
        self.size = size
        self.read_only = read_only
        self.grain = grain
        self.data = bytearray(size)
        self.allocated = bytearray((size + grain - 1) // grain)
        self.flushes = 0
        self.discards: list[tuple[int, int]] = []
        self.zeroed: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []
        self.fail_next: BaseException | None = None
        self.closed = False
        self._lock = threading.Lock()

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc

    def pread(self, n: int, offset: int) -> bytes:
        with self._lock:
            self._maybe_fail()
            return bytes(self.data[offset : offset + n])

    def preadinto(self, buffer: Any, offset: int) -> int:
        view = memoryview(buffer).cast("B")
        with self._lock:
            self._maybe_fail()
            n = max(0, min(len(view), self.size - offset))
            view[:n] = self.data[offset : offset + n]
            return n

    def pwrite(self, data: Any, offset: int) -> int:
        view = memoryview(data).cast("B")
        with self._lock:
            self._maybe_fail()
            if self.read_only:
                raise vhd.ReadOnlyError("read-only")
            if offset < 0 or offset + len(view) > self.size:
                raise vhd.InvalidArgumentError("past the end")
            self.data[offset : offset + len(view)] = view
            self.writes.append((offset, len(view)))
            for g in range(offset // self.grain, (offset + len(view) - 1) // self.grain + 1):
                if len(view):
                    self.allocated[g] = 1
            return len(view)

    def flush(self) -> None:
        with self._lock:
            self._maybe_fail()
            self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        # The strictest legal TRIM: recorded, and the data left as it was (the contents of a
        # discarded range are unspecified), so a front end that needs zeros must ask for them.
        with self._lock:
            self._maybe_fail()
            if self.read_only:
                raise vhd.ReadOnlyError("read-only")
            self.discards.append((offset, length))

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._lock:
            self._maybe_fail()
            if self.read_only:
                raise vhd.ReadOnlyError("read-only")
            self.data[offset : offset + length] = bytes(length)
            self.zeroed.append((offset, length))
            # Whole grains inside the range become unallocated.
            first = -(-offset // self.grain)
            last = (offset + length) // self.grain
            for g in range(first, last):
                self.allocated[g] = 0

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[FakeExtent]:
        end = self.size if length is None else min(self.size, offset + length)
        pos = offset
        run_start, run_layer = offset, None
        first = True
        while pos < end:
            g = pos // self.grain
            layer = 0 if self.allocated[g] else None
            nxt = min(end, (g + 1) * self.grain)
            if first:
                run_layer, first = layer, False
            elif layer != run_layer:
                yield FakeExtent(run_start, pos - run_start, run_layer)
                run_start, run_layer = pos, layer
            pos = nxt
        if end > run_start:
            yield FakeExtent(run_start, end - run_start, run_layer)

    def close(self) -> None:
        self.closed = True
