"""Inside the lab's dom0: each test starts from a clean toolstack and leaves its evidence behind.

After every test, whatever it did not clean up itself (it failed midway) is torn down so the next
scenario does not inherit guests, backends or xenstore nodes, and every guest console is copied to
/vhdlab/<test>/ for the report.  Then dom0's copies of a few host files (the guest kernel, the
toolstack's library, libc: /vhdlab/canaries.sha256, written by tests/xen/lab.py) must still read
as the host has them: if not, the platform corrupted dom0's memory during that test, and the test
errors saying so rather than leaving a mystery crash to the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import signal
from collections.abc import Iterator

import pytest

from .xenlab import CONSOLE, RESULTS, Backend, run


def corrupted_canaries() -> list[str]:
    """Files whose bytes in dom0 differ from the host's (page cache or 9p corruption)."""
    listing = RESULTS / "canaries.sha256"
    bad = []
    for line in listing.read_text().splitlines() if listing.exists() else []:
        want, _, path = line.partition("  ")
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != want:
                bad.append(path)
    return bad


@pytest.fixture(autouse=True)
def clean_lab(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    out = RESULTS / request.node.name
    out.mkdir(parents=True, exist_ok=True)
    for log in CONSOLE.glob("guest-*.log"):
        shutil.copy(log, out / log.name)
        log.unlink()
    listing = run("xl", "list", check=False).stdout.splitlines()[1:]
    for line in listing:
        name = line.split()[0]
        if name != "Domain-0":
            run("xl", "destroy", name, check=False)
    # A backend still running here belongs to a test that failed midway: SIGABRT makes
    # faulthandler (PYTHONFAULTHANDLER=1) write every thread's stack to its serve.log.
    (out / "xenstore.txt").write_text(
        run("xenstore-ls", "-fp", "/local/domain", check=False).stdout
    )
    for backend in list(Backend.running):
        with contextlib.suppress(AssertionError):
            backend.stop(signal.SIGABRT, timeout=30)
    for kind in ("vbd", "qdisk", "vhd"):
        run("xenstore-rm", f"/local/domain/0/backend/{kind}", check=False)
    bad = corrupted_canaries()
    if bad:
        pytest.fail(
            f"dom0 now reads {bad} differently from the host: the platform (QEMU/Xen) corrupted "
            "dom0's memory during this test; its crashes are not vhdkit's"
        )
