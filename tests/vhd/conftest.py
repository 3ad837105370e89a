"""Fixtures shared by the tests of vhd/ (VHD and VHDX alike)."""

from __future__ import annotations

from pathlib import Path

import pytest

MiB = 1024 * 1024


@pytest.fixture
def big_source(tmp_path: Path) -> Path:
    """A 64 MiB raw source, every MiB a different byte: long enough to interrupt a convert."""
    src = tmp_path / "in" / "src.raw"
    src.parent.mkdir()
    with open(src, "wb") as f:
        for i in range(64):
            f.write(bytes([i + 1]) * MiB)
    return src


@pytest.fixture
def layout_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every ``(offset, length)`` the layout step reads from now on (through its read hook)."""
    import vhd.layout as vlayout

    reads: list[tuple[int, int]] = []
    real = vlayout.read_hook

    def spy(fd: int, n: int, off: int) -> bytes:
        reads.append((off, n))
        return real(fd, n, off)

    monkeypatch.setattr(vlayout, "read_hook", spy)
    return reads
