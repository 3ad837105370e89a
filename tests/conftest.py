"""Shared fixtures: reference tools (fail under CI=true, skip otherwise), the sample corpus."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_tool(name: str) -> str:
    """Return the path of an external tool; skip the test without it, or fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"reference tool {name!r} is not installed (make test installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    return need_tool


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The directory of real sample images; only corpus tests may skip, and only without it."""
    value = os.environ.get("VHD_CORPUS")
    if not value:
        pytest.skip("VHD_CORPUS is not set (make test sets it when ../shared/corpus exists)")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"VHD_CORPUS={value} is not a directory")
    return path


# tests/xen/ boots a real hypervisor under QEMU: only `make test-xen` (VHD_TEST_XEN=1) and the
# lab's own dom0 (VHD_XEN_DOM0=1) collect it.
collect_ignore = [] if os.environ.get("VHD_TEST_XEN") or os.environ.get("VHD_XEN_DOM0") else ["xen"]
