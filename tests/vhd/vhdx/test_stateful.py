"""Hypothesis stateful tests for VHDX: random pwrite/pread/preadinto/discard/flush/reopen/extents
against a bytearray, on dynamic disks (512 and 4096-byte sectors), differencing disks and mixed
chains (a VHD base under VHDX children).

After every reopen the files are read again by a fresh read-only open and the parents are
checked byte for byte untouched; at the end a dynamic disk is also read by qemu-img (512-byte
sectors: qemu supports no other) and by libvhdi, and passes ``qemu-img check``.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

import vhd
from tests.interop.oracles import libvhdi_read
from tests.strategies import hsettings, payload
from tests.vhd.vhdx.helpers import assert_qemu_clean, qemu_raw
from vhd.disk import Disk
from vhd.vhdx import create_vhdx, open_vhdx

MiB = 1024 * 1024


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@st.composite
def _ranges(draw: st.DrawFn, size: int) -> tuple[int, int]:
    """(offset, length) biased to sector, 4 KiB and 1 MiB block edges."""
    edge = st.builds(
        lambda b, d: max(0, min(size - 1, b * MiB + d)),
        st.integers(0, size // MiB),
        st.sampled_from([-4097, -4096, -513, -512, -1, 0, 1, 511, 512, 4096]),
    )
    offset = draw(st.one_of(st.integers(0, size - 1), edge))
    length = draw(
        st.one_of(
            st.integers(0, min(70_000, size - offset)),
            st.sampled_from([1, 512, 4096, MiB, MiB + 512]).filter(lambda n: n <= size - offset),
        )
    )
    return offset, length


class VHDXMachine(RuleBasedStateMachine):
    """Drive one writable VHDX; ``build`` makes the layers (base first, leaf last)."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="vhdx-sm-"))
        self.disk: Disk | None = None
        self.layers: list[Path] = []
        self.frozen: dict[Path, str] = {}
        self.expected = bytearray()
        self.size = 0
        self.lss = 512

    def build(self, rng: random.Random) -> None:
        leaf = self.dir / "leaf.vhdx"
        create_vhdx(leaf, self.size, block_size=MiB, logical_sector_size=self.lss).close()
        self.layers = [leaf]

    def _fill(self, disk: Disk, rng: random.Random) -> None:
        """Random runs of data in a new layer, mirrored into ``expected``."""
        for _ in range(rng.randrange(1, 6)):
            off = rng.randrange(0, self.size // 512) * 512
            n = min(self.size - off, rng.randrange(1, 3 * MiB))
            data = rng.randbytes(n)
            disk.pwrite(data, off)
            self.expected[off : off + n] = data

    @initialize(
        sectors=st.integers(1, 5 * MiB // 4096),
        lss=st.sampled_from([512, 4096]),
        seed=st.integers(0, 2**16),
    )
    def setup(self, sectors: int, lss: int, seed: int) -> None:
        self.lss = lss
        self.size = sectors * 4096
        self.expected = bytearray(self.size)
        self.build(random.Random(seed))
        for parent in self.layers[:-1]:
            self.frozen[parent] = _digest(parent)
        self.disk = vhd.open(self.layers[-1], "r+")
        assert self.disk.size == self.size

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data(), seed=st.integers(0, 255))
    def write(self, data: st.DataObject, seed: int) -> None:
        assert self.disk is not None
        off, n = data.draw(_ranges(self.size))
        buf = payload(n, seed)
        assert self.disk.pwrite(buf, off) == n
        self.expected[off : off + n] = buf

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        assert self.disk is not None
        off, n = data.draw(_ranges(self.size))
        assert self.disk.pread(n, off) == bytes(self.expected[off : off + n])

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data(), extra=st.integers(0, 3000))
    def read_into_past_end(self, data: st.DataObject, extra: int) -> None:
        assert self.disk is not None
        off, n = data.draw(_ranges(self.size))
        backing = bytearray(b"\xaa" * (n + extra + 7))
        got = self.disk.preadinto(memoryview(backing)[7:], off)
        assert got == min(n + extra, self.size - off)
        assert backing[7 : 7 + got] == self.expected[off : off + got]
        assert backing[7 + got :] == b"\xaa" * (n + extra - got)

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        assert self.disk is not None
        off, n = data.draw(_ranges(self.size))
        self.disk.discard(off, n)
        self.expected[off : off + n] = bytes(n)

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
        self._check_files()
        self.disk = vhd.open(self.layers[-1], "r+")

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data())
    def extents(self, data: st.DataObject) -> None:
        assert self.disk is not None
        off, n = data.draw(_ranges(self.size))
        pos = off
        for ext in self.disk.extents(off, n):
            assert ext.offset == pos and ext.length > 0
            if ext.layer is None:
                assert self.expected[ext.offset : ext.end] == bytes(ext.length)
            else:
                assert 0 <= ext.layer < len(self.layers)
            pos = ext.end
        assert pos == off + n

    def _check_files(self) -> None:
        with vhd.open(self.layers[-1]) as disk:
            assert disk.pread(self.size, 0) == bytes(self.expected)
        for parent, digest in self.frozen.items():
            assert _digest(parent) == digest, f"{parent.name} was modified"

    def _oracles(self) -> None:
        """Independent readers, where they can read the disk."""

    def teardown(self) -> None:
        try:
            if self.disk is not None:
                self.disk.close()
                self.disk = None
                self._check_files()
                self._oracles()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class DynamicMachine(VHDXMachine):
    def _oracles(self) -> None:
        leaf = self.layers[-1]
        if self.lss == 512:
            assert_qemu_clean(leaf)
            assert qemu_raw(leaf, self.dir / "q.raw") == self.expected
        libvhdi_read([leaf], self.dir / "l.raw")
        assert (self.dir / "l.raw").read_bytes() == self.expected


class DifferencingMachine(VHDXMachine):
    def build(self, rng: random.Random) -> None:
        base = self.dir / "base.vhdx"
        with create_vhdx(base, self.size, block_size=MiB, logical_sector_size=self.lss) as disk:
            self._fill(disk, rng)
        leaf = self.dir / "leaf.avhdx"
        create_vhdx(leaf, 0, type="differencing", parent=open_vhdx(base), block_size=MiB).close()
        self.layers = [base, leaf]


class MixedChainMachine(VHDXMachine):
    """A dynamic VHD base, a VHDX child filled with data, a VHDX grandchild written to."""

    def build(self, rng: random.Random) -> None:
        self.lss = 512
        base = self.dir / "base.vhd"
        with vhd.create(base, self.size, block_size=64 * 1024) as disk:
            self._fill(disk, rng)
        mid = self.dir / "mid.vhdx"
        with create_vhdx(mid, 0, type="differencing", parent=vhd.open(base), block_size=MiB) as d:
            self._fill(d, rng)
        leaf = self.dir / "leaf.avhdx"
        create_vhdx(leaf, 0, type="differencing", parent=vhd.open(mid), block_size=MiB).close()
        self.layers = [base, mid, leaf]


TestDynamic = DynamicMachine.TestCase
TestDynamic.settings = hsettings(max_examples=25, stateful_step_count=25, deadline=None)
TestDifferencing = DifferencingMachine.TestCase
TestDifferencing.settings = hsettings(max_examples=25, stateful_step_count=25, deadline=None)
TestMixedChain = MixedChainMachine.TestCase
TestMixedChain.settings = hsettings(max_examples=20, stateful_step_count=25, deadline=None)
