"""``vhd serve IMAGE --sim DIR`` as a user runs it: a process that prints how to attach, serves
the C frontend, and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import vhd
from tests.conftest import need_tool
from vhd.vhdx import create_vhdx

from .cbuild import compile_c


@pytest.mark.parametrize("fmt", ["vhd", "vhdx"])
def test_vhd_serve_sim_cli(tmp_path: Path, fmt: str) -> None:
    exe = compile_c("frontend.c", tmp_path / "frontend", libs=("xenstore",))
    image = tmp_path / f"d.{fmt}"
    if fmt == "vhdx":
        create_vhdx(image, 16 * 1024 * 1024, block_size=1024 * 1024).close()
    else:
        vhd.create(image, 16 * 1024 * 1024).close()
    sim = tmp_path / "sim"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhdtools.cli", "serve", str(image), "--sim", str(sim)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "ready":
                break
        assert lines and lines[-1] == "ready", (lines, proc.stderr.read() if proc.stderr else "")
        attach = next(x for x in lines if x.startswith("XENSTORED_PATH="))
        env_part, _exe, directory, fe_path, mode = attach.split()
        assert (directory, mode) == (str(sim), "check")
        env = dict(os.environ, XENSTORED_PATH=env_part.split("=", 1)[1])
        result = subprocess.run(
            [
                str(exe),
                str(sim),
                fe_path,
                "bench",
                "--op",
                "write",
                "--segs",
                "11",
                "--seconds",
                "0.3",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert '"iops"' in result.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    assert rc == 0
    with vhd.open(image) as disk:  # the writes landed and the image is consistent
        assert disk.pread(4096, 0) != bytes(4096)
    if fmt == "vhdx":
        result = subprocess.run(
            [need_tool("qemu-img"), "check", "-f", "vhdx", str(image)],
            capture_output=True,
            text=True,
        )
        assert "No errors" in result.stdout, result.stdout + result.stderr
