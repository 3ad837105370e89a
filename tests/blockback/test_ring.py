"""blockback.ring: the back ring against a Python model of the front-ring macros."""

from __future__ import annotations

import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockback.abi import PAGE_SIZE, REQ_EVENT, RSP_PROD, X86_32, X86_64, Abi, Op, Status
from blockback.errors import LocalProtocolError
from blockback.ring import (
    MASK32,
    BackRing,
    PagedRingMemory,
    RingOverflowError,
    ViewRingMemory,
    memory_barrier,
)

from .pyfront import FrontRing


def make(order: int = 0, layout: Abi = X86_64, start: int = 0) -> tuple[FrontRing, BackRing]:
    view = memoryview(bytearray(PAGE_SIZE << order))
    front = FrontRing(view, layout, order, start)
    back = BackRing(ViewRingMemory(view), layout, order, start)
    return front, back


def req(rid: int, layout: Abi = X86_64) -> bytes:
    return layout.encode_rw(Op.READ, rid, rid, [(rid & 0xFFFF, 0, 7)])


class CountingMemory(ViewRingMemory):
    """Counts reads per slot offset and scribbles over each slot right after it is copied."""

    def __init__(self, view: memoryview) -> None:
        super().__init__(view)
        self.reads: Counter[int] = Counter()

    def copy_out(self, offset: int, length: int) -> bytes:
        data = super().copy_out(offset, length)
        self.reads[offset] += 1
        self.view[offset : offset + length] = b"\xff" * length  # hostile frontend flips it
        return data


def test_fence_callable() -> None:
    memory_barrier()  # a real fence (libatomic or compiled); must simply not crash


# Neither libatomic nor gcc: importing the ring module (and everything that imports it) must
# still work -- the fence is found or built on first use, and then fails with a clear OSError.
NO_FENCE = """
import ctypes, subprocess, sys
real_cdll = ctypes.CDLL
def no_atomic(name, *a, **k):
    if "atomic" in str(name) or "fence" in str(name):
        raise OSError("refused by the test")
    return real_cdll(name, *a, **k)
def refuse(*a, **k):
    raise OSError("refused by the test")
ctypes.CDLL = no_atomic
subprocess.run = refuse
import blockback.ring, blockback.backend, blockback.daemon
try:
    blockback.ring.fence()
except OSError as exc:
    print("fence:", exc)
"""


def test_importing_the_ring_loads_and_builds_nothing() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", NO_FENCE], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fence: no memory fence for the blkif ring: install libatomic1")


def test_basic_round_trip_and_notify() -> None:
    front, back = make()
    for i in range(5):
        front.put_request(req(i))
    assert front.push_requests_and_check_notify()  # req_event starts at 1
    copies = back.take_requests(budget=100)
    assert [X86_64.decode_request(c).id for c in copies] == list(range(5))
    assert back.outstanding == 5
    for i in reversed(range(5)):  # out of order
        back.put_response(X86_64.encode_response(i, Op.READ, Status.OKAY))
    # Frontend armed rsp_event = 1 at init: crossing it needs a notify.
    assert back.push_responses_and_check_notify()
    assert [r[0] for r in front.take_responses()] == [4, 3, 2, 1, 0]
    assert not back.final_check_for_requests()
    assert front.req_event == back.req_cons + 1


def test_no_notify_when_rsp_event_not_crossed() -> None:
    front, back = make()
    for i in range(3):
        front.put_request(req(i))
    front.push_requests()
    back.take_requests(10)
    front.set_rsp_event(10)  # the frontend is still busy: only wants a kick at response 10
    back.put_response(X86_64.encode_response(0, 0, 0))
    assert not back.push_responses_and_check_notify()
    front.set_rsp_event(2)
    back.put_response(X86_64.encode_response(1, 0, 0))
    assert back.push_responses_and_check_notify()  # rsp_event 2 in (1, 2]


def test_final_check_catches_silent_push() -> None:
    """No lost wake-up: a frontend that publishes without notifying is found by the re-check."""
    front, back = make()
    assert not back.final_check_for_requests()
    front.put_request(req(1))
    front.push_requests()  # no notify at all
    assert back.final_check_for_requests()
    assert len(back.take_requests(10)) == 1


def test_req_prod_far_ahead_halts() -> None:
    front, back = make()
    view = front.view
    mem = CountingMemory(view)
    back = BackRing(mem, X86_64, 0)
    struct.pack_into("<I", view, 0, 33)  # 33 > 32 outstanding: impossible
    with pytest.raises(RingOverflowError):
        back.take_requests(1000)
    assert back.halted
    assert back.take_requests(1000) == [] and not back.final_check_for_requests()
    assert not mem.reads  # halted before reading a single slot


def test_response_slot_backpressure() -> None:
    front, back = make()
    for i in range(32):
        front.put_request(req(i))
    front.push_requests()
    assert len(back.take_requests(1000)) == 32
    assert back.take_requests(1000) == []
    with pytest.raises(LocalProtocolError):
        for i in range(33):
            back.put_response(X86_64.encode_response(i, 0, 0))


def test_each_slot_read_once_even_when_mutated() -> None:
    view = memoryview(bytearray(PAGE_SIZE))
    front = FrontRing(view, X86_64, 0)
    mem = CountingMemory(view)
    back = BackRing(mem, X86_64, 0)
    rid = 0
    for _round in range(10):
        for _ in range(20):
            front.put_request(req(rid))
            rid += 1
        front.push_requests()
        copies = back.take_requests(7) + back.take_requests(100)
        assert [X86_64.decode_request(c).id for c in copies] == list(range(rid - 20, rid))
        for c in copies:
            back.put_response(X86_64.encode_response(X86_64.decode_request(c).id, 0, 0))
        back.push_responses_and_check_notify()
        front.take_responses()
    # 200 requests went through 32 slots: every consumption was exactly one read (7 per slot at
    # most), and the copies stayed intact although the slot was scribbled over after each read.
    assert sum(mem.reads.values()) == 200
    assert max(mem.reads.values()) == 7 and len(mem.reads) == 32


def test_paged_memory_matches_contiguous() -> None:
    order = 2
    view = memoryview(bytearray(PAGE_SIZE << order))
    pages = [view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(1 << order)]
    front = FrontRing(view, X86_32, order)
    back = BackRing(PagedRingMemory(pages), X86_32, order)
    for i in range(128):
        front.put_request(req(i, X86_32))
    front.push_requests()
    copies = back.take_requests(1000)
    assert [X86_32.decode_request(c).id for c in copies] == list(range(128))
    for i in range(128):
        back.put_response(X86_32.encode_response(i, Op.READ, Status.OKAY))
    back.push_responses_and_check_notify()
    assert [r[0] for r in front.take_responses()] == list(range(128))


@settings(max_examples=200, deadline=None)
@given(
    layout=st.sampled_from([X86_64, X86_32]),
    order=st.integers(0, 2),
    start=st.one_of(st.integers(0, 100), st.integers(MASK32 - 600, MASK32)),
    steps=st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 50), st.integers(0, 50), st.integers(0, 3)),
        max_size=30,
    ),
)
def test_model_wraparound(
    layout: Abi, order: int, start: int, steps: list[tuple[int, int, int, int]]
) -> None:
    """Random push/take/respond interleavings across the 2**32 wrap: FIFO, once, no loss."""
    front, back = make(order, layout, start)
    n = layout.ring_entries(order)
    next_id = 0
    consumed: list[int] = []
    pending: list[int] = []
    answered: list[int] = []
    for push, budget, respond, ahead in steps:
        for _ in range(min(push, front.free_requests)):
            front.put_request(req(next_id, layout))
            next_id += 1
        notify = front.push_requests_and_check_notify()
        copies = back.take_requests(budget)
        assert len(copies) <= budget
        ids = [layout.decode_request(c).id for c in copies]
        assert ids == list(range(len(consumed), len(consumed) + len(ids)))
        consumed += ids
        pending += ids
        for rid in pending[:respond]:
            back.put_response(layout.encode_response(rid, Op.READ, Status.OKAY))
        del pending[:respond]
        back.push_responses_and_check_notify()
        got = front.take_responses()
        assert all(op == Op.READ and st_ == 0 for _, op, st_ in got)
        answered += [r for r, _, _ in got]
        assert back.outstanding == len(pending) <= n
        if ahead == 3 and not copies:
            work = back.final_check_for_requests()
            assert work == (next_id > len(consumed) and back.outstanding < n)
            if not work:
                assert front.req_event == (back.req_cons + 1) & MASK32
        del notify
    assert answered == consumed[: len(answered)]
    assert back.rsp_prod_pvt == front.rsp_prod == (start + len(answered)) & MASK32


def test_put_response_wrong_size() -> None:
    front, back = make()
    front.put_request(req(1))
    front.push_requests()
    back.take_requests(1)
    with pytest.raises(LocalProtocolError):
        back.put_response(b"\0" * 12)
    assert RSP_PROD == 8 and REQ_EVENT == 4
