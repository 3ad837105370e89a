"""Helpers shared by the ``vhd`` sub-commands: size parsing, opening images the CLI way (lenient
checksums, warnings on stderr), raw-or-VHD sources, and a progress bar for terminals."""

from __future__ import annotations

import os
import re
import sys
import time
from typing import TextIO

import vhd
from vhd.source import Source, open_source

__all__ = ["Progress", "Source", "open_source", "open_vhd", "parse_size", "warn"]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``4096``, ``1TiB`` -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r} (use a number with an optional K/M/G/T suffix)")
    number, unit = match.groups()
    return int(number) * _UNITS[unit.upper()]


def warn(message: str) -> None:
    print(f"vhd: warning: {message}", file=sys.stderr)


def open_vhd(
    path: str,
    mode: str = "r",
    *,
    parent_dirs: list[str] | None = None,
    allow_parent_mismatch: bool = False,
    open_parent: bool = True,
    force_share: bool = False,
) -> vhd.Disk:
    """Open like the CLI does: bad checksums are warnings, not errors."""
    disk = vhd.open(
        path,
        mode,
        strict=False,
        parent_dirs=parent_dirs or (),
        allow_parent_mismatch=allow_parent_mismatch,
        open_parent=open_parent,
        force_share=force_share,
    )
    for layer in disk.chain:
        for message in layer.warnings:
            warn(f"{layer.path}: {message}")
    return disk


class Progress:
    """A one-line progress bar on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() and os.environ.get("TERM") != "dumb"
        self._last = 0.0
        self._start = time.monotonic()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2 and done < self.total:
            return
        self._last = now
        frac = min(1.0, done / self.total)
        width = 30
        bar = "#" * int(frac * width)
        rate = done / max(now - self._start, 1e-6) / (1 << 20)
        self.stream.write(f"\r{self.label} [{bar:<{width}}] {frac * 100:5.1f}% {rate:7.1f} MiB/s")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.update(self.total)
            self.stream.write("\n")
            self.stream.flush()
