"""A bytearray-backed stand-in for ``vhd.Disk`` (positional I/O, flush, discard) for unit tests."""

from __future__ import annotations

import threading
from typing import Any


class FakeDisk:
    """Thread-safe in-memory disk that records flushes and discards and can fail on demand."""

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        self.size = size
        self.read_only = read_only
        self.data = bytearray(size)
        self.flushes = 0
        self.discards: list[tuple[int, int]] = []
        self.fail_next: BaseException | None = None
        self.closed = False
        self._lock = threading.Lock()

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc

    def preadinto(self, buffer: Any, offset: int) -> int:
        view = memoryview(buffer).cast("B")
        with self._lock:
            self._maybe_fail()
            n = max(0, min(len(view), self.size - offset))
            view[:n] = self.data[offset : offset + n]
            return n

    def pread(self, n: int, offset: int) -> bytes:
        buffer = bytearray(n)
        count = self.preadinto(buffer, offset)
        return bytes(buffer[:count])

    def pwrite(self, data: Any, offset: int) -> int:
        import vhd

        view = memoryview(data).cast("B")
        with self._lock:
            self._maybe_fail()
            if self.read_only:
                raise vhd.ReadOnlyError("read-only")
            if offset + len(view) > self.size:
                raise vhd.InvalidArgumentError("past the end")
            self.data[offset : offset + len(view)] = view
            return len(view)

    def flush(self) -> None:
        with self._lock:
            self._maybe_fail()
            self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        with self._lock:
            self._maybe_fail()
            self.data[offset : offset + length] = bytes(length)
            self.discards.append((offset, length))

    def close(self) -> None:
        self.closed = True
