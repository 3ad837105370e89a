"""Oracles and fixtures for VHDX tests: qemu-img/qemu-io (fixed and dynamic VHDX), libvhdi
(all three types, via pyvhdi with the system Python), and raw edits of records for damage."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

from tests.conftest import need_tool
from tests.interop.oracles import TIMEOUT
from vhd.vhdx import records as r

MiB = 1024 * 1024


def run(*args: str) -> subprocess.CompletedProcess[str]:
    tool = need_tool(args[0])
    return subprocess.run(
        [tool, *args[1:]], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def qemu_create(path: Path, size: int, *, block_size: int = 0, subformat: str = "dynamic") -> None:
    opts = f"subformat={subformat}" + (f",block_size={block_size}" if block_size else "")
    proc = run("qemu-img", "create", "-q", "-f", "vhdx", "-o", opts, str(path), str(size))
    assert proc.returncode == 0, proc.stderr


def qemu_write(path: Path, *commands: str) -> None:
    args: list[str] = []
    for c in commands:
        args += ["-c", c]
    proc = run("qemu-io", "-f", "vhdx", *args, str(path))
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def qemu_raw(path: Path, out: Path) -> bytes:
    proc = run("qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(path), str(out))
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def qemu_check(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", "check", "-f", "vhdx", *extra, str(path))


def assert_qemu_clean(path: Path) -> None:
    proc = qemu_check(path)
    assert proc.returncode == 0 and "No errors" in proc.stdout, proc.stdout + proc.stderr


def unpack_corpus(corpus: Path, name: str, dest: Path) -> Path:
    out = dest / name
    with gzip.open(corpus / "vhdx" / f"{name}.gz") as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def current_header(data: bytes | bytearray) -> tuple[int, r.Header]:
    """(file offset, header) of the current header of the image bytes ``data``."""
    best: tuple[int, r.Header] | None = None
    for off in r.HEADER_OFFSETS:
        try:
            h = r.Header.parse(bytes(data[off : off + r.HEADER_SIZE]))
        except Exception:
            continue
        if best is None or h.sequence_number > best[1].sequence_number:
            best = (off, h)
    assert best is not None
    return best


def libvhdi_view(chain: list[Path]) -> tuple[bytes, list[int]]:
    """What libvhdi (20210425, Debian 12) reads from the chain ``chain`` (parents first), and
    the guest offsets of the ZERO blocks where it differs from MS-VHDX and from us.

    MS-VHDX 2.5.1.1 says of PAYLOAD_BLOCK_ZERO "For reads from the blocks in this state,
    implementations MUST return zeros", in every disk type; only NOT_PRESENT and the clear bits
    of a PARTIALLY_PRESENT block defer to the parent.  libvhdi reads ZERO and NOT_PRESENT
    blocks of a differencing VHDX alike, through the sector bitmap, ignoring the entries'
    states: the chunk's bitmap at the bitmap entry's offset even when it is SB_BLOCK_NOT_PRESENT
    (offset 0: the file identifier's bytes become bits), and a set bit's sector at the payload
    entry's offset (0 again) plus the sector's place in the block.  README: known differences.
    This view applies exactly that to our own reading of each layer, so every byte is still
    compared."""
    import vhd
    from vhd.vhdx import VHDXDisk

    with vhd.open(chain[-1]) as disk:
        data = bytearray(disk.pread(disk.size, 0))
        odd: list[tuple[int, int]] = []  # (guest offset, bits) of ZERO / NOT_PRESENT blocks
        zero_blocks: list[int] = []
        if isinstance(disk, VHDXDisk) and disk.metadata.has_parent:
            bs, lss = disk.block_size, disk.logical_sector_size
            spb = bs // lss
            raw = Path(chain[-1]).read_bytes()
            for block in range(-(-disk.size // bs)):
                state = disk._entry(block) & r.STATE_MASK
                if state not in (r.PayloadState.ZERO, r.PayloadState.NOT_PRESENT):
                    continue
                if state == r.PayloadState.ZERO:
                    zero_blocks.append(block * bs)
                index, rel = disk._bitmap_location(block)
                base = disk.bat[index] & r.OFFSET_MASK
                bits = int.from_bytes(raw[base + rel : base + rel + spb // 8], "little")
                odd.append((block * bs, bits))
    if odd:
        parent, _ = libvhdi_view(chain[:-1])
        for start, bits in odd:
            end = min(start + bs, len(data))
            for sector in range((end - start) // lss):
                at = start + sector * lss
                if (bits >> sector) & 1:
                    piece = raw[sector * lss : (sector + 1) * lss]
                else:
                    piece = parent[at : at + lss]
                data[at : at + lss] = piece.ljust(lss, b"\0")
    return bytes(data), zero_blocks


def misplaced_model(
    bat: list[int], ratio: int, bs: int, regions: list[tuple[int, int, str]]
) -> tuple[int, int, str] | None:
    """vhd.vhdx.placement.first_misplaced one entry at a time: the lowest-numbered entry whose
    payload block (FULLY/PARTIALLY_PRESENT) or sector bitmap block (PRESENT) overlaps a region,
    the first region in ``regions`` order naming it."""
    best = None
    for start, end, name in regions:
        for i, e in enumerate(bat):
            off, state = e & r.OFFSET_MASK, e & r.STATE_MASK
            if i % (ratio + 1) == ratio:
                hit = state == 6 and off >= MiB and start < off + MiB and off < end
            else:
                hit = state in (6, 7) and off >= MiB and start < off + bs and off < end
            if hit:
                if best is None or i < best[0]:
                    best = (i, e, name)
                break
    return best
