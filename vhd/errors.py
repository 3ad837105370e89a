"""The error hierarchy of the library.

Every failure caused by an image (corrupt, unsupported, missing parent) or by a misuse of the API
(write to a read-only disk, bad size) raises a subclass of :class:`VHDError`, with a message that
names the file and says what is wrong in terms a user can act on.
"""

from __future__ import annotations


class VHDError(Exception):
    """Base class of every error raised by vhdkit."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class CorruptImageError(VHDError):
    """The image's structures are damaged or inconsistent."""


class ChecksumError(CorruptImageError):
    """A footer or header checksum does not match its contents."""


class UnsupportedFeatureError(VHDError):
    """The image is valid but uses something vhdkit does not implement."""


class NotAVHDError(VHDError):
    """The file has no VHD footer at its end or start."""


class ForeignFormatError(NotAVHDError):
    """The file is a disk image in another format (qcow2, VMDK, VHDX, ...), named in the message:
    vhdkit refuses it rather than reading the container's bytes as a raw disk."""

    def __init__(self, message: str, *, path: str | None = None, format: object = None) -> None:
        super().__init__(message, path=path)
        self.format = format


class ParentError(VHDError):
    """Base class for problems with a differencing disk's parent chain."""


class ParentNotFoundError(ParentError):
    """No candidate path for the parent exists."""


class ParentMismatchError(ParentError):
    """A parent was found but its unique id is not the one the child records."""


class ChainLoopError(ParentError):
    """Following parents leads back to a disk already in the chain."""


class ReadOnlyError(VHDError):
    """A write was attempted on a disk opened read-only (or a parent in a chain)."""


class InvalidArgumentError(VHDError):
    """A caller passed a value the format cannot represent (size, block size, offset)."""
