"""What kind of disk image a file holds, from its magic numbers, and which format an output path
asks for.  VHD itself is spec section "Hard Disk Footer Format" (cookie ``conectix`` at the end,
or at the start of a dynamic disk); the other formats' signatures are those of their own
specifications, as qemu's block drivers probe them:

* qcow / qcow2: ``QFI\\xfb`` then a big-endian version (1: qcow, 2 or 3: qcow2);
* QED: ``QED\\0``;  VHDX: ``vhdxfile`` (VHDX spec 2.2.1, file type identifier);
* VMDK: hosted sparse extent ``KDMV``, ESX sparse ``COWD``, or a text descriptor
  (``# Disk DescriptorFile``);
* VDI: signature 0xbeda107f (little-endian) at 0x40, after the ``<<< ... >>>`` text;
* LUKS: ``LUKS\\xba\\xbe`` (LUKS1 and LUKS2);  Parallels: ``WithoutFreeSpace`` /
  ``WithouFreSpacExt``;  Bochs: ``Bochs Virtual HD Image``;  cloop: its ``#!/bin/sh`` +
  ``#V2.0 Format`` preamble;  Apple DMG (UDIF): a ``koly`` trailer in the last 512 bytes;
* compressed files (gzip, xz, zstd, bzip2), so that ``disk.vhd.gz`` is not copied as a raw disk.

Everything else is raw, as qemu-img's probe has it.  The functions here are pure (bytes and names
in, a format out): the callers read the bytes.
"""

from __future__ import annotations

import enum
import os
import stat
import struct

from .errors import InvalidArgumentError, UnsupportedFeatureError

HEAD_BYTES = 4096  # what probe() needs from the start of the file
TAIL_BYTES = 512  # ... and from its end


class ImageFormat(enum.Enum):
    """A disk image format: ``value`` is its name for users, ``qemu`` qemu-img's name for it."""

    RAW = ("raw", "raw")
    VHD = ("VHD", "vpc")
    VHDX = ("VHDX", "vhdx")
    QCOW = ("qcow (version 1)", "qcow")
    QCOW2 = ("qcow2", "qcow2")
    QED = ("QED", "qed")
    VMDK = ("VMDK", "vmdk")
    VDI = ("VDI (VirtualBox)", "vdi")
    LUKS = ("LUKS (encrypted)", "luks")
    PARALLELS = ("Parallels", "parallels")
    BOCHS = ("Bochs", "bochs")
    CLOOP = ("cloop", "cloop")
    DMG = ("Apple DMG", "dmg")
    GZIP = ("gzip-compressed", "")
    XZ = ("xz-compressed", "")
    ZSTD = ("zstd-compressed", "")
    BZIP2 = ("bzip2-compressed", "")

    def __init__(self, label: str, qemu: str) -> None:
        self.label = label
        self.qemu = qemu

    def __str__(self) -> str:
        return self.label


_COMPRESSED = {
    ImageFormat.GZIP: "gunzip",
    ImageFormat.XZ: "unxz",
    ImageFormat.ZSTD: "unzstd",
    ImageFormat.BZIP2: "bunzip2",
}

_PREFIXES: tuple[tuple[bytes, ImageFormat], ...] = (
    (b"vhdxfile", ImageFormat.VHDX),
    (b"QED\0", ImageFormat.QED),
    (b"KDMV", ImageFormat.VMDK),
    (b"COWD", ImageFormat.VMDK),
    (b"LUKS\xba\xbe", ImageFormat.LUKS),
    (b"WithoutFreeSpace", ImageFormat.PARALLELS),
    (b"WithouFreSpacExt", ImageFormat.PARALLELS),
    (b"Bochs Virtual HD Image", ImageFormat.BOCHS),
    (b"#!/bin/sh\n#V2.0 Format\n", ImageFormat.CLOOP),
    (b"\x1f\x8b\x08", ImageFormat.GZIP),
    (b"\xfd7zXZ\0", ImageFormat.XZ),
    (b"\x28\xb5\x2f\xfd", ImageFormat.ZSTD),
)


def is_vhdx_file(path: str) -> bool:
    """Whether ``path`` is a regular file or block device starting with "vhdxfile" (as
    :func:`vhd.vhdx.probe_vhdx`, without importing the VHDX package: every command opening a
    VHD asks).  Never blocks (a FIFO is not read) and never raises."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        mode = os.fstat(fd).st_mode
        return (stat.S_ISREG(mode) or stat.S_ISBLK(mode)) and os.pread(fd, 8, 0) == b"vhdxfile"
    except OSError:
        return False
    finally:
        os.close(fd)


def probe(head: bytes, tail: bytes = b"") -> ImageFormat:
    """The format of a file that starts with ``head`` (its first :data:`HEAD_BYTES`, or all of
    it) and ends with ``tail`` (its last :data:`TAIL_BYTES`)."""
    if head[:8] == b"conectix" or tail[-512:][:8] == b"conectix" or tail[-511:][:8] == b"conectix":
        return ImageFormat.VHD
    if head[:4] == b"QFI\xfb" and len(head) >= 8:
        version = struct.unpack_from(">I", head, 4)[0]
        if version == 1:
            return ImageFormat.QCOW
        if version in (2, 3):
            return ImageFormat.QCOW2
    for prefix, fmt in _PREFIXES:
        if head.startswith(prefix):
            return fmt
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return ImageFormat.BZIP2
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        return ImageFormat.VDI
    if b"# Disk DescriptorFile" in head[:1024]:
        return ImageFormat.VMDK
    if len(tail) >= 512 and tail[-512:][:4] == b"koly":
        return ImageFormat.DMG
    return ImageFormat.RAW


def refusal(fmt: ImageFormat, path: str = "SRC") -> str:
    """One line for a user whose input ``path`` is in ``fmt``, a format vhdkit does not read."""
    if fmt in _COMPRESSED:
        return f"a {fmt} file, not a disk image: decompress it first ({_COMPRESSED[fmt]})"
    if fmt is ImageFormat.LUKS:
        return (
            "a LUKS-encrypted volume, not a disk image vhdkit reads: open it with cryptsetup "
            "and convert the mapped device"
        )
    raw = os.path.splitext(os.path.basename(path))[0] + ".raw"
    hint = f"; convert it to raw first: qemu-img convert -f {fmt.qemu} -O raw {path} {raw}"
    if fmt is ImageFormat.VHDX:
        return f"a {fmt} image: reading VHDX is not supported yet{hint}"
    return f"a {fmt} image, not a VHD or raw disk{hint}"


# The format an output path asks for, by extension: the one table to extend when vhdkit learns
# to write another format (add it to WRITABLE too).
OUTPUT_EXTENSIONS: dict[str, ImageFormat] = {
    "": ImageFormat.RAW,
    ".img": ImageFormat.RAW,
    ".raw": ImageFormat.RAW,
    ".bin": ImageFormat.RAW,
    ".vhd": ImageFormat.VHD,
    ".vhdx": ImageFormat.VHDX,
    ".avhdx": ImageFormat.VHDX,
    ".qcow2": ImageFormat.QCOW2,
    ".qcow": ImageFormat.QCOW,
    ".qed": ImageFormat.QED,
    ".vmdk": ImageFormat.VMDK,
    ".vdi": ImageFormat.VDI,
    ".hdd": ImageFormat.PARALLELS,
    ".dmg": ImageFormat.DMG,
}
WRITABLE: dict[str, ImageFormat] = {
    "raw": ImageFormat.RAW,
    "vhd": ImageFormat.VHD,
    "vhdx": ImageFormat.VHDX,  # vhd.vhdx
}


def output_format(path: str, to: str | None = None, *, block_device: bool = False) -> str:
    """The format (a key of :data:`WRITABLE`) to write ``path`` in: ``to`` when given, else the
    one its extension names (a block device is raw).  Unknown or unwritable ones are refused, so
    that ``disk.vhdx`` never receives raw bytes."""
    if to is not None:
        if to not in WRITABLE:
            raise InvalidArgumentError(
                f"cannot write {to!r} images (writable: {', '.join(WRITABLE)})"
            )
        return to
    if block_device:
        return "raw"
    ext = os.path.splitext(os.path.basename(path))[1].lower()
    fmt = OUTPUT_EXTENSIONS.get(ext)
    if fmt is None:
        raise InvalidArgumentError(
            f"{path}: unknown output extension {ext!r}: name it .vhd, .img, .raw or .bin, or "
            "pass --to raw / --to vhd"
        )
    for name, writable in WRITABLE.items():
        if writable is fmt:
            return name
    if fmt is ImageFormat.VHDX:
        raise UnsupportedFeatureError(
            f"{path}: writing VHDX is not supported yet (use .vhd, or --to raw / --to vhd)"
        )
    raise UnsupportedFeatureError(
        f"{path}: vhdkit does not write {fmt} images; write raw (--to raw, or .img) and use "
        f"qemu-img convert -f raw -O {fmt.qemu}"
    )
