"""blockback.xenbus: the transition table (Hypothesis over every input) and the key helpers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockback.abi import X86_32, X86_64
from blockback.errors import LocalProtocolError, RemoteProtocolError
from blockback.xenbus import (
    TRANSITIONS,
    Action,
    Input,
    XenbusMachine,
    XenbusState,
    connect_keys,
    initwait_keys,
    read_frontend,
)

S = XenbusState


def state(m: XenbusMachine) -> XenbusState:
    return m.state  # a call, so mypy does not narrow across transitions


@given(st.lists(st.sampled_from(list(Input)), max_size=60))
def test_table_is_the_only_law(inputs: list[Input]) -> None:
    """Every allowed input moves exactly as the table says; every other one raises, state kept."""
    m = XenbusMachine()
    for event in inputs:
        before = m.state
        if (before, event) in TRANSITIONS:
            action, after = TRANSITIONS[(before, event)]
            assert m.process(event) is action
            assert m.state is after
        else:
            error = (
                LocalProtocolError
                if event in (Input.PROBE, Input.CONNECT_FAILED)
                else RemoteProtocolError
            )
            with pytest.raises(error):
                m.process(event)
            assert m.state is before


def test_table_invariants() -> None:
    for (state, event), (action, after) in TRANSITIONS.items():
        # Connected is reached only by CONNECT, InitWait only by PUBLISH.
        if after is S.CONNECTED and state is not S.CONNECTED:
            assert action is Action.CONNECT
        if after is S.INIT_WAIT and state is not S.INIT_WAIT:
            assert action is Action.PUBLISH
        # A frontend that closes always gets us to Closed with the ring released.
        if event is Input.FE_CLOSED and state in (S.INIT_WAIT, S.CONNECTED, S.CLOSING):
            assert (action, after) == (Action.CLOSE, S.CLOSED)
    for bad in (Input.FE_INIT_WAIT, Input.FE_RECONFIGURING, Input.FE_RECONFIGURED):
        assert not any(event is bad for _, event in TRANSITIONS)


def test_connect_cycle_and_reconnect() -> None:
    m = XenbusMachine()
    assert m.process(Input.PROBE) is Action.PUBLISH and state(m) is S.INIT_WAIT
    assert m.frontend_state("1") is Action.NONE
    assert m.frontend_state("4") is Action.CONNECT  # coalesced 3 -> 4 still connects
    assert m.frontend_state("4") is Action.NONE  # repeated watch: no second connect
    assert m.process(Input.RESIZE) is Action.RESIZE
    assert m.frontend_state("5") is Action.CLOSING
    assert m.frontend_state("6") is Action.CLOSE and state(m) is S.CLOSED
    assert m.frontend_state("1") is Action.PUBLISH and state(m) is S.INIT_WAIT
    assert m.frontend_state("3") is Action.CONNECT and state(m) is S.CONNECTED
    assert m.process(Input.OFFLINE) is Action.CLOSING
    assert m.frontend_state("6") is Action.CLOSE
    assert m.process(Input.OFFLINE) is Action.REMOVE


def test_flip_3_6_thousand_times() -> None:
    m = XenbusMachine()
    m.process(Input.PROBE)
    connects = closes = 0
    for _ in range(1000):
        connects += m.frontend_state("3") is Action.CONNECT
        closes += m.frontend_state("6") is Action.CLOSE
        m.frontend_state("1")
    assert connects == closes == 1000 and state(m) is S.INIT_WAIT


@pytest.mark.parametrize("value", ["7", "8", "2", "x", "99"])
def test_bad_frontend_states(value: str) -> None:
    m = XenbusMachine()
    m.process(Input.PROBE)
    with pytest.raises(RemoteProtocolError):
        m.frontend_state(value)
    assert m.frontend_state(None) is Action.REMOVE  # node vanished: frontend gone


def test_initwait_and_connect_keys() -> None:
    assert initwait_keys() == {
        "feature-max-indirect-segments": "1024",
        "multi-queue-max-queues": "4",
        "max-ring-page-order": "4",
    }
    assert "feature-max-indirect-segments" not in initwait_keys(max_indirect_segments=0)
    rw = connect_keys(size=1 << 30, read_only=False, discard=True)
    assert rw == {
        "feature-flush-cache": "1",
        "feature-barrier": "1",
        "feature-discard": "1",
        "discard-granularity": "4096",
        "discard-alignment": "0",
        "discard-secure": "0",
        "feature-persistent": "0",
        "sectors": str((1 << 30) // 512),
        "info": "0",
        "sector-size": "512",
        "physical-sector-size": "512",
    }
    ro = connect_keys(size=4096, read_only=True, discard=True)
    assert ro["info"] == "4" and ro["feature-discard"] == "0" and ro["feature-flush-cache"] == "0"
    assert "discard-granularity" not in ro
    # A 4K-native disk: sector-size is its logical sector, sectors stay in 512-byte units, the
    # physical size never below the logical one, discard granularity at least one sector.
    k4 = connect_keys(
        size=1 << 30, read_only=False, discard=True, sector_size=4096, physical_sector_size=512
    )
    assert (k4["sectors"], k4["sector-size"], k4["physical-sector-size"]) == (
        str((1 << 30) // 512), "4096", "4096")  # fmt: skip
    assert k4["discard-granularity"] == "4096"
    big = connect_keys(size=1 << 20, read_only=False, discard=False, physical_sector_size=4096)
    assert (big["sector-size"], big["physical-sector-size"]) == ("512", "4096")
    # A frontend whose device-type is cdrom gets VDISK_CDROM in info (Linux blkback's vbd.type).
    assert connect_keys(size=4096, read_only=True, discard=False, cdrom=True)["info"] == "5"


def reader(keys: dict[str, str]):  # type: ignore[no-untyped-def]
    return keys.get


def test_read_frontend_single_and_multi_queue() -> None:
    p = read_frontend(reader({"ring-ref": "7", "event-channel": "3", "protocol": "x86_32-abi"}))
    assert p.abi is X86_32 and p.ring_page_order == 0 and p.queues[0].ring_refs == (7,)
    p = read_frontend(
        reader({
            "ring-page-order": "2", "multi-queue-num-queues": "2", "feature-persistent": "1",
            **{f"queue-{q}/ring-ref{i}": str(10 * q + i) for q in range(2) for i in range(4)},
            "queue-0/event-channel": "5", "queue-1/event-channel": "6",
        })
    )  # fmt: skip
    assert p.abi is X86_64 and p.ring_page_order == 2 and p.persistent
    assert [q.ring_refs for q in p.queues] == [(0, 1, 2, 3), (10, 11, 12, 13)]
    assert [q.event_channel for q in p.queues] == [5, 6]
    # Legacy FreeBSD keys are tolerated; num-ring-pages stands in for ring-page-order.
    p = read_frontend(
        reader({"num-ring-pages": "2", "ring-ref0": "1", "ring-ref1": "2", "event-channel": "1",
                "max-requests": "32", "max-request-segments": "11"})
    )  # fmt: skip
    assert p.ring_page_order == 1


@pytest.mark.parametrize(
    "keys",
    [
        {"ring-page-order": "5", **{f"ring-ref{i}": "1" for i in range(32)}, "event-channel": "1"},
        {"multi-queue-num-queues": "0", "ring-ref": "1", "event-channel": "1"},
        {"multi-queue-num-queues": "5", "ring-ref": "1", "event-channel": "1"},
        {"protocol": "sparc-abi", "ring-ref": "1", "event-channel": "1"},
        {"ring-ref": "1"},
        {"ring-ref": "-1", "event-channel": "1"},
        {"ring-ref": "0x10", "event-channel": "1"},
        {"ring-page-order": "1", "ring-ref0": "1", "event-channel": "1"},
        {"num-ring-pages": "3", "ring-ref0": "1", "event-channel": "1"},
    ],
)
def test_read_frontend_refuses(keys: dict[str, str]) -> None:
    with pytest.raises(RemoteProtocolError):
        read_frontend(reader(keys))


def test_backend_directory_removed_removes_from_every_state() -> None:
    """The toolstack removed the backend directory (xl destroy, block-detach): from any state the
    device is removed (and the driver writes nothing more: tests/blockback/test_xen_daemon.py)."""
    states = {state for state, _ in TRANSITIONS}
    assert states == {S.INITIALISING, S.INIT_WAIT, S.CONNECTED, S.CLOSING, S.CLOSED}
    for s in states:
        assert TRANSITIONS[(s, Input.GONE)] == (Action.REMOVE, S.CLOSED)
