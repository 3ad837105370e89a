"""vhd.buffers: buffers (bytearrays and maps) start on a page (the kernel's copies into a buffer 8 or 16 bytes into a
page ran at half speed), have the asked length, start zeroed, and stay where they are."""

from __future__ import annotations

import ctypes
import mmap

import pytest

from vhd.buffers import mapped, page_aligned


def _address(buf: bytearray) -> int:
    probe = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


@pytest.mark.parametrize("n", [4096, 4097, 65536, 512 * 1024, 2 * 1024 * 1024 + 512, 16 << 20])
def test_page_aligned(n: int) -> None:
    buf = page_aligned(n)
    assert isinstance(buf, bytearray) and len(buf) == n and not any(buf)
    at = _address(buf)
    assert at % mmap.PAGESIZE == 0
    view = memoryview(buf)
    view[-3:] = b"abc"
    view.release()
    assert _address(buf) == at  # writes through a view do not move it
    assert buf == bytearray(n - 3) + b"abc"


def test_many_buffers_each_aligned() -> None:
    # whether glibc serves them from maps of their own or from its heap
    bufs = [page_aligned(size) for size in (4096, 5000, 70000, 300000) * 8]
    assert all(_address(b) % mmap.PAGESIZE == 0 for b in bufs)


def test_less_than_a_page_is_refused() -> None:
    with pytest.raises(ValueError, match="at least a page"):
        page_aligned(mmap.PAGESIZE - 1)


@pytest.mark.parametrize("n", [3, 4096, 70000, 2 << 20])
def test_mapped(n: int) -> None:
    view = mapped(n)
    assert len(view) == n and not view.readonly and not any(view)
    assert ctypes.addressof(ctypes.c_char.from_buffer(view)) % mmap.PAGESIZE == 0
    view[-3:] = b"abc"
    assert bytes(view[-3:]) == b"abc"
    # what convert's zero scan does with it: bytes.startswith takes any buffer
    assert bytes(n).startswith(view[: n - 3])
    assert not bytes(n).startswith(view)
