"""``vhd compare`` side by side with ``qemu-img compare`` (issue 9, item 17): target <= 1.0x
qemu-img's time on sparse pairs and on half-full pairs.

* sparse pairs: two empty 8 GiB dynamic VHDs, two empty 2040 GiB dynamic VHDs, two 8 GiB raw
  files that are one hole each (only the extents may be looked at: reading the zeros took 65 s);
* a half-full pair: a 1 GiB dynamic VHD made by ``vhd convert`` against its raw source (4 MiB
  runs of random data and of zeros, page cache warm), so both tools must read every data byte;
* for scale, ``vhd --version``: the interpreter start-up every ``vhd`` command pays, which is most
  of the sparse rows' time (qemu-img, a C program, starts in a few milliseconds).

Times are medians of the whole process (GNU time) over rounds that run ours and qemu-img's in
turn (``SHORT_ROUNDS`` for the start-up-bound rows, ``HALF_ROUNDS`` for the half-full pair), of
the regular install ``make bench`` made (see :mod:`benchmarks.core`), not the editable dev one.
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path
from typing import Any

import vhd

from . import core
from .core import VHD_CLI, GiB, _make_source, _row, _warm

# The start-up-bound rows take a few tens of milliseconds: more runs than the data-bound ones.
SHORT_ROUNDS = 15
HALF_ROUNDS = 5


def _alternating(commands: list[list[str]], rounds: int) -> list[float]:
    """Each command's median wall time over ``rounds`` rounds that run the commands in turn
    (:func:`benchmarks.core.alternating`), so that a change in the machine's load lands on all
    of them alike."""
    return [statistics.median(r.wall) for r in core.alternating(commands, rounds)]


def _median(command: list[str]) -> float:
    return _alternating([command], SHORT_ROUNDS)[0]


def _pair(
    name: str, a: Path, b: Path, fmt_a: str, fmt_b: str, qemu: str, rounds: int = SHORT_ROUNDS
) -> dict[str, Any]:
    ours, theirs = _alternating(
        [
            [VHD_CLI, "compare", str(a), str(b)],
            [qemu, "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
        ],
        rounds,
    )
    return _row(name, ours, theirs, "s", "vs qemu-img compare; target <= 1.0x")


def run(workdir: Path) -> list[dict[str, Any]]:
    qemu = core.prepare(workdir)
    rows: list[dict[str, Any]] = []
    # CPython's own start-up, no site, no imports: the floor under every `vhd` command
    python = str(Path(VHD_CLI).with_name("python"))
    floor = _median([python, "-I", "-S", "-c", "pass"])
    rows.append(_row("python -I -S -c pass (CPython's floor)", floor, None, "s", "for scale"))
    startup = _median([VHD_CLI, "--version"])
    install = "regular install" if core.REGULAR_INSTALL else "EDITABLE dev install"
    rows.append(
        _row("vhd --version (interpreter start-up)", startup, None, "s", f"for scale; {install}")
    )
    paths: list[Path] = []
    try:
        for size, label in ((8 * GiB, "8 GiB"), (2040 * GiB, "2040 GiB")):
            a, b = workdir / f"a-{label[:-4]}.vhd", workdir / f"b-{label[:-4]}.vhd"
            paths += [a, b]
            vhd.create(a, size).close()
            vhd.create(b, size).close()
            rows.append(
                _pair(f"compare, sparse {label} dynamic VHD pair", a, b, "vpc", "vpc", qemu)
            )
        a, b = workdir / "a.raw", workdir / "b.raw"
        paths += [a, b]
        for p in (a, b):
            with p.open("wb") as f:
                f.truncate(8 * GiB)
        rows.append(_pair("compare, sparse 8 GiB raw pair", a, b, "raw", "raw", qemu))

        src, image = workdir / "half.raw", workdir / "half.vhd"
        paths += [src, image]
        _make_source(src)
        subprocess.run([VHD_CLI, "convert", str(src), str(image)], check=True, timeout=600)
        _warm(src)
        _warm(image)
        rows.append(
            _pair(
                "compare, half-full 1 GiB dynamic VHD vs raw",
                image,
                src,
                "vpc",
                "raw",
                qemu,
                rounds=HALF_ROUNDS,
            )
        )
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
    return rows
