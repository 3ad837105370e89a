"""The C test frontend (Xen's own ring macros and blkif structs, libxenstore handshake) runs the
conformance checklist (its 15 items are named in frontend.c) against the backend on the simulated hypervisor.

Matrix: x86_64-abi and x86_32-abi layouts x ring orders 0 and 4 x dynamic and differencing disks,
VHD and VHDX (the backend serves a format-neutral ``Disk``).
The frontend keeps a shadow of what the guest wrote; the image is read back with ``vhd convert``
(after a simulated crash right after the guest's acknowledged flush, and after a clean stop) and
must equal the shadow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import vhd
from blockback.sim import SimBackend
from tests.conftest import need_tool
from tests.images import MiB, image

from .cbuild import compile_c

SIZE = 32 * MiB


@pytest.fixture(scope="session")
def frontends(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("frontend")
    return {
        "x86_64": compile_c("frontend.c", out / "frontend64", libs=("xenstore",)),
        "x86_32": compile_c(
            "frontend.c", out / "frontend32", defines=("BLKIF_X86_32",), libs=("xenstore",)
        ),
    }


class ResizedDisk:
    """The disk as the backend sees it after a (simulated) resize to ``size`` bytes."""

    def __init__(self, disk: Any, size: int) -> None:
        self._disk = disk
        self.size = size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._disk, name)


def make_image(tmp: Path, kind: str, fmt: str = "vhd") -> Path:
    """A dynamic disk or a child, VHD or VHDX (1 MiB blocks, so that the 32 MiB disk has many
    blocks, as the VHD with 2 MiB ones has)."""
    kw = {"block_size": MiB} if fmt == "vhdx" else {}
    if kind == "dynamic":
        # Some allocated blocks.
        return image(tmp / f"dyn.{fmt}", SIZE, writes=[(5 * MiB, b"\xa5" * 3 * MiB)], **kw).path
    writes = [(mib * MiB, bytes([mib + 1]) * MiB) for mib in range(0, 32, 3)]
    parent = image(tmp / f"parent.{fmt}", SIZE, writes=writes, **kw)
    return image(tmp / f"child.{fmt}", parent=parent, **kw).path


def convert(src: Path, dst: Path) -> bytes:
    cmd = [sys.executable, "-m", "vhdtools.cli", "convert", "--to", "raw", str(src), str(dst)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return dst.read_bytes()


@pytest.mark.parametrize("fmt", ["vhd", "vhdx"])
@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@pytest.mark.parametrize("order", [0, 4])
@pytest.mark.parametrize("layout", ["x86_64", "x86_32"])
def test_checklist(
    tmp_path: Path, frontends: dict[str, Path], layout: str, order: int, kind: str, fmt: str
) -> None:
    image = make_image(tmp_path, kind, fmt)
    disk = vhd.open(image, "r+")
    sim = SimBackend(tmp_path / "sim", disk, image=str(image)).start()
    shadow = tmp_path / "shadow.bin"
    crash = tmp_path / "crash" / image.name
    crash.parent.mkdir()
    lines: list[str] = []
    try:
        env = dict(os.environ, XENSTORED_PATH=sim.frontend_xenstored_path)
        proc = subprocess.Popen(
            [
                str(frontends[layout]),
                str(sim.directory),
                sim.frontend_path,
                "check",
                "--order",
                str(order),
                "--shadow",
                str(shadow),
                "--resize",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        killer = threading.Timer(240, proc.kill)
        killer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line == "resize?\n":
                sim.driver.disk = ResizedDisk(disk, disk.size - 1024 * 1024)
                sim.driver.resize()
            elif line == "restore?\n":
                sim.driver.disk = disk
                sim.driver.resize()
            elif line == "flushed\n":
                # A simulated crash: the image as it is on disk right after the acknowledged
                # flush, with the backend still running and nothing closed.
                shutil.copyfile(image, crash)
        stderr = proc.stderr.read() if proc.stderr else ""
        rc = proc.wait()
        killer.cancel()
        assert rc == 0, "\n".join(lines) + "\n" + stderr
        done = {int(x.split()[1]) for x in lines if x.startswith("ok ")}
        assert done == set(range(1, 16)), lines
        # 13/15: nothing mapped, no port left bound, after the frontend went away.
        assert sim.xen.grants.mapped == 0
        assert sim.xen.events.unbound == 0
    finally:
        sim.stop()
        disk.close()
    expected = shadow.read_bytes()
    assert len(expected) == SIZE
    if kind == "differencing":
        shutil.copyfile(image.parent / f"parent.{fmt}", crash.parent / f"parent.{fmt}")
    assert convert(crash, tmp_path / "crash.raw") == expected
    assert convert(image, tmp_path / "final.raw") == expected
    if fmt == "vhdx" and kind == "dynamic":
        # qemu-img reads (and checks) dynamic VHDX: an oracle that is not ours.
        for name in (crash, image):
            result = subprocess.run(
                [need_tool("qemu-img"), "check", "-f", "vhdx", str(name)],
                capture_output=True,
                text=True,
            )
            assert "No errors" in result.stdout, result.stdout + result.stderr
        ref = tmp_path / "qemu.raw"
        subprocess.run(
            [need_tool("qemu-img"), "convert", "-f", "vhdx", "-O", "raw", str(image), str(ref)],
            check=True,
        )
        assert ref.read_bytes() == expected


@pytest.mark.parametrize("fmt", ["vhd", "vhdx"])
@pytest.mark.parametrize("layout", ["x86_64", "x86_32"])
def test_checklist_read_only(
    tmp_path: Path, frontends: dict[str, Path], layout: str, fmt: str
) -> None:
    image = make_image(tmp_path, "differencing", fmt)
    before = convert(image, tmp_path / "before.raw")
    disk = vhd.open(image, "r")
    sim = SimBackend(tmp_path / "sim", disk, image=str(image), read_only=True).start()
    try:
        env = dict(os.environ, XENSTORED_PATH=sim.frontend_xenstored_path)
        result = subprocess.run(
            [
                str(frontends[layout]),
                str(sim.directory),
                sim.frontend_path,
                "check",
                "--read-only",
                "--shadow",
                str(tmp_path / "shadow.bin"),
                "--no-hostile",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ok 5 " in result.stdout and "ok 2 " in result.stdout
    finally:
        sim.stop()
        disk.close()
    assert (tmp_path / "shadow.bin").read_bytes() == before
    assert convert(image, tmp_path / "after.raw") == before
