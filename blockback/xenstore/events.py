"""The xenstore client's watch events: a bounded, coalescing queue (XSA-349).

A frontend rewriting nodes under a watched path at a high rate must not grow our memory (Xen
security advisory 349, "unbounded memory usage for PV devices"): an event identical to one
already queued is dropped (coalesced); when the queue still overflows it is replaced by one
event per registered watch, at the watch's own path, meaning "something below here changed:
rescan" -- what ``docs/misc/xenstore.txt`` lets a watcher assume of any event.

The queue also keeps a pipe readable while it is non-empty, so a caller may wait for events in
its own ``select``/``poll`` loop (``XenStoreClient.event_fileno``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from .wire import XenStoreError


@dataclass(frozen=True, slots=True)
class WatchEvent:
    path: str
    token: str


class WatchQueue:
    """At most ``max_events`` watch events, waiting for a reader; thread-safe."""

    def __init__(self, max_events: int) -> None:
        self._events: collections.deque[WatchEvent] = collections.deque()
        self._keys: set[WatchEvent] = set()
        self._max = max(1, max_events)
        self._cv = threading.Condition()
        self._closed: str | None = None  # why no more events will come
        self.coalesced = 0
        self.collapsed = 0
        self._pipe_r, self._pipe_w = os.pipe()
        os.set_blocking(self._pipe_r, False)
        os.set_blocking(self._pipe_w, False)

    def __len__(self) -> int:
        with self._cv:
            return len(self._events)

    def fileno(self) -> int:
        """A descriptor that polls readable while events are queued."""
        return self._pipe_r

    def push(self, event: WatchEvent, watches: Iterable[tuple[str, str]]) -> None:
        """Queue ``event``; ``watches`` (path, token) are the rescan events if it overflows."""
        with self._cv:
            if event in self._keys:
                self.coalesced += 1
                return
            was_empty = not self._events
            if len(self._events) >= self._max:
                # Collapse: one "rescan" event per watch instead of the flood.
                self.collapsed += 1
                self._events.clear()
                self._keys.clear()
                for path, token in list(watches)[: self._max]:
                    rescan = WatchEvent(path, token)
                    self._events.append(rescan)
                    self._keys.add(rescan)
                if event not in self._keys and len(self._events) < self._max:
                    self._events.append(event)
                    self._keys.add(event)
            else:
                self._events.append(event)
                self._keys.add(event)
            if was_empty:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._pipe_w, b"x")
            self._cv.notify_all()

    def get(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event; None after ``timeout`` seconds (None = wait for ever).  Once the
        queue is closed and empty: ``XenStoreError`` EIO with the reason."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._events or self._closed, timeout):
                return None
            if not self._events:
                raise XenStoreError("EIO", self._closed or "connection closed")
            event = self._events.popleft()
            self._keys.discard(event)
            if not self._events:
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(self._pipe_r, 4096):
                        pass
            return event

    def close(self, reason: str) -> None:
        """No more events will come (``reason`` says why): wake every reader."""
        with self._cv:
            self._closed = reason
            self._cv.notify_all()

    def release(self) -> None:
        """Close the pipe (after :meth:`close`, once no reader polls it)."""
        for fd in (self._pipe_r, self._pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)
