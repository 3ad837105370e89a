"""vhd: read, write and create Microsoft VHD images (fixed, dynamic, differencing).

``vhd.open(path, mode="r", *, strict=True, parent_dirs=(), allow_parent_mismatch=False,
parent=None, open_parent=True, parent_policy=None, force_share=False)`` opens an image (a
differencing disk's parent is looked for only in its own folder and ``parent_dirs`` unless a
:class:`ParentPolicy` says otherwise), locked against other processes (shared for ``"r"`` and
for every parent, exclusive for ``"r+"``; see :mod:`vhd.lock`; ``force_share`` takes no lock,
for inspection); ``vhd.create(path, size, *, type="dynamic",
block_size=2 MiB, parent=None)`` makes one.  Both return a :class:`Disk`.
"""

from __future__ import annotations

from .chain import ParentPolicy
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
from .lock import InUseError

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
    "InUseError",
    "InvalidArgumentError",
    "NotAVHDError",
    "ParentError",
    "ParentMismatchError",
    "ParentNotFoundError",
    "ParentPolicy",
    "ReadOnlyError",
    "UnsupportedFeatureError",
    "VHDError",
    "__version__",
    "create",
    "open",
]
