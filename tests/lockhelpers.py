"""Helpers for the lock tests: another process holding an image open (as a mount or a server
would), and qemu-nbd serving one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from tests.conftest import need_tool
from vhd import lock

_HOLDER = r"""
import sys, vhd
disk = vhd.open(sys.argv[1], sys.argv[2])
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "write":
        disk.pwrite(b"\x5a" * 4096, 0)
        disk.flush()
        print("written", flush=True)
disk.close()
print("closed", flush=True)
"""


class Holder:
    """A process that has ``path`` open through ``vhd.open(path, mode)`` until closed; it can
    be asked to write 4 KiB of 0x5a at offset 0 and flush."""

    def __init__(self, path: Path, mode: str = "r+") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", self.proc.stderr.read() if self.proc.stderr else line

    def write(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("write\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "written"

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        assert self.proc.returncode == 0, self.proc.stderr.read() if self.proc.stderr else ""

    def __enter__(self) -> Holder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.proc.kill()
            self.proc.wait(timeout=60)


class QemuNbd:
    """``qemu-nbd`` serving ``path`` (read-write unless ``read_only``) on a unix socket."""

    def __init__(self, path: Path, socket: Path, *, read_only: bool = False) -> None:
        qemu_nbd = need_tool("qemu-nbd")
        argv = [qemu_nbd, "-f", "vpc", "-k", str(socket), "--persistent"]
        if read_only:
            argv.append("-r")
        self.socket = socket
        self.proc = subprocess.Popen([*argv, str(path)], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        # Ready once it serves and holds its locks (the socket may come first).
        while not socket.exists() or lock.holder(str(path)) is None:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # qemu-nbd sometimes sits on SIGTERM with no client ever connected; the test is
            # about its locks, which end with the process either way.
            self.proc.kill()
            self.proc.wait(timeout=60)

    def __enter__(self) -> QemuNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
