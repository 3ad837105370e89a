"""Crash safety for real: a writer process is killed with SIGKILL at random moments during
allocating writes to a dynamic VHDX, many rounds.  After each kill, qemu (``qemu-img check -r
all`` on a copy: its own log replay) and vhdkit (an ``r+`` open replays) both read every write
acknowledged by a completed ``flush()`` exactly, pages touched only by unacknowledged writes hold
their old content or one of those writes, and ``qemu-img check`` is clean afterwards."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.maintenance.test_crash import parse_log, verify
from tests.vhdx.helpers import MiB, assert_qemu_clean, current_header, qemu_check, qemu_raw
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import records as r

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 20


@pytest.mark.timeout(240)
def test_sigkill_dynamic_vhdx(tmp_path: Path) -> None:
    image = tmp_path / "dyn.vhdx"
    size = 48 * MiB
    create_vhdx(image, size, block_size=MiB).close()
    base = bytes(size)
    rng = random.Random(11)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    acknowledged = 0
    live_logs = 0
    for round_ in range(ROUNDS):
        seed = 11000 + round_
        log = tmp_path / f"log{round_}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.vhdx.crash_writer", str(image), str(log), str(seed)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while not (log.exists() and log.read_bytes().startswith(b"R")):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                assert time.monotonic() < deadline
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        writes, flushed = parse_log(log.read_text())
        acknowledged += flushed + 1
        live_logs += current_header(image.read_bytes())[1].log_guid != r.ZERO_GUID
        copy = tmp_path / "qemu.vhdx"
        shutil.copy(image, copy)
        check = qemu_check(copy, "-r", "all")
        assert check.returncode == 0, check.stdout + check.stderr
        by_qemu = qemu_raw(copy, tmp_path / "q.raw")
        verify(base, by_qemu, writes, flushed, seed)
        with open_vhdx(image, "r+") as disk:  # replays whatever the kill left in the log
            ours = disk.pread(size, 0)
        assert ours == by_qemu
        assert_qemu_clean(image)
        base = ours
    # The writer got work done, and kills really caught transactions with a live log.
    assert acknowledged > ROUNDS and live_logs > 0
