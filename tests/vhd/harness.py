"""Test harnesses shared by the VHD suites (tests/vhd) and their VHDX twins (tests/vhd/vhdx):
one copy of each, parametrized by format where the behaviour is the same.

- :class:`ImageMachine`: the Hypothesis state machine (pwrite/pread/preadinto/discard/flush/
  reopen/extents against a bytearray); each format subclasses it with its set-up, its ranges,
  its discard model and its file checks.
- Crash points: :func:`record_io` logs the writes, zeroings and barriers the library issues,
  :func:`apply_ops` replays a prefix of them onto the image as it was.
- Stopped operations: :func:`stopped_runs` stops an operation after each of its synced steps.
- SIGKILL rounds: :func:`run_writer` starts ``tests.vhd.crash_writer`` on an image and kills it
  at a random moment; :func:`parse_log` and :func:`verify` check what survived.
- Fuzzing: :class:`Seed`, :func:`corruptions`, :func:`corrupted_copy`, :func:`attempt` and
  :func:`within_bounds` (time and memory) for random corruption of valid images.
- New files: :func:`slow_convert` and :func:`leftovers` for interrupted create/convert.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

import vhd
import vhd.fileio
from tests.images import sha
from tests.strategies import payload
from tests.vhd.crash_writer import PAGE
from tests.vhd.crash_writer import payload as writer_payload
from vhd.disk import Disk

ROOT = Path(__file__).resolve().parents[2]
SECTOR = 512


# -- the state machine -------------------------------------------------------------------------


class ImageMachine(RuleBasedStateMachine):
    """Drive one writable disk; ``build`` makes the layers (base first, leaf last).

    A subclass supplies ``@initialize`` (which sets ``size`` and ``expected``, calls ``build``,
    then :meth:`start`), :meth:`ranges`, :meth:`discard_range` and :meth:`check_files`."""

    prefix = "img-sm-"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix=self.prefix))
        self.disk: Disk | None = None
        self.layers: list[Path] = []
        self.frozen: dict[Path, str] = {}
        self.expected = bytearray()
        self.size = 0

    def ranges(self, size: int) -> st.SearchStrategy[tuple[int, int]]:
        raise NotImplementedError

    def discard_range(self, off: int, n: int) -> None:
        """Discard ``off, n`` on the open disk and update ``expected`` as the format says."""
        raise NotImplementedError

    def check_files(self) -> None:
        """The files on disk (the disk closed) hold exactly ``expected``; parents untouched."""
        raise NotImplementedError

    def oracles(self) -> None:
        """Independent readers, where they can read the disk (at the end)."""

    def start(self) -> None:
        """After ``build``: remember the parents, check the files, open the leaf."""
        for parent in self.layers[:-1]:
            self.frozen[parent] = sha(parent)
        self.check_files()
        self.disk = vhd.open(self.layers[-1], "r+")
        assert self.disk.size == self.size

    def check_parents(self) -> None:
        for parent, want in self.frozen.items():
            assert sha(parent) == want, f"{parent.name} was modified"

    # -- rules -----------------------------------------------------------------------------

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data(), seed=st.integers(0, 255))
    def write(self, data: st.DataObject, seed: int) -> None:
        assert self.disk is not None
        off, n = data.draw(self.ranges(self.size))
        buf = payload(n, seed)
        assert self.disk.pwrite(buf, off) == n
        self.expected[off : off + n] = buf

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        assert self.disk is not None
        off, n = data.draw(self.ranges(self.size))
        assert self.disk.pread(n, off) == bytes(self.expected[off : off + n])

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data(), extra=st.integers(0, 3000))
    def read_into_past_end(self, data: st.DataObject, extra: int) -> None:
        """preadinto a memoryview slice; reads past the end are clipped."""
        assert self.disk is not None
        off, n = data.draw(self.ranges(self.size))
        backing = bytearray(b"\xaa" * (n + extra + 7))
        got = self.disk.preadinto(memoryview(backing)[7:], off)
        assert got == min(n + extra, self.size - off)
        assert backing[7 : 7 + got] == self.expected[off : off + got]
        assert backing[7 + got :] == b"\xaa" * (n + extra - got)

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        assert self.disk is not None
        off, n = data.draw(self.ranges(self.size))
        self.discard_range(off, n)

    @precondition(lambda self: self.disk is not None)
    @rule()
    def flush(self) -> None:
        assert self.disk is not None
        self.disk.flush()

    @precondition(lambda self: self.disk is not None)
    @rule()
    def reopen(self) -> None:
        assert self.disk is not None
        self.disk.close()
        self.disk = None
        self.check_files()
        self.disk = vhd.open(self.layers[-1], "r+")

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data())
    def extents(self, data: st.DataObject) -> None:
        """Extents tile the range; zero-layer runs read as zeros; layers exist in the chain."""
        assert self.disk is not None
        off, n = data.draw(self.ranges(self.size))
        pos = off
        for ext in self.disk.extents(off, n):
            assert ext.offset == pos and ext.length > 0
            if ext.layer is None:
                assert self.expected[ext.offset : ext.end] == bytes(ext.length)
            else:
                assert 0 <= ext.layer < len(self.layers)
            pos = ext.end
        assert pos == off + n

    def teardown(self) -> None:
        try:
            if self.disk is not None:
                self.disk.close()
                self.disk = None
                self.check_files()
                self.oracles()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# -- crash points ------------------------------------------------------------------------------

# ("write", offset, data) / ("zero", offset, length) / ("size", length, 0) / ("sync", 0, 0)
Op = tuple[str, int, bytes | int]


def record_io(
    monkeypatch: pytest.MonkeyPatch,
    log: list[Op],
    targets: dict[ModuleType, tuple[str, ...]],
    *,
    fsync: bool = False,
    ftruncate: bool = False,
) -> None:
    """Log every write_all/write_zeros/punch_hole the ``targets`` modules call (by the names
    they imported from vhd.fileio), every fdatasync (and fsync, ftruncate when asked)."""
    real_write, real_zeros = vhd.fileio.write_all, vhd.fileio.write_zeros
    real_punch = vhd.fileio.punch_hole
    real_sync, real_fsync, real_trunc = os.fdatasync, os.fsync, os.ftruncate

    def write_all(fd: int, data: Any, offset: int) -> None:
        log.append(("write", offset, bytes(data)))
        real_write(fd, data, offset)

    def write_zeros(fd: int, offset: int, length: int) -> None:
        log.append(("zero", offset, length))
        real_zeros(fd, offset, length)

    def punch_hole(fd: int, offset: int, length: int) -> None:
        log.append(("zero", offset, length))
        real_punch(fd, offset, length)

    def fdatasync(fd: int) -> None:
        log.append(("sync", 0, 0))
        real_sync(fd)

    def fsync_(fd: int) -> None:
        log.append(("sync", 0, 0))
        real_fsync(fd)

    def ftruncate_(fd: int, length: int) -> None:
        log.append(("size", length, 0))
        real_trunc(fd, length)

    wrappers = {"write_all": write_all, "write_zeros": write_zeros, "punch_hole": punch_hole}
    for module, names in targets.items():
        for name in names:
            monkeypatch.setattr(module, name, wrappers[name])
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    if fsync:
        monkeypatch.setattr(os, "fsync", fsync_)
    if ftruncate:
        monkeypatch.setattr(os, "ftruncate", ftruncate_)


def apply_ops(image: bytes | bytearray, ops: list[Op]) -> bytes:
    """The file as it is after ``ops`` reached the disk, in order."""
    out = bytearray(image)
    for kind, offset, value in ops:
        if kind == "write":
            assert isinstance(value, bytes)
            if len(out) < offset + len(value):
                out.extend(bytes(offset + len(value) - len(out)))
            out[offset : offset + len(value)] = value
        elif kind == "zero":
            assert isinstance(value, int)
            end = min(len(out), offset + value)  # punching keeps the file size
            out[offset:end] = bytes(max(0, end - offset))
        elif kind == "size":
            del out[offset:]
            out.extend(bytes(offset - len(out)))
    return bytes(out)


def changed(old: bytes, changes: list[tuple[int, bytes]]) -> bytes:
    new = bytearray(old)
    for offset, data in changes:
        new[offset : offset + len(data)] = data
    return bytes(new)


def assert_old_or_new(seen: bytes, old: bytes, new: bytes, k: int, total: int) -> None:
    """Every sector of a crash image reads its old or its new content."""
    for s in range(len(old) // SECTOR):
        sector = seen[s * SECTOR : (s + 1) * SECTOR]
        assert sector in (old[s * SECTOR : (s + 1) * SECTOR], new[s * SECTOR : (s + 1) * SECTOR]), (
            f"crash after write {k}/{total}: sector {s} is neither old nor new"
        )


class Stop(Exception):
    """Raised in place of the fsync after which an operation is stopped."""


def stopped_runs(
    monkeypatch: pytest.MonkeyPatch, raw: bytes, stem: Path, operation: Callable[[Path], object]
) -> Iterator[tuple[int, Path, bool]]:
    """Run ``operation`` on fresh copies of the image ``raw`` (``stem`` + step + ".vhd"),
    stopped right after its 1st, 2nd, ... synced step (the data is synced, then :class:`Stop`
    is raised in place of the fsync's return), until a run finishes.  Yields
    ``(step, copy, finished)`` after each run, with fsync restored."""
    real_fsync = os.fsync
    step = 0
    while True:
        path = stem.with_name(f"{stem.name}{step}.vhd")
        path.write_bytes(raw)
        calls = [0]

        def fsync(fd: int, limit: int = step, calls: list[int] = calls) -> None:
            os.fdatasync(fd)
            calls[0] += 1
            if calls[0] > limit:
                raise Stop

        monkeypatch.setattr(os, "fsync", fsync)
        try:
            operation(path)
            finished = True
        except Stop:
            finished = False
        monkeypatch.setattr(os, "fsync", real_fsync)
        yield step, path, finished
        if finished:
            return
        step += 1


# -- SIGKILL rounds ----------------------------------------------------------------------------


def run_writer(fmt: str, image: Path, log: Path, seed: int, pause: float) -> None:
    """Start ``tests.vhd.crash_writer`` on ``image``, let it run up to ``pause`` seconds (a
    random time by ``seed``'s round generator is the caller's), then SIGKILL it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.vhd.crash_writer", fmt, str(image), str(log), str(seed)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and log.read_bytes().startswith(b"R")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(pause)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


ROUNDS = 20


def killed_writers(
    fmt: str,
    image: Path,
    tmp: Path,
    seed0: int,
    max_pause: float,
    more: Callable[[], bool] | None = None,
) -> Iterator[tuple[int, list[tuple[int, int, int, bool]], int]]:
    """ROUNDS writer runs on ``image``, each killed after a random pause (up to ``max_pause``
    seconds, drawn from ``seed0``); yields each round's writer seed and its parsed log.
    ``more``: asked after ROUNDS rounds, whether to go on (up to 3 x ROUNDS) because the kills
    have not yet caught what the caller must see caught: on a loaded machine the pauses land
    elsewhere in the writer's run, so a fixed number of rounds would fail by chance."""
    rng = random.Random(seed0)
    for round_ in range(3 * ROUNDS):
        if round_ >= ROUNDS and (more is None or not more()):
            return
        seed = seed0 * 1000 + round_
        log = tmp / f"log{round_}"
        run_writer(fmt, image, log, seed, rng.uniform(0.0, max_pause))
        writes, flushed = parse_log(log.read_text())
        yield seed, writes, flushed


def parse_log(text: str) -> tuple[list[tuple[int, int, int, bool]], int]:
    """(seq, offset, length, is_discard) of every operation begun, and the last flushed seq."""
    writes: list[tuple[int, int, int, bool]] = []
    flushed = -1
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] in ("W", "D") and len(parts) == 4:
            writes.append((int(parts[1]), int(parts[2]), int(parts[3]), parts[0] == "D"))
        elif parts[0] == "F" and len(parts) == 2:
            flushed = int(parts[1])
    return writes, flushed


def verify(
    base: bytes,
    got: bytes,
    writes: list[tuple[int, int, int, bool]],
    flushed: int,
    seed: int,
    released: bytes | None = None,
) -> None:
    """Acknowledged writes read back exactly; other touched pages hold their old content or
    one of the writes to them.  ``released``: what a discarded range reads as (the parent's
    data on a differencing VHD, whose discard releases sectors to the parent; None: zeros)."""
    model = bytearray(base)
    pending: dict[int, list[bytes]] = {}
    for seq, offset, length, discard in writes:
        if discard:
            data = bytes(length) if released is None else released[offset : offset + length]
        else:
            data = writer_payload(seed, seq, length)
        if seq <= flushed:
            model[offset : offset + length] = data
        else:
            for i in range(0, length, PAGE):
                pending.setdefault((offset + i) // PAGE, []).append(data[i : i + PAGE])
    assert len(got) == len(model)
    if got == model:
        return
    for page in range(len(model) // PAGE):
        have = got[page * PAGE : (page + 1) * PAGE]
        want = bytes(model[page * PAGE : (page + 1) * PAGE])
        if have == want:
            continue
        assert have in pending.get(page, []), f"page {page} lost an acknowledged write"


# -- fuzzing -----------------------------------------------------------------------------------

MiB = 1024 * 1024
MAX_SECONDS = 10.0
MAX_PEAK = 48 * MiB


@dataclass(frozen=True)
class Seed:
    """A valid image (and the files it needs next to it) to corrupt copies of."""

    files: tuple[Path, ...]  # the last one is corrupted; earlier ones are its parents
    regions: tuple[tuple[int, int], ...]


@st.composite
def corruptions(
    draw: st.DrawFn,
    regions: tuple[tuple[int, int], ...],
    interesting: list[int],
    kinds: tuple[str, ...],
    endian: str,
) -> list[tuple[int, bytes]]:
    """1..6 mutations in ``regions``: a byte, a 16/32/64-bit field (``endian`` "<" or ">",
    often an ``interesting`` value) or a run of zeros."""
    muts: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(1, 6))):
        lo, hi = draw(st.sampled_from(regions))
        at = draw(st.integers(lo, max(lo, hi - 1)))
        kind = draw(st.sampled_from(kinds))
        if kind == "byte":
            data = bytes([draw(st.integers(0, 255))])
        elif kind == "u16":
            data = struct.pack(endian + "H", draw(st.integers(0, 0xFFFF)))
        elif kind == "u32":
            value = draw(st.one_of(st.sampled_from(interesting), st.integers(0, 2**32 - 1)))
            data = struct.pack(endian + "I", value & 0xFFFFFFFF)
        elif kind == "u64":
            value = draw(st.one_of(st.sampled_from(interesting), st.integers(0, 2**64 - 1)))
            data = struct.pack(endian + "Q", value)
        else:
            data = bytes(draw(st.integers(1, 64)))
        muts.append((at, data))
    return muts


def corrupted_copy(
    seed: Seed,
    tmp: Path,
    muts: list[tuple[int, bytes]],
    refix: Callable[[bytearray], None] | None,
) -> tuple[Path, bytes]:
    """Copy the seed's files into ``tmp``, apply ``muts`` to the last (then ``refix`` its
    checksums, if given); returns its path and bytes."""
    for f in seed.files:
        shutil.copyfile(f, tmp / f.name)
    target = tmp / seed.files[-1].name
    raw = bytearray(target.read_bytes())
    for at, data in muts:
        raw[at : at + len(data)] = data[: max(0, len(raw) - at)]
    if refix is not None:
        refix(raw)
    target.write_bytes(bytes(raw))
    return target, bytes(raw)


def use(disk: Disk, offset: int, write: bool, extents_window: int) -> None:
    """Bounded use of an opened disk: reads at both ends and in the middle, extents, writes."""
    size = disk.size
    buf = bytearray(64 * 1024)
    for at in {0, max(0, size // 2 - 1000), max(0, size - len(buf)), offset % max(1, size)}:
        disk.preadinto(buf, at)
    disk.pread(1000, max(0, size - 333))
    for count, _ in enumerate(disk.extents(0, min(size, extents_window))):
        if count > 10000:
            break
    if write and not disk.read_only and size:
        at = offset % size
        n = min(3000, size - at)
        disk.pwrite(payload(n, 1), at)
        disk.discard(at, min(n, 1024))
        disk.pwrite(payload(600, 2), max(0, size - 600))
        disk.flush()
        disk.pread(n, at)


def attempt(path: Path, offset: int, extents_window: int, **kw: Any) -> None:
    """Open (``kw`` as vhd.open takes it) and use; a clean VHDError is fine, nothing else."""
    try:
        disk = vhd.open(path, **kw)
    except vhd.VHDError:
        return
    try:
        use(disk, offset, kw.get("mode") == "r+", extents_window)
    except vhd.VHDError:
        pass
    finally:
        with contextlib.suppress(vhd.VHDError):
            disk.close()


@contextlib.contextmanager
def within_bounds(max_seconds: float = MAX_SECONDS, max_peak: int = MAX_PEAK) -> Iterator[None]:
    """The body ends within ``max_seconds`` and allocates at most ``max_peak`` bytes at once."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - start < max_seconds
    assert peak < max_peak, f"peak memory {peak} bytes"


# -- new files ---------------------------------------------------------------------------------

# The temporary name of a file being written (vhd.newfile.PARTIAL; spelled out, as the README).
PARTIAL = ".vhdkit-partial-"

# Runs the CLI with a source whose reads are slow, and touches a marker once copying started.
_SLOW_CONVERT = r"""
import pathlib, sys, time
import vhd.source
real = vhd.source.Source.preadinto
marker = pathlib.Path(sys.argv[1])
def slow(self, buffer, offset):
    marker.touch()
    time.sleep(0.25)
    return real(self, buffer, offset)
vhd.source.Source.preadinto = slow
from vhdtools.cli import main
sys.exit(main(sys.argv[2:]))
"""


def slow_convert(tmp: Path, src: Path, dst: Path, *extra: str) -> subprocess.Popen[str]:
    """`vhd convert` with slow reads, returned once copying has started."""
    marker = tmp / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERT, str(marker), "convert", *extra, str(src), str(dst)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())
