"""VHDX records against libvhdi's fragments cut from real Windows-made files (corpus/vhdx/*.1),
and round trips of what vhdkit builds."""

from __future__ import annotations

import re
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhd import ChecksumError, CorruptImageError
from vhd.vhdx import log as vlog
from vhd.vhdx import records as r
from vhd.vhdx.crc import crc32c, using_c_extension

from . import construct_records as old

pytestmark = pytest.mark.corpus


def test_crc32c_is_castagnoli_from_the_c_extension() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert using_c_extension()


def test_file_identifier(corpus: Path) -> None:
    ident = r.FileIdentifier.parse((corpus / "vhdx" / "file_identifier.1").read_bytes())
    assert ident.creator == "Microsoft Windows 10.0.19041.0"
    assert r.FileIdentifier.parse(r.FileIdentifier("vhdkit").build()).creator == "vhdkit"


def test_header_fragment_and_round_trip(corpus: Path) -> None:
    raw = (corpus / "vhdx" / "image_header.1").read_bytes()
    h = r.Header.parse(raw)
    assert (h.sequence_number, h.version, h.log_version) == (6, 1, 0)
    assert (h.log_offset, h.log_length) == (1 << 20, 1 << 20)
    assert h.log_guid == r.ZERO_GUID
    assert h.build() == raw  # CRC-32C and layout rebuilt byte for byte
    bad = bytearray(raw)
    bad[100] ^= 1
    with pytest.raises(ChecksumError):
        r.Header.parse(bytes(bad))


def test_header_of_uuid_values_equals_its_parse() -> None:
    """A caller may hand the records uuid.UUID values; what parses back (vhd.guid.Guid values)
    is the same header: equal, hashing alike, the same bytes."""
    made = r.Header(1, uuid.uuid4(), uuid.uuid4(), uuid.UUID(int=0), 0, 1, 1 << 20, 1 << 20)
    back = r.Header.parse(made.build())
    assert back.replace(checksum=0) == made and hash(back.replace(checksum=0)) == hash(made)
    assert made.log_guid == r.ZERO_GUID and back.build() == made.build()
    assert {back.data_write_guid} == {made.data_write_guid}


def test_region_table_fragment(corpus: Path) -> None:
    raw = (corpus / "vhdx" / "region_table.1").read_bytes()
    head = r.REGION_TABLE_HEADER.parse(raw)
    assert head.entry_count == 2
    entries = [r.REGION_TABLE_ENTRY.parse(raw[16 + 32 * i : 48 + 32 * i]) for i in range(2)]
    assert {r.guid(e.guid) for e in entries} == {r.BAT_REGION, r.METADATA_REGION}
    assert all(e.required == 1 and e.file_offset % (1 << 20) == 0 for e in entries)
    # The fragment is the first 80 bytes of a table whose rest is zeros: padded, its CRC-32C
    # (over the whole 64 KiB) holds, and rebuilding gives the same bytes.
    table = r.RegionTable.parse(raw.ljust(r.REGION_TABLE_SIZE, b"\0"))
    assert table.build()[:80] == raw
    bad = bytearray(raw.ljust(r.REGION_TABLE_SIZE, b"\0"))
    bad[40] ^= 1
    with pytest.raises(ChecksumError):
        r.RegionTable.parse(bytes(bad))


def test_metadata_fragments(corpus: Path) -> None:
    head = r.METADATA_TABLE_HEADER.parse((corpus / "vhdx" / "metadata_table_header.1").read_bytes())
    assert head.entry_count == 5
    raw = (corpus / "vhdx" / "metadata_table_entry.1").read_bytes()
    table = r.parse_metadata_table(
        (b"metadata" + bytes(2) + (1).to_bytes(2, "little") + bytes(20) + raw).ljust(65536, b"\0")
    )
    (e,) = table
    assert e.item_id == r.FILE_PARAMETERS and e.name == "file_parameters"
    assert (e.offset, e.length, e.is_required, e.is_user) == (65536, 8, True, False)


def test_parent_locator_fragments(corpus: Path) -> None:
    head = (corpus / "vhdx" / "parent_locator_header.1").read_bytes()
    assert r.guid(head[:16]) == r.VHDX_PARENT_LOCATOR_TYPE
    assert r.PARENT_LOCATOR_HEADER.parse(head).key_value_count == 5
    e = r.PARENT_LOCATOR_ENTRY.parse((corpus / "vhdx" / "parent_locator_entry.1").read_bytes())
    assert (e.key_offset, e.value_offset, e.key_length, e.value_length) == (80, 108, 28, 76)
    loc = r.ParentLocator(
        r.VHDX_PARENT_LOCATOR_TYPE,
        {"parent_linkage": "{" + str(uuid.uuid4()) + "}", "relative_path": ".\\p.vhdx"},
    )
    assert r.ParentLocator.parse(loc.build()) == loc
    with pytest.raises(CorruptImageError):
        r.ParentLocator.parse(loc.build()[:30])


def test_log_entry_round_trip() -> None:
    guid = uuid.uuid4()
    pages = [(3 << 20, bytes(range(256)) * 16), (4 << 20, b"\xab" * 4096)]
    entry = vlog.build_entry(
        log_guid=guid,
        sequence_number=(7 << 32) + 5,
        tail=0,
        flushed_file_offset=8 << 20,
        last_file_offset=8 << 20,
        pages=pages,
    )
    ring = entry.ljust(1 << 20, b"\0")
    seq = vlog.find_active_sequence(ring, guid)
    assert seq is not None
    assert [(w.offset, w.data) for w in seq.writes] == pages
    assert vlog.find_active_sequence(ring, uuid.uuid4()) is None  # another LogGuid: invalid
    torn = bytearray(ring)
    torn[4096 + 100] ^= 1  # a data sector changed: CRC-32C fails
    assert vlog.find_active_sequence(bytes(torn), guid) is None


# -- the struct field tables against the construct declarations they replaced ---------------

_RANGES = {"H": 16, "I": 32, "Q": 64}


def _field_values(record: r.Record) -> st.SearchStrategy[dict[str, Any]]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, fmt in zip(record.names, _formats(record), strict=True):
        if name in record.signatures:
            continue
        if fmt.endswith("s"):
            n = int(fmt[:-1])
            fields[name] = st.binary(min_size=n, max_size=n)
        else:
            fields[name] = st.integers(0, (1 << _RANGES[fmt]) - 1)
    return st.fixed_dictionaries(fields)


def _formats(record: r.Record) -> list[str]:
    return re.findall(r"\d*[a-zA-Z]", record.struct.format.lstrip("<"))


@pytest.mark.parametrize("name", sorted(old.ALL))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_records_build_and_parse_as_construct_did(name: str, data: st.DataObject) -> None:
    new: r.Record = getattr(r, name)
    legacy = old.ALL[name]
    assert new.size == legacy.sizeof()
    values = data.draw(_field_values(new))
    raw = new.build(values)
    assert raw == legacy.build(values)  # the same bytes, field for field
    # and both read any bytes (with the signature in place) as the same fields
    noise = bytearray(data.draw(st.binary(min_size=new.size, max_size=new.size)))
    for field_name, constant in new.signatures.items():
        at = _offset(new, field_name)
        noise[at : at + len(constant)] = constant
    for blob in (raw, bytes(noise)):
        ours = vars(new.parse(blob))
        theirs = {k: v for k, v in legacy.parse(blob).items() if not k.startswith("_")}
        assert ours == theirs


def _offset(record: r.Record, field_name: str) -> int:
    fmts = _formats(record)
    index = record.names.index(field_name)
    return struct.calcsize("<" + "".join(fmts[:index]))


def test_record_refuses_short_input_wrong_signature_and_wrong_lengths() -> None:
    raw = r.HEADER.build(
        {
            "checksum": 0,
            "sequence_number": 1,
            "file_write_guid": bytes(16),
            "data_write_guid": bytes(16),
            "log_guid": bytes(16),
            "log_version": 0,
            "version": 1,
            "log_length": 1 << 20,
            "log_offset": 1 << 20,
        }
    )
    with pytest.raises(CorruptImageError):
        r.HEADER.parse(raw[:-1])
    with pytest.raises(CorruptImageError):
        r.HEADER.parse(b"HEAD" + raw[4:])
    with pytest.raises(ValueError):
        r.FILE_IDENTIFIER.build({"signature": r.SIGNATURE, "creator": b"short"})
