"""The back end of a Xen shared ring (``xen/io/ring.h``), as a sans-IO engine over shared memory.

Theory of operation
===================

A blkif ring is one to sixteen 4 KiB pages the frontend grants to us.  The first 64 bytes hold
four free-running 32-bit indexes; the rest is an array of ``nr_ents`` slots (a power of two), each
big enough for a request or a response.  The frontend produces requests at ``req_prod``; we consume
them at our private ``req_cons``, and produce the response for a request *into a slot we already
consumed* at our private ``rsp_prod_pvt``, publishing it with ``rsp_prod``.  Because a response
always reuses a consumed slot, at most ``nr_ents`` requests can be outstanding, and the frontend
can never legitimately publish more than ``nr_ents`` requests beyond ``rsp_prod_pvt``.  All
arithmetic is modulo 2**32; slot = ``index & (nr_ents - 1)``.

The frontend is untrusted and runs concurrently on another CPU.  This module therefore:

* reads ``req_prod`` once per batch, then (read barrier) copies each slot it consumes **exactly
  once** into private memory (``bytes``), and never looks at that slot again; decoding and all
  validation happen on the copy (XSA-155, the double-fetch bugs in blkback and qdisk).  Every
  shared-memory access goes through the small :class:`RingMemory` interface, so a test can count
  reads per slot and flip bytes between reads.
* only consumes requests that are fully published (index below the ``req_prod`` it read) and for
  which a response slot is free (``RING_REQUEST_CONS_OVERFLOW``), and at most ``budget`` per call,
  so one wake-up does bounded work however hard the frontend pushes (XSA-332).
* detects a frontend that claims more than ``nr_ents`` outstanding requests
  (``RING_REQUEST_PROD_OVERFLOW``, Linux: "Frontend provided bogus ring requests") and *halts*:
  the ring never consumes again until it is torn down, so a hostile ``req_prod`` cannot make us
  spin or read stale slots.
* writes every byte of each response (padding included, XSA-216), advances ``rsp_prod_pvt``, and
  publishes responses in batches with ``PUSH_RESPONSES_AND_CHECK_NOTIFY``: write barrier, store
  ``rsp_prod``, **full barrier**, then notify only if ``rsp_event`` lies in (old, new].
* before sleeping, runs ``FINAL_CHECK_FOR_REQUESTS``: if no work, store ``req_event = req_cons+1``,
  **full barrier**, and look again -- closing the race with a frontend that published just before
  seeing the new ``req_event`` and so did not notify (the "lost wake-up" hangs).

Memory barriers.  CPython offers none.  On x86 (TSO) loads are not reordered with loads nor stores
with stores, and every Python-level access is an opaque C call, so ``rmb``/``wmb`` need nothing;
but a store followed by a load of another location *can* be reordered by the CPU, which is exactly
the pattern of both full barriers above.  :func:`memory_barrier` therefore calls a real fence:
libatomic's exported ``atomic_thread_fence(memory_order_seq_cst)`` (its body is a ``lock or`` on
x86-64 and ``dmb ish`` on arm64 -- a genuine full fence, and libatomic ships with gcc on every
Debian system), loaded with ctypes.  Where libatomic is missing we compile the one-line C function
``__atomic_thread_fence(__ATOMIC_SEQ_CST)`` with gcc into a cache directory.  Either happens at first use (the first ring attached), never at
import.  On
non-x86 machines the read/write barriers also use the full fence.

The engine owns no file descriptors, threads or clocks: the caller (``blockback.backend``) hands
it memory, asks for request copies, gives it responses and asks whether to notify.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import platform
import struct
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from blockback.abi import (
    PAGE_SIZE,
    REQ_EVENT,
    REQ_PROD,
    RING_HEADER_SIZE,
    RSP_EVENT,
    RSP_PROD,
    Abi,
)
from blockback.errors import LocalProtocolError, RemoteProtocolError

MASK32 = 0xFFFFFFFF
_U32 = struct.Struct("<I")


class RingOverflowError(RemoteProtocolError):
    """The frontend published more requests than the ring can hold; the ring is halted."""


# --- memory barriers -----------------------------------------------------------------------------

_FENCE_SOURCE = "void vhdkit_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }\n"


@functools.cache
def fence() -> Callable[[], None]:
    """The full memory fence, found (or built) on first use and then cached: importing this
    module runs nothing.  OSError, saying what to install, when neither libatomic nor gcc is
    there -- a device then fails to connect with that message, the daemon stays up."""
    name = ctypes.util.find_library("atomic")
    for candidate in ([name] if name else []) + ["libatomic.so.1"]:
        try:
            lib = ctypes.CDLL(candidate)
            fn = lib.atomic_thread_fence
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int]
        fn.restype = None
        return functools.partial(fn, 5)  # memory_order_seq_cst
    try:
        return _compile_fence()
    except (OSError, subprocess.SubprocessError) as exc:
        raise OSError(
            f"no memory fence for the blkif ring: install libatomic1 (or gcc) ({exc})"
        ) from exc


def _compile_fence() -> Callable[[], None]:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vhdkit"
    digest = hashlib.sha256(_FENCE_SOURCE.encode()).hexdigest()[:16]
    target = cache / f"fence-{platform.machine()}-{digest}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "fence.c"
            src.write_text(_FENCE_SOURCE)
            out = Path(tmp) / "fence.so"
            subprocess.run(
                ["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(src)], check=True, timeout=60
            )
            os.replace(out, target)  # atomic: concurrent first uses race harmlessly
    fn = ctypes.CDLL(str(target)).vhdkit_fence
    fn.argtypes = []
    fn.restype = None
    return fn


def memory_barrier() -> None:
    """A full fence (``mb``).  The ring engine binds :func:`fence` once per ring instead."""
    fence()()


_TSO = platform.machine() in ("x86_64", "AMD64", "i386", "i686")


def _noop() -> None:
    pass


def _barriers() -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """``(rmb, wmb, mb)``.  Loads are not reordered with loads, nor stores with stores, on x86:
    only the compiler could, and each Python-level access is an opaque call.  Elsewhere the full
    fence serves for all three."""
    mb = fence()
    return (_noop, _noop, mb) if _TSO else (mb, mb, mb)


# --- shared memory access ------------------------------------------------------------------------


class RingMemory(Protocol):
    """Every access the ring engine makes to shared memory.  Offsets are ring-relative."""

    def load_u32(self, offset: int) -> int: ...
    def store_u32(self, offset: int, value: int) -> None: ...
    def copy_out(self, offset: int, length: int) -> bytes: ...
    def copy_in(self, offset: int, data: bytes) -> None: ...


class ViewRingMemory:
    """A ring mapped contiguously (one ``memoryview`` of 2**order pages)."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def load_u32(self, offset: int) -> int:
        value: int = _U32.unpack_from(self.view, offset)[0]
        return value

    def store_u32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.view, offset, value & MASK32)

    def copy_out(self, offset: int, length: int) -> bytes:
        return self.view[offset : offset + length].tobytes()

    def copy_in(self, offset: int, data: bytes) -> None:
        self.view[offset : offset + len(data)] = data


class PagedRingMemory:
    """A ring whose pages are mapped separately (grant refs need not be contiguous).

    Slots may straddle a page boundary (112-byte slots do not divide 4096)."""

    __slots__ = ("pages",)

    def __init__(self, pages: Sequence[memoryview]) -> None:
        if any(len(p) != PAGE_SIZE for p in pages):
            raise ValueError("ring pages must be 4 KiB each")
        self.pages = list(pages)

    def load_u32(self, offset: int) -> int:  # header fields live in page 0
        value: int = _U32.unpack_from(self.pages[0], offset)[0]
        return value

    def store_u32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.pages[0], offset, value & MASK32)

    def copy_out(self, offset: int, length: int) -> bytes:
        page, off = divmod(offset, PAGE_SIZE)
        if off + length <= PAGE_SIZE:
            return self.pages[page][off : off + length].tobytes()
        first = PAGE_SIZE - off
        return self.pages[page][off:].tobytes() + self.pages[page + 1][: length - first].tobytes()

    def copy_in(self, offset: int, data: bytes) -> None:
        page, off = divmod(offset, PAGE_SIZE)
        n = len(data)
        if off + n <= PAGE_SIZE:
            self.pages[page][off : off + n] = data
            return
        first = PAGE_SIZE - off
        self.pages[page][off:] = data[:first]
        self.pages[page + 1][: n - first] = data[first:]


# --- the back ring -------------------------------------------------------------------------------


class BackRing:
    """Backend view of one shared ring (``BACK_RING_INIT``): private ``req_cons``/``rsp_prod_pvt``."""

    def __init__(self, memory: RingMemory, abi: Abi, order: int, start: int = 0) -> None:
        # ``start`` is BACK_RING_ATTACH's index (0 for a ring the frontend just initialised).
        self.memory = memory
        self.abi = abi
        self.order = order
        self.nr_ents = abi.ring_entries(order)
        self.req_cons = start & MASK32
        self.rsp_prod_pvt = start & MASK32
        self.halted = False
        self._entry = abi.entry_size
        self._req_size = abi.request_size
        self._rmb, self._wmb, self._mb = _barriers()

    # ``RING_HAS_UNCONSUMED_REQUESTS`` on a req_prod value already read.
    def _unconsumed(self, prod: int) -> int:
        if ((prod - self.rsp_prod_pvt) & MASK32) > self.nr_ents:
            self.halted = True
            raise RingOverflowError(
                f"frontend provided bogus ring requests (req_prod {prod}, "
                f"rsp_prod_pvt {self.rsp_prod_pvt}, ring size {self.nr_ents}): ring halted"
            )
        req = (prod - self.req_cons) & MASK32
        rsp = self.nr_ents - ((self.req_cons - self.rsp_prod_pvt) & MASK32)
        return min(req, rsp)

    def take_requests(self, budget: int) -> list[bytes]:
        """Copy up to ``budget`` fully published requests into private memory, each slot once.

        Raises :class:`RingOverflowError` (and halts) on an impossible ``req_prod``; returns
        nothing once halted."""
        if self.halted:
            return []
        prod = self.memory.load_u32(REQ_PROD)
        self._rmb()  # see the requests published before req_prod
        n = min(self._unconsumed(prod), budget)
        out: list[bytes] = []
        copy_out = self.memory.copy_out
        cons = self.req_cons
        mask = self.nr_ents - 1
        for _ in range(n):
            out.append(copy_out(RING_HEADER_SIZE + (cons & mask) * self._entry, self._req_size))
            cons = (cons + 1) & MASK32
        self.req_cons = cons
        return out

    def has_unconsumed_requests(self) -> bool:
        if self.halted:
            return False
        return self._unconsumed(self.memory.load_u32(REQ_PROD)) > 0

    @property
    def outstanding(self) -> int:
        """Requests consumed but not yet answered."""
        return (self.req_cons - self.rsp_prod_pvt) & MASK32

    def put_response(self, response: bytes) -> None:
        """Write one fully encoded response into the next response slot (not yet published)."""
        if self.outstanding == 0:
            raise LocalProtocolError("more responses than consumed requests")
        if len(response) != self.abi.response_size:
            raise LocalProtocolError("response has the wrong size for this ABI")
        offset = RING_HEADER_SIZE + (self.rsp_prod_pvt & (self.nr_ents - 1)) * self._entry
        self.memory.copy_in(offset, response)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & MASK32

    def push_responses_and_check_notify(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``: publish and say whether to notify."""
        mem = self.memory
        old = mem.load_u32(RSP_PROD)
        new = self.rsp_prod_pvt
        self._wmb()  # frontend sees the responses before the index
        mem.store_u32(RSP_PROD, new)
        self._mb()  # frontend sees the index before we read rsp_event
        event = mem.load_u32(RSP_EVENT)
        return ((new - event) & MASK32) < ((new - old) & MASK32)

    def final_check_for_requests(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: True if there is work; else arm ``req_event``."""
        if self.halted:
            return False
        if self.has_unconsumed_requests():
            return True
        self.memory.store_u32(REQ_EVENT, self.req_cons + 1)
        self._mb()  # req_event visible before we look at req_prod again
        return self.has_unconsumed_requests()
