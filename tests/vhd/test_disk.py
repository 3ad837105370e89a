"""The library's data path and creation, example-based: layouts written, crash ordering,
parent resolution, extents, discard, threads, footer recovery.  Files are checked with the spec
model (:mod:`tests.model`), never only with the library itself."""

from __future__ import annotations

import os
import random
import shutil
import struct
import threading
import time
from array import array
from pathlib import Path

import pytest

import vhd
from tests.images import build_hyperv
from tests.model import ModelImage, build_footer, model_chain, spec_chs
from tests.strategies import payload

KiB = 1024
MiB = 1024 * KiB


def test_create_fixed_layout(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    size = 3 * MiB + 512
    with vhd.create(path, size, type="fixed") as disk:
        assert disk.type == vhd.DiskType.FIXED and disk.block_size is None
        assert disk.size == size and not disk.read_only
        disk.pwrite(b"abc", size - 3)
    assert path.stat().st_size == size + 512
    image = ModelImage(path)
    assert image.footer.current_size == image.footer.original_size == size
    assert image.footer.data_offset == 2**64 - 1
    assert image.footer.creator_app == b"win "
    assert image.read(size - 3, 3) == b"abc"
    assert image.read(0, 4096) == bytes(4096)


def test_create_dynamic_layout(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    size = 5 * MiB
    vhd.create(path, size, block_size=64 * KiB).close()
    raw = path.read_bytes()
    assert raw[:512] == raw[-512:], "the footer copy at 0 equals the trailing footer"
    image = ModelImage(path)
    assert image.header is not None
    assert image.footer.data_offset == 512
    assert image.header.table_offset == 0x600
    assert image.header.block_size == 64 * KiB
    assert image.header.max_table_entries == 80
    assert image.bat == [0xFFFFFFFF] * 80
    assert image.read_all() == bytes(size)
    # Geometry: the spec's CHS, as Windows writes it (never more, which vhd-util check rejects).
    g = (image.footer.cylinders, image.footer.heads, image.footer.sectors)
    assert g == spec_chs(size)


def test_new_blocks_are_4k_aligned_and_footer_moves(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    with vhd.create(path, 1 * MiB, block_size=16 * KiB) as disk:
        for block in (7, 2, 40):
            disk.pwrite(payload(700, block), block * 16 * KiB + 100)
    image = ModelImage(path)
    raw = path.read_bytes()
    assert raw[:512] == raw[-512:]
    allocated = image.allocated_blocks()
    assert [b for b, _ in allocated] == [2, 7, 40]
    for _, sector in allocated:
        assert (sector * 512 + 512) % 4096 == 0, "data starts on a 4 KiB boundary"
    for block in (7, 2, 40):
        assert image.read(block * 16 * KiB + 100, 700) == payload(700, block)


def test_differencing_create_records_the_parent(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    vhd.create(base, 2 * MiB, block_size=8 * KiB).close()
    sub = tmp_path / "sub"
    sub.mkdir()
    child = sub / "child.vhd"
    with vhd.create(child, parent=base) as disk:
        assert disk.type == vhd.DiskType.DIFFERENCING
        assert disk.parent is not None and disk.parent.read_only
        assert disk.size == 2 * MiB
    parent_model = ModelImage(base)
    image = ModelImage(child, parent=parent_model)
    assert image.header is not None
    assert image.header.parent_id == parent_model.footer.unique_id
    assert image.header.parent_name == "base.vhd"
    assert image.header.parent_timestamp == int(base.stat().st_mtime) - 946684800
    kinds: dict[int, bytes] = {}
    for code, space, length, offset in image.header.locators:
        if code:
            assert offset % 512 == 0 and space >= length and space % 512 == 0
            kinds[code] = Path(child).read_bytes()[offset : offset + length]
    assert kinds[0x57327275].decode("utf-16-le") == ".\\..\\base.vhd"
    assert kinds[0x57326B75].decode("utf-16-le") == str(base).replace("/", "\\")
    assert kinds[0x4D616358].decode() == "file://" + str(base)


def test_chain_survives_a_move_and_finds_parent_dirs(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    base = a / "base.vhd"
    with vhd.create(base, 1 * MiB, block_size=4 * KiB) as disk:
        disk.pwrite(b"base" * 1000, 0)
    with vhd.create(a / "child.vhd", parent=base) as disk:
        disk.pwrite(b"kid!", 2)
    moved = tmp_path / "moved"
    shutil.move(a, moved)  # absolute locators now point nowhere; the relative one works
    with vhd.open(moved / "child.vhd") as disk:
        assert disk.pread(8, 0) == b"bakid!se"
    # Parent in another directory: only found with parent_dirs.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(moved / "base.vhd", elsewhere / "base.vhd")
    with pytest.raises(vhd.ParentNotFoundError) as info:
        vhd.open(moved / "child.vhd")
    assert "base.vhd" in str(info.value)
    with vhd.open(moved / "child.vhd", parent_dirs=[str(elsewhere)]) as disk:
        assert disk.pread(8, 0) == b"bakid!se"
    with vhd.open(moved / "child.vhd", parent=elsewhere / "base.vhd") as disk:
        assert disk.parent is not None and disk.parent.path == str(elsewhere / "base.vhd")


def test_parent_mismatch(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    vhd.create(base, 1 * MiB).close()
    vhd.create(tmp_path / "child.vhd", parent=base).close()
    base.unlink()
    vhd.create(base, 1 * MiB).close()  # same name, another unique id
    with pytest.raises(vhd.ParentMismatchError):
        vhd.open(tmp_path / "child.vhd")
    with vhd.open(tmp_path / "child.vhd", allow_parent_mismatch=True) as disk:
        assert disk.parent is not None
        assert any("unique id" in w for w in disk.warnings)


def test_read_only_and_argument_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    vhd.create(path, 64 * KiB, block_size=4 * KiB).close()
    with vhd.open(path) as disk:
        assert disk.read_only
        with pytest.raises(vhd.ReadOnlyError):
            disk.pwrite(b"x", 0)
        with pytest.raises(vhd.ReadOnlyError):
            disk.discard(0, 512)
        assert disk.pread(100, 64 * KiB - 10) == bytes(10)
        assert disk.pread(100, 64 * KiB + 10) == b""
        with pytest.raises(vhd.InvalidArgumentError):
            disk.pread(1, -1)
        with pytest.raises(vhd.InvalidArgumentError):
            disk.preadinto(b"immutable", 0)
    with vhd.open(path, "r+") as disk:
        with pytest.raises(vhd.InvalidArgumentError):
            disk.pwrite(b"xy", 64 * KiB - 1)
        with pytest.raises(vhd.InvalidArgumentError):
            disk.discard(64 * KiB, 1)
        # A second writer is refused while the first holds the image.
        with pytest.raises(vhd.VHDError):
            vhd.open(path, "r+")
    with pytest.raises(vhd.InvalidArgumentError):
        vhd.open(path, "w")


@pytest.mark.parametrize(
    ("size", "kwargs"),
    [
        (0, {}),
        (1000, {}),
        (-512, {}),
        (2040 * 1024 * MiB + 512, {}),
        (MiB, {"block_size": 3000}),
        (MiB, {"block_size": 2048}),
        (MiB, {"block_size": 512 * MiB}),
        (MiB, {"type": "differencing"}),
    ],
)
def test_create_refuses_bad_arguments(tmp_path: Path, size: int, kwargs: dict[str, object]) -> None:
    path = tmp_path / "x.vhd"
    with pytest.raises(vhd.InvalidArgumentError):
        vhd.create(path, size, **kwargs)  # type: ignore[arg-type]
    assert not path.exists()


def test_create_does_not_clobber(tmp_path: Path) -> None:
    path = tmp_path / "x.vhd"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        vhd.create(path, MiB)
    assert path.read_bytes() == b"precious"


def test_unflushed_allocation_is_invisible_after_a_crash(tmp_path: Path) -> None:
    """Until flush, the on-disk BAT never points at the new block; the file stays valid."""
    path = tmp_path / "d.vhd"
    disk = vhd.create(path, 1 * MiB, block_size=16 * KiB)
    try:
        disk.pwrite(payload(5000, 1), 20000)
        crashed = tmp_path / "crash.vhd"
        shutil.copyfile(path, crashed)  # what a power cut now would leave
        image = ModelImage(crashed)
        assert image.bat == [0xFFFFFFFF] * 64
        assert image.read_all() == bytes(MiB)
        disk.flush()
        shutil.copyfile(path, crashed)
        assert ModelImage(crashed).read(20000, 5000) == payload(5000, 1)
    finally:
        disk.close()


def test_extents_report_layers(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    with vhd.create(base, 256 * KiB, block_size=4 * KiB) as disk:
        disk.pwrite(b"a" * 8192, 0)
    mid = tmp_path / "mid.vhd"
    with vhd.create(mid, parent=base, block_size=4 * KiB) as disk:
        disk.pwrite(b"b" * 1024, 4096)
    leaf = tmp_path / "leaf.vhd"
    with vhd.create(leaf, parent=mid, block_size=4 * KiB) as disk:
        disk.pwrite(b"c" * 512, 512)
        got = list(disk.extents())
    assert got == [
        vhd.Extent(0, 512, 2),
        vhd.Extent(512, 512, 0),
        vhd.Extent(1024, 3072, 2),
        vhd.Extent(4096, 1024, 1),
        vhd.Extent(5120, 3072, 2),
        vhd.Extent(8192, 256 * KiB - 8192, None),
    ]
    image = model_chain([base, mid, leaf])
    for ext in got:
        for s in range(ext.offset // 512, ext.end // 512):
            assert image.layer(s) == ext.layer


def test_dynamic_discard_frees_blocks(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    with vhd.create(path, 4 * MiB, block_size=64 * KiB) as disk:
        disk.pwrite(payload(MiB, 3), 0)
    before = path.stat().st_blocks
    with vhd.open(path, "r+") as disk:
        disk.discard(0, MiB - 64 * KiB)
        disk.discard(MiB - 64 * KiB + 512, 1000)
    image = ModelImage(path)
    assert [b for b, _ in image.allocated_blocks()] == [15]
    assert image.read(0, MiB - 64 * KiB) == bytes(MiB - 64 * KiB)
    assert image.read(MiB - 64 * KiB + 512, 1000) == bytes(1000)
    assert image.read(MiB - 64 * KiB, 512) == payload(MiB, 3)[MiB - 64 * KiB : MiB - 64 * KiB + 512]
    assert path.stat().st_blocks < before, "the freed space went back to the file system"


def test_differencing_discard_never_allocates_and_releases_to_the_parent(tmp_path: Path) -> None:
    """Issue 9 item 11: a guest's fstrim on a differencing disk used to write whole blocks of
    zeros into the child (the file grew; compact reclaimed nothing).  Now a discard skips what
    the child does not hold and frees what it does; write_zeroes still reads back zeros."""
    parent, child = tmp_path / "p.vhd", tmp_path / "c.vhd"
    base = payload(4 * MiB, 1)
    with vhd.create(parent, 4 * MiB, block_size=64 * KiB) as disk:
        disk.pwrite(base, 0)
    with vhd.create(child, parent=parent, block_size=64 * KiB) as disk:
        disk.pwrite(payload(MiB, 2), MiB)  # the child holds [1 MiB, 2 MiB): 16 blocks
    size_before, blocks_before = child.stat().st_size, child.stat().st_blocks
    with vhd.open(child, "r+") as disk:
        disk.discard(0, 4 * MiB - 100)  # fstrim: everything but a partial last sector
        assert [(e.offset, e.length, e.layer) for e in disk.extents()] == [(0, 4 * MiB, 1)]
    assert child.stat().st_size == size_before
    assert child.stat().st_blocks < blocks_before, "the child's blocks went back to the host"
    image = model_chain([parent, child])
    assert image.read_all() == base
    assert not image.allocated_blocks()
    # Compact has nothing left to keep; discarding unallocated space allocated nothing.
    with vhd.open(child, "r+") as disk:
        disk.discard(0, 4 * MiB)
        disk.pwrite(b"x" * 1000, 3 * MiB + 100)
        disk.discard(3 * MiB + 200, 700)  # partial sectors are left alone
        assert disk.pread(1000, 3 * MiB + 100) == b"x" * 1000
        disk.discard(3 * MiB, 1024)  # covers sectors 0 and 1 of the write entirely
        assert disk.pread(1024, 3 * MiB) == base[3 * MiB : 3 * MiB + 1024]
        assert disk.pread(100, 3 * MiB + 1024) == b"x" * 76 + base[3 * MiB + 1100 : 3 * MiB + 1124]
        # write_zeroes keeps its promise: zeros, hiding the parent.
        disk.write_zeroes(2 * MiB + 10, 5000)
        assert disk.pread(5000, 2 * MiB + 10) == bytes(5000)
    assert model_chain([parent, child]).read(2 * MiB + 10, 5000) == bytes(5000)


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    size = 2 * MiB
    chunk = 12 * KiB + 512  # crosses 4 KiB blocks and sectors
    disk = vhd.create(path, size, block_size=4 * KiB)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(k, size // chunk, 4):
                disk.pwrite(payload(chunk, i % 200), i * chunk)
                disk.pread(chunk, ((i * 7) % (size // chunk)) * chunk)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    disk.close()
    assert not errors
    expected = bytearray(size)
    for i in range(size // chunk):
        expected[i * chunk : (i + 1) * chunk] = payload(chunk, i % 200)
    assert ModelImage(path).read_all() == bytes(expected)


def test_hyperv_layout_reads_and_writes(tmp_path: Path) -> None:
    size = 3 * MiB
    content = bytearray(size)
    for i in range(0, size, 96 * KiB):
        content[i : i + 3000] = payload(3000, i // 4096)
    path = tmp_path / "hv.vhd"
    build_hyperv(path, size=size, block_size=2 * MiB, content=bytes(content), seed=7)
    raw = path.read_bytes()
    image = ModelImage(path)
    sectors = sorted(e for _, e in image.allocated_blocks())
    assert sectors[0] == 15 and sectors[1] - sectors[0] == 4104  # Windows' stride
    with vhd.open(path) as disk:
        assert disk.pread(size, 0) == content
    with vhd.open(path, "r+") as disk:
        disk.pwrite(b"Z" * 10000, MiB - 5000)
        content[MiB - 5000 : MiB + 5000] = b"Z" * 10000
    assert ModelImage(path).read_all() == bytes(content)
    # The write went into the existing (out-of-order, aligned) block: no new block was added.
    assert len(path.read_bytes()) == len(raw)


def test_511_byte_footer_opens_read_only(tmp_path: Path) -> None:
    path = tmp_path / "old.vhd"
    data = payload(64 * KiB, 9)
    footer = build_footer(size=64 * KiB, disk_type=2, unique_id=bytes(range(16)))
    path.write_bytes(data + footer[:511])
    with vhd.open(path) as disk:
        assert disk.size == 64 * KiB
        assert disk.pread(64 * KiB, 0) == data
        assert any("511" in w for w in disk.warnings)


def test_damaged_tail_footer_uses_head_copy(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    with vhd.create(path, 256 * KiB, block_size=4 * KiB) as disk:
        disk.pwrite(b"keep", 1000)
    raw = bytearray(path.read_bytes())
    raw[-512:-504] = b"garbage!"
    path.write_bytes(bytes(raw))
    with vhd.open(path) as disk:
        assert disk.pread(4, 1000) == b"keep"
        assert disk.warnings
    with pytest.raises(vhd.CorruptImageError):
        vhd.open(path, "r+")
    assert path.read_bytes() == bytes(raw)


def test_diskfile_view(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    with vhd.create(path, 64 * KiB, block_size=4 * KiB) as disk:
        f = disk.file()
        assert f.write(b"hello") == 5
        f.seek(1)
        assert f.read(4) == b"ello"
        assert f.seek(-2, os.SEEK_END) == 64 * KiB - 2
        assert f.read(10) == b"\0\0"
        assert f.read(10) == b""


def test_big_sparse_image_opens_fast_without_python_objects(tmp_path: Path) -> None:
    path = tmp_path / "big.vhd"
    size = 2040 * 1024 * MiB
    vhd.create(path, size).close()
    start = time.perf_counter()
    with vhd.open(path) as disk:
        elapsed = time.perf_counter() - start
        assert disk.size == size
        assert isinstance(disk.bat.entries, array)  # type: ignore[attr-defined]
        assert len(disk.bat) == size // (2 * MiB)  # type: ignore[attr-defined]
        assert list(disk.extents()) == [vhd.Extent(0, size, None)]
    # Generous bound: the point is "no per-entry Python work", which would take many seconds.
    assert elapsed < 2.0
    image = ModelImage(path)
    assert image.footer.current_size == size
    assert struct.unpack(">I", path.read_bytes()[0x600:0x604])[0] == 0xFFFFFFFF


@pytest.mark.parametrize("differencing", [False, True])
def test_readers_never_see_unwritten_blocks(tmp_path: Path, differencing: bool) -> None:
    """While a writer allocates blocks, concurrent readers see, sector by sector, either the old
    content or the new one: a BAT entry or bitmap is published only after its data."""
    size = 4 * MiB
    block = 8 * KiB
    old = bytearray(size)
    if differencing:
        base = tmp_path / "base.vhd"
        with vhd.create(base, size, type="fixed") as disk:
            old[:] = payload(size, 50)
            disk.pwrite(old, 0)
        disk = vhd.create(tmp_path / "child.vhd", parent=base, block_size=block)
    else:
        disk = vhd.create(tmp_path / "d.vhd", size, block_size=block)
    new = payload(block, 51)
    done = threading.Event()
    problems: list[str] = []

    def writer() -> None:
        try:
            for b in range(size // block):
                disk.pwrite(new, b * block)
        finally:
            done.set()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not done.is_set() and not problems:
            b = rng.randrange(size // block)
            got = disk.pread(block, b * block)
            for s in range(0, block, 512):
                sector = got[s : s + 512]
                if sector not in (old[b * block + s : b * block + s + 512], new[s : s + 512]):
                    problems.append(f"block {b} sector {s // 512}")

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(k,)) for k in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    disk.close()
    assert not problems, problems[:5]


def test_fast_path_takes_any_unsigned_byte_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ctypes buffer's memoryview has the format '<B' (issue 10 §3): still one preadv."""
    import ctypes

    path = tmp_path / "d.vhd"
    with vhd.create(path, 2 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"\x42" * MiB, MiB)
    with vhd.open(path) as disk:
        assert disk.pread(512, MiB) == b"\x42" * 512  # caches the block's bitmap

        def slow_path(self: vhd.Disk, buffer: object, offset: int) -> int:
            raise AssertionError("the read missed the fast path")

        monkeypatch.setattr(vhd.Disk, "preadinto", slow_path)
        buffer = (ctypes.c_ubyte * 4096)()
        view = memoryview(buffer)
        assert view.format == "<B"
        assert disk.preadinto(view, MiB + 512) == 4096
        assert bytes(buffer) == b"\x42" * 4096


def test_a_bitmap_read_racing_a_writer_is_never_cached_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader loads a block's bitmap without the lock.  If a writer sets more bits and its
    cache entry is evicted (cache pressure) before the reader caches what it read, the stale
    bitmap must not be cached: later reads would show the parent there, and later writes would
    store the stale bits back (found by reading the code; would need > 16384 cached bitmaps)."""
    import vhd.disk as vdisk

    base = tmp_path / "base.vhd"
    with vhd.create(base, 4 * 2**20, block_size=2**20) as disk:
        disk.pwrite(b"P" * 4096, 0)
    child = tmp_path / "child.vhd"
    with vhd.create(child, parent=base) as disk:
        disk.pwrite(b"A" * 512, 0)  # block 0 allocated, only sector 0 in the child

    with vhd.open(child, "r+") as disk:
        sparse = disk
        assert isinstance(sparse, vdisk.SparseDisk)
        entry = sparse.bat[0]
        real_read = vdisk.read_exact
        raced = []

        def read_then_race(fd: int, n: int, offset: int, *, path: str | None = None) -> bytes:
            raw = real_read(fd, n, offset, path=path)
            if not raced:
                raced.append(True)
                sparse.pwrite(b"B" * 512, 5 * 512)  # a writer sets sector 5's bit ...
                sparse._bitmaps.pop(0, None)  # ... and cache pressure evicts its entry
            return raw

        monkeypatch.setattr(vdisk, "read_exact", read_then_race)
        sparse._bitmap(0, entry)
        monkeypatch.setattr(vdisk, "read_exact", real_read)
        assert raced
        assert disk.pread(512, 5 * 512) == b"B" * 512
        disk.pwrite(b"C" * 512, 9 * 512)  # a later write must not drop sector 5's bit
    with vhd.open(child) as disk:
        assert disk.pread(512, 5 * 512) == b"B" * 512
        assert disk.pread(512, 9 * 512) == b"C" * 512
        assert disk.pread(512, 512) == b"P" * 512
