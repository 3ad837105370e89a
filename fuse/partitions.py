"""Partition tables of a disk: MBR (primary, extended and logical) and GPT, numbered as Linux does.

Pure: the parser reads through a ``read(offset, length) -> bytes`` callable and returns
:class:`Partition` records; no file, no binding.  The rules follow the Linux kernel's
``block/partitions/msdos.c`` and ``efi.c`` so that ``p5`` here is ``sda5`` there:

* **GPT** is used when sector 0 is a protective (or hybrid) MBR, i.e. holds a type ``0xEE``
  entry.  The primary header (LBA 1) is checked (signature, header size, header CRC32, its own
  LBA, usable range, entry size 128, entry-array CRC32); if it fails, the backup header named by
  the primary's ``alternate_lba`` and then the one in the last sector are tried.  Entry *i*
  (0-based) with a non-zero type GUID becomes partition *i + 1*; holes keep their numbers.
  An MBR holding ``0xEE`` but no valid GPT has no partitions (Linux ignores it too).
* **MBR**: sector 0 must end in ``55 AA`` and every boot indicator must be ``0x00`` or ``0x80``
  (otherwise it is a boot sector of an unpartitioned file system).  Slot *k* (1-4) with a
  non-zero size is partition *k*.  An extended entry (types ``05``, ``0F``, ``85``) shows as a
  2-sector stub, as in Linux; its chain of EBRs yields logical partitions numbered from 5:
  data entries are relative to their EBR, the link entry is relative to the extended
  partition's start, at most 100 EBRs are followed and entries 3-4 of an EBR count only when
  they lie inside the extended partition.
* Partitions starting past the end of the disk are dropped; ones running past it are clipped.

Only 512-byte logical sectors exist in a VHD, so every LBA here counts 512 bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

SECTOR = 512

_MBR_ENTRY = struct.Struct("<B3sB3sII")  # boot flag, CHS first, type, CHS last, LBA, sectors
_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
_GPT_PROTECTIVE = 0xEE
_MAX_EBRS = 100  # Linux stops following the chain after this many links
_MAX_PARTITIONS = 256  # DISK_MAX_PARTS
_GPT_SIGNATURE = b"EFI PART"
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY_SIZE = 128
_MAX_GPT_ENTRY_BYTES = 4 * 1024 * 1024  # refuse absurd entry arrays instead of reading GiBs

Reader = Callable[[int, int], bytes]


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition: its Linux number and its byte range on the disk."""

    number: int
    start: int
    length: int

    @property
    def name(self) -> str:
        return f"p{self.number}"


def read_partitions(read: Reader, disk_size: int) -> list[Partition]:
    """Parse the partition table of a disk of ``disk_size`` bytes read through ``read``.

    Returns the partitions ordered by number; an empty list when the disk holds no table (or
    one Linux would not accept).
    """
    if disk_size < 2 * SECTOR:
        return []
    mbr = _read_exact(read, 0, SECTOR)
    if mbr[510:512] != b"\x55\xaa":
        return []
    entries = [_MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    if any(entry[2] == _GPT_PROTECTIVE for entry in entries):
        found = _read_gpt(read, disk_size)
    else:
        if any(entry[0] not in (0x00, 0x80) for entry in entries):
            return []
        found = _read_mbr(read, disk_size, entries)
    return _clip(found, disk_size)


def _read_exact(read: Reader, offset: int, length: int) -> bytes:
    data = read(offset, length)
    if len(data) < length:
        # A short read means the table points past the disk: treat the missing part as zeros,
        # which makes every check below fail cleanly.
        data = bytes(data) + bytes(length - len(data))
    return bytes(data)


def _clip(found: list[tuple[int, int, int]], disk_size: int) -> list[Partition]:
    result: list[Partition] = []
    for number, start, length in sorted(found):
        if length <= 0 or start >= disk_size:
            continue
        result.append(Partition(number, start, min(length, disk_size - start)))
    return result


def _read_mbr(
    read: Reader, disk_size: int, entries: list[tuple[int, bytes, int, bytes, int, int]]
) -> list[tuple[int, int, int]]:
    found: list[tuple[int, int, int]] = []
    extended: list[tuple[int, int]] = []
    for slot, (_boot, _chs1, kind, _chs2, lba, sectors) in enumerate(entries, start=1):
        if sectors == 0:
            continue
        if kind in _EXTENDED_TYPES:
            # Linux exposes the extended container as a tiny device (room for a boot loader,
            # but too small to mkfs by mistake).
            found.append((slot, lba * SECTOR, min(sectors, 2) * SECTOR))
            extended.append((lba, sectors))
        else:
            found.append((slot, lba * SECTOR, sectors * SECTOR))
    next_number = 5
    for first_lba, first_sectors in extended:
        next_number = _read_logicals(read, disk_size, first_lba, first_sectors, next_number, found)
    return found


def _read_logicals(
    read: Reader,
    disk_size: int,
    first_lba: int,
    first_sectors: int,
    number: int,
    found: list[tuple[int, int, int]],
) -> int:
    """Follow one extended partition's EBR chain (Linux ``parse_extended``)."""
    this_lba, this_sectors = first_lba, first_sectors
    for _ in range(_MAX_EBRS):
        if number > _MAX_PARTITIONS or (this_lba + 1) * SECTOR > disk_size:
            break
        ebr = _read_exact(read, this_lba * SECTOR, SECTOR)
        if ebr[510:512] != b"\x55\xaa":
            break
        entries = [_MBR_ENTRY.unpack_from(ebr, 446 + 16 * i) for i in range(4)]
        for index, (_boot, _chs1, kind, _chs2, lba, sectors) in enumerate(entries):
            if sectors == 0 or kind in _EXTENDED_TYPES:
                continue
            start = this_lba + lba
            # Entries 3 and 4 of an EBR sometimes hold garbage: keep them only when they fit.
            if index >= 2 and (
                lba + sectors > this_sectors
                or start < first_lba
                or start + sectors > first_lba + first_sectors
            ):
                continue
            found.append((number, start * SECTOR, sectors * SECTOR))
            number += 1
        link = next(
            (
                (lba, sectors)
                for _b, _c, kind, _d, lba, sectors in entries
                if sectors and kind in _EXTENDED_TYPES
            ),
            None,
        )
        if link is None:
            break
        this_lba, this_sectors = first_lba + link[0], link[1]
    return number


def _read_gpt(read: Reader, disk_size: int) -> list[tuple[int, int, int]]:
    last_lba = disk_size // SECTOR - 1
    primary = _gpt_at(read, 1, last_lba)
    if primary is not None:
        return primary
    # The primary is damaged: use the backup, where the primary says it is, else at the end.
    header = _read_exact(read, SECTOR, SECTOR)
    candidates: list[int] = []
    if header[:8] == _GPT_SIGNATURE:
        alternate = _GPT_HEADER.unpack_from(header)[6]
        if 1 < alternate <= last_lba:
            candidates.append(alternate)
    if last_lba not in candidates:
        candidates.append(last_lba)
    for lba in candidates:
        backup = _gpt_at(read, lba, last_lba)
        if backup is not None:
            return backup
    return []


def _gpt_at(read: Reader, lba: int, last_lba: int) -> list[tuple[int, int, int]] | None:
    """Validate the GPT header at ``lba`` and return its partitions, or None when invalid."""
    block = _read_exact(read, lba * SECTOR, SECTOR)
    (
        signature,
        _revision,
        header_size,
        header_crc,
        _reserved,
        my_lba,
        _alternate,
        first_usable,
        last_usable,
        _disk_guid,
        entries_lba,
        entry_count,
        entry_size,
        entries_crc,
    ) = _GPT_HEADER.unpack_from(block)
    if signature != _GPT_SIGNATURE or not _GPT_HEADER.size <= header_size <= SECTOR:
        return None
    check = bytearray(block[:header_size])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != header_crc or my_lba != lba:
        return None
    if first_usable > last_lba or last_usable > last_lba or first_usable > last_usable:
        return None
    if entry_size != _GPT_ENTRY_SIZE or entry_count * entry_size > _MAX_GPT_ENTRY_BYTES:
        return None
    if entries_lba > last_lba:
        return None
    table = _read_exact(read, entries_lba * SECTOR, entry_count * entry_size)
    if zlib.crc32(table) != entries_crc:
        return None
    found: list[tuple[int, int, int]] = []
    for index in range(min(entry_count, _MAX_PARTITIONS)):
        entry = table[index * entry_size : (index + 1) * entry_size]
        first, last = struct.unpack_from("<QQ", entry, 32)
        if entry[:16] == bytes(16) or first > last or last > last_lba:
            continue
        found.append((index + 1, first * SECTOR, (last - first + 1) * SECTOR))
    return found
