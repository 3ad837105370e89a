"""Which ``crcmod`` computes VHDX's CRC-32C (MS-VHDX 2.2.2): its compiled extension, about a
hundred times faster, or its pure Python fallback.

Outside :mod:`vhd.vhdx` so that ``vhd --version`` can say which without importing the VHDX
package (about 20 ms); :mod:`vhd.vhdx.crc` re-exports it.
"""

from __future__ import annotations

import sys


def using_c_extension() -> bool:
    """True when crcmod runs its compiled extension (``crcmod.crcmod._usingExtension``)."""
    import crcmod  # noqa: F401  (loads crcmod.crcmod, which sets _usingExtension)

    return bool(getattr(sys.modules.get("crcmod.crcmod"), "_usingExtension", False))
