"""The NBD export under abuse: what a client may learn, how many may connect, how much memory
idle or non-reading clients can pin, and how much work one BLOCK_STATUS request may cost."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockback.nbd import protocol as p
from tests.nbd.helpers import RawClient, make_image, short_tmpdir

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


def _description(sock: str) -> str | None:
    """What NBD_OPT_INFO tells any client about the default export."""
    with RawClient(sock) as c:
        magic, _ihaveopt, _flags = struct.unpack(">QQH", c.recv_exact(18))
        assert magic == p.NBD_MAGIC
        c.sock.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        query = struct.pack(">IH", 0, 1) + struct.pack(">H", p.Info.DESCRIPTION)
        for rep, payload in c.option(p.Opt.INFO, query):
            if rep == p.Rep.INFO and struct.unpack(">H", payload[:2])[0] == p.Info.DESCRIPTION:
                return payload[2:].decode()
    return None


def _serve_cli(image: Path, sock: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhdtools.cli", "serve", str(image), "--nbd", "--socket",
         str(sock), "--read-only", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    if not proc.stdout.readline().strip():
        proc.kill()
        pytest.fail(f"vhd serve printed no URI: {proc.communicate(timeout=10)[1]}")
    return proc


@pytest.mark.parametrize(
    ("extra", "want"),
    [
        ((), "vhdkit"),
        (("--describe", "tenant 7 system disk"), "tenant 7 system disk"),
        (("--show-path",), None),  # the path, shown because the admin asked for it
    ],
)
def test_the_export_description_reveals_no_path_unless_asked(
    tmp: Path, extra: tuple[str, ...], want: str | None
) -> None:
    image = tmp / "secret-tenant-dir" / "child.vhd"
    image.parent.mkdir()
    make_image(image)
    sock = tmp / "s"
    proc = _serve_cli(image, sock, *extra)
    try:
        got = _description(str(sock))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    if want is None:
        assert got is not None and str(image) in got
    else:
        assert got == want
        assert "secret-tenant-dir" not in got
