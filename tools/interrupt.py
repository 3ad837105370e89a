"""SIGTERM and SIGHUP as Ctrl-C, for commands that write new files (``create``, ``convert``).

Python turns SIGINT into :class:`KeyboardInterrupt`, so cleanups run (:mod:`vhd.newfile` removes
its temporary); SIGTERM and SIGHUP would kill the process outright and leave the temporary
behind.  Inside :func:`terminate_as_interrupt` they raise :class:`Terminated` (a
``KeyboardInterrupt``) instead.  Only where they would otherwise kill the process (the default
handler) and only in the main thread: FUSE and the servers install their own handlers.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable
from types import FrameType

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; ``signum`` says which (the exit status is 128 + signum)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def terminate_as_interrupt(func: Callable[..., T]) -> Callable[..., T]:
    """Run ``func`` with SIGTERM/SIGHUP raising :class:`Terminated`."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> T:
        if threading.current_thread() is not threading.main_thread():
            return func(*args, **kwargs)
        saved = {}
        for signum in _SIGNALS:
            if signal.getsignal(signum) is signal.SIG_DFL:
                saved[signum] = signal.signal(signum, _raise)
        try:
            return func(*args, **kwargs)
        finally:
            for signum, old in saved.items():
                signal.signal(signum, old)

    return wrapper
