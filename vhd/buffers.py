"""Buffers that data is read into and written from (no part of the spec: how bytes move through
``preadv``/``pwritev`` between the page cache and vhdkit).

Where a buffer starts within its page matters.  glibc serves a large ``malloc`` (a plain
``bytearray`` of a chunk's size) from an ``mmap`` of its own, with the data 16 bytes into the
first page, and the kernel's page-cache copies into and out of a buffer that starts 8 or 16
bytes into a page ran at half speed or worse here (1 GiB of 512 KiB ``preadv``: 133 ms against
73 ms page-aligned; raw -> VHDX convert 466 -> 343 ms of CPU).  qemu-img's buffers are
page-aligned, and so are these.

They are ``bytearray`` s, not anonymous maps (which are page-aligned too): ``bytearray ==
bytearray`` is one ``memcmp`` where ``memoryview == memoryview``, all a map offers, compares
item by item, 70x slower (``vhd compare``); and ``bytearray.startswith`` finds zeros in any
buffer with one ``memcmp`` (``vhd convert``).
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
