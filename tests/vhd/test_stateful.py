"""Hypothesis stateful tests: random pwrite/pread/preadinto/flush/reopen/discard/write_zeroes
against a bytearray, for fixed, dynamic, differencing, Hyper-V-layout and 3-deep chains.

Discard is modelled exactly: on a fixed or dynamic disk the range reads as zeros; on a
differencing disk every sector the range covers entirely reads from the parent again and
partly covered sectors keep their data; and a discard never makes the file grow (on a
differencing disk it never allocates host space either).

After every reopen and at the end, the files on disk are also read by the independent spec model
(:mod:`tests.model`), so what the library wrote is checked by a second reader, and the parents of
a chain are checked to be byte-for-byte untouched.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

import vhd
from tests.images import build_hyperv
from tests.model import model_chain
from tests.strategies import block_sizes, hsettings, ranges
from tests.vhd.harness import ImageMachine

SECTOR = 512


def _random_content(size: int, rng: random.Random, density: float = 0.3) -> bytearray:
    """Sector-granular random data (some sectors left zero)."""
    out = bytearray(size)
    for s in range(size // SECTOR):
        if rng.random() < density:
            out[s * SECTOR : (s + 1) * SECTOR] = rng.randbytes(SECTOR)
    return out


class DiskMachine(ImageMachine):
    """The VHD machine: fixed and dynamic disks and chains; discard modelled exactly, plus
    write_zeroes; the spec model reads the files."""

    kind = "dynamic"
    prefix = "vhd-sm-"

    def __init__(self) -> None:
        super().__init__()
        # What the leaf's parent chain reads (None: no parent); discarded sectors show it.
        self.released: bytes | None = None

    # -- set-up ----------------------------------------------------------------------------

    def _lib_layer(
        self, name: str, size: int, block: int, rng: random.Random, **kw: object
    ) -> Path:
        """A layer made and filled through the library, checked against the model."""
        path = self.dir / name
        with vhd.create(path, size, block_size=block, **kw) as disk:  # type: ignore[arg-type]
            for _ in range(rng.randrange(1, 6)):
                off = rng.randrange(size)
                n = rng.randrange(1, min(size - off, 3 * block) + 1)
                data = rng.randbytes(n)
                disk.pwrite(data, off)
                self.expected[off : off + n] = data
        return path

    def build(self, size: int, block: int, rng: random.Random) -> None:
        self.layers = [self.dir / "d.vhd"]
        vhd.create(self.layers[0], size, type=self.kind, block_size=block).close()

    @initialize(
        sectors=st.integers(min_value=1, max_value=600),
        block=block_sizes,
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(self, sectors: int, block: int, seed: int) -> None:
        self.size = sectors * SECTOR
        self.expected = bytearray(self.size)
        self.build(self.size, block, random.Random(seed))
        self.released = bytes(self.expected) if len(self.layers) > 1 else None
        self.start()

    def ranges(self, size: int) -> st.SearchStrategy[tuple[int, int]]:
        return ranges(size)

    # -- rules -----------------------------------------------------------------------------

    def discard_range(self, off: int, n: int) -> None:
        assert self.disk is not None
        before = os.fstat(self.disk.fd)
        self.disk.discard(off, n)
        after = os.fstat(self.disk.fd)
        assert after.st_size <= before.st_size, "discard made the file grow"
        if self.released is None:
            self.expected[off : off + n] = bytes(n)
            return
        # No allocation: not even a host block for an edge sector.
        assert after.st_blocks <= before.st_blocks, "discard allocated host space"
        first = -(-off // SECTOR) * SECTOR
        last = (off + n) // SECTOR * SECTOR
        if first < last:
            self.expected[first:last] = self.released[first:last]

    @precondition(lambda self: self.disk is not None)
    @rule(data=st.data())
    def write_zeroes(self, data: st.DataObject) -> None:
        assert self.disk is not None
        off, n = data.draw(ranges(self.size))
        self.disk.write_zeroes(off, n)
        self.expected[off : off + n] = bytes(n)

    # -- checks ----------------------------------------------------------------------------

    def check_files(self) -> None:
        """The files on disk, read by the spec model, hold exactly the expected bytes."""
        image = model_chain(list(self.layers))
        assert image.size == self.size
        assert image.read_all() == bytes(self.expected)
        # The library's extents name, for every sector, the layer the model finds it in.
        with vhd.open(self.layers[-1]) as disk:
            for ext in disk.extents():
                for s in range(ext.offset // SECTOR, ext.end // SECTOR):
                    assert image.layer(s) == ext.layer, (s, ext)
        self.check_parents()


class FixedMachine(DiskMachine):
    kind = "fixed"


class DynamicMachine(DiskMachine):
    kind = "dynamic"


class DifferencingMachine(DiskMachine):
    def build(self, size: int, block: int, rng: random.Random) -> None:
        kind = rng.choice(["fixed", "dynamic"])
        base = self._lib_layer("base.vhd", size, block, rng, type=kind)
        child = self.dir / "child.vhd"
        vhd.create(child, block_size=rng.choice([4096, 16384, block]), parent=base).close()
        self.layers = [base, child]


class ChainMachine(DiskMachine):
    """A 3-deep chain: Hyper-V-layout base and middle, then a library-made leaf."""

    def build(self, size: int, block: int, rng: random.Random) -> None:
        base_content = _random_content(size, rng)
        base = self.dir / "base.vhd"
        base_id = build_hyperv(base, size=size, block_size=block, content=bytes(base_content))
        mid_content = bytearray(base_content)
        present: set[int] = set()
        for s in range(size // SECTOR):
            if rng.random() < 0.2:
                present.add(s)
                mid_content[s * SECTOR : (s + 1) * SECTOR] = (
                    rng.randbytes(SECTOR) if rng.random() < 0.8 else bytes(SECTOR)
                )
        mid = self.dir / "mid.vhd"
        build_hyperv(
            mid,
            size=size,
            block_size=block,
            content=bytes(mid_content),
            present=present,
            parent=("base.vhd", base_id),
            seed=rng.randrange(1000),
        )
        self.expected[:] = mid_content
        leaf = self.dir / "leaf.vhd"
        vhd.create(leaf, block_size=rng.choice([4096, 8192, 65536]), parent=mid).close()
        self.layers = [base, mid, leaf]


class HyperVMachine(DiskMachine):
    """Writes into an image with Windows' layout (aligned, out-of-order blocks)."""

    def build(self, size: int, block: int, rng: random.Random) -> None:
        content = _random_content(size, rng, density=0.2)
        path = self.dir / "hv.vhd"
        build_hyperv(
            path, size=size, block_size=block, content=bytes(content), seed=rng.randrange(99)
        )
        self.expected[:] = content
        self.layers = [path]


TestFixed = FixedMachine.TestCase
TestFixed.settings = hsettings(max_examples=30)
TestDynamic = DynamicMachine.TestCase
TestDynamic.settings = hsettings(max_examples=80)
TestDifferencing = DifferencingMachine.TestCase
TestDifferencing.settings = hsettings(max_examples=80)
TestChain = ChainMachine.TestCase
TestChain.settings = hsettings(max_examples=60)
TestHyperV = HyperVMachine.TestCase
TestHyperV.settings = hsettings(max_examples=40)
