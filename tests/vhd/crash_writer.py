"""A writer process for the SIGKILL rounds (tests/vhd/test_sigkill.py and its VHDX twin): random
allocating writes and discards with periodic flushes, logging each operation's intent before it
starts and each completed flush after it returns.

Usage: python -m tests.vhd.crash_writer FORMAT IMAGE LOG SEED   (FORMAT: vhd or vhdx)
Log lines: ``R`` (ready), ``W seq offset length`` (about to write), ``D seq offset length`` (about
to discard: the range then reads as zeros, or as the parent on a differencing VHD), ``F seq``
(every operation up to seq is acknowledged by a completed flush).  The data of write ``seq`` is
``payload(seed, seq, n)``.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable

import vhd

PAGE = 4096

# Per format: how often an operation is a discard, and how many pages it then covers (n: the
# pages a write would): VHD discards free bitmap bits and whole 16-page blocks (FUSE hole
# punching, Xen discard); VHDX ones reach a whole 1 MiB block.
DISCARDS: dict[str, tuple[float, Callable[[random.Random, int], int]]] = {
    "vhd": (0.15, lambda rng, n: n * rng.choice((1, 16))),
    "vhdx": (0.1, lambda rng, n: n * 256),
}


def payload(seed: int, seq: int, length: int) -> bytes:
    return random.Random(f"{seed}/{seq}").randbytes(length)


def main(argv: list[str]) -> int:
    fmt, image, log_path, seed = argv[0], argv[1], argv[2], int(argv[3])
    share, pages_of = DISCARDS[fmt]
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
            if rng.random() < share:
                n = min(pages_of(rng, n), pages - first)
                os.write(log, f"D {seq} {first * PAGE} {n * PAGE}\n".encode())
                if fmt == "vhdx":
                    # Zeros on either kind of VHDX: a TRIM on a VHDX child may give sectors
                    # back to the parent or read as zeros, block by block, which "D reads as
                    # zeros" (the checker's model without ``released``) cannot say.
                    disk.write_zeroes(first * PAGE, n * PAGE)
                else:
                    disk.discard(first * PAGE, n * PAGE)
            else:
                os.write(log, f"W {seq} {first * PAGE} {n * PAGE}\n".encode())
                disk.pwrite(payload(seed, seq, n * PAGE), first * PAGE)
            seq += 1
        disk.flush()
        os.write(log, f"F {seq - 1}\n".encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
