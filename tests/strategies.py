"""Hypothesis strategies and settings profiles shared by the VHD tests.

Profiles: ``ci`` (the default; moderate example counts so the suite stays within minutes on two
cores) and ``thorough`` (many more examples, for a long local run).  Choose one with the
``HYPOTHESIS_PROFILE`` environment variable; tests take their settings from :func:`hsettings`.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SECTOR = 512
KiB = 1024

settings.register_profile(
    "ci",
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=500,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if _PROFILE not in ("ci", "thorough"):
    _PROFILE = "ci"


def hsettings(**overrides: Any) -> settings:
    """The selected profile, with per-test overrides (overrides scale with the profile)."""
    base = settings.get_profile(_PROFILE)
    if _PROFILE == "thorough" and "max_examples" in overrides:
        overrides["max_examples"] = overrides["max_examples"] * 10
    return settings(base, **overrides)


# Block sizes small enough that a disk of a few hundred KiB spans many blocks.
block_sizes = st.sampled_from([4 * KiB, 8 * KiB, 16 * KiB, 64 * KiB])


def disk_sizes(max_sectors: int = 1024) -> st.SearchStrategy[int]:
    """Disk sizes in bytes: whole sectors, including sizes that are not a whole block."""
    return st.integers(min_value=1, max_value=max_sectors).map(lambda s: s * SECTOR)


@st.composite
def ranges(draw: st.DrawFn, size: int, max_len: int = 40 * KiB) -> tuple[int, int]:
    """(offset, length) inside a disk of ``size`` bytes; biased to sector and block edges."""
    edge = st.sampled_from([0, 1, 511, 512, 513, 4095, 4096, 4097, 8191, 8192, 16383, 16384])
    offset = draw(
        st.one_of(
            st.integers(min_value=0, max_value=size - 1),
            edge.filter(lambda e: e < size),
            st.integers(min_value=0, max_value=(size - 1) // SECTOR).map(lambda s: s * SECTOR),
        )
    )
    length = draw(
        st.one_of(
            st.integers(min_value=0, max_value=min(max_len, size - offset)),
            st.sampled_from([1, 511, 512, 513, 4096]).filter(lambda n: n <= size - offset),
        )
    )
    return offset, length


@st.composite
def aligned_ranges(draw: st.DrawFn, size: int, align: int = 4096) -> tuple[int, int]:
    """(offset, length) with both ends on ``align`` boundaries (for the libvhdi oracle)."""
    units = size // align
    first = draw(st.integers(min_value=0, max_value=max(0, units - 1)))
    count = draw(st.integers(min_value=1, max_value=max(1, min(units - first, 16))))
    return first * align, count * align


def payload(length: int, seed: int) -> bytes:
    """Deterministic, non-zero-heavy bytes (so zeros and data are never confused)."""
    pattern = bytes((seed * 131 + i * 7 + 1) % 251 + 1 for i in range(251))
    reps = length // len(pattern) + 1
    return (pattern * reps)[:length]


byte_values = st.integers(min_value=0, max_value=255)
