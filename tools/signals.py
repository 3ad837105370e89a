"""Signal handling for the long-running commands (``vhd serve``, ``vhd mount``): the library
takes a :class:`threading.Event` to stop on; turning SIGTERM/SIGINT into that event is the CLI's
business, done here once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


@contextlib.contextmanager
def stop_on_signals(event: threading.Event) -> Iterator[threading.Event]:
    """Set ``event`` on SIGTERM or SIGINT while the block runs; the previous handlers come back
    afterwards.  Whatever the block does after the event is set (a drain, a final flush) runs
    with our handlers still in place, so a second signal cannot cut it short."""

    def handler(signum: int, frame: Any) -> None:
        event.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
