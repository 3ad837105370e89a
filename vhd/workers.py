"""A few worker threads for chunked copies and compares (``vhd convert``, ``vhd compare``):
``preadv``/``pwritev`` release the GIL, so page-cache copies run on both cores, as qemu-img's
parallel requests do.

What ``concurrent.futures.ThreadPoolExecutor`` did there, without its import (it pulls in
``logging``: about 5 ms of every such command's start-up).  Jobs run first come first served;
the caller takes their results in its own order, and a worker's exception is raised in the
caller's thread.  On leaving, jobs not yet started are dropped and the running ones are waited
for, so no worker touches a file after the caller has moved on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any, Generic, TypeVar

    T = TypeVar("T")
else:
    T = None

    class Generic:
        """What ``typing.Generic`` does at run time here: ``Job[int]`` is ``Job`` (annotations
        are strings, never evaluated; mypy sees the real one)."""

        __slots__ = ()

        def __class_getitem__(cls, _item: object) -> type:
            return cls


class Job(Generic[T]):
    """One call: its arguments, then its result or the exception it raised."""

    __slots__ = ("_done", "_error", "_value", "args")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def finish(self, value: T | None, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def result(self) -> T:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set by a call that returned a T


class WorkerPool(Generic[T]):
    """``workers`` threads named ``name_<i>`` calling ``fn(*args)`` for each submitted job."""

    def __init__(self, fn: Callable[..., T], workers: int, name: str) -> None:
        self._fn = fn
        self._jobs: queue.SimpleQueue[Job[T] | None] = queue.SimpleQueue()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._stopping:
                job.finish(None, InterruptedError("job abandoned"))
                continue
            try:
                job.finish(self._fn(*job.args), None)
            except BaseException as exc:  # handed to the caller's thread by Job.result
                job.finish(None, exc)

    def submit(self, *args: Any) -> Job[T]:
        job: Job[T] = Job(args)
        self._jobs.put(job)
        return job

    def __enter__(self) -> WorkerPool[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
