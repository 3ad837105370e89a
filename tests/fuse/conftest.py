"""Fixtures of the FUSE tests: ``mounts`` mounts images and always unmounts them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .mounting import Mounts, need_fuse


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    need_fuse()
    manager = Mounts(tmp_path)
    try:
        yield manager
    finally:
        manager.cleanup()
