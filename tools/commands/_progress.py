"""A one-line progress bar on stderr for the long-running maintenance commands."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

MiB = 1024 * 1024


def progress_bar(label: str, enabled: bool) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that redraws ``label [####    ] 42% 12/30 MiB`` at most
    ten times a second, and ends the line when done == total."""
    last = [0.0]

    def show(done: int, total: int) -> None:
        if not enabled:
            return
        now = time.monotonic()
        if done < total and now - last[0] < 0.1:
            return
        last[0] = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(
            f"\r{label} [{bar:<30}] {frac * 100:5.1f}% {done / MiB:.0f}/{total / MiB:.0f} MiB"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
