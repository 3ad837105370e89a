"""The sans-IO NBD negotiation engine and transmission codecs, byte for byte."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockback.nbd import protocol as p

EXPORT = p.Export(name="disk", size=1 << 30, description="test disk")
RO_EXPORT = p.Export(name="ro", size=4096, read_only=True)


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, reply type, payload); checks every magic number."""
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == p.REPLY_MAGIC
        pos += 20
        out.append((option, rep, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def started(flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> p.ServerNegotiation:
    engine = p.ServerNegotiation([EXPORT, RO_EXPORT])
    greeting = engine.data_to_send()
    assert greeting == struct.pack(
        ">QQH", p.NBD_MAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    )
    engine.receive_data(struct.pack(">I", flags))
    return engine


def test_greeting_and_client_flags() -> None:
    engine = started()
    assert engine.state is p.NegotiationState.OPTIONS
    assert engine.data_to_send() == b""


def test_unknown_client_flag_hangs_up() -> None:
    engine = started(flags=1 << 5)
    assert engine.state is p.NegotiationState.CLOSED
    assert "client flags" in engine.close_reason


def test_go_with_structured_replies_and_base_allocation() -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.STRUCTURED_REPLY))
    engine.receive_data(opt(p.Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation", "x:y")))
    engine.receive_data(opt(p.Opt.GO, go_data("disk", (p.Info.NAME, p.Info.DESCRIPTION))))
    out = replies(engine.data_to_send())
    assert out[0] == (p.Opt.STRUCTURED_REPLY, p.Rep.ACK, b"")
    assert out[1] == (
        p.Opt.SET_META_CONTEXT,
        p.Rep.META_CONTEXT,
        struct.pack(">I", p.BASE_ALLOCATION_ID) + b"base:allocation",
    )
    assert out[2] == (p.Opt.SET_META_CONTEXT, p.Rep.ACK, b"")
    infos = {struct.unpack(">H", data[:2])[0]: data[2:] for _, rep, data in out[3:-1]}
    assert all(rep == p.Rep.INFO for _, rep, _ in out[3:-1])
    size, flags = struct.unpack(">QH", infos[p.Info.EXPORT])
    assert size == 1 << 30
    f = p.TransmissionFlag
    for needed in (f.HAS_FLAGS, f.SEND_FLUSH, f.SEND_FUA, f.SEND_TRIM, f.SEND_WRITE_ZEROES):
        assert flags & needed
    assert flags & f.SEND_DF and flags & f.CAN_MULTI_CONN and not flags & f.READ_ONLY
    assert struct.unpack(">III", infos[p.Info.BLOCK_SIZE]) == (1, 4096, 32 << 20)
    assert infos[p.Info.NAME] == b"disk"
    assert infos[p.Info.DESCRIPTION] == b"test disk"
    assert out[-1] == (p.Opt.GO, p.Rep.ACK, b"")
    assert engine.state is p.NegotiationState.TRANSMISSION
    session = engine.session
    assert session is not None
    assert session.structured and session.contexts == {p.BASE_ALLOCATION_ID: "base:allocation"}
    assert session.flags == flags and session.export is EXPORT


def test_read_only_export_flags() -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.GO, go_data("ro")))
    out = replies(engine.data_to_send())
    _size, flags = struct.unpack(">QH", out[0][2][2:])
    f = p.TransmissionFlag
    assert flags & f.READ_ONLY
    assert not flags & (f.SEND_TRIM | f.SEND_WRITE_ZEROES | f.SEND_FUA | f.SEND_DF)


def test_info_does_not_end_negotiation_and_unknown_export_is_an_error() -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.INFO, go_data("disk")))
    engine.receive_data(opt(p.Opt.GO, go_data("nope")))
    out = replies(engine.data_to_send())
    assert out[-2][1] == p.Rep.ACK
    assert out[-1][:2] == (p.Opt.GO, p.Rep.ERR_UNKNOWN)
    assert engine.state is p.NegotiationState.OPTIONS


def test_empty_name_is_the_default_export() -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.GO, go_data("")))
    assert engine.session is not None and engine.session.export is EXPORT


def test_export_name_with_and_without_zeroes() -> None:
    for flags, padding in ((p.FLAG_C_FIXED_NEWSTYLE, 124), (p.FLAG_C_NO_ZEROES, 0)):
        engine = started(flags)
        engine.receive_data(opt(p.Opt.EXPORT_NAME, b"disk") + b"REQUEST")
        out = engine.data_to_send()
        assert len(out) == 10 + padding
        size, tflags = struct.unpack(">QH", out[:10])
        assert size == 1 << 30 and tflags & p.TransmissionFlag.HAS_FLAGS
        assert not tflags & p.TransmissionFlag.SEND_DF
        assert out[10:] == bytes(padding)
        assert engine.state is p.NegotiationState.TRANSMISSION
        assert engine.unused_data() == b"REQUEST"


def test_export_name_unknown_hangs_up_without_reply() -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.EXPORT_NAME, b"missing"))
    assert engine.state is p.NegotiationState.CLOSED
    assert engine.data_to_send() == b""


def test_list_exports() -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.LIST))
    out = replies(engine.data_to_send())
    assert out == [
        (p.Opt.LIST, p.Rep.SERVER, struct.pack(">I", 4) + b"disk"),
        (p.Opt.LIST, p.Rep.SERVER, struct.pack(">I", 2) + b"ro"),
        (p.Opt.LIST, p.Rep.ACK, b""),
    ]
    engine.receive_data(opt(p.Opt.LIST, b"junk"))
    assert replies(engine.data_to_send())[0][1] == p.Rep.ERR_INVALID


def test_abort_acks_and_closes() -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.ABORT))
    assert replies(engine.data_to_send()) == [(p.Opt.ABORT, p.Rep.ACK, b"")]
    assert engine.state is p.NegotiationState.CLOSED


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (p.Opt.STARTTLS, p.Rep.ERR_POLICY),
        (p.Opt.EXTENDED_HEADERS, p.Rep.ERR_UNSUP),
        (99, p.Rep.ERR_UNSUP),
    ],
)
def test_unsupported_options(option: int, expected: int) -> None:
    engine = started()
    engine.receive_data(opt(option))
    assert replies(engine.data_to_send())[0][:2] == (option, expected)
    assert engine.state is p.NegotiationState.OPTIONS


def test_meta_context_needs_structured_replies() -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation")))
    assert replies(engine.data_to_send())[0][1] == p.Rep.ERR_INVALID


def test_list_meta_context() -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.STRUCTURED_REPLY))
    engine.data_to_send()
    for queries, listed in (((), True), (("base:",), True), (("qemu:dirty-bitmap:x",), False)):
        engine.receive_data(opt(p.Opt.LIST_META_CONTEXT, meta_data("disk", *queries)))
        out = replies(engine.data_to_send())
        if listed:
            assert out[0] == (
                p.Opt.LIST_META_CONTEXT,
                p.Rep.META_CONTEXT,
                struct.pack(">I", 0) + b"base:allocation",
            )
        assert out[-1] == (p.Opt.LIST_META_CONTEXT, p.Rep.ACK, b"")
        assert len(out) == (2 if listed else 1)


def test_contexts_set_for_another_export_are_dropped_at_go() -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.STRUCTURED_REPLY))
    engine.receive_data(opt(p.Opt.SET_META_CONTEXT, meta_data("ro", "base:allocation")))
    engine.receive_data(opt(p.Opt.GO, go_data("disk")))
    assert engine.session is not None and engine.session.contexts == {}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        struct.pack(">I", 10) + b"disk",
        go_data("disk") + b"x",
        struct.pack(">I", 4) + b"\xff\xfe\xfd\xfc" + struct.pack(">H", 0),
        struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3) + b"\x00\x01",
    ],
)
def test_malformed_go_is_invalid_and_negotiation_goes_on(payload: bytes) -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.GO, payload))
    assert replies(engine.data_to_send())[0][:2] == (p.Opt.GO, p.Rep.ERR_INVALID)
    engine.receive_data(opt(p.Opt.GO, go_data("disk")))
    assert engine.state is p.NegotiationState.TRANSMISSION


def test_oversized_option_is_skipped_without_buffering() -> None:
    engine = started()
    size = p.MAX_OPTION_DATA + 12345
    engine.receive_data(struct.pack(">QII", p.IHAVEOPT, p.Opt.GO, size))
    for _ in range(size // 4096):
        engine.receive_data(bytes(4096))
        assert len(engine._in) <= 4096
    engine.receive_data(bytes(size % 4096) + opt(p.Opt.LIST))
    out = replies(engine.data_to_send())
    assert out[0][:2] == (p.Opt.GO, p.Rep.ERR_TOO_BIG)
    assert out[-1] == (p.Opt.LIST, p.Rep.ACK, b"")


def test_oversized_export_name_hangs_up() -> None:
    engine = started()
    engine.receive_data(struct.pack(">QII", p.IHAVEOPT, p.Opt.EXPORT_NAME, 1 << 31))
    assert engine.state is p.NegotiationState.CLOSED


def test_bad_option_magic_hangs_up() -> None:
    engine = started()
    engine.receive_data(struct.pack(">QII", 0x1234, p.Opt.LIST, 0))
    assert engine.state is p.NegotiationState.CLOSED


def test_byte_at_a_time_is_the_same_as_all_at_once() -> None:
    stream = (
        struct.pack(">I", 3)
        + opt(p.Opt.STRUCTURED_REPLY)
        + opt(p.Opt.LIST)
        + opt(p.Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation"))
        + opt(p.Opt.GO, go_data("disk", (p.Info.BLOCK_SIZE,)))
        + b"tail"
    )
    whole = p.ServerNegotiation([EXPORT])
    whole.receive_data(stream)
    piecewise = p.ServerNegotiation([EXPORT])
    for i in range(len(stream)):
        piecewise.receive_data(stream[i : i + 1])
    assert whole.data_to_send() == piecewise.data_to_send()
    assert whole.unused_data() == piecewise.unused_data() == b"tail"
    assert whole.session == piecewise.session


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=10))
def test_random_bytes_never_crash_the_engine(data: bytes, cuts: list[int]) -> None:
    engine = p.ServerNegotiation([EXPORT])
    engine.data_to_send()
    pos = 0
    for cut in [*cuts, len(data)]:
        engine.receive_data(data[pos : pos + cut])
        pos += cut
    out = engine.data_to_send()
    if engine.state is not p.NegotiationState.TRANSMISSION:
        replies(out)  # whatever we answered is well-formed option replies


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([*p.Opt, 0, 77]),
    st.binary(max_size=64),
)
def test_random_option_payloads_get_one_well_formed_answer(option: int, payload: bytes) -> None:
    engine = started()
    engine.receive_data(opt(p.Opt.STRUCTURED_REPLY))
    engine.data_to_send()
    engine.receive_data(opt(option, payload))
    out = engine.data_to_send()
    if engine.state is p.NegotiationState.OPTIONS:
        answered = replies(out)
        assert answered and {o for o, _, _ in answered} == {option}
        final = answered[-1][1]
        assert final == p.Rep.ACK or final & (1 << 31)


# -- transmission ------------------------------------------------------------------------------


def session(structured: bool = True, export: p.Export = EXPORT) -> p.Session:
    contexts = {p.BASE_ALLOCATION_ID: p.BASE_ALLOCATION} if structured else {}
    return p.Session(export, structured, contexts, export.transmission_flags(structured))


def request(
    kind: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7
) -> p.Request:
    header = struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, kind, handle, offset, length)
    return p.decode_request(header)


def test_decode_request() -> None:
    req = request(p.Cmd.WRITE, 4096, 512, p.CmdFlag.FUA, handle=0xDEADBEEF00)
    assert req == p.Request(p.CmdFlag.FUA, p.Cmd.WRITE, 0xDEADBEEF00, 4096, 512)
    assert req.payload_length == 512
    assert request(p.Cmd.READ, 0, 512).payload_length == 0
    with pytest.raises(p.RemoteProtocolError):
        p.decode_request(struct.pack(">IHHQQI", 0x12345678, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("req", "sess", "expected"),
    [
        (request(p.Cmd.READ, 0, 4096), session(), 0),
        (request(p.Cmd.READ, (1 << 30) - 1, 1), session(), 0),
        (request(p.Cmd.READ, (1 << 30) - 1, 2), session(), errno.EINVAL),
        (request(p.Cmd.READ, 1 << 62, 0), session(), errno.EINVAL),
        (request(p.Cmd.READ, 0, (32 << 20) + 1), session(), errno.EINVAL),
        (request(p.Cmd.WRITE, 0, (32 << 20) + 1), session(), errno.EINVAL),
        (request(p.Cmd.WRITE_ZEROES, 0, 1 << 30), session(), 0),
        (request(p.Cmd.READ, 0, 1, p.CmdFlag.DF), session(), 0),
        (request(p.Cmd.READ, 0, 1, p.CmdFlag.DF), session(False), errno.EINVAL),
        (request(p.Cmd.READ, 0, 1, p.CmdFlag.NO_HOLE), session(), errno.EINVAL),
        (request(p.Cmd.WRITE, 0, 1, 1 << 9), session(), errno.EINVAL),
        (request(p.Cmd.WRITE_ZEROES, 0, 1, 0x13), session(), 0),
        (request(p.Cmd.BLOCK_STATUS, 0, 1, p.CmdFlag.REQ_ONE), session(), 0),
        (request(p.Cmd.BLOCK_STATUS, 0, 0), session(), errno.EINVAL),
        (request(p.Cmd.BLOCK_STATUS, 0, 1), session(False), errno.EINVAL),
        (request(p.Cmd.FLUSH), session(), 0),
        (request(p.Cmd.CACHE, 0, 1 << 30), session(), 0),
        (request(p.Cmd.RESIZE, 0, 0), session(), errno.EINVAL),
        (request(42), session(), errno.EINVAL),
        (request(p.Cmd.WRITE, 0, 1), session(export=RO_EXPORT), errno.EPERM),
        (request(p.Cmd.TRIM, 0, 1), session(export=RO_EXPORT), errno.EPERM),
        (request(p.Cmd.WRITE_ZEROES, 0, 1), session(export=RO_EXPORT), errno.EPERM),
        (request(p.Cmd.READ, 0, 4096), session(export=RO_EXPORT), 0),
    ],
)
def test_check_request(req: p.Request, sess: p.Session, expected: int) -> None:
    err, why = p.check_request(sess, req)
    assert err == expected
    assert bool(why) == bool(expected)


def test_reply_encodings() -> None:
    assert p.simple_reply(5) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 5)
    assert p.simple_reply(5, errno.EPERM) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 1, 5)
    # Errors with no wire value travel as EIO.
    assert p.simple_reply(5, errno.ENOENT)[4:8] == struct.pack(">I", 5)
    err = p.structured_error(9, errno.ENOSPC, "full")
    assert (
        err
        == struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, 1, 0x8001, 9, 10)
        + struct.pack(">IH", 28, 4)
        + b"full"
    )
    assert p.structured_none(3) == struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, 1, 0, 3, 0)
    buf = bytearray(p.read_reply_header_size(session()) + 4)
    p.pack_read_reply_header(session(), buf, 11, 4096, 4)
    assert bytes(buf[:28]) == struct.pack(">IHHQIQ", p.STRUCTURED_REPLY_MAGIC, 1, 1, 11, 12, 4096)
    buf = bytearray(p.read_reply_header_size(session(False)) + 4)
    p.pack_read_reply_header(session(False), buf, 11, 4096, 4)
    assert bytes(buf[:16]) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 11)
    bs = p.block_status_reply(4, 1, [(512, 0), (1024, 3)])
    assert bs == struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, 1, 5, 4, 20) + struct.pack(
        ">IIIII", 1, 512, 0, 1024, 3
    )


def test_clip_extents() -> None:
    extents = [(0, 1000, 0), (1000, 1000, None), (2000, 1000, 2), (3000, 1000, 0)]
    assert p.clip_extents(extents, 500, 2000) == [(500, 0), (1000, 3), (500, 0)]
    # Data in this file and data in a parent look the same to base:allocation: merged.
    assert p.clip_extents(extents, 2000, 2000) == [(2000, 0)]
    assert p.clip_extents(extents, 500, 2000, one=True) == [(500, 0)]
    assert p.clip_extents(extents, 999, 1) == [(1, 0)]
    assert p.clip_extents([(100, 50, 0)], 0, 200) == []
    many = [(i, 1, None if i % 2 else 0) for i in range(p.MAX_EXTENTS + 10)]
    assert len(p.clip_extents(many, 0, len(many))) == p.MAX_EXTENTS
