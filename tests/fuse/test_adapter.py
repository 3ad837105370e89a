"""The libfuse binding's own code paths that need no mount: how request buffers reach the disk."""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import SimpleNamespace

import pytest
from vhdfuse import adapter
from vhdfuse.fs import DiskFilesystem

import vhd
from vhd.disk import Disk

MiB = 1024 * 1024
PATTERN = bytes(range(256))


def test_reads_reach_the_disks_single_preadv_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10 §3: libfuse's buffer, viewed through ctypes, has the format '<B', and the disk's
    fast path (one preadv for a read inside a fully present block) wanted 'B', so every FUSE
    read took the slow path.  Now a read lands in libfuse's buffer through the fast path."""
    path = tmp_path / "d.vhd"
    with vhd.create(path, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(PATTERN * (4 * MiB // 256), 0)
    with vhd.open(path) as disk:
        fs = DiskFilesystem(disk)
        fh = fs.open("/disk", 0)
        assert fs.read(fh, 512, 0) == PATTERN * 2  # loads block 0's bitmap (all present)

        def slow_path(self: Disk, buffer: object, offset: int) -> int:
            raise AssertionError("the read missed the fast path")

        monkeypatch.setattr(Disk, "preadinto", slow_path)
        # What libfuse hands the read callback: a char * into its own buffer, and the handle.
        buffer = (ctypes.c_byte * 8192)()
        buf = ctypes.cast(buffer, ctypes.POINTER(ctypes.c_byte))
        fip = SimpleNamespace(contents=SimpleNamespace(fh=fh))
        server = SimpleNamespace(operations=SimpleNamespace(fs=fs))
        assert adapter._FUSE.read(server, None, buf, 8192, 4096, fip) == 8192
        assert bytes(buffer) == PATTERN * 32


def test_writes_hand_the_disk_a_byte_view_of_libfuses_buffer() -> None:
    seen: list[memoryview] = []

    class Recorder:
        def write(self, fh: int, data: memoryview, offset: int) -> int:
            seen.append(data)
            return len(data)

    buffer = (ctypes.c_byte * 100)(*range(100))
    buf = ctypes.cast(buffer, ctypes.POINTER(ctypes.c_byte))
    server = SimpleNamespace(operations=SimpleNamespace(fs=Recorder()))
    fip = SimpleNamespace(contents=SimpleNamespace(fh=1))
    assert adapter._FUSE.write(server, None, buf, 100, 0, fip) == 100
    (view,) = seen
    assert view.format == "B" and bytes(view) == bytes(range(100))
    buffer[0] = 55  # a view of libfuse's memory, not a copy
    assert view[0] == 55
