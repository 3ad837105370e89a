"""The binding-free filesystem core against an in-memory disk: windows, errno mapping, flushes."""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vhdfuse.fs import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    DiskFilesystem,
    FilesystemError,
)
from vhdfuse.partitions import Partition

import vhd
from tests.fakedisk import FakeDisk

MiB = 1024 * 1024


def _fs(read_only: bool = False) -> tuple[DiskFilesystem, FakeDisk]:
    disk = FakeDisk(8 * MiB, read_only=read_only)
    parts = [
        Partition(1, 1 * MiB, 2 * MiB),
        Partition(2, 3 * MiB, 4 * MiB),
        Partition(5, 3 * MiB, 1 * MiB),
    ]
    return DiskFilesystem(disk, parts), disk


def _errno(call: object, *args: object) -> int:
    with pytest.raises(FilesystemError) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.errno is not None
    return info.value.errno


def test_listing_and_attributes() -> None:
    fs, _ = _fs()
    assert fs.readdir("/") == [".", "..", "disk", "p1", "p2", "p5"]
    root = fs.getattr("/")
    assert stat.S_ISDIR(root.mode)
    disk = fs.getattr("/disk")
    assert stat.S_ISREG(disk.mode) and disk.size == 8 * MiB and disk.mode & 0o200
    assert fs.getattr("/p2").size == 4 * MiB
    assert len({fs.getattr(f"/{n}").inode for n in ("disk", "p1", "p2", "p5")}) == 4
    assert _errno(fs.getattr, "/p3") == errno.ENOENT
    assert _errno(fs.getattr, "/disk/x") == errno.ENOENT
    assert _errno(fs.readdir, "/disk") == errno.ENOTDIR


def test_partition_windows_read_and_write() -> None:
    fs, disk = _fs()
    disk.data[:] = bytes(range(256)) * (len(disk.data) // 256)
    fh = fs.open("/p1", os.O_RDWR)
    assert fs.read(fh, 16, 0) == bytes(disk.data[MiB : MiB + 16])
    # Reads are clipped at the window's end; past it they are empty.
    assert fs.read(fh, 100, 2 * MiB - 10) == bytes(disk.data[3 * MiB - 10 : 3 * MiB])
    assert fs.read(fh, 100, 2 * MiB) == b""
    assert fs.write(fh, b"x" * 20, 2 * MiB - 10) == 10
    assert disk.data[3 * MiB - 10 : 3 * MiB] == b"x" * 10
    assert disk.data[3 * MiB] == (3 * MiB) % 256  # the byte after the window is untouched
    assert _errno(fs.write, fh, b"y", 2 * MiB) == errno.ENOSPC
    assert fs.write(fh, b"", 2 * MiB) == 0


def test_readinto_zero_copy() -> None:
    fs, disk = _fs()
    disk.data[5 * MiB : 5 * MiB + 4] = b"abcd"
    fh = fs.open("/p2", os.O_RDONLY)
    buffer = bytearray(8)
    assert fs.readinto(fh, memoryview(buffer), 2 * MiB) == 8
    assert buffer[:4] == b"abcd"


def test_flush_only_after_writes_and_fsync() -> None:
    fs, disk = _fs()
    reader = fs.open("/disk", os.O_RDONLY)
    fs.flush(reader)
    assert disk.flushes == 0
    writer = fs.open("/disk", os.O_WRONLY)
    fs.flush(writer)
    assert disk.flushes == 0
    fs.write(writer, b"1", 0)
    fs.flush(writer)
    assert disk.flushes == 1
    fs.flush(writer)  # nothing new
    assert disk.flushes == 1
    fs.fsync(reader)
    assert disk.flushes == 2
    fs.release(writer)
    assert _errno(fs.flush, writer) == errno.EBADF


def test_read_only_refuses_writes() -> None:
    fs, _disk = _fs(read_only=True)
    assert fs.getattr("/disk").mode & 0o222 == 0
    assert _errno(fs.open, "/disk", os.O_RDWR) == errno.EROFS
    assert _errno(fs.open, "/p1", os.O_WRONLY) == errno.EROFS
    fh = fs.open("/disk", os.O_RDONLY)
    assert _errno(fs.write, fh, b"x", 0) == errno.EROFS
    assert (
        _errno(fs.fallocate, fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096) == errno.EROFS
    )
    assert _errno(fs.truncate, "/disk", 0) == errno.EROFS
    # A writable disk can still be shown read-only.
    fs2 = DiskFilesystem(FakeDisk(MiB), read_only=True)
    assert _errno(fs2.open, "/disk", os.O_RDWR) == errno.EROFS


def test_write_on_read_only_handle() -> None:
    fs, _ = _fs()
    fh = fs.open("/disk", os.O_RDONLY)
    assert _errno(fs.write, fh, b"x", 0) == errno.EBADF


def test_truncate_only_to_same_size() -> None:
    fs, _ = _fs()
    fs.truncate("/disk", 8 * MiB)
    fs.truncate("/p1", 2 * MiB)
    assert _errno(fs.truncate, "/disk", 0) == errno.EINVAL
    assert _errno(fs.truncate, "/p1", 3 * MiB) == errno.EINVAL


def test_fallocate_modes() -> None:
    fs, disk = _fs()
    disk.data[:] = b"\x01" * len(disk.data)
    fh = fs.open("/p2", os.O_RDWR)
    fs.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
    # Both modes promise zeros afterwards: Disk.write_zeroes, not the unspecified discard.
    assert disk.zeroed == [(3 * MiB + 4096, 8192)] and not disk.discards
    assert disk.data[3 * MiB + 4096 : 3 * MiB + 12288] == bytes(8192)
    fs.fallocate(fh, FALLOC_FL_ZERO_RANGE, 4 * MiB - 512, 4096)  # clipped at the window's end
    assert disk.zeroed[-1] == (7 * MiB - 512, 512)
    assert disk.data[7 * MiB - 512 : 7 * MiB] == bytes(512)
    assert disk.data[7 * MiB] == 1
    assert _errno(fs.fallocate, fh, 0, 0, 4096) == errno.EOPNOTSUPP
    assert _errno(fs.fallocate, fh, FALLOC_FL_PUNCH_HOLE, 0, 4096) == errno.EOPNOTSUPP
    fs.flush(fh)
    assert disk.flushes == 1


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (vhd.CorruptImageError("bad block", path="x.vhd"), errno.EIO),
        (vhd.ChecksumError("bad checksum"), errno.EIO),
        (vhd.ParentNotFoundError("gone"), errno.EIO),
        (vhd.ReadOnlyError("ro"), errno.EROFS),
        (vhd.InvalidArgumentError("bad"), errno.EINVAL),
        (vhd.UnsupportedFeatureError("nope"), errno.EOPNOTSUPP),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (RuntimeError("bug"), errno.EIO),
        (MemoryError(), errno.ENOMEM),
    ],
)
def test_errors_become_errno(
    exc: BaseException, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    fs, disk = _fs()
    fh = fs.open("/disk", os.O_RDWR)
    disk.fail_next = exc
    assert _errno(fs.read, fh, 10, 0) == code
    disk.fail_next = exc
    assert _errno(fs.write, fh, b"x", 0) == code
    disk.fail_next = exc
    assert _errno(fs.fsync, fh) == code
    # The reason is logged (the kernel only hears the errno).
    assert any(str(exc) in record.getMessage() or record.exc_info for record in caplog.records)


def test_close_flushes_once_and_refuses_later_opens() -> None:
    fs, disk = _fs()
    fs.close()
    fs.close()
    assert disk.flushes == 1 and disk.closed
    assert _errno(fs.open, "/disk", os.O_RDONLY) == errno.ENODEV


def test_concurrent_handles() -> None:
    fs, disk = _fs()
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(50):
                fh = fs.open("/disk", os.O_RDWR)
                offset = (index * 50 + round_) * 512
                payload = bytes([index]) * 512
                fs.write(fh, payload, offset)
                assert fs.read(fh, 512, offset) == payload
                fs.release(fh)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for index in range(8):
        assert disk.data[index * 50 * 512 : (index + 1) * 50 * 512] == bytes([index]) * 50 * 512


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["disk", "p1", "p2", "p5"]),
            st.sampled_from(["read", "write", "punch"]),
            st.integers(0, 5 * MiB),
            st.integers(0, 300 * 1024),
        ),
        max_size=25,
    )
)
def test_operations_against_a_model(ops: list[tuple[str, str, int, int]]) -> None:
    """Random reads, writes and punches through any file agree with a plain bytearray."""
    fs, disk = _fs()
    model = bytearray(len(disk.data))
    windows = {
        "disk": (0, 8 * MiB),
        "p1": (MiB, 2 * MiB),
        "p2": (3 * MiB, 4 * MiB),
        "p5": (3 * MiB, MiB),
    }
    handles = {name: fs.open(f"/{name}", os.O_RDWR) for name in windows}
    for index, (name, op, offset, length) in enumerate(ops):
        start, size = windows[name]
        count = max(0, min(length, size - offset))
        if op == "read":
            assert fs.read(handles[name], length, offset) == bytes(
                model[start + offset : start + offset + count]
            )
        elif op == "write":
            data = bytes([index % 251 + 1]) * length
            if count == 0 and length:
                assert _errno(fs.write, handles[name], data, offset) == errno.ENOSPC
            else:
                assert fs.write(handles[name], data, offset) == count
                model[start + offset : start + offset + count] = data[:count]
        else:
            fs.fallocate(handles[name], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            model[start + offset : start + offset + count] = bytes(count)
    assert disk.data == model


def test_st_blocks_counts_what_the_disk_holds() -> None:
    """Issue 9 item 13: du showed the full size of an empty disk."""
    fs, _ = _fs()
    assert fs.getattr("/disk").blocks == 0
    fh = fs.open("/p2", os.O_RDWR)
    fs.write(fh, b"x", 0)  # allocates one 64 KiB grain at 3 MiB
    assert fs.getattr("/disk").blocks == 128
    assert fs.getattr("/p2").blocks == fs.getattr("/p5").blocks == 128
    assert fs.getattr("/p1").blocks == 0
    fs.write(fh, b"y" * 200 * 1024, MiB)  # 4 MiB .. 4 MiB + 200 KiB: 4 grains
    assert fs.getattr("", fh).blocks == 5 * 128
    fs.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, MiB)
    assert fs.getattr("/disk").blocks == 4 * 128
    assert fs.getattr("/p5").blocks == 0


def test_seek_data_and_seek_hole_follow_the_extents() -> None:
    fs, _ = _fs()
    fh = fs.open("/p2", os.O_RDWR)  # the window [3 MiB, 7 MiB)
    whole = fs.open("/disk", os.O_RDONLY)
    assert _errno(fs.lseek, whole, 0, os.SEEK_DATA) == errno.ENXIO  # all hole
    assert fs.lseek(whole, 5, os.SEEK_HOLE) == 5
    fs.write(fh, b"x" * 100, MiB + 10)  # grain [4 MiB, 4 MiB + 64 KiB) of the disk
    grain = 64 * 1024
    assert fs.lseek(fh, 0, os.SEEK_DATA) == MiB
    assert fs.lseek(fh, MiB + 7, os.SEEK_DATA) == MiB + 7  # inside data: stays
    assert fs.lseek(fh, MiB, os.SEEK_HOLE) == MiB + grain
    assert fs.lseek(fh, 0, os.SEEK_HOLE) == 0
    assert _errno(fs.lseek, fh, MiB + grain, os.SEEK_DATA) == errno.ENXIO
    assert fs.lseek(whole, 0, os.SEEK_DATA) == 4 * MiB
    # Data up to the end of a window: the end of the file is the hole.
    p5 = fs.open("/p5", os.O_RDWR)  # [3 MiB, 4 MiB)
    fs.write(p5, b"z", MiB - 1)
    assert fs.lseek(p5, MiB - grain, os.SEEK_HOLE) == MiB
    assert _errno(fs.lseek, p5, MiB, os.SEEK_DATA) == errno.ENXIO  # at or past the end
    assert _errno(fs.lseek, p5, MiB, os.SEEK_HOLE) == errno.ENXIO
    assert _errno(fs.lseek, p5, 0, os.SEEK_SET) == errno.EINVAL
