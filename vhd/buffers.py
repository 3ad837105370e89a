"""Buffers that data is read into and written from (no part of the spec: how bytes move through
``preadv``/``pwritev`` between the page cache and vhdkit).

Where a buffer starts within its page matters.  glibc serves a large ``malloc`` (a plain
``bytearray`` of a chunk's size) from an ``mmap`` of its own, with the data 16 bytes into the
first page, and the kernel's page-cache copies into and out of a buffer that starts 8 or 16
bytes into a page ran at half speed or worse here (1 GiB of 512 KiB ``preadv``: 133 ms against
73 ms page-aligned; raw -> VHDX convert 466 -> 343 ms of CPU).  qemu-img's buffers are
page-aligned, and so are these.

Two kinds:

* :func:`page_aligned`, a ``bytearray``, for buffers that are compared (``vhd compare``):
  ``bytearray == bytearray`` is one ``memcmp`` where ``memoryview == memoryview``, all a map
  offers, compares item by item, 70x slower.  Aligning it takes its address, from ``ctypes``.
* :func:`mapped`, an anonymous map, for buffers that data only passes through (``vhd convert``,
  whose zero scan is ``bytes.startswith``, one ``memcmp`` on any buffer): page-aligned by
  nature, and the kernel hands it zeroed pages, where a ``bytearray`` is zeroed again by a
  ``memset`` over all of it.  It needs neither ``ctypes`` (2 ms of a small
  ``vhd convert``'s start-up) nor that ``memset``.
"""

from __future__ import annotations

import mmap


def page_aligned(n: int) -> bytearray:
    """A zero-filled ``n``-byte ``bytearray`` whose data starts on a page boundary.

    A page more is allocated and the bytes before the boundary are dropped from the front, which
    moves a bytearray's start without a copy; the tail past ``n`` is dropped the same way (a
    minor shrink keeps the buffer where it is, which is why ``n`` is at least a page: cutting
    more than half moves the data to a new allocation).
    """
    if n < mmap.PAGESIZE:
        raise ValueError(f"a page-aligned buffer holds at least a page, not {n} bytes")
    import ctypes  # (only here: a command that moves no data does not pay its import)

    buf = bytearray(n + mmap.PAGESIZE)
    probe = ctypes.c_char.from_buffer(buf)
    skip = -ctypes.addressof(probe) % mmap.PAGESIZE
    del probe  # the buffer export: a bytearray that is exported cannot be resized
    del buf[:skip]
    del buf[n:]
    return buf


def mapped(n: int) -> memoryview:
    """A zero-filled, writable ``n``-byte buffer on a page boundary: an anonymous map (private
    to this process, unmapped when the last view of it goes)."""
    if n <= 0:
        raise ValueError(f"a buffer holds at least a byte, not {n}")
    # Populated at once: one call makes its pages, where faulting them in one by one during the
    # first reads cost a fifth more (2 MiB: 0.72 against 0.92 ms).
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    return memoryview(mmap.mmap(-1, n, flags=flags))
