"""Record codecs: footer, dynamic header, locators, BAT, bitmaps, geometry and the checksum,
checked against the spec model's independent encoder/decoder and with Hypothesis round trips."""

from __future__ import annotations

import itertools
import struct
import tempfile
from array import array
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

import vhd
from tests import model
from tests.strategies import hsettings
from vhd import bitmap as bm
from vhd.bat import UNUSED, BlockAllocationTable
from vhd.checksum import vhd_checksum
from vhd.footer import DiskType, Footer, checksum_ok, new_footer, unix_time, vhd_timestamp
from vhd.geometry import MAX_GEOMETRY, chs_from_size, geometry_for_create
from vhd.header import (
    DynamicHeader,
    ParentLocator,
    bitmap_size,
    decode_utf16,
    encode_parent_name,
    new_header,
)
from vhd.header import checksum_ok as header_checksum_ok
from vhd.locator import (
    CODE_MACX,
    CODE_W2KU,
    CODE_W2RU,
    CODE_WI2K,
    decode_payload,
    encode_payload,
    macx_to_posix,
    posix_to_macx,
    relative_windows_path,
    windows_to_posix,
)

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
u64 = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def footers(draw: st.DrawFn) -> Footer:
    return Footer(
        cookie=draw(st.binary(min_size=8, max_size=8)),
        features=draw(u32),
        version=draw(u32),
        data_offset=draw(u64),
        timestamp=draw(u32),
        creator_app=draw(st.binary(min_size=4, max_size=4)),
        creator_version=draw(u32),
        creator_host=draw(st.binary(min_size=4, max_size=4)),
        original_size=draw(u64),
        current_size=draw(u64),
        cylinders=draw(st.integers(0, 0xFFFF)),
        heads=draw(st.integers(0, 255)),
        sectors=draw(st.integers(0, 255)),
        disk_type=draw(u32),
        checksum=0,
        unique_id=draw(st.binary(min_size=16, max_size=16)),
        saved_state=draw(st.integers(0, 255)),
        reserved=draw(st.binary(min_size=427, max_size=427)),
    )


@given(footers())
@hsettings(max_examples=60)
def test_footer_round_trip_matches_the_spec_layout(footer: Footer) -> None:
    raw = footer.build()
    assert len(raw) == 512
    assert checksum_ok(raw)
    again = Footer.parse(raw)
    assert again.replace(checksum=0) == footer
    assert again.build() == raw
    # The spec model decodes the same bytes to the same fields, and agrees on the checksum.
    spec = model.Footer.decode(raw)
    assert spec.checksum_valid
    assert spec.current_size == footer.current_size
    assert spec.original_size == footer.original_size
    assert spec.data_offset == footer.data_offset
    assert (spec.cylinders, spec.heads, spec.sectors) == (
        footer.cylinders,
        footer.heads,
        footer.sectors,
    )
    assert spec.unique_id == footer.unique_id
    assert spec.disk_type == footer.disk_type
    assert spec.checksum == again.checksum


@given(footers(), st.integers(0, 511), st.integers(1, 255))
@hsettings(max_examples=60)
def test_any_single_byte_change_breaks_the_footer_checksum(
    footer: Footer, at: int, delta: int
) -> None:
    raw = bytearray(footer.build())
    raw[at] = (raw[at] + delta) % 256
    assert not checksum_ok(raw)
    assert not model.Footer.decode(bytes(raw)).checksum_valid


def test_footer_checksum_matches_the_model_encoder() -> None:
    raw = model.build_footer(size=10 * 2**20, disk_type=3, unique_id=bytes(range(16)))
    footer = Footer.parse(raw)
    assert checksum_ok(raw)
    assert footer.build() == raw
    assert footer.current_size == footer.original_size == 10 * 2**20
    assert footer.type is not None and footer.type.label == "dynamic"
    assert vhd_checksum(raw, 64) == struct.unpack(">I", raw[64:68])[0]


def test_footer_511_byte_form_parses() -> None:
    raw = model.build_footer(size=2**20, disk_type=2, unique_id=bytes(16))
    footer = Footer.parse(raw[:511])
    assert footer.current_size == 2**20
    assert checksum_ok(raw[:511])


def test_new_footer_fields() -> None:
    f = new_footer(size=5 * 2**20, disk_type=model_type(3), geometry=geometry_for_create(5 << 20))
    assert f.cookie_ok and f.features == 2 and f.version == 0x00010000
    assert f.data_offset == 512 and f.original_size == f.current_size == 5 << 20
    fixed = new_footer(size=2**20, disk_type=model_type(2), geometry=chs_from_size(2**20))
    assert fixed.data_offset == 2**64 - 1


def model_type(value: int) -> DiskType:
    return DiskType(value)


def test_timestamps_use_the_2000_epoch() -> None:
    assert vhd_timestamp(946684800) == 0
    assert vhd_timestamp(946684800 + 3600) == 3600
    assert unix_time(3600) == 946684800 + 3600
    assert vhd_timestamp(0) == 0  # clamped, never negative


@st.composite
def headers(draw: st.DrawFn) -> DynamicHeader:
    locs = tuple(
        ParentLocator(
            code=draw(u32), data_space=draw(u32), data_len=draw(u32), data_offset=draw(u64)
        )
        for _ in range(8)
    )
    return DynamicHeader(
        cookie=draw(st.binary(min_size=8, max_size=8)),
        data_offset=draw(u64),
        table_offset=draw(u64),
        version=draw(u32),
        max_table_entries=draw(u32),
        block_size=draw(u32),
        checksum=0,
        parent_unique_id=draw(st.binary(min_size=16, max_size=16)),
        parent_timestamp=draw(u32),
        reserved1=draw(u32),
        parent_name_raw=draw(st.binary(min_size=512, max_size=512)),
        locators=locs,
        reserved2=draw(st.binary(min_size=256, max_size=256)),
    )


@given(headers())
@hsettings(max_examples=60)
def test_header_round_trip_matches_the_spec_layout(header: DynamicHeader) -> None:
    raw = header.build()
    assert len(raw) == 1024 and header_checksum_ok(raw)
    again = DynamicHeader.parse(raw)
    assert again.replace(checksum=0) == header
    spec = model.Header.decode(raw)
    assert spec.checksum_valid and spec.checksum == again.checksum
    assert spec.table_offset == header.table_offset
    assert spec.block_size == header.block_size
    assert spec.max_table_entries == header.max_table_entries
    assert spec.parent_id == header.parent_unique_id
    assert [(lc.code, lc.data_space, lc.data_len, lc.data_offset) for lc in header.locators] == (
        spec.locators
    )
    # The parent name never raises, whatever bytes are stored (unpaired surrogates included).
    assert isinstance(again.parent_name, str)


@given(st.text(max_size=255).filter(lambda t: "\0" not in t and len(t.encode("utf-16-be")) <= 510))
@hsettings(max_examples=60)
def test_parent_name_round_trip(name: str) -> None:
    header = new_header(table_offset=0x600, max_table_entries=1, block_size=4096, parent_name=name)
    raw = header.build()
    assert DynamicHeader.parse(raw).parent_name == name
    assert model.Header.decode(raw).parent_name == name


def test_parent_name_invalid_utf16_is_replaced_not_fatal() -> None:
    raw = b"\xd8\x00\x00A" + b"\xdc\x00" + b"\x00B"  # lone high, lone low surrogate
    text = decode_utf16(raw.ljust(512, b"\0"), "be")
    assert text.endswith("B") and "\ufffd" in text
    assert decode_utf16(b"\x00A\x00", "be") == "A"  # odd trailing byte ignored


def test_parent_name_too_long() -> None:
    try:
        encode_parent_name("x" * 256)
    except ValueError:
        pass
    else:  # pragma: no cover
        raise AssertionError("a 256-unit name must be refused")
    assert len(encode_parent_name("x" * 255)) == 512


def test_header_matches_model_encoder() -> None:
    raw = model.build_header(
        table_offset=0x2000,
        entries=3,
        block_size=2 << 20,
        parent_id=bytes(range(16)),
        parent_name="C:\\a\\parent.vhd",
        locators=[(CODE_W2KU, 4096, 30, 0x1000), (CODE_W2RU, 65536, 24, 0x3000)],
    )
    header = DynamicHeader.parse(raw)
    assert header_checksum_ok(raw)
    assert header.build() == raw
    assert header.parent_name == "C:\\a\\parent.vhd"
    assert header.locators[0].code == CODE_W2KU and header.locators[0].space_bytes == 4096
    assert header.locators[1].space_bytes == 65536
    assert not header.locators[2].in_use
    assert header.bitmap_bytes == 512


def test_locator_space_sectors_versus_bytes() -> None:
    assert ParentLocator(code=1, data_space=1).space_bytes == 512  # spec: sectors
    assert ParentLocator(code=1, data_space=512).space_bytes == 512  # Windows: bytes
    assert ParentLocator(code=1, data_space=4096).space_bytes == 4096


@given(st.integers(min_value=1, max_value=20).map(lambda e: 1 << e).filter(lambda b: b >= 512))
def test_bitmap_size_matches_model(block: int) -> None:
    assert bitmap_size(block) == model.bitmap_bytes(block)
    assert bitmap_size(block) % 512 == 0 and bitmap_size(block) * 8 >= block // 512


def test_bitmap_sizes() -> None:
    assert bitmap_size(2 << 20) == 512
    assert bitmap_size(4096) == 512
    assert bitmap_size(4 << 20) == 1024
    assert bitmap_size(256 << 20) == 64 * 1024


# -- locators ------------------------------------------------------------------------------


@given(st.text(max_size=100).filter(lambda t: "\0" not in t))
def test_utf16_locators_round_trip(text: str) -> None:
    for code in (CODE_W2KU, CODE_W2RU):
        raw = encode_payload(code, text)
        assert decode_payload(code, raw) == text
        assert raw == text.encode("utf-16-le", "surrogatepass")  # little-endian, per doc
    assert decode_payload(CODE_MACX, encode_payload(CODE_MACX, text)) == text


def test_locator_path_mapping() -> None:
    assert windows_to_posix("C:\\vms\\p.vhd", "/x") == ["/mnt/c/vms/p.vhd"]
    assert windows_to_posix(".\\p.vhd", "/images") == ["/images/p.vhd"]
    assert windows_to_posix("..\\up\\p.vhd", "/images/sub") == ["/images/up/p.vhd"]
    assert macx_to_posix("file:///srv/a%20b.vhd", "/x") == ["/srv/a b.vhd"]
    assert macx_to_posix(posix_to_macx("/srv/a b.vhd"), "/") == ["/srv/a b.vhd"]
    assert relative_windows_path("/a/b/p.vhd", "/a") == ".\\b\\p.vhd"
    assert decode_payload(CODE_WI2K, b"C:\\p.vhd\0junk") == "C:\\p.vhd"
    assert decode_payload(0x4D616320, b"alias") is None  # "Mac " alias blobs are not text


# -- BAT -----------------------------------------------------------------------------------


@given(st.lists(st.one_of(st.just(UNUSED), u32), max_size=700))
def test_bat_round_trip_and_allocated(entries: list[int]) -> None:
    raw = b"".join(e.to_bytes(4, "big") for e in entries)
    bat = BlockAllocationTable.from_bytes(raw + b"\xff" * 8, len(entries))
    assert list(bat.entries) == entries
    assert list(bat.allocated()) == [(i, e) for i, e in enumerate(entries) if e != UNUSED]
    assert bat.allocated_count() == sum(1 for e in entries if e != UNUSED)
    table = bat.table_bytes()
    assert len(table) % 512 == 0 and table[: len(raw)] == raw
    assert set(table[len(raw) :]) <= {0xFF}
    for sector in range((len(entries) + 127) // 128):
        assert bat.sector_bytes(sector) == table[sector * 512 : (sector + 1) * 512]


def test_bat_dirty_tracking() -> None:
    bat = BlockAllocationTable.empty(300)
    assert not bat.dirty
    bat[0] = 5
    bat[129] = 9
    bat[130] = 10
    assert bat.take_dirty() == [0, 1]
    assert not bat.dirty
    assert bat.table_bytes(1024)[-4:] == b"\xff" * 4 and len(bat.table_bytes(1024)) == 4096
    assert isinstance(bat.entries, array)


# -- bitmaps -------------------------------------------------------------------------------


@given(st.binary(min_size=1, max_size=64), st.data())
def test_bitmap_runs_match_a_naive_reading(raw: bytes, data: st.DataObject) -> None:
    sectors = len(raw) * 8
    start = data.draw(st.integers(0, sectors - 1))
    stop = data.draw(st.integers(start, sectors))
    naive = [model.bit_set(raw, s) for s in range(sectors)]
    covered: list[int] = []
    for first, end, value in bm.runs(raw, start, stop):
        assert first < end
        assert all(naive[s] == value for s in range(first, end))
        covered.extend(range(first, end))
    assert covered == list(range(start, stop))
    runs = list(bm.runs(raw, start, stop))
    for (_, _, a), (_, _, b) in itertools.pairwise(runs):
        assert a != b  # maximal runs
    assert bm.count_set(raw, sectors) == sum(naive)
    assert bm.any_set(raw, sectors) == any(naive)
    assert bm.all_equal(raw, start, stop, True) == all(naive[start:stop])


@given(st.binary(min_size=1, max_size=64), st.data(), st.booleans())
def test_bitmap_set_range(raw: bytes, data: st.DataObject, value: bool) -> None:
    sectors = len(raw) * 8
    start = data.draw(st.integers(0, sectors))
    stop = data.draw(st.integers(start, sectors))
    new = bytearray(raw)
    changed = bm.set_range(new, start, stop, value)
    for s in range(sectors):
        expect = value if start <= s < stop else model.bit_set(raw, s)
        assert model.bit_set(bytes(new), s) == expect
    assert changed == (bytes(new) != raw)


def test_bitmap_is_msb_first() -> None:
    bits = bytearray(2)
    bm.set_range(bits, 0, 1)
    bm.set_range(bits, 9, 10)
    assert bits == bytearray([0x80, 0x40])
    assert bm.bit(bits, 0) and bm.bit(bits, 9) and not bm.bit(bits, 1)


# -- geometry ------------------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=(2**41) // 512).map(lambda s: s * 512))
def test_chs_never_exceeds_the_size(size: int) -> None:
    g = chs_from_size(size)
    assert g.total_bytes <= size
    assert 1 <= g.heads <= 16 and g.sectors in (17, 31, 63, 255)
    assert g.cylinders <= 65535
    assert tuple(geometry_for_create(size)) == model.spec_chs(size)


def test_known_geometries() -> None:
    # Values from the Windows sample (10 MiB: 301/4/17), the libvhdi fragment (512 MiB:
    # 1040/16/63) and the spec's maximum.
    assert tuple(chs_from_size(10 << 20)) == (301, 4, 17)
    assert tuple(chs_from_size(512 << 20)) == (1040, 16, 63)
    assert tuple(chs_from_size(2040 << 30)) == (65535, 16, 255)
    assert MAX_GEOMETRY.is_max


@given(
    sectors=st.integers(1, 8 * 1024 * 1024),
    kind=st.sampled_from(["fixed", "dynamic"]),
)
@hsettings(max_examples=20)
def test_created_footer_is_laid_out_like_windows(sectors: int, kind: str) -> None:
    """Every image gets the spec's CHS (never more: blktap's vhd-util check rejects a larger
    geometry) and a creator qemu sizes by the current size (qemu <= 9 sizes others by C*H*S)."""
    size = sectors * 512
    with tempfile.TemporaryDirectory(prefix="vhd-geo-") as tmp:
        path = Path(tmp) / "d.vhd"
        vhd.create(path, size, type=kind).close()  # type: ignore[arg-type]
        with path.open("rb") as fh:
            fh.seek(-512, 2)
            f = model.Footer.decode(fh.read())
    assert (f.cylinders, f.heads, f.sectors) == model.spec_chs(size)
    assert f.creator_app in (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
    assert f.current_size == f.original_size == size


_ENTRY = st.one_of(
    st.just(UNUSED),
    st.integers(0, 40),
    st.integers(0, 0xFFFFFFFE),
    st.integers(0xFF000000, 0xFFFFFFFE),
)


@given(
    entries=st.lists(_ENTRY, min_size=1, max_size=60),
    span=st.sampled_from([1024, 4608, 2 * 1024 * 1024 + 512]),
    cut=st.integers(0, 511),
    file_size=st.integers(0, 64 * 512),
    regions=st.lists(st.tuples(st.integers(0, 30 * 512), st.integers(1, 4096)), max_size=4),
)
@hsettings(max_examples=300)
def test_first_misplaced_matches_a_per_block_scan(
    entries: list[int], span: int, cut: int, file_size: int, regions: list[tuple[int, int]]
) -> None:
    """The C-level table scan finds exactly what a per-block loop finds (the first block over
    a region or past the end of the file, the last block possibly shorter)."""
    table = BlockAllocationTable(array("I", entries))
    last_span = span - cut
    labelled = [(start, start + length, f"region {i}") for i, (start, length) in enumerate(regions)]
    expected = None
    for block, entry in enumerate(entries):
        if entry == UNUSED:
            continue
        start, size = entry * 512, last_span if block == len(entries) - 1 else span
        hits = [r for r in labelled if start < r[1] and start + size > r[0]]
        if start + size > file_size or hits:
            expected = block
            break
    found = table.first_misplaced(
        span=span, last_span=last_span, file_size=file_size, regions=labelled
    )
    assert (found[0] if found else None) == expected
    for block in range(len(entries)):
        end = block + 1
        while end < len(entries) and entries[end] == entries[block]:
            end += 1
        assert table.run_end(block) == end


@given(
    entries=st.lists(
        st.one_of(st.just(UNUSED), _ENTRY, st.sampled_from([0, 0xFF, 0xFFFFFF00, 0x00FFFFFF])),
        max_size=300,
    ),
    dense=st.booleans(),
)
@hsettings(max_examples=300)
def test_allocated_indices_match_a_per_entry_scan(entries: list[int], dense: bool) -> None:
    """Both of allocated_indices' ways (runs for sparse tables, compress for many runs) give
    exactly the entries that are not 0xFFFFFFFF, whatever their bytes (0xFF in some lanes)."""
    if dense:  # many short runs: the compress path
        entries = [e for entry in entries for e in (entry, UNUSED)]
    table = BlockAllocationTable(array("I", entries))
    got = table.allocated_indices()
    assert got.typecode == "I"
    assert list(got) == [i for i, e in enumerate(entries) if e != UNUSED]
    assert list(table.allocated()) == [(i, e) for i, e in enumerate(entries) if e != UNUSED]
