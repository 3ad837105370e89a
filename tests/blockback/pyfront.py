"""A Python frontend ring (``FRONT_RING_INIT`` & co, ring.h) for tests: the guest's side."""

from __future__ import annotations

import struct

from blockback.abi import REQ_EVENT, REQ_PROD, RING_HEADER_SIZE, RSP_EVENT, RSP_PROD, Abi
from blockback.ring import MASK32, memory_barrier

_U32 = struct.Struct("<I")


class FrontRing:
    """Frontend view of a shared ring living in ``view`` (2**order pages)."""

    def __init__(self, view: memoryview, abi: Abi, order: int, start: int = 0) -> None:
        self.view = view
        self.abi = abi
        self.nr_ents = abi.ring_entries(order)
        self.req_prod_pvt = start & MASK32
        self.rsp_cons = start & MASK32
        # FRONT_RING_INIT / SHARED_RING_INIT: prods at start, events one past.
        self._store(REQ_PROD, start)
        self._store(RSP_PROD, start)
        self._store(REQ_EVENT, start + 1)
        self._store(RSP_EVENT, start + 1)

    def _load(self, off: int) -> int:
        value: int = _U32.unpack_from(self.view, off)[0]
        return value

    def _store(self, off: int, value: int) -> None:
        _U32.pack_into(self.view, off, value & MASK32)

    def slot(self, index: int) -> int:
        return RING_HEADER_SIZE + (index & (self.nr_ents - 1)) * self.abi.entry_size

    @property
    def free_requests(self) -> int:
        return self.nr_ents - ((self.req_prod_pvt - self.rsp_cons) & MASK32)

    def put_request(self, data: bytes) -> None:
        assert self.free_requests > 0, "ring full"
        off = self.slot(self.req_prod_pvt)
        self.view[off : off + len(data)] = data
        self.req_prod_pvt = (self.req_prod_pvt + 1) & MASK32

    def push_requests(self) -> None:
        """RING_PUSH_REQUESTS (no notify check): publish without caring about req_event."""
        self._store(REQ_PROD, self.req_prod_pvt)

    def push_requests_and_check_notify(self) -> bool:
        old = self._load(REQ_PROD)
        new = self.req_prod_pvt
        self._store(REQ_PROD, new)
        memory_barrier()
        event = self._load(REQ_EVENT)
        return ((new - event) & MASK32) < ((new - old) & MASK32)

    def take_responses(self) -> list[tuple[int, int, int]]:
        prod = self._load(RSP_PROD)
        assert ((prod - self.rsp_cons) & MASK32) <= self.nr_ents, "backend overran the ring"
        out = []
        while self.rsp_cons != prod:
            off = self.slot(self.rsp_cons)
            out.append(
                self.abi.decode_response(bytes(self.view[off : off + self.abi.response_size]))
            )
            self.rsp_cons = (self.rsp_cons + 1) & MASK32
        return out

    def final_check_for_responses(self) -> bool:
        if self._load(RSP_PROD) != self.rsp_cons:
            return True
        self._store(RSP_EVENT, self.rsp_cons + 1)
        memory_barrier()
        return self._load(RSP_PROD) != self.rsp_cons

    def set_rsp_event(self, value: int) -> None:
        self._store(RSP_EVENT, value)

    @property
    def req_event(self) -> int:
        return self._load(REQ_EVENT)

    @property
    def rsp_prod(self) -> int:
        return self._load(RSP_PROD)


class SimFrontend:
    """A Python guest on the simulated hypervisor of DIR: ring, grants, event channel."""

    def __init__(self, directory: str, layout: Abi, order: int = 0, *, first_page: int = 0) -> None:
        from blockback.transport.sim import SimFrontendMemory, alloc_unbound_port

        self.mem = SimFrontendMemory(directory)
        self.abi = layout
        self.order = order
        self.ring_refs = [self.mem.grant(first_page + i) for i in range(1 << order)]
        start = first_page * 4096
        self.ring = FrontRing(self.mem.view[start : start + (4096 << order)], layout, order)
        self.evtchn = alloc_unbound_port(directory)
        self._next = first_page + (1 << order)
        self.notifications = 0

    def alloc(self, n: int, read_only: bool = False) -> list[int]:
        pages = list(range(self._next, self._next + n))
        self._next += n
        for p in pages:
            self.mem.grant(p, read_only)
        return pages

    def page(self, gref: int) -> memoryview:
        return self.mem.page(gref)

    def keys(self) -> dict[str, str]:
        keys = {"event-channel": str(self.evtchn.port), "protocol": self.abi.name}
        if self.order == 0:
            keys["ring-ref"] = str(self.ring_refs[0])
        else:
            keys["ring-page-order"] = str(self.order)
            keys.update({f"ring-ref{i}": str(r) for i, r in enumerate(self.ring_refs)})
        return keys

    def submit(self, requests: list[bytes], notify: bool = True) -> None:
        for r in requests:
            self.ring.put_request(r)
        if self.ring.push_requests_and_check_notify() and notify:
            self.evtchn.notify()

    def wait(self, count: int, timeout: float = 10.0) -> list[tuple[int, int, int]]:
        """Collect ``count`` responses (RING_FINAL_CHECK_FOR_RESPONSES before each sleep)."""
        import select
        import time

        got: list[tuple[int, int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += self.ring.take_responses()
            if len(got) >= count or self.ring.final_check_for_responses():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(got)} of {count} responses after {timeout} s")
            if select.select([self.evtchn.fileno()], [], [], left)[0]:
                self.notifications += 1
                self.evtchn.ack()
        return got

    def call(self, request: bytes) -> int:
        """Submit one request, wait for its response, return the status."""
        rid = self.abi.decode_request(request).id
        self.submit([request])
        (resp,) = self.wait(1)
        assert resp[0] == rid
        return resp[2]

    def close(self) -> None:
        self.evtchn.close()
        self.ring.view.release()
        self.mem.close()
