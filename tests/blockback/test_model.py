"""Random request batches through the whole data path against a bytearray model of the disk."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhd
from blockback.abi import X86_32, X86_64, Op, Status

from .test_backend import SIZE, Rig

SECTORS = SIZE // 512

segment = st.tuples(st.integers(0, 7), st.integers(0, 7)).map(lambda t: (min(t), max(t)))
request = st.one_of(
    st.tuples(
        st.just("read"), st.integers(0, SECTORS - 1), st.lists(segment, min_size=1, max_size=11)
    ),
    st.tuples(
        st.just("write"), st.integers(0, SECTORS - 1), st.lists(segment, min_size=1, max_size=11)
    ),
    st.tuples(st.just("discard"), st.integers(0, SECTORS - 1), st.integers(0, 64)),
    st.just(("flush", 0, 0)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x86_32=st.booleans(),
    batches=st.lists(st.lists(request, min_size=1, max_size=8), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_batches_match_model(
    x86_32: bool, batches: list[list[tuple[str, int, Any]]], seed: int
) -> None:
    import random

    rnd = random.Random(seed)
    layout = X86_32 if x86_32 else X86_64
    with tempfile.TemporaryDirectory() as tmp:
        vhd.create(Path(tmp) / "disk.vhd", SIZE).close()
        rig = Rig(Path(tmp), layout, 0)
        try:
            f = rig.front
            pages = f.alloc(8 * 11)
            model = rig.model
            rid = 0
            for batch in batches:
                reqs: list[bytes] = []
                checks: list[tuple[int, int, bool, str, list[tuple[int, int, int]], int]] = []
                busy: list[tuple[int, int]] = []
                for slot, (kind, sector, arg) in enumerate(batch):
                    rid += 1
                    mine = pages[slot * 11 : slot * 11 + 11]
                    if kind in ("read", "write"):
                        segs = [(mine[i], a, b) for i, (a, b) in enumerate(arg)]
                        length = sum((b - a + 1) * 512 for _, a, b in segs)
                        start, end = sector * 512, sector * 512 + length
                        valid = end <= SIZE
                        if valid and any(s < end and start < e for s, e in busy):
                            continue  # overlapping requests in one batch may complete in any order
                        if valid:
                            busy.append((start, end))
                        if kind == "write":
                            blob = b""
                            for g, a, b in segs:
                                data = rnd.randbytes((b - a + 1) * 512)
                                f.page(g)[a * 512 : (b + 1) * 512] = data
                                blob += data
                            if valid:
                                model[start:end] = blob
                        op = Op.READ if kind == "read" else Op.WRITE
                        reqs.append(layout.encode_rw(op, rid, sector, segs))
                        checks.append((rid, op, valid, kind, segs, start))
                    elif kind == "discard":
                        start, end = sector * 512, (sector + arg) * 512
                        valid = end <= SIZE
                        if valid and any(s < end and start < e for s, e in busy):
                            continue
                        if valid:
                            busy.append((start, end))
                            model[start:end] = bytes(end - start)
                        reqs.append(layout.encode_discard(rid, sector, arg))
                        checks.append((rid, Op.DISCARD, valid, kind, [], start))
                    else:
                        reqs.append(layout.encode_rw(Op.FLUSH_DISKCACHE, rid, 0, [], nr_segments=0))
                        checks.append((rid, Op.FLUSH_DISKCACHE, True, kind, [], 0))
                f.submit(reqs)
                got = {r[0]: r for r in f.wait(len(reqs))}
                assert len(got) == len(reqs)
                for crid, cop, cvalid, ckind, csegs, cstart in checks:
                    _, rop, status = got[crid]
                    assert rop == cop
                    assert status == (Status.OKAY if cvalid else Status.ERROR)
                    if ckind == "read" and cvalid:
                        pos = cstart
                        for g, a, b in csegs:
                            n = (b - a + 1) * 512
                            assert bytes(f.page(g)[a * 512 : (b + 1) * 512]) == model[pos : pos + n]
                            pos += n
            assert rig.xen.grants.mapped == 0
            rig.device.stop()
            rig.disk.flush()
            assert rig.disk.pread(SIZE, 0) == bytes(model)
        finally:
            rig.close()
