"""The VHD checksum: one's complement of the byte sum of a record with its checksum field zeroed.

Used by the hard disk footer (512 bytes, field at offset 64) and the dynamic disk header
(1024 bytes, field at offset 36).
"""

from __future__ import annotations


def vhd_checksum(record: bytes | bytearray | memoryview, field_offset: int) -> int:
    """Checksum of ``record`` as if its 4-byte checksum field at ``field_offset`` were zero."""
    data = bytes(record)
    total = sum(data) - sum(data[field_offset : field_offset + 4])
    return ~total & 0xFFFFFFFF
