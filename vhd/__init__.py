"""vhd: read, write and create Microsoft VHD images (fixed, dynamic, differencing)."""

from __future__ import annotations

from .errors import (
    ChainLoopError,
    ChecksumError,
    CorruptImageError,
    InvalidArgumentError,
    NotAVHDError,
    ParentError,
    ParentMismatchError,
    ParentNotFoundError,
    ReadOnlyError,
    UnsupportedFeatureError,
    VHDError,
)

__version__ = "0.1.0"

__all__ = [
    "ChainLoopError",
    "ChecksumError",
    "CorruptImageError",
    "InvalidArgumentError",
    "NotAVHDError",
    "ParentError",
    "ParentMismatchError",
    "ParentNotFoundError",
    "ReadOnlyError",
    "UnsupportedFeatureError",
    "VHDError",
    "__version__",
]
