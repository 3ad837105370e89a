"""A writer process for the crash test: random allocating writes with periodic flushes, logging
each write's intent before it starts and each completed flush after it returns.

Usage: python -m tests.vhd.crash_writer IMAGE LOG SEED
Log lines: ``R`` (ready), ``W seq offset length`` (about to write), ``D seq offset length`` (about
to discard: the range then reads as zeros, or as the parent on a differencing disk), ``F seq`` (every operation up to seq is
acknowledged by a completed flush).  The data of write ``seq`` is ``payload(seed, seq, n)``.
"""

from __future__ import annotations

import os
import random
import sys

import vhd

PAGE = 4096


def payload(seed: int, seq: int, length: int) -> bytes:
    return random.Random(f"{seed}/{seq}").randbytes(length)


def main(argv: list[str]) -> int:
    image, log_path, seed = argv[0], argv[1], int(argv[2])
    rng = random.Random(seed)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    disk = vhd.open(image, "r+")
    pages = disk.size // PAGE
    os.write(log, b"R\n")
    seq = 0
    while True:
        for _ in range(rng.randrange(1, 9)):
            n = rng.randrange(1, 9)
            first = rng.randrange(0, pages - n + 1)
            if rng.random() < 0.15:
                # Discards (FUSE hole punching, Xen discard) free bitmap bits and whole blocks.
                n *= rng.choice((1, 16))
                n = min(n, pages - first)
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
