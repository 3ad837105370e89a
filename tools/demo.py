"""``make demo``: the main job end to end on images it generates.

Makes a raw disk with recognisable content, converts it to a dynamic VHD, shows ``vhd info``,
creates a differencing child, writes to it through the library, shows ``vhd map``, converts the
chain back to raw and compares it with what the writes should have produced.  Where qemu-img is
installed, it reads the dynamic VHD too, as an independent check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import vhd

MiB = 1024 * 1024


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def vhd_cli(*args: str) -> None:
    print("$ vhd " + " ".join(args), flush=True)
    exe = shutil.which("vhd") or os.path.join(os.path.dirname(sys.executable), "vhd")
    subprocess.run([exe, *args], check=True)


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "demo-out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    raw, dyn, child, flat = out / "disk.raw", out / "disk.vhd", out / "child.vhd", out / "flat.raw"

    step("1. a 64 MiB raw disk: MiB i filled with byte i, MiBs 32-47 left as a hole")
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        for i in list(range(0, 32)) + list(range(48, 64)):
            f.seek(i * MiB)
            f.write(bytes([i]) * MiB)
    expected = bytearray(raw.read_bytes())

    step("2. convert it to a dynamic VHD")
    vhd_cli("convert", str(raw), str(dyn))
    if shutil.which("qemu-img"):
        print("$ qemu-img compare -f raw -F vpc disk.raw disk.vhd")
        subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "vpc", str(raw), str(dyn)], check=True
        )

    step("3. vhd info")
    vhd_cli("info", str(dyn))

    step("4. a differencing child, written through the library")
    vhd_cli("create", str(child), "--parent", str(dyn))
    writes = [(5 * MiB + 1000, b"hello from the child " * 100), (40 * MiB, b"\xab" * (3 * MiB))]
    with vhd.open(child, "r+") as disk:
        for offset, data in writes:
            disk.pwrite(data, offset)
            expected[offset : offset + len(data)] = data
        disk.flush()
    print("wrote", ", ".join(f"{len(d)} bytes at {o}" for o, d in writes))

    step("5. vhd map of the child")
    vhd_cli("map", str(child))

    step("6. flatten the chain back to raw and compare")
    vhd_cli("convert", str(child), str(flat))
    if flat.read_bytes() != bytes(expected):
        print("MISMATCH: the flattened chain is not what was written", file=sys.stderr)
        return 1
    print("flat.raw matches the original disk plus the child's writes, byte for byte")
    print(f"\nDemo images are in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
