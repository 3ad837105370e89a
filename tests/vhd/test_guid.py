"""vhd.guid.Guid against ``uuid.UUID`` as the oracle: the byte layouts (MS-VHDX's ``bytes_le``,
VHD's ``bytes``), the text forms, parsing by uuid's own rules, and equality and hashing that mix
the two types (mixed VHD/VHDX chains, and callers of the library holding ``uuid.UUID``)."""

from __future__ import annotations

import copy
import pickle
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhd.guid import ZERO_GUID, Guid

sixteen = st.binary(min_size=16, max_size=16)


@given(sixteen)
def test_layouts_and_text_match_uuid(raw: bytes) -> None:
    want_le, want = uuid.UUID(bytes_le=raw), uuid.UUID(bytes=raw)
    le, be = Guid.from_bytes_le(raw), Guid.from_bytes(raw)
    assert (le.int, le.bytes, le.bytes_le, str(le), le.hex) == (
        want_le.int,
        want_le.bytes,
        want_le.bytes_le,
        str(want_le),
        want_le.hex,
    )
    assert (be.int, be.bytes, be.bytes_le, str(be)) == (
        want.int,
        want.bytes,
        want.bytes_le,
        str(want),
    )
    assert le.bytes_le == raw and be.bytes == raw
    assert Guid.from_bytes_le(bytearray(raw)) == le and Guid.from_bytes(memoryview(raw)) == be
    assert repr(le) == f"Guid('{want_le}')"


@given(sixteen)
def test_text_forms_parse_back(raw: bytes) -> None:
    g = Guid.from_bytes_le(raw)
    text = str(g)
    for form in (text, text.upper(), "{" + text + "}", "{" + text.upper() + "}", g.hex):
        assert Guid.parse(form) == g
        assert Guid.parse(form).int == uuid.UUID(form).int


@given(sixteen, sixteen)
def test_equality_and_hash_mix_with_uuid(a: bytes, b: bytes) -> None:
    ga, ua = Guid.from_bytes(a), uuid.UUID(bytes=a)
    gb, ub = Guid.from_bytes(b), uuid.UUID(bytes=b)
    same = a == b
    # both ways round, == and !=, and alike in sets and dicts
    assert (ga == ua, ua == ga, ga != ua, ua != ga) == (True, True, False, False)
    assert (ga == ub, ub == ga, ga != ub, ub != ga) == (same, same, not same, not same)
    assert (ga == gb, ga != gb) == (same, not same)
    assert hash(ga) == hash(ua)
    by_guid: dict[object, int] = {ga: 1}
    by_uuid: dict[object, int] = {ua: 1}
    assert ua in {ga} and ga in {ua} and by_guid[ua] == 1 and by_uuid[ga] == 1
    assert len({ga, ua, gb, ub}) == (1 if same else 2)


def test_other_types_are_not_equal() -> None:
    g = Guid(0x1234)
    assert g != 0x1234 and g != str(g) and g != g.bytes and g != object()
    assert ZERO_GUID == Guid(0) == uuid.UUID(int=0) and g != ZERO_GUID


# Text that parses as a GUID, that nearly does, and that does by uuid's quirks (int() takes
# whitespace, underscores, a sign and a 0x prefix; hyphens may stand anywhere).
_ALPHABET = "0123456789abcdefABCDEFxg{}-_+ :urnid\t\u0661"


def _written(raw: bytes, braces: bool, upper: bool, extra: str) -> str:
    text = str(uuid.UUID(bytes=raw))
    text = text.upper() if upper else text
    return ("{" + text + "}" if braces else text) + extra


@given(
    st.one_of(
        st.text(_ALPHABET, max_size=48),
        st.builds(
            _written,
            sixteen,
            st.booleans(),
            st.booleans(),
            st.sampled_from(["", " ", "}", "-", "0", "{", "urn:uuid:"]),
        ),
        st.text(max_size=40),
    )
)
def test_parse_accepts_exactly_what_uuid_accepts(text: str) -> None:
    try:
        want: int | None = uuid.UUID(text).int
    except ValueError:
        want = None
    try:
        got: int | None = Guid.parse(text).int
    except ValueError:
        got = None
    assert got == want


def test_parse_refuses_what_uuid_refuses() -> None:
    for bad in ("", "{}", "0" * 31, "0" * 33, "g" * 32, "{" + "0" * 31 + "}"):
        with pytest.raises(ValueError):
            uuid.UUID(bad)
        with pytest.raises(ValueError):
            Guid.parse(bad)


def test_random_is_version_4() -> None:
    seen = {Guid.random() for _ in range(64)}
    assert len(seen) == 64  # 122 random bits: a repeat would be a broken generator
    for g in seen:
        u = uuid.UUID(bytes=g.bytes)
        assert u.version == 4 and u.variant == uuid.RFC_4122


def test_immutable_copyable_and_range_checked() -> None:
    g = Guid.random()
    with pytest.raises(AttributeError):
        setattr(g, "int", 1)  # noqa: B010  (what an assignment does, out of mypy's sight)
    with pytest.raises(AttributeError):
        del g.int
    assert copy.copy(g) == g and copy.deepcopy(g) == g and pickle.loads(pickle.dumps(g)) == g
    for bad_value in (-1, 1 << 128):
        with pytest.raises(ValueError):
            Guid(bad_value)
    for bad_raw in (b"", bytes(15), bytes(17)):
        with pytest.raises(ValueError):
            Guid.from_bytes(bad_raw)
        with pytest.raises(ValueError):
            Guid.from_bytes_le(bad_raw)
