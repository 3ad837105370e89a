"""Log replay (MS-VHDX 2.3.3) against qemu: an image qemu-io wrote to, with its log made current
again and the BAT entry reverted, reads the written data after our replay; qemu-img check -r all
on a copy (qemu's own replay) is the oracle.  A read-only open replays in memory only."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tests.vhd.vhdx.helpers import (
    MiB,
    assert_qemu_clean,
    current_header,
    qemu_check,
    qemu_create,
    qemu_raw,
    qemu_write,
)
from vhd import CorruptImageError
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import log as vlog
from vhd.vhdx import records as r


def _rewind_to_log(image: Path) -> uuid.UUID:
    """Make the log of ``image`` current again (header LogGuid = the entries' LogGuid) and undo
    what it did in place (zero the BAT pages it wrote), as if the writer died after flushing the
    log.  Returns the LogGuid."""
    data = bytearray(image.read_bytes())
    off, head = current_header(data)
    log = bytes(data[head.log_offset : head.log_offset + head.log_length])
    # qemu takes a new LogGuid for each metadata update: the newest entry's is the live one.
    newest = max(
        (
            r.LOG_ENTRY_HEADER.parse(log[p : p + 64])
            for p in range(0, len(log), 4096)
            if log[p : p + 4] == b"loge"
        ),
        key=lambda e: e.sequence_number,
    )
    log_guid = r.guid(newest.log_guid)
    seq = vlog.find_active_sequence(log, log_guid)
    assert seq is not None and seq.writes
    for w in seq.writes:
        data[w.offset : w.offset + w.length] = bytes(w.length)
    data[off : off + r.HEADER_SIZE] = head.replace(log_guid=log_guid).build()
    image.write_bytes(bytes(data))
    return log_guid


@pytest.fixture
def pending(tmp_path: Path) -> tuple[Path, bytes]:
    image = tmp_path / "q.vhdx"
    qemu_create(image, 64 * MiB, block_size=MiB)
    qemu_write(image, "write -P 0x5a 4096 64k", "write -P 0x6b 10M 1M")
    expected = qemu_raw(image, tmp_path / "before.raw")
    _rewind_to_log(image)
    assert qemu_check(image).returncode != 0  # qemu refuses it read-only: the log needs replay
    return image, expected


def test_qemu_oracle_replays_the_prepared_log(pending: tuple[Path, bytes], tmp_path: Path) -> None:
    image, expected = pending
    copy = tmp_path / "copy.vhdx"
    shutil.copy(image, copy)
    proc = qemu_check(copy, "-r", "all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert qemu_raw(copy, tmp_path / "q.raw") == expected


def test_read_only_open_replays_in_memory_and_writes_nothing(
    pending: tuple[Path, bytes],
) -> None:
    image, expected = pending
    before = image.read_bytes()
    with open_vhdx(image) as disk:
        assert disk.layout.replayed is not None
        assert disk.pread(disk.size, 0) == expected
        assert any("replayed in memory" in w for w in disk.warnings)
    assert image.read_bytes() == before


def test_read_write_open_replays_in_the_file(pending: tuple[Path, bytes], tmp_path: Path) -> None:
    image, expected = pending
    with open_vhdx(image, "r+") as disk:
        assert disk.pread(disk.size, 0) == expected
    _, head = current_header(image.read_bytes())
    assert head.log_guid == r.ZERO_GUID
    assert_qemu_clean(image)  # qemu opens it read-only: nothing left to replay
    assert qemu_raw(image, tmp_path / "q.raw") == expected
    with open_vhdx(image) as disk:
        assert disk.layout.replayed is None


def test_truncated_file_refused(pending: tuple[Path, bytes]) -> None:
    image, _ = pending
    with open_vhdx(image) as disk:
        needed = disk.layout.replayed.head.flushed_file_offset if disk.layout.replayed else 0
    with image.open("r+b") as f:
        f.truncate(needed - MiB)
    with pytest.raises(CorruptImageError, match="truncated"):
        open_vhdx(image)


def test_the_newest_sequence_wins_and_stale_guids_are_ignored(tmp_path: Path) -> None:
    image = tmp_path / "n.vhdx"
    create_vhdx(image, 8 * MiB, block_size=MiB).close()
    data = bytearray(image.read_bytes())
    off, head = current_header(data)
    target = 7 * MiB  # past the structures: a page only the log writes
    data.extend(bytes(8 * MiB - len(data) % MiB if len(data) < 8 * MiB else 0))
    guid, stale = uuid.uuid4(), uuid.uuid4()
    entries = [
        vlog.build_entry(
            log_guid=g,
            sequence_number=seq,
            tail=tail,
            flushed_file_offset=0,
            last_file_offset=8 * MiB,
            pages=[(target, bytes([fill]) * 4096)],
        )
        for g, seq, tail, fill in (
            (guid, 10, 0, 0x01),  # sequence A: [10] at 0
            (guid, 11, 0, 0x02),  # [10, 11]: head 11 with tail 0 -> valid, newest so far
            (stale, 50, 16384, 0x09),  # another LogGuid: never valid
            (guid, 3, 12288, 0x03),  # an old sequence on its own
        )
    ]
    log = b"".join(entries)
    data[head.log_offset : head.log_offset + len(log)] = log
    data[off : off + r.HEADER_SIZE] = head.replace(log_guid=guid).build()
    image.write_bytes(bytes(data))
    with open_vhdx(image) as disk:
        seq = disk.layout.replayed
        assert seq is not None
        assert [e.sequence_number for e in seq.entries] == [10, 11]
    with open_vhdx(image, "r+"):
        pass
    with image.open("rb") as f:
        f.seek(target)
        assert f.read(4096) == b"\x02" * 4096


def test_log_guid_without_entries_opens_with_a_warning(tmp_path: Path) -> None:
    image = tmp_path / "e.vhdx"
    create_vhdx(image, 8 * MiB).close()
    data = bytearray(image.read_bytes())
    off, head = current_header(data)
    data[off : off + r.HEADER_SIZE] = head.replace(log_guid=uuid.uuid4()).build()
    image.write_bytes(bytes(data))
    with open_vhdx(image) as disk:
        assert any("no valid entry" in w for w in disk.warnings)
