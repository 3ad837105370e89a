"""A writer process for the VHDX SIGKILL test: random allocating writes and discards with
periodic flushes, logging intent before each operation and each completed flush after it returns
(the log format of tests.vhd.crash_writer, whose payloads it shares).

Usage: python -m tests.vhd.vhdx.crash_writer IMAGE LOG SEED
"""

from __future__ import annotations

import os
import random
import sys

from tests.vhd.crash_writer import PAGE, payload
from vhd.vhdx import open_vhdx


def main(argv: list[str]) -> int:
    image, log_path, seed = argv[0], argv[1], int(argv[2])
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    disk = open_vhdx(image, "r+")
    pages = disk.size // PAGE
    os.write(log, b"R\n")
    seq = 0
    while True:
        for _ in range(rng.randrange(1, 9)):
            n = rng.randrange(1, 9)
            first = rng.randrange(0, pages - n + 1)
            if rng.random() < 0.1:
                n = min(n * 256, pages - first)  # up to a whole 1 MiB block
                os.write(log, f"D {seq} {first * PAGE} {n * PAGE}\n".encode())
                disk.discard(first * PAGE, n * PAGE)
            else:
                os.write(log, f"W {seq} {first * PAGE} {n * PAGE}\n".encode())
                disk.pwrite(payload(seed, seq, n * PAGE), first * PAGE)
            seq += 1
        disk.flush()
        os.write(log, f"F {seq - 1}\n".encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
