"""XenStore client speed, side by side: our Python client vs libxenstore (C), same server.

Both talk to our ``blockback.xenstore.server`` running in its own process on a unix socket, so
the comparison is of the clients (what the Xen backend pays per handshake), with the server cost
common to both:

* write+read round trips of one key (ops/s: one op = a write and a read);
* transactions of four writes, as a frontend's ``talk_to_blkback`` does (transactions/s);
* the server's memory with 200 transactions left open on a 30,000-node tree, each having read
  and written one node (issue 12: a copy of the tree per transaction took it from 35 to
  402 MiB; copy-on-write transactions cost what they touch).  Reported, not compared.

``run(workdir)`` returns the rows ``make bench`` prints; ``python -m benchmarks.xenstore [DIR]``
runs it alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blockback.xenstore.client import Transaction, XenStoreClient

ROOT = Path(__file__).resolve().parent.parent
N = 2000
KEYS = ("ring-ref", "event-channel", "protocol", "state")


def _ours(socket_path: str) -> dict[str, float]:
    with XenStoreClient(socket_path) as xs:
        t0 = time.perf_counter()
        for i in range(N):
            xs.write("/bench/py/key", str(i))
            xs.read("/bench/py/key")
        rw = time.perf_counter() - t0

        def handshake(tx: Transaction) -> None:
            for key in KEYS:
                tx.write(f"/bench/py/fe/{key}", "8")

        t0 = time.perf_counter()
        for _ in range(N):
            xs.run_transaction(handshake)
        tx = time.perf_counter() - t0
    return {"rw": rw, "tx": tx}


def _theirs(socket_path: str, workdir: Path) -> dict[str, float] | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    exe = workdir / "xs_bench"
    subprocess.run(
        [gcc, "-O2", "-o", str(exe), str(ROOT / "tests/blockback/xs_bench.c"), "-lxenstore"],
        check=True,
        timeout=120,
    )
    out = subprocess.run(
        [str(exe), str(N)],
        env=dict(os.environ, XENSTORED_PATH=socket_path),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    return {k: float(v) for k, v in (line.split() for line in out.splitlines())}


TX_NODES = 30_000
TX_OPEN = 200


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _open_transactions_child() -> None:
    """Runs in its own process: RSS of the store before and after opening the transactions."""
    from blockback.xenstore.store import Store
    from blockback.xenstore.wire import Message, XsType

    store = Store()
    dom0 = store.connect(0)
    for i in range(TX_NODES):
        path = f"/bench/{i // 100}/{i % 100}".encode()
        store.handle(dom0, Message(XsType.WRITE, 1, 0, path + b"\0value"))
        while dom0.pop_out() is not None:
            pass
    before = _rss_mib()
    conns = []
    for i in range(TX_OPEN):
        conn = store.connect(0)
        conns.append(conn)
        store.handle(conn, Message(XsType.TRANSACTION_START, 1, 0, b"\0"))
        tx = int(conn.pop_out()[16:].rstrip(b"\0"))  # type: ignore[index]
        path = f"/bench/{i % 300}/1".encode()
        store.handle(conn, Message(XsType.READ, 2, tx, path + b"\0"))
        store.handle(conn, Message(XsType.WRITE, 3, tx, path + b"\0new"))
        while conn.pop_out() is not None:
            pass
    print(json.dumps({"before": before, "after": _rss_mib()}))


def _open_transactions_row() -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c",
         "from benchmarks.xenstore import _open_transactions_child as f; f()"],
        check=True, capture_output=True, text=True, timeout=600, cwd=ROOT,
    ).stdout  # fmt: skip
    rss = json.loads(out)
    return {
        "benchmark": f"xenstored RSS, {TX_OPEN} open transactions on {TX_NODES} nodes",
        "ours": round(rss["after"] - rss["before"], 1),
        "theirs": None,
        "ratio": None,
        "unit": "MiB",
        "note": f"growth over {rss['before']:.0f} MiB; was 367 MiB with a tree copy per "
        "transaction; report",
    }


def run(workdir: Path) -> list[dict[str, object]]:
    workdir.mkdir(parents=True, exist_ok=True)
    # A short socket directory: AF_UNIX paths are limited to 107 bytes.
    sockdir = Path(tempfile.mkdtemp(prefix="xsb"))
    socket_path = str(sockdir / "xs.sock")
    server = subprocess.Popen([sys.executable, "-m", "blockback.xenstore.server", socket_path])
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(socket_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        ours = _ours(socket_path)
        theirs = _theirs(socket_path, workdir)
    finally:
        server.terminate()
        server.wait(20)
        shutil.rmtree(sockdir, ignore_errors=True)
    rows: list[dict[str, object]] = []
    for key, name, unit in (
        ("rw", "xenstore write+read round trips", "ops/s"),
        ("tx", "xenstore 4-write transactions", "tx/s"),
    ):
        ours_rate = N / ours[key]
        theirs_rate = N / theirs[key] if theirs else None
        rows.append(
            {
                "benchmark": name,
                "ours": round(ours_rate),
                "theirs": round(theirs_rate) if theirs_rate else None,
                "ratio": round(ours_rate / theirs_rate, 2) if theirs_rate else None,
                "unit": unit,
                "note": "our Python client vs libxenstore (C), both against our server",
            }
        )
    rows.append(_open_transactions_row())
    return rows


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    print(json.dumps(run(target), indent=2))
