"""VHDX (MS-VHDX 1.0): Hyper-V's format as a second implementation of :class:`vhd.Disk`.

``open_vhdx(path, mode)`` opens fixed, dynamic and differencing VHDX (replaying the log);
``create_vhdx(path, size, ...)`` makes one; ``open_any`` probes VHDX or VHD by content.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..disk import Disk
from .crc import using_c_extension
from .create import create_vhdx
from .disk import VHDXDisk, is_vhdx, open_vhdx, probe_vhdx

__all__ = [
    "VHDXDisk",
    "create_vhdx",
    "is_vhdx",
    "open_any",
    "open_vhdx",
    "probe_vhdx",
    "using_c_extension",
]


def open_any(
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    parent_dirs: Sequence[str] = (),
    _seen: frozenset[tuple[int, int]] = frozenset(),
) -> Disk:
    """Open a VHDX or a VHD, whichever the file's first bytes say it is."""
    if probe_vhdx(os.fspath(path)):
        return open_vhdx(path, mode, parent_dirs=parent_dirs, _seen=_seen)
    from ..image import open as open_vhd

    return open_vhd(path, mode, parent_dirs=parent_dirs, _seen=_seen)
