"""Hypothesis stateful tests for VHDX: random pwrite/pread/preadinto/discard/flush/reopen/extents
against a bytearray, on dynamic disks (512 and 4096-byte sectors), differencing disks and mixed
chains (a VHD base under VHDX children).

After every reopen the files are read again by a fresh read-only open and the parents are
checked byte for byte untouched; at the end a dynamic disk is also read by qemu-img (512-byte
sectors: qemu supports no other) and by libvhdi, and passes ``qemu-img check``; differencing
disks are read by libvhdi, whose departures from MS-VHDX are handled explicitly.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

import vhd
from tests.interop.oracles import libvhdi_read
from tests.strategies import hsettings
from tests.vhd.harness import ImageMachine
from tests.vhd.vhdx.helpers import assert_qemu_clean, libvhdi_view, qemu_raw
from vhd.disk import Disk
from vhd.vhdx import create_vhdx, open_vhdx

MiB = 1024 * 1024


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


class VHDXMachine(ImageMachine):
    """The VHDX machine: 512- and 4096-byte logical sectors, 1 MiB blocks; a discard reads as
    zeros without a parent (on a child see :meth:`discard_range`), write_zeroes as zeros; the
    library (a fresh read-only open) reads the files back."""

    prefix = "vhdx-sm-"

    def __init__(self) -> None:
        super().__init__()
        self.lss = 512
        self.parent_data = b""

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
        self.parent_data = bytes(self.expected)  # the leaf is empty: what its parents read
        self.start()

    def ranges(self, size: int) -> st.SearchStrategy[tuple[int, int]]:
        return _ranges(size)

    def discard_range(self, off: int, n: int) -> None:
        """TRIM (Disk.discard): zeros without a parent.  On a child it never allocates, and
        each sector reads as before, or (where the range covers it entirely) as zeros or as the
        parent's data again; the model takes what the disk then reads."""
        assert self.disk is not None
        if len(self.layers) == 1:
            self.disk.discard(off, n)
            self.expected[off : off + n] = bytes(n)
            return
        grown = os.path.getsize(self.layers[-1])
        self.disk.discard(off, n)
        assert os.path.getsize(self.layers[-1]) == grown  # a TRIM never allocates
        got = self.disk.pread(n, off)
        lss = self.lss
        pos = off
        while pos < off + n:
            end = min(off + n, (pos // lss + 1) * lss)
            old, now = self.expected[pos:end], got[pos - off : end - off]
            whole = pos % lss == 0 and end - pos == lss
            allowed = [old, bytes(end - pos), self.parent_data[pos:end]] if whole else [old]
            assert now in allowed, f"sector at {pos} after a discard of [{off}, {off + n})"
            pos = end
        self.expected[off : off + n] = got

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data())
    def write_zeroes(self, data: st.DataObject) -> None:
        assert self.disk is not None
        off, n = data.draw(_ranges(self.size))
        self.disk.write_zeroes(off, n)
        self.expected[off : off + n] = bytes(n)

    def check_files(self) -> None:
        with vhd.open(self.layers[-1]) as disk:
            got = disk.pread(self.size, 0)
        if got != self.expected:
            # Name the first differing byte: pytest's diff of megabytes takes hours.
            at = next(i for i in range(self.size) if got[i] != self.expected[i])
            raise AssertionError(f"a fresh open reads differently from byte {at} on")
        self.check_parents()


class DynamicMachine(VHDXMachine):
    def oracles(self) -> None:
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

    def oracles(self) -> None:
        _libvhdi_agrees(self.layers, self.dir, self.expected)


def _libvhdi_agrees(layers: list[Path], tmp: Path, expected: bytearray) -> None:
    """libvhdi reads the chain as we do except where it departs from MS-VHDX on differencing
    layers (see :func:`tests.vhd.vhdx.helpers.libvhdi_view`): there it is compared against
    exactly that departure, and ours must be zeros in ZERO blocks."""
    view, zero_blocks = libvhdi_view(layers)
    for start in zero_blocks:
        assert expected[start : start + MiB] == bytes(len(expected[start : start + MiB]))
    libvhdi_read(layers, tmp / "l.raw")
    assert (tmp / "l.raw").read_bytes() == view


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

    # No libvhdi oracle here: the base is a VHD with 64 KiB blocks written at 512-byte offsets,
    # which libvhdi misreads (README, known oracle limits); DifferencingMachine covers VHDX.


class VHDBetweenVHDXMachine(VHDXMachine):
    """The other mix: a dynamic VHDX base, a VHD child of it filled with data (recording the
    base's DataWriteGuid), a VHDX grandchild written to; libvhdi reads the VHD child."""

    def build(self, rng: random.Random) -> None:
        self.lss = 512
        base = self.dir / "base.vhdx"
        with create_vhdx(base, self.size, block_size=MiB) as disk:
            self._fill(disk, rng)
        mid = self.dir / "mid.vhd"
        with vhd.create(mid, parent=base, block_size=64 * 1024) as d:
            # Whole 64 KiB blocks: libvhdi 20210425 misreads VHD sector bitmaps inside a byte
            # with a set bit, and some partly present blocks (a VHD parent does the same).
            for _ in range(rng.randrange(1, 6)):
                off = rng.randrange(0, -(-self.size // 65536)) * 65536
                n = min(self.size - off, rng.randrange(1, 48) * 65536)
                data = rng.randbytes(n)
                d.pwrite(data, off)
                self.expected[off : off + n] = data
        leaf = self.dir / "leaf.avhdx"
        create_vhdx(leaf, 0, type="differencing", parent=vhd.open(mid), block_size=MiB).close()
        self.layers = [base, mid, leaf]
        self.mid_expected = bytes(self.expected)

    def _oracles(self) -> None:
        # libvhdi reads the VHD child of the VHDX (its parent identity checked); not the leaf:
        # libvhdi 20210425 misreads a differencing VHDX chunk with no sector bitmap block yet
        # (an empty leaf) and reads whole-block discards (ZERO) from the parent.
        libvhdi_read(self.layers[:2], self.dir / "l.raw")
        assert (self.dir / "l.raw").read_bytes() == self.mid_expected


TestDynamic = DynamicMachine.TestCase
TestDynamic.settings = hsettings(max_examples=25, stateful_step_count=25, deadline=None)
TestDifferencing = DifferencingMachine.TestCase
TestDifferencing.settings = hsettings(max_examples=25, stateful_step_count=25, deadline=None)
TestMixedChain = MixedChainMachine.TestCase
TestMixedChain.settings = hsettings(max_examples=20, stateful_step_count=25, deadline=None)
TestVHDBetweenVHDX = VHDBetweenVHDXMachine.TestCase
TestVHDBetweenVHDX.settings = hsettings(max_examples=20, stateful_step_count=25, deadline=None)
