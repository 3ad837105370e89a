"""The MBR/GPT parser against tables written by sfdisk (and partx, which reads like the kernel)."""

from __future__ import annotations

import json
import re
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from vhdfuse.partitions import Partition, read_partitions

MiB = 1024 * 1024


def _reader(path: Path) -> Callable[[int, int], bytes]:
    data = path.read_bytes()
    return lambda offset, length: data[offset : offset + length]


def _table(path: Path) -> list[Partition]:
    return read_partitions(_reader(path), path.stat().st_size)


def _sfdisk(require_tool: Callable[[str], str], path: Path, script: str) -> list[dict[str, int]]:
    sfdisk = require_tool("sfdisk")
    subprocess.run([sfdisk, "-q", str(path)], input=script, text=True, check=True, timeout=30)
    dump = subprocess.run(
        [sfdisk, "--json", str(path)], capture_output=True, text=True, check=True, timeout=30
    )
    parts: list[dict[str, int]] = json.loads(dump.stdout)["partitiontable"]["partitions"]
    return parts


def _number(node: str) -> int:
    """sfdisk names partitions by appending the number to the image path."""
    match = re.search(r"(\d+)$", node)
    assert match is not None
    return int(match.group(1))


def test_mbr_primary_extended_logical(tmp_path: Path, require_tool: Callable[[str], str]) -> None:
    image = tmp_path / "mbr.img"
    image.write_bytes(bytes(64 * MiB))
    script = (
        "label: dos\n"
        "start=2048, size=8192, type=83\n"
        "start=10240, size=40960, type=5\n"
        "start=53248, size=8192, type=c\n"
        "start=12288, size=4096, type=83\n"
        "start=18432, size=6144, type=82\n"
        "start=26624, size=2048, type=83\n"
    )
    expected = _sfdisk(require_tool, image, script)
    got = {p.number: p for p in _table(image)}
    assert sorted(got) == [1, 2, 3, 5, 6, 7]
    for entry in expected:
        number = _number(entry["node"])
        start, size = entry["start"] * 512, entry["size"] * 512
        if entry["type"] == "5":
            # Linux shows the extended container as a 2-sector stub.
            assert got[number] == Partition(number, start, 1024)
        else:
            assert got[number] == Partition(number, start, size)


def test_gpt_and_backup(tmp_path: Path, require_tool: Callable[[str], str]) -> None:
    image = tmp_path / "gpt.img"
    image.write_bytes(bytes(32 * MiB))
    script = (
        "label: gpt\n"
        "start=2048, size=4096, type=L\n"
        "start=8192, size=8192, type=L\n"
        "start=20480, size=2048, type=S\n"
    )
    expected = _sfdisk(require_tool, image, script)
    want = [Partition(_number(e["node"]), e["start"] * 512, e["size"] * 512) for e in expected]
    assert _table(image) == want
    # Damage the primary header: the backup at the end of the disk must take over.
    with image.open("r+b") as f:
        f.seek(512 + 40)
        f.write(b"\xff")
    assert _table(image) == want
    # Damage the backup as well: no valid GPT, and the protective MBR is not used as a table.
    with image.open("r+b") as f:
        f.seek(32 * MiB - 512 + 40)
        f.write(b"\xff")
    assert _table(image) == []


def test_gpt_holes_keep_numbers(tmp_path: Path, require_tool: Callable[[str], str]) -> None:
    image = tmp_path / "gpt.img"
    image.write_bytes(bytes(16 * MiB))
    _sfdisk(require_tool, image, "label: gpt\n3: start=2048, size=2048, type=L\n")
    assert _table(image) == [Partition(3, 2048 * 512, 2048 * 512)]


def test_kernel_agrees(tmp_path: Path, require_tool: Callable[[str], str]) -> None:
    """Compare with partx (it reads the table with libblkid, which mirrors the kernel)."""
    partx = require_tool("partx")
    image = tmp_path / "mbr.img"
    image.write_bytes(bytes(32 * MiB))
    _sfdisk(
        require_tool,
        image,
        "label: dos\nstart=2048, size=2048\nstart=4096, size=30000, type=f\n"
        "start=6144, size=2048\nstart=10240, size=2048\nstart=14336, size=4096\n",
    )
    out = subprocess.run(
        [partx, "-g", "-r", "-o", "NR,START,SECTORS", str(image)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines()]
    ours = {p.number: p for p in _table(image)}
    assert sorted(ours) == [row[0] for row in rows]
    for number, start, _sectors in rows:
        assert ours[number].start == start * 512


def test_unpartitioned_and_fat_boot_sector() -> None:
    assert read_partitions(lambda o, n: bytes(n), 1 * MiB) == []
    boot = bytearray(512)
    boot[510:512] = b"\x55\xaa"
    boot[446] = 0x12  # not a boot indicator: a file system's boot code, not a table
    boot[446 + 4] = 0x83
    boot[446 + 12] = 1
    assert read_partitions(lambda o, n: bytes(boot[o : o + n]).ljust(n, b"\0"), MiB) == []


def test_clipped_at_disk_end() -> None:
    mbr = bytearray(512)
    mbr[510:512] = b"\x55\xaa"
    entry = (
        bytes([0, 0, 0, 0, 0x83, 0, 0, 0])
        + (100).to_bytes(4, "little")
        + (10_000).to_bytes(4, "little")
    )
    mbr[446:462] = entry
    entry2 = (
        bytes([0, 0, 0, 0, 0x83, 0, 0, 0])
        + (5000).to_bytes(4, "little")
        + (1).to_bytes(4, "little")
    )
    mbr[462:478] = entry2
    read = lambda o, n: bytes(mbr[o : o + n]).ljust(n, b"\0")  # noqa: E731
    assert read_partitions(read, 2000 * 512) == [Partition(1, 100 * 512, 1900 * 512)]


def test_ebr_loop_terminates() -> None:
    disk = bytearray(4 * MiB)
    disk[510:512] = b"\x55\xaa"
    disk[446:462] = (
        bytes([0, 0, 0, 0, 0x05, 0, 0, 0])
        + (100).to_bytes(4, "little")
        + (1000).to_bytes(4, "little")
    )
    ebr = 100 * 512
    disk[ebr + 510 : ebr + 512] = b"\x55\xaa"
    disk[ebr + 446 : ebr + 462] = (
        bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (1).to_bytes(4, "little") + (1).to_bytes(4, "little")
    )
    # The link points back at the same EBR: Linux gives up after 100 links, and so must we.
    disk[ebr + 462 : ebr + 478] = (
        bytes([0, 0, 0, 0, 0x05, 0, 0, 0])
        + (0).to_bytes(4, "little")
        + (1000).to_bytes(4, "little")
    )
    parts = read_partitions(lambda o, n: bytes(disk[o : o + n]), len(disk))
    assert parts[0] == Partition(1, 100 * 512, 1024)
    assert [p.number for p in parts[1:]] == list(range(5, 5 + 100))


def _gpt_image(entries: list[tuple[int, int, int]], sectors: int = 8192) -> bytearray:
    disk = bytearray(sectors * 512)
    disk[446:462] = (
        bytes([0, 0, 2, 0, 0xEE, 0, 0, 0])
        + (1).to_bytes(4, "little")
        + (sectors - 1).to_bytes(4, "little")
    )
    disk[510:512] = b"\x55\xaa"
    table = bytearray(128 * 128)
    for index, first, last in entries:
        table[index * 128 : index * 128 + 16] = b"\x01" * 16
        table[index * 128 + 32 : index * 128 + 48] = first.to_bytes(8, "little") + last.to_bytes(
            8, "little"
        )
    disk[1024 : 1024 + len(table)] = table
    header = bytearray(92)
    header[0:8] = b"EFI PART"
    header[8:12] = (0x10000).to_bytes(4, "little")
    header[12:16] = (92).to_bytes(4, "little")
    header[24:32] = (1).to_bytes(8, "little")
    header[32:40] = (sectors - 1).to_bytes(8, "little")
    header[40:48] = (34).to_bytes(8, "little")
    header[48:56] = (sectors - 34).to_bytes(8, "little")
    header[72:80] = (2).to_bytes(8, "little")
    header[80:84] = (128).to_bytes(4, "little")
    header[84:88] = (128).to_bytes(4, "little")
    header[88:92] = zlib.crc32(table).to_bytes(4, "little")
    header[16:20] = zlib.crc32(header).to_bytes(4, "little")
    disk[512 : 512 + 92] = header
    return disk


def test_gpt_entry_rules() -> None:
    # Entry 2 (index 1) has last < first and entry 4 ends past the disk: both skipped.
    disk = _gpt_image([(0, 34, 99), (1, 200, 100), (2, 300, 399), (3, 500, 10**6)])
    parts = read_partitions(lambda o, n: bytes(disk[o : o + n]), len(disk))
    assert parts == [Partition(1, 34 * 512, 66 * 512), Partition(3, 300 * 512, 100 * 512)]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=2048, max_size=2048), st.integers(1024, 1 << 40))
def test_garbage_never_crashes(blob: bytes, size: int) -> None:
    data = bytearray(blob)
    data[510:512] = b"\x55\xaa"
    read = lambda o, n: bytes(data[o : o + n]) if o < len(data) else b""  # noqa: E731
    for part in read_partitions(read, size):
        assert part.start < size and 0 < part.length <= size - part.start
