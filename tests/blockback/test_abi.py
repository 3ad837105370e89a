"""blockback.abi against Xen's own structs (compiled from libxen-dev headers) and round trips."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockback import abi
from blockback.abi import ARM, X86_32, X86_64, Op, Status

from .cbuild import compile_c


@pytest.mark.parametrize("layout", [X86_64, X86_32, ARM])
@pytest.mark.parametrize("order", range(5))
def test_ring_entries(layout: abi.Abi, order: int) -> None:
    assert layout.ring_entries(order) == 32 << order


def test_sizes() -> None:
    assert (X86_64.request_size, X86_64.response_size, X86_64.entry_size) == (112, 16, 112)
    assert (X86_32.request_size, X86_32.response_size, X86_32.entry_size) == (108, 12, 108)
    with pytest.raises(ValueError):
        X86_64.ring_entries(5)


def _c_dump(tmp_path: Path, x86_32: bool) -> dict[str, str]:
    exe = compile_c(
        "abi_layout.c",
        tmp_path / ("al32" if x86_32 else "al64"),
        defines=("BLKIF_X86_32",) if x86_32 else (),
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


@pytest.mark.parametrize("x86_32", [False, True])
def test_codecs_match_xen_headers(tmp_path: Path, x86_32: bool) -> None:
    c = _c_dump(tmp_path, x86_32)
    layout = abi.ABIS[c["protocol"]]
    assert layout is (X86_32 if x86_32 else X86_64)
    req, rsp, entry = map(int, c["sizes"].split())
    assert (req, rsp, entry) == (layout.request_size, layout.response_size, layout.entry_size)
    assert [int(x) for x in c["ring"].split()] == [layout.ring_entries(o) for o in range(5)]

    rw = bytes.fromhex(c["rw"])
    segs = [(100 + i, i, 7) for i in range(3)]
    r = layout.decode_request(rw)
    assert (r.operation, r.nr_segments, r.handle) == (Op.WRITE, 3, 0x1234)
    assert (r.id, r.sector_number, r.segments) == (
        0x1122334455667788,
        0x0102030405060708,
        tuple(segs),
    )
    assert layout.encode_rw(Op.WRITE, r.id, r.sector_number, segs, handle=0x1234) == rw

    d = layout.decode_request(bytes.fromhex(c["discard"]))
    assert (d.operation, d.flag, d.id, d.sector_number, d.nr_sectors) == (
        Op.DISCARD,
        1,
        0xDEADBEEFCAFEF00D,
        4096,
        0x99,
    )
    assert layout.encode_discard(d.id, 4096, 0x99, 1) == bytes.fromhex(c["discard"])

    ind = bytes.fromhex(c["indirect"])
    i = layout.decode_request(ind)
    assert (i.operation, i.indirect_op, i.nr_segments, i.id, i.sector_number) == (
        Op.INDIRECT,
        Op.READ,
        600,
        77,
        123456,
    )
    assert i.indirect_grefs == tuple(range(1000, 1008))
    assert layout.encode_indirect(Op.READ, 77, 123456, 600, list(range(1000, 1008))) == ind

    response = layout.encode_response(0x0102030405060708, Op.FLUSH_DISKCACHE, Status.EOPNOTSUPP)
    assert response == bytes.fromhex(c["response"])


@given(
    layout=st.sampled_from([X86_64, X86_32, ARM]),
    op=st.sampled_from([Op.READ, Op.WRITE, Op.WRITE_BARRIER, Op.FLUSH_DISKCACHE]),
    rid=st.integers(0, 2**64 - 1),
    sector=st.integers(0, 2**64 - 1),
    handle=st.integers(0, 0xFFFF),
    segs=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255)),
        min_size=1,
        max_size=11,
    ),
)
def test_rw_round_trip(
    layout: abi.Abi, op: int, rid: int, sector: int, handle: int, segs: list[abi.Segment]
) -> None:
    data = layout.encode_rw(op, rid, sector, segs, handle=handle)
    assert len(data) == layout.request_size
    r = layout.decode_request(data)
    assert (r.operation, r.id, r.sector_number, r.handle) == (op, rid, sector, handle)
    assert r.segments == tuple(segs) and r.nr_segments == len(segs)


@given(st.integers(12, 255))
def test_oversized_nr_segments_not_decoded(n: int) -> None:
    r = X86_64.decode_request(X86_64.encode_rw(Op.READ, 1, 0, [(1, 0, 7)], nr_segments=n))
    assert r.nr_segments == n and r.segments == ()


@given(
    layout=st.sampled_from([X86_64, X86_32]),
    rid=st.integers(0, 2**64 - 1),
    op=st.integers(0, 255),
    status=st.sampled_from(list(Status)),
)
def test_response_fully_initialised(layout: abi.Abi, rid: int, op: int, status: int) -> None:
    data = layout.encode_response(rid, op, status)
    assert len(data) == layout.response_size
    assert int.from_bytes(data[0:8], "little") == rid
    assert data[8] == op and data[9] == 0
    assert int.from_bytes(data[10:12], "little", signed=True) == status
    assert data[12:] == bytes(layout.response_size - 12)  # XSA-216: padding is zero


def test_abi_for() -> None:
    assert abi.abi_for(None) is X86_64
    assert abi.abi_for("x86_32-abi") is X86_32
    assert abi.abi_for("arm-abi") is ARM
    with pytest.raises(KeyError):
        abi.abi_for("sparc-abi")
