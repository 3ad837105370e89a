"""The pure store engine: transactions are serialisable, and never refused without a reason.

Random interleavings of two transactional clients and one plain writer over a few keys. A serial
model replays each committed transaction at its commit point: every value the transaction read
must be what the model holds then (otherwise the store committed a non-serialisable
transaction), and a transaction that nobody disturbed must commit.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockback.xenstore.store import ConnState, Store
from blockback.xenstore.wire import OK, Message, XsType, join_strings

KEYS = [f"/k/{i}" for i in range(3)]


def call(store: Store, conn: ConnState, mtype: int, payload: bytes, tx: int = 0) -> Message:
    store.handle(conn, Message(mtype, 1, tx, payload))
    while True:
        data = conn.pop_out()
        assert data is not None
        msg_type = int.from_bytes(data[:4], "little")
        if msg_type != XsType.WATCH_EVENT:
            return Message(msg_type, 0, 0, data[16:])


ops = st.lists(
    st.tuples(
        st.sampled_from(["start", "read", "write", "rm", "commit", "abort", "plain"]),
        st.integers(0, 1),  # which transactional client
        st.sampled_from(KEYS),
        st.integers(0, 9),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_committed_transactions_are_serialisable(script: list[tuple[str, int, str, int]]) -> None:
    store = Store()
    conns = [store.connect(0), store.connect(0)]
    plain = store.connect(0)
    call(store, plain, XsType.MKDIR, join_strings("/k"))
    model: dict[str, bytes] = {}
    commits = 0  # the number of changes to the live tree so far
    open_tx: dict[int, tuple[int, int, list[tuple[str, str, bytes | None]]]] = {}

    for op, who, key, value in script:
        conn = conns[who]
        if op == "plain":
            call(store, plain, XsType.WRITE, key.encode() + b"\0" + str(value).encode())
            model[key] = str(value).encode()
            commits += 1
            continue
        if op == "start":
            if who not in open_tx:
                reply = call(store, conn, XsType.TRANSACTION_START, b"\0")
                open_tx[who] = (int(reply.payload.rstrip(b"\0")), commits, [])
            continue
        if who not in open_tx:
            continue
        tx_id, started_at, log = open_tx[who]
        if op == "read":
            reply = call(store, conn, XsType.READ, join_strings(key), tx_id)
            log.append(("read", key, reply.payload if reply.type == XsType.READ else None))
        elif op == "write":
            reply = call(
                store, conn, XsType.WRITE, key.encode() + b"\0" + str(value).encode(), tx_id
            )
            assert reply.payload == OK
            log.append(("write", key, str(value).encode()))
        elif op == "rm":
            reply = call(store, conn, XsType.RM, join_strings(key), tx_id)
            assert reply.payload == OK
            log.append(("rm", key, None))
        elif op in ("commit", "abort"):
            del open_tx[who]
            flag = "T" if op == "commit" else "F"
            reply = call(store, conn, XsType.TRANSACTION_END, join_strings(flag), tx_id)
            if op == "abort":
                assert reply.payload == OK
                continue
            if reply.type == XsType.ERROR:
                assert reply.payload == b"EAGAIN\0"
                # Refused: only allowed if something committed since the transaction started.
                assert commits > started_at, "an undisturbed transaction was refused"
                continue
            # Committed: replay it serially on the model at this point.
            changed = False
            for kind, k, v in log:
                if kind == "read":
                    assert model.get(k) == v, f"non-serialisable read of {k}"
                elif kind == "write":
                    assert v is not None
                    model[k] = v
                    changed = True
                else:
                    model.pop(k, None)
                    changed = True
            commits += changed

    for key in KEYS:
        reply = call(store, plain, XsType.READ, join_strings(key))
        assert (reply.payload if reply.type == XsType.READ else None) == model.get(key)
