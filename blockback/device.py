"""One connected vbd's rings (docs/blkif.md §2-3, the Connected state): map each queue's ring
pages, bind its event channel, attach a :class:`~blockback.backend.RingService` and tear it all
down again.

:class:`BlkifDevice` owns the rings of one connected vbd (one per queue) over a transport.  It
attaches to each ring where the frontend's ``rsp_prod`` stands (``BACK_RING_ATTACH``, as Linux
blkback's ``xen_blkif_map`` does), not at 0: a backend restarted under a connected guest (crash, systemd
restart) answers the requests its predecessor left unanswered and then goes on, instead of
replaying old slots or halting the ring.
"""

from __future__ import annotations

import contextlib

from blockback.abi import REQ_PROD, RSP_PROD, Abi
from blockback.backend import RingService
from blockback.engine import BlkifEngine
from blockback.errors import RemoteProtocolError
from blockback.executor import RequestExecutor
from blockback.ring import MASK32, BackRing, RingMemory
from blockback.transport import EventChannel, Transport
from blockback.xenbus import FrontendParams


def _attach_ring(memory: RingMemory, abi: Abi, order: int) -> BackRing:
    """``BACK_RING_ATTACH`` at the shared ``rsp_prod``: every request after it is unanswered.

    A fresh ring (``SHARED_RING_INIT``) has both indexes at 0, so this is ``BACK_RING_INIT``
    there.  More requests than the ring holds past ``rsp_prod`` is a bogus ring (Linux blkback's
    ``xen_blkif_map`` refuses it the same way)."""
    rsp_prod = memory.load_u32(RSP_PROD)
    ring = BackRing(memory, abi, order, start=rsp_prod)
    pending = (memory.load_u32(REQ_PROD) - rsp_prod) & MASK32
    if pending > ring.nr_ents:
        raise RemoteProtocolError(
            f"ring has {pending} requests past rsp_prod {rsp_prod} (at most {ring.nr_ents})"
        )
    return ring


class BlkifDevice:
    """A connected vbd: one :class:`RingService` per queue, over one executor and transport."""

    def __init__(
        self,
        transport: Transport,
        domid: int,
        params: FrontendParams,
        engine: BlkifEngine,
        executor: RequestExecutor,
        *,
        name: str = "vbd",
        inline_max: int = 0,
    ) -> None:
        self.transport = transport
        self.params = params
        self.rings: list[RingService] = []
        self._memories: list[RingMemory] = []
        self._channels: list[EventChannel] = []
        grants = transport.grant_mapper(domid)
        try:
            for q, queue in enumerate(params.queues):
                memory = transport.map_ring(domid, queue.ring_refs)
                self._memories.append(memory)
                channel = transport.bind_interdomain(domid, queue.event_channel)
                self._channels.append(channel)
                ring = _attach_ring(memory, params.abi, params.ring_page_order)
                self.rings.append(
                    RingService(
                        ring,
                        engine,
                        executor,
                        grants,
                        channel,
                        name=f"{name}-q{q}",
                        inline_max=inline_max,
                    )
                )
        except BaseException:
            self._release()
            raise

    def start(self) -> None:
        for ring in self.rings:
            ring.start()

    def stop(self) -> None:
        """Stop every ring (in-flight I/O answered), unbind ports, unmap rings.  Idempotent."""
        for ring in self.rings:
            ring.stop()
        self.rings = []
        self._release()

    def _release(self) -> None:
        for channel in self._channels:
            with contextlib.suppress(OSError):
                channel.close()
        self._channels = []
        for memory in self._memories:
            self.transport.unmap_ring(memory)
        self._memories = []
