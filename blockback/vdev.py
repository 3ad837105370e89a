"""Virtual device names of Xen vbds and their numbers (Xen's ``docs/misc/vbd-interface.txt``).

A vbd is keyed in XenStore by its device number (the ``<devid>`` of ``device/vbd/<devid>`` and
``backend/.../<frontend domid>/<devid>``, and the frontend's ``virtual-device`` node).  The
names a guest config uses map onto it as the document says (and libxl's
``libxl__device_disk_dev_number`` does):

* ``xvdX[N]``: disks 0..15 with partitions 0..15 are ``202 << 8 | disk << 4 | partition``; any
  other (disk up to 2^20-1, partition up to 255) takes the extended form
  ``1 << 28 | disk << 8 | partition``;
* ``hdX[N]``: disks 0..3, partitions 0..63: hda/hdb on major 3, hdc/hdd on major 22,
  ``major << 8 | (disk & 1) << 6 | partition``;
* ``sdX[N]``: disks 0..15, partitions 0..15: ``8 << 8 | disk << 4 | partition``;
* ``dNpM`` (and ``dN``): the xvd encoding of disk N, partition M;
* a plain decimal number is taken as the device number itself.

Disk letters count in bijective base 26: ``a``..``z`` are 0..25, ``aa`` is 26, ``ab`` 27, ...
"""

from __future__ import annotations

import re
from typing import Final

XVD_MAJOR: Final = 202
EXTENDED: Final = 1 << 28
_NAME = re.compile(r"(xvd|hd|sd)([a-z]+)([0-9]*)")
_DFORM = re.compile(r"d([0-9]+)(?:p([0-9]+))?")


def _letters(text: str) -> int:
    """``a`` -> 0, ``z`` -> 25, ``aa`` -> 26 (bijective base 26)."""
    n = 0
    for ch in text:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def _xvd(disk: int, partition: int, vdev: str) -> int:
    if disk < 16 and partition < 16:
        return XVD_MAJOR << 8 | disk << 4 | partition
    if disk < 1 << 20 and partition < 256:
        return EXTENDED | disk << 8 | partition
    raise ValueError(f"virtual device {vdev!r} is out of range (xvd: disk < 2^20, partition < 256)")


def devid(vdev: str) -> int:
    """The vbd device number of a virtual device name (``xvdb`` -> 51728); ValueError if it is
    not one Xen's vbd-interface.txt defines."""
    name = vdev.strip()
    if name.isdigit():
        number = int(name)
        if not 0 < number < 1 << 31:
            raise ValueError(f"device number {name} is out of range")
        return number
    m = _DFORM.fullmatch(name)
    if m:
        return _xvd(int(m.group(1)), int(m.group(2) or 0), vdev)
    m = _NAME.fullmatch(name)
    if not m or len(m.group(2)) > 5:
        raise ValueError(
            f"virtual device {vdev!r} is not a Xen vbd name (xvdX, hdX, sdX, dNpM or a number)"
        )
    kind, disk, partition = m.group(1), _letters(m.group(2)), int(m.group(3) or 0)
    if kind == "xvd":
        return _xvd(disk, partition, vdev)
    if kind == "hd":
        if disk > 3 or partition > 63:
            raise ValueError(f"virtual device {vdev!r} is out of range (hda..hdd, partition < 64)")
        return (3 if disk < 2 else 22) << 8 | (disk & 1) << 6 | partition
    if disk > 15 or partition > 15:
        raise ValueError(f"virtual device {vdev!r} is out of range (sda..sdp, partition < 16)")
    return 8 << 8 | disk << 4 | partition
