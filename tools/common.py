"""Helpers shared by the ``vhd`` sub-commands: size parsing, opening images the CLI way (lenient
checksums, warnings on stderr), raw-or-VHD sources, and a progress bar for terminals."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import vhd
from vhd.source import Source, open_source

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import TextIO

__all__ = [
    "LOCAL_PARENTS",
    "Progress",
    "Source",
    "add_parent_options",
    "add_progress_options",
    "open_source",
    "open_vhd",
    "parent_policy",
    "parse_size",
    "progress_wanted",
    "warn",
]

# Commands a user runs on their own images follow the parent locators as written (as qemu-img
# and Hyper-V do: `vhd create --parent ../base.vhd` children keep working); `serve` and `mount`,
# which hand an image to someone else, confine them (see README, "Untrusted images").
LOCAL_PARENTS = vhd.ParentPolicy.trusting()


def add_parent_dir_option(
    p: argparse.ArgumentParser, help: str | None = "also look for parent images in DIR (repeatable)"
) -> None:
    """``--parent-dir DIR`` (repeatable): folders where parents are also looked for."""
    p.add_argument("--parent-dir", metavar="DIR", action="append", default=[], help=help)


def add_parent_options(p: argparse.ArgumentParser, *, serving: bool) -> None:
    """``--parent-dir`` and the parent policy switch of a command."""
    add_parent_dir_option(p)
    if serving:
        p.add_argument(
            "--allow-absolute-parents",
            action="store_true",
            help="follow parent locators anywhere on the host (absolute paths, '..'); by "
            "default parents are looked for only next to the image and in --parent-dir folders",
        )
    else:
        p.add_argument(
            "--confine-parents",
            action="store_true",
            help="look for parents only where 'vhd serve' and 'vhd mount' would: next to the "
            "image and in --parent-dir folders (to vet an image one did not make)",
        )


def parent_policy(args: argparse.Namespace) -> vhd.ParentPolicy:
    """The parent policy the options of :func:`add_parent_options` ask for."""
    dirs = tuple(getattr(args, "parent_dir", None) or ())
    if getattr(args, "allow_absolute_parents", False):
        return vhd.ParentPolicy.trusting(dirs)
    if hasattr(args, "allow_absolute_parents") or getattr(args, "confine_parents", False):
        return vhd.ParentPolicy(dirs=dirs)
    return vhd.ParentPolicy.trusting(dirs)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# A pattern, compiled by re's cache when a size is first parsed: most commands parse none.
_SIZE = r"^\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$"


def relative_size_matcher() -> re.Pattern[str]:
    """``-N`` sizes as :func:`parse_size` reads them, for argparse's negative-number matcher of a
    command taking one (``vhd resize IMAGE -6M``)."""
    return re.compile(_SIZE.replace("([+-]?)", "(-)", 1), re.IGNORECASE)


def parse_size(text: str, current: int | None = None) -> int:
    """``10G``, ``1.5G``, ``512M``, ``4096``, ``1TiB`` -> bytes (binary units), the one size
    parser of every command.  With ``current`` (resize), ``+N``/``-N`` are relative to it.
    A fraction must come to a whole number of bytes (``1.5K`` is 1536; ``0.3K`` is refused)."""
    match = re.match(_SIZE, text, re.IGNORECASE)
    if not match:
        raise ValueError(
            f"invalid size {text!r} (use a number, 1.5 too, with an optional K/M/G/T suffix)"
        )
    sign, number, unit = match.groups()
    if number.isdigit():
        value = int(number) * _UNITS[unit.upper()]
    else:
        import fractions  # (only for fractional sizes: not at every command's start-up)

        exact = fractions.Fraction(number) * _UNITS[unit.upper()]  # exact: no float rounding
        if exact.denominator != 1:
            raise ValueError(
                f"invalid size {text!r}: {float(exact):g} is not a whole number of bytes"
            )
        value = int(exact)
    if not sign:
        return value
    if current is None:
        raise ValueError(f"invalid size {text!r}: a relative size (+/-) is for resize only")
    return current + value if sign == "+" else current - value


def warn(message: str) -> None:
    print(f"vhd: warning: {message}", file=sys.stderr)


def open_vhd(
    path: str,
    mode: str = "r",
    *,
    parent_dirs: list[str] | None = None,
    allow_parent_mismatch: bool = False,
    open_parent: bool = True,
    policy: vhd.ParentPolicy = LOCAL_PARENTS,
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
        parent_policy=policy,
        force_share=force_share,
    )
    for layer in disk.chain:
        for message in layer.warnings:
            warn(f"{layer.path}: {message}")
    return disk


def add_progress_options(parser: argparse.ArgumentParser) -> None:
    """``-p/--progress`` and ``-q/--quiet``, the same on every long-running command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-p", "--progress", action="store_true", help="show progress even when not a terminal"
    )
    group.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")


def progress_wanted(args: argparse.Namespace) -> bool:
    """A progress bar: with -p; never with -q; else when stderr is a terminal."""
    if getattr(args, "quiet", False):
        return False
    if getattr(args, "progress", False):
        return True
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class Progress:
    """A one-line progress bar on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(
        self,
        total: int,
        label: str,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
    ) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = self.stream.isatty() and os.environ.get("TERM") != "dumb"
        self.enabled = enabled
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
