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
