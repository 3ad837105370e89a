"""vhd: read, write and create Microsoft VHD images (fixed, dynamic, differencing).

``vhd.open(path, mode="r", *, strict=True, parent_dirs=(), allow_parent_mismatch=False,
parent=None, open_parent=True)`` opens an image; ``vhd.create(path, size, *, type="dynamic",
block_size=2 MiB, parent=None)`` makes one.  Both return a :class:`Disk`.
"""

from __future__ import annotations

from .create import create
from .disk import BlockDevice, Disk, DiskFile, Extent
from .errors import (
    ChainLoopError,
    ChecksumError,
    CorruptImageError,
    ForeignFormatError,
    InvalidArgumentError,
    NotAVHDError,
    ParentError,
    ParentMismatchError,
    ParentNotFoundError,
    ReadOnlyError,
    UnsupportedFeatureError,
    VHDError,
)
from .footer import DiskType
from .image import open

__version__ = "0.1.0"

__all__ = [
    "BlockDevice",
    "ChainLoopError",
    "ChecksumError",
    "CorruptImageError",
    "Disk",
    "DiskFile",
    "DiskType",
    "Extent",
    "ForeignFormatError",
    "InvalidArgumentError",
    "NotAVHDError",
    "ParentError",
    "ParentMismatchError",
    "ParentNotFoundError",
    "ReadOnlyError",
    "UnsupportedFeatureError",
    "VHDError",
    "__version__",
    "create",
    "open",
]
