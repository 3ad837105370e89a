"""The blkif data path: ring engine + request engine + executor + a transport (docs/blkif.md §3).

One :class:`RingService` thread per ring (queue).  Each wake-up it

1. writes the responses of every request the executor finished since the last wake-up, releasing
   each request's grant mappings *before* its response is published (no mapping outlives its
   response; a grant-copy transport first copies all their read data to the guest in one batch,
   and a failed copy turns that response into ERROR), then publishes them all with one ``PUSH_RESPONSES_AND_CHECK_NOTIFY`` -- at most one
   notification per batch, and only when the frontend asked for it;
2. copies at most ``budget`` published requests out of the ring (``blockback.ring``), validates the
   copies (``blockback.engine``), answers invalid ones at once and hands valid ones to the shared
   :class:`~blockback.executor.RequestExecutor`, whose worker threads complete them in any order
   with ``preadinto``/``pwrite`` straight between the image and the granted pages (small
   requests run on the ring thread itself while they complete at page-cache speed: ``inline_max``);
3. acknowledges the event channel after that bounded batch (late EOI, XSA-332: all pending
   kicks at once, so a storm costs one wake-up per batch), and
4. sleeps only after ``FINAL_CHECK_FOR_REQUESTS`` found nothing.

WRITE_BARRIER stops the intake (as tapdisk does): once everything before it has completed it runs
flush, write, flush, and intake resumes when it is answered.  FLUSH_DISKCACHE writes its data (if
any) and then flushes.  A halted ring (bogus ``req_prod``) is never read again; its in-flight
requests still complete.  :meth:`RingService.stop` stops the intake, waits for in-flight I/O and
answers it, so nothing is mapped after it returns.

Rings are attached and owned per connected vbd by :class:`blockback.device.BlkifDevice`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import threading
import time
from dataclasses import dataclass, field

from blockback.abi import Abi, Status
from blockback.engine import BlkifEngine, IoPlan, NeedIndirect, Reply
from blockback.errors import RemoteProtocolError
from blockback.executor import RequestExecutor
from blockback.request import BlockOp, BlockRequest
from blockback.ring import BackRing
from blockback.transport import EventChannel, GrantMapper, Mapping

log = logging.getLogger("blockback")

INLINE_SLOW = 500e-6  # seconds: far slower than a page-cache hit (~10 us), so a real disk
INLINE_PROBE = 256  # requests sent to the pool between two inline probes
INLINE_WINDOW = 16  # inline requests per median
DEFAULT_BYTES_IN_FLIGHT = 64 * 1024 * 1024  # guest data buffers in flight per ring


class _Job:
    """One validated request on its way through the executor (possibly several steps)."""

    __slots__ = ("mapping", "plan", "status", "steps")

    def __init__(self, plan: IoPlan, mapping: Mapping | None, steps: list[BlockRequest]) -> None:
        self.plan = plan
        self.mapping = mapping
        self.steps = steps
        self.status = Status.OKAY


@dataclass
class RingStats:
    requests: int = 0
    errors: int = 0
    unsupported: int = 0
    wakeups: int = 0
    notifications: int = 0
    halted: bool = False
    batches: int = 0
    max_in_flight: int = 0
    max_bytes_in_flight: int = 0  # data bytes of mapped/bounced guest buffers, at most
    held: int = 0  # times intake paused for the byte budget
    inline: int = 0  # requests run on the ring thread
    extra: dict[str, int] = field(default_factory=dict)


class RingService:
    """Serves one shared ring on its own thread."""

    def __init__(
        self,
        ring: BackRing,
        engine: BlkifEngine,
        executor: RequestExecutor,
        grants: GrantMapper,
        channel: EventChannel,
        *,
        name: str = "blkif",
        budget: int | None = None,
        inline_max: int = 0,
        max_bytes_in_flight: int = DEFAULT_BYTES_IN_FLIGHT,
    ) -> None:
        self.ring = ring
        self.abi: Abi = ring.abi
        self.engine = engine
        self.executor = executor
        self.grants = grants
        self.channel = channel
        self.name = name
        self.budget = budget or ring.nr_ents
        # Adaptive inline execution.  Requests up to ``inline_max`` bytes may run on the ring
        # thread itself: for page-cache hits handing them to a worker (queue, wake-up, GIL
        # hand-over, completion wake-up) costs several times the I/O.  But a request that really
        # waits for a disk would stall the whole ring, so the ring takes the median time of every
        # INLINE_WINDOW inline requests (a median: preemption on a busy host makes a few of them
        # slow, a real disk makes most of them slow) and, once that looks like real I/O
        # (> INLINE_SLOW), sends everything to the pool, probing inline again every INLINE_PROBE
        # requests.
        # 0 = everything goes to the executor's pool.
        self.inline_max = inline_max
        self._inline_slow = False
        self._inline_times: list[float] = []
        self._inline_probe = INLINE_PROBE
        self.stats = RingStats()
        self.in_flight = 0
        # Guest data in flight (bounce buffers on the grant-copy path, mappings otherwise) is
        # bounded per ring: a request that would pass the budget waits, decoded, until
        # completions make room (one request may always run, so any valid request gets through).
        # Without it a hostile frontend (order-4 rings, many queues, 1024-segment indirect
        # requests) could make the backend allocate gigabytes.
        self.max_bytes_in_flight = max_bytes_in_flight
        self.bytes_in_flight = 0
        self._held: IoPlan | None = None
        self._done: collections.deque[_Job] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._barrier: _Job | None = None  # waiting for the drain, or running
        self._barrier_running = False
        self._deferred: collections.deque[bytes] = collections.deque()
        self._published = ring.rsp_prod_pvt
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the intake, finish and answer in-flight requests, and join the thread."""
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"{self.name}: in-flight I/O did not finish in {timeout} s")
            self._thread = None
        with contextlib.suppress(OSError):
            os.close(self._wake)
        self._wake = -1

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        channel_fd = self.channel.fileno()
        poller.register(channel_fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        watching_channel = True
        try:
            while not self._stopping:
                if self._iterate():
                    continue
                if self._stopping:  # set before stop() kicked the eventfd we may just have read
                    break
                if watching_channel and self.channel.peer_closed:
                    poller.unregister(channel_fd)  # a dead peer would poll readable for ever
                    watching_channel = False
                poller.poll()
            self._drain()
        except BaseException as exc:  # pragma: no cover - a bug: make it visible, keep dom0 up
            self._error = exc
            log.exception("%s: ring thread failed", self.name)

    def _drain(self) -> None:
        """Teardown: serve what the frontend had published when we were told to stop (at most
        one ring's worth more, so a frontend that keeps pushing cannot hold us), let everything
        in flight finish, and answer it all: nothing consumed is left unanswered at Closed."""
        allowance = self.ring.nr_ents
        while True:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake)
            self._respond()
            self._maybe_start_barrier()
            # Requests deferred behind a barrier or the byte budget are consumed already: they
            # are always served.
            if self._barrier is None and (
                self._deferred or self._held is not None or (allowance > 0 and not self.ring.halted)
            ):
                budget, self.budget = self.budget, min(self.budget, allowance)
                try:
                    allowance -= self._intake()
                finally:
                    self.budget = budget
                self._respond()
            self._publish()
            if not self.in_flight and self._barrier is None:
                if (
                    self._deferred
                    or self._held is not None
                    or (allowance > 0 and self._has_requests())
                ):
                    continue
                return
            self._wait_wake()

    def _has_requests(self) -> bool:
        try:
            return self.ring.has_unconsumed_requests()
        except RemoteProtocolError:
            return False

    def _wait_wake(self) -> None:
        select.select([self._wake], [], [], 1.0)

    def _iterate(self) -> bool:
        """One bounded unit of work; True if anything happened (so look again before sleeping)."""
        self.stats.wakeups += 1
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        answered = self._respond()
        self._maybe_start_barrier()
        taken = 0
        if self._barrier is None and not self._stopping:
            taken = self._intake()
            answered += self._respond()  # inline requests finished already
        self._publish()
        # Late EOI (XSA-332): re-enable the port only after this bounded batch; a kick that came
        # meanwhile is consumed here, and the final check below (or the next round) sees its
        # requests, so nothing is lost.
        self.channel.ack()
        if answered or taken:
            return True
        if self._barrier is None and not self._stopping and not self.ring.halted:
            try:
                return self.ring.final_check_for_requests()
            except RemoteProtocolError as exc:
                # req_prod went bogus between the intake and the final check: halt here too,
                # rather than let the error end the ring thread.
                log.error("%s: %s", self.name, exc)
                self.stats.halted = True
        return False

    def _respond(self) -> int:
        """Write the responses of finished jobs (published later, once per batch)."""
        done = self._done
        if not done:
            return 0
        jobs: list[_Job] = []
        while done:  # a snapshot: workers keep appending
            jobs.append(done.popleft())
        if self.grants.copies_data:
            # A grant-copy transport delivers the data of every finished request to the guest
            # in one batch, before any response is written; a request whose copy failed on any
            # segment is answered ERROR, never a silent partial success (XSA-365).
            pending = [(j, j.mapping) for j in jobs if j.mapping is not None]
            if pending:
                delivered = self.grants.finish_mappings(
                    [(m, j.status == Status.OKAY) for j, m in pending]
                )
                for (job, _), ok in zip(pending, delivered, strict=True):
                    if not ok:
                        job.status = Status.ERROR
        for job in jobs:
            self._answer(job.plan.id, job.plan.operation, job.status, job.mapping)
            self.in_flight -= 1
            if job.mapping is not None:
                self.bytes_in_flight -= job.plan.length
            if job is self._barrier:
                self._barrier = None
                self._barrier_running = False
        return len(jobs)

    def _publish(self) -> None:
        if self.ring.rsp_prod_pvt == self._published:
            return
        self._published = self.ring.rsp_prod_pvt
        if self.ring.push_responses_and_check_notify():
            self.channel.notify()
            self.stats.notifications += 1

    def _answer(self, rid: int, op: int, status: int, mapping: Mapping | None = None) -> None:
        if mapping is not None:
            mapping.release()  # unmap before the frontend can see the response
        if status != Status.OKAY:
            self.stats.errors += status == Status.ERROR
            self.stats.unsupported += status == Status.EOPNOTSUPP
        self.ring.put_response(self.abi.encode_response(rid, op, status))

    def _intake(self) -> int:
        if self._held is not None:
            plan, self._held = self._held, None
            if not self._dispatch(plan):
                return 0  # still no room: completions will wake us
            if self._barrier is not None:
                return 1
        if self._deferred:  # requests that followed a barrier, consumed but not yet started
            copies = list(self._deferred)
            self._deferred.clear()
        else:
            try:
                copies = self.ring.take_requests(self.budget)
            except RemoteProtocolError as exc:
                log.error("%s: %s", self.name, exc)
                self.stats.halted = True
                return 0
        if not copies:
            return 0
        self.stats.batches += 1
        decode = self.abi.decode_request
        handle = self.engine.handle
        for i, copy in enumerate(copies):
            if self._barrier is not None:
                # Nothing after a barrier starts before it is answered (tapdisk's rule).
                self._deferred.extend(copies[i:])
                break
            self.stats.requests += 1
            outcome = handle(decode(copy))
            if isinstance(outcome, NeedIndirect):
                try:
                    pages = self.grants.copy_pages(outcome.grefs)
                except OSError as exc:
                    req = outcome.request
                    log.warning("%s: request %d: indirect pages: %s", self.name, req.id, exc)
                    self._answer(req.id, req.indirect_op, Status.ERROR)
                    continue
                outcome = self.engine.handle_indirect(outcome, pages)
            if isinstance(outcome, Reply):
                if outcome.status == Status.ERROR:
                    log.warning("%s: request %d refused: %s", self.name, outcome.id, outcome.reason)
                self._answer(outcome.id, outcome.operation, outcome.status)
                continue
            if not self._dispatch(outcome):
                # Over the byte budget: this request waits (decoded) and the rest stay consumed
                # but undecoded, in order, like the requests behind a barrier.
                self._deferred.extend(copies[i + 1 :])
                break
        return len(copies)

    def _maybe_start_barrier(self) -> None:
        # The barrier is the only thing left in flight: everything before it has completed.
        if self._barrier is not None and not self._barrier_running and self.in_flight == 1:
            self._barrier_running = True
            self._submit(self._barrier)

    def _dispatch(self, plan: IoPlan) -> bool:
        """Start a validated request; False (and the plan held) if the byte budget is full."""
        if (
            plan.segments
            and self.bytes_in_flight
            and (self.bytes_in_flight + plan.length > self.max_bytes_in_flight)
        ):
            self._held = plan
            self.stats.held += 1
            return False
        mapping: Mapping | None = None
        buffers: tuple[memoryview, ...] = ()
        if plan.segments:
            try:
                mapping = self.grants.map_segments(plan.segments, plan.writes_guest_pages)
            except OSError as exc:
                log.warning("%s: request %d: %s", self.name, plan.id, exc)
                self._answer(plan.id, plan.operation, Status.ERROR)
                return True
            buffers = tuple(mapping.buffers)
            self.bytes_in_flight += plan.length
            self.stats.max_bytes_in_flight = max(
                self.stats.max_bytes_in_flight, self.bytes_in_flight
            )
        op = plan.op
        steps: list[BlockRequest]
        if op is not BlockOp.FLUSH:  # READ, WRITE, DISCARD: one step
            steps = [BlockRequest(op, plan.offset, plan.length, buffers)]
        else:
            write = [BlockRequest(BlockOp.WRITE, plan.offset, plan.length, buffers)]
            flush = [BlockRequest(BlockOp.FLUSH)]
            if not plan.barrier:  # FLUSH_DISKCACHE: write any data, then flush
                steps = (write if plan.length else []) + flush
            else:  # WRITE_BARRIER: drain, flush, write, flush
                steps = flush + (write if plan.length else []) + flush
        job = _Job(plan, mapping, steps)
        self.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.in_flight)
        if plan.barrier:
            self._barrier = job
            self._maybe_start_barrier()
            return True
        if plan.length <= self.inline_max and (op is BlockOp.READ or op is BlockOp.WRITE):
            if not self._inline_slow:
                self._run_inline(job)
                return True
            self._inline_probe -= 1
            if self._inline_probe <= 0:
                self._inline_probe = INLINE_PROBE
                self._run_inline(job)
                return True
        self._submit(job)
        return True

    def _run_inline(self, job: _Job) -> None:
        start = time.perf_counter()
        for step in job.steps:
            if self.executor.execute(step):
                job.status = Status.ERROR
                break
        times = self._inline_times
        times.append(time.perf_counter() - start)
        if len(times) >= INLINE_WINDOW or self._inline_slow:
            times.sort()
            self._inline_slow = times[len(times) // 2] > INLINE_SLOW
            times.clear()
        self.stats.inline += 1
        self._done.append(job)

    def _submit(self, job: _Job) -> None:
        def step_done(req: BlockRequest, err: int) -> None:
            if err:
                job.status = Status.ERROR
            elif job.steps:
                self.executor.submit(job.steps.pop(0), step_done)
                return
            self._done.append(job)
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake, 1)

        self.executor.submit(job.steps.pop(0), step_done)
