"""The bounce pool of the grant-copy data path (docs/blkif.md §3-4): page-aligned local buffers
that guest data is grant-copied into and out of, reused per frontend domain and bounded."""

from __future__ import annotations

import ctypes
import mmap
import threading

from blockback.transport.xen_abi import PAGE_SIZE

# Bounce pages kept for reuse per frontend domain: 64 base requests (11 pages) or four full
# 1024-segment indirect ones.  What is in flight beyond it is allocated and dropped on return, so
# memory is bounded by the ring depth (in flight) plus this (pooled).
DEFAULT_POOL_BYTES = 16 << 20


class Bounce:
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
        self._free: dict[int, list[Bounce]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()
        self.allocated = 0  # bounce mappings ever created (tests: reuse keeps this small)
        self.in_use = 0

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def get(self, nbytes: int) -> Bounce:
        pages = 1 << max(0, (-(-nbytes // PAGE_SIZE) - 1).bit_length())
        with self._lock:
            self.in_use += 1
            free = self._free.get(pages)
            if free:
                self._free_bytes -= pages * PAGE_SIZE
                return free.pop()
            self.allocated += 1
        return Bounce(pages)

    def put(self, bounce: Bounce) -> None:
        size = bounce.pages * PAGE_SIZE
        with self._lock:
            self.in_use -= 1
            if self._free_bytes + size <= self.max_bytes:
                self._free.setdefault(bounce.pages, []).append(bounce)
                self._free_bytes += size
        # else: dropped; the mapping goes away with the object
