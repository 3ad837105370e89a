"""Helpers for the tests that run inside the lab's dom0 (real Xen 4.17, xl, Linux PV guests).

A guest is the lab kernel with ``guest.img`` (tests/xen/guest/): it runs the scenario script named
by ``vhdtest=NAME`` and prints ``VHDTEST PASS|FAIL|INFO ...`` lines on its console, which
xenconsoled logs to /var/log/xen/console/guest-NAME.log; tests here wait for ``VHDTEST END``
and assert on those lines and on what dom0 sees (xenstore, the images, the backend's log).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import vhd

CONSOLE = Path("/vhdlab/console")  # xenconsoled --log-dir (tests/xen/dom0.sh)
RESULTS = Path("/vhdlab")
VHD = [str(Path(sys.executable).with_name("vhd"))]
# Under TCG on 2 shared cores a guest boot takes minutes; these bound a hung run, not a slow one.
BOOT_TIMEOUT = 1500.0


def run(
    *argv: str | Path, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], check=check, capture_output=True, text=True, timeout=timeout
    )


def xs_ls(path: str) -> list[str]:
    """Every node under PATH (``xenstore-ls -f``), or [] if PATH does not exist."""
    out = run("xenstore-ls", "-f", path, check=False)
    return out.stdout.splitlines() if out.returncode == 0 else []


def xs_read(path: str) -> str | None:
    out = run("xenstore-read", path, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def domid(name: str) -> int:
    return int(run("xl", "domid", name).stdout.strip())


def wait_for(what: str, predicate: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def md5_of(path: Path, offset: int, length: int) -> str:
    """MD5 of guest bytes [offset, offset+length) of a VHD, read by our library (the oracle for
    what the guest wrote through the backend)."""
    with vhd.open(str(path)) as disk:
        return hashlib.md5(disk.pread(length, offset)).hexdigest()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Console:
    """What a guest printed: its markers parsed from xenconsoled's log."""

    text: str
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Console:
        c = cls(text)
        for line in text.splitlines():
            m = re.search(r"VHDTEST (PASS|FAIL|INFO) (.*)", line)
            if not m:
                continue
            kind, rest = m.group(1), m.group(2).strip()
            if kind == "PASS":
                c.passed.append(rest)
            elif kind == "FAIL":
                c.failed.append(rest)
            else:
                key, _, value = rest.partition(" ")
                c.info[key] = value.strip()
        return c

    def assert_clean(self, *expected: str) -> None:
        assert not self.failed, f"guest checks failed: {self.failed}"
        missing = [e for e in expected if e not in self.passed]
        assert not missing, f"guest never passed {missing}; it printed:\n{self.text[-3000:]}"


def console_log(name: str) -> Path:
    return CONSOLE / f"guest-{name}.log"


def console_text(name: str) -> str:
    path = console_log(name)
    return path.read_text(errors="replace") if path.exists() else ""


def wait_console(name: str, marker: str, timeout: float = BOOT_TIMEOUT) -> str:
    """Wait until the guest NAME printed MARKER; returns its whole console so far."""
    wait_for(f"{marker!r} on {name}'s console", lambda: marker in console_text(name), timeout)
    return console_text(name)


@dataclass
class Disk:
    """One line of an xl ``disk=[...]`` list."""

    target: str
    vdev: str
    access: str = "rw"
    backendtype: str = "phy"
    script: str = "/etc/xen/scripts/vhdkit-noop"

    def spec(self) -> str:
        # target= must come last: everything after it is the path.
        script = f"script={self.script}, " if self.script else ""
        return (
            f"format=raw, vdev={self.vdev}, access={self.access}, "
            f"backendtype={self.backendtype}, {script}target={self.target}"
        )


NOOP_SCRIPT = (
    "#!/bin/sh\n# vhdkit writes hotplug-status itself; libxl only needs a script to run.\nexit 0\n"
)


def install_noop_script() -> None:
    path = Path("/etc/xen/scripts/vhdkit-noop")
    path.write_text(NOOP_SCRIPT)
    path.chmod(0o755)


def guest_config(
    name: str, scenario: str, disks: list[Disk], *, vcpus: int = 2, memory: int = 160
) -> Path:
    kernel = os.environ["LAB_KERNEL"]
    initrd = os.environ["LAB_GUEST_INITRD"]
    lines = [
        f'name = "{name}"',
        'type = "pv"',
        f'kernel = "{kernel}"',
        f'ramdisk = "{initrd}"',
        f'extra = "console=hvc0 mitigations=off vhdtest={scenario}"',
        f"memory = {memory}",
        f"vcpus = {vcpus}",
        'on_poweroff = "destroy"',
        'on_crash = "destroy"',
        "disk = [ " + ", ".join(f"'{d.spec()}'" for d in disks) + " ]",
    ]
    path = Path("/tmp") / f"{name}.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


def xl_create(cfg: Path) -> None:
    out = run("xl", "create", cfg, check=False, timeout=BOOT_TIMEOUT)
    assert out.returncode == 0, f"xl create failed:\n{out.stdout}\n{out.stderr}"


def wait_gone(name: str, timeout: float = 300.0) -> None:
    wait_for(
        f"domain {name} to go away",
        lambda: run("xl", "domid", name, check=False).returncode != 0,
        timeout,
    )


class Backend:
    """``vhd serve --xen`` (or ``--nbd``) as a daemon with its log in the test's directory."""

    running: ClassVar[list[Backend]] = []  # stopped after each test (conftest.py) if still alive

    def __init__(self, logdir: Path, *args: str) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        self.log = logdir / "serve.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [*VHD, "serve", *args], stdout=self._out, stderr=subprocess.STDOUT
        )
        Backend.running.append(self)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the backend ignored signal {sig} for {timeout:.0f} s") from None
        finally:
            self._out.close()
            if self in Backend.running:
                Backend.running.remove(self)

    def alive(self) -> bool:
        return self.proc.poll() is None


# The lab's stand-in for /etc/xen/scripts/block: under TCG that bash script outruns libxl's
# hotplug timeout.  It does the part blkback needs: physical-device (hex major:minor) + status.
BLOCK_SCRIPT = """#!/bin/sh
[ "$1" = add ] || exit 0
dev=$(xenstore-read "$XENBUS_PATH/params")
set -- $(stat -L -c '%t %T' "$dev")
xenstore-write "$XENBUS_PATH/physical-device" "$1:$2"
xenstore-write "$XENBUS_PATH/hotplug-status" connected
"""


@contextlib.contextmanager
def nbd_route(logdir: Path, image: Path, export: str) -> Iterator[Disk]:
    """The NBD route's dom0 side (README "NBD export"): ``vhd serve --nbd`` on ``image``, attached
    with nbd-client (4 connections, 4 KiB blocks) as /dev/nbd0, and the xl disk that gives it to a
    guest as xvda through the kernel's xen-blkback.  Afterwards the device is disconnected, the
    server stopped and xen-blkback unloaded: loaded, it claims every backend/vbd device, and a
    later ``vhd serve --xen`` scenario would find its disks taken."""
    script = Path("/etc/xen/scripts/vhdkit-lab-block")
    script.write_text(BLOCK_SCRIPT)
    script.chmod(0o755)
    for module in ("nbd", "xen-blkback"):
        run("modprobe", module)
    sock = f"/tmp/{export}.sock"
    server = Backend(logdir, str(image), "--nbd", "--socket", sock, "--export-name", export)
    try:
        wait_for("the NBD socket", lambda: Path(sock).exists())
        client = run(
            "nbd-client", "-unix", sock, "/dev/nbd0", "-N", export, "-connections", "4",
            "-b", "4096", check=False,
        )  # fmt: skip
        assert client.returncode == 0, client.stdout + client.stderr
        yield Disk("/dev/nbd0", "xvda", script=str(script))
    finally:
        run("nbd-client", "-d", "/dev/nbd0", check=False)
        time.sleep(1)
        server.stop()
        run("rmmod", "xen-blkback", check=False)


def backend_nodes(frontend_domid: int, kind: str = "vbd") -> list[str]:
    return xs_ls(f"/local/domain/0/backend/{kind}/{frontend_domid}")


def iter_markers(text: str, prefix: str) -> Iterator[tuple[str, str]]:
    for line in text.splitlines():
        m = re.search(rf"VHDTEST INFO {re.escape(prefix)}(\S*) (.*)", line)
        if m:
            yield m.group(1), m.group(2).strip()


def open_files(pid: int) -> set[str]:
    """Paths the process PID has open (/proc/PID/fd): an image closed cleanly is not among them."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            out.add(os.readlink(fd))
    return out


def xl(*args: str | Path, timeout: float = BOOT_TIMEOUT) -> str:
    out = run("xl", *args, check=False, timeout=timeout)
    assert out.returncode == 0, f"xl {' '.join(map(str, args))} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def vhd_check(image: Path, *args: str) -> None:
    out = run(*VHD, "check", *args, image, check=False)
    assert out.returncode == 0, f"vhd check {' '.join(args)} {image}: {out.stdout}{out.stderr}"


class Soft:
    """Soft assertions: every check of a scenario runs (one guest boot is expensive) and all the
    failures are reported together by :meth:`verify`."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    @contextlib.contextmanager
    def check(self, what: str) -> Iterator[None]:
        try:
            yield
        except (AssertionError, KeyError, subprocess.CalledProcessError, vhd.VHDError) as exc:
            self.failures.append(f"{what}: {type(exc).__name__}: {exc}")

    def verify(self) -> None:
        assert not self.failures, "\n".join(self.failures)
