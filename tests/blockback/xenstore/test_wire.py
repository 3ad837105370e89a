"""The xenstore wire codec: constants against ``xs_wire.h`` (compiled), framing properties."""

from __future__ import annotations

import errno
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockback.xenstore import wire
from tests.blockback.cbuild import compile_c


@pytest.fixture(scope="module")
def c_wire(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    exe = compile_c("xenstore/xs_wire_layout.c", tmp_path_factory.mktemp("xw") / "xs_wire_layout")
    return subprocess.run(
        [str(exe)], capture_output=True, text=True, timeout=30, check=True
    ).stdout.splitlines()


def test_message_types_match_the_header(c_wire: list[str]) -> None:
    values = dict(line.split(" ", 1) for line in c_wire if line.startswith("XS_"))
    types = {k: int(v) for k, v in values.items()}
    assert types.pop("XS_INVALID") == wire.XS_INVALID
    assert types.pop("XS_TYPE_COUNT") == max(wire.XsType) + 1
    assert {f"XS_{t.name}": int(t) for t in wire.XsType} == types


def test_limits_and_header_layout(c_wire: list[str]) -> None:
    values = dict(line.rsplit(" ", 1) for line in c_wire if not line.startswith(("XS_", "ERROR")))
    assert int(values["XENSTORE_PAYLOAD_MAX"]) == wire.PAYLOAD_MAX
    assert int(values["XENSTORE_ABS_PATH_MAX"]) == wire.ABS_PATH_MAX
    assert int(values["XENSTORE_REL_PATH_MAX"]) == wire.REL_PATH_MAX
    assert int(values["sizeof(struct xsd_sockmsg)"]) == wire.HEADER_SIZE
    assert [
        int(values[f"offsetof(struct xsd_sockmsg, {f})"])
        for f in ("type", "req_id", "tx_id", "len")
    ] == [0, 4, 8, 12]
    modes = next(line for line in c_wire if line.startswith("WRITE_MODES")).split()[1:]
    assert modes == [wire.WRITE_NONE, wire.WRITE_CREATE, wire.WRITE_CREATE_EXCL]


def test_error_table_matches_the_header(c_wire: list[str]) -> None:
    rows = [line.split() for line in c_wire if line.startswith("ERROR ")]
    assert [name for _, _, name, _ in rows] == list(wire.XSD_ERRORS)
    for _, _, name, number in rows:
        assert wire.xs_error(name) == int(number)
        assert wire.xs_error_name(int(number)) == name
    assert wire.xs_error("EWHATEVER") == errno.EINVAL
    assert wire.xs_error_name(errno.ETIMEDOUT) == "EINVAL"  # not in the table


def test_payload_helpers() -> None:
    assert wire.join_strings("a", b"b", "") == b"a\0b\0\0"
    assert wire.split_strings(b"a\0b\0") == ["a", "b"]
    assert wire.split_strings(b"a\0b") == ["a", "b"]
    assert wire.split_strings(b"") == []
    assert wire.split_strings(b"\0") == [""]
    with pytest.raises(wire.WireProtocolError):
        wire.split_strings(b"\xff\0")
    err = wire.error_message("ENOENT", 7, 3)
    assert (err.type, err.req_id, err.tx_id, err.payload) == (wire.XsType.ERROR, 7, 3, b"ENOENT\0")
    assert err.error_name() == "ENOENT"
    assert wire.error_message("EBOGUS").payload == b"EINVAL\0"
    ev = wire.watch_event("/a", "tok")
    assert ev.encode() == wire.HEADER.pack(15, 0, 0, 7) + b"/a\0tok\0"
    with pytest.raises(wire.WireProtocolError):
        wire.Message(wire.XsType.WRITE, 0, 0, b"x" * (wire.PAYLOAD_MAX + 1)).encode()


messages = st.builds(
    wire.Message,
    st.integers(0, 0xFFFF),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=wire.PAYLOAD_MAX),
)


@given(st.lists(messages, max_size=6), st.lists(st.integers(1, 5000), max_size=20))
def test_decoder_reassembles_any_chunking(msgs: list[wire.Message], cuts: list[int]) -> None:
    stream = b"".join(m.encode() for m in msgs)
    decoder = wire.MessageDecoder()
    out: list[wire.Message] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        decoder.feed(stream[pos : pos + cut])
        pos += cut
        out.extend(decoder.messages())
    decoder.feed(stream[pos:])
    out.extend(decoder.messages())
    assert out == msgs
    assert decoder.buffered == 0


@given(st.integers(wire.PAYLOAD_MAX + 1, 2**32 - 1))
def test_decoder_refuses_oversized_before_buffering(length: int) -> None:
    decoder = wire.MessageDecoder()
    decoder.feed(wire.HEADER.pack(wire.XsType.WRITE, 1, 0, length))
    with pytest.raises(wire.WireProtocolError):
        decoder.next_message()
