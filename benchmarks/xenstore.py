"""XenStore client speed, side by side: our Python client vs libxenstore (C), same server.

Both talk to our ``blockback.xenstore.server`` running in its own process on a unix socket, so
the comparison is of the clients (what the Xen backend pays per handshake), with the server cost
common to both:

* write+read round trips of one key (ops/s: one op = a write and a read);
* transactions of four writes, as a frontend's ``talk_to_blkback`` does (transactions/s).

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
    return rows


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    print(json.dumps(run(target), indent=2))
