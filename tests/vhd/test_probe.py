"""Foreign image formats are recognised and refused by name (not copied as raw disks), and the
output format follows the extension table: real images made by ``qemu-img create``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import vhd
from tests.conftest import need_tool
from vhd.probe import HEAD_BYTES, TAIL_BYTES, ImageFormat, output_format, probe

VHD_CLI = str(Path(sys.executable).with_name("vhd"))
MiB = 1 << 20

QEMU_FORMATS = [
    ("qcow2", [], ImageFormat.QCOW2, "qcow2"),
    ("qcow", [], ImageFormat.QCOW, "qcow"),
    ("vmdk", [], ImageFormat.VMDK, "VMDK"),
    ("vmdk", ["-o", "subformat=streamOptimized"], ImageFormat.VMDK, "VMDK"),
    ("vmdk", ["-o", "subformat=monolithicFlat"], ImageFormat.VMDK, "VMDK"),  # descriptor file
    ("vdi", [], ImageFormat.VDI, "VDI"),
    ("qed", [], ImageFormat.QED, "QED"),
    ("parallels", [], ImageFormat.PARALLELS, "Parallels"),
    (
        "luks",
        ["--object", "secret,id=s0,data=pw", "-o", "key-secret=s0,iter-time=10"],
        ImageFormat.LUKS,
        "LUKS",
    ),
]


def qemu_image(tmp: Path, fmt: str, options: list[str]) -> Path:
    path = tmp / f"in.{fmt}"
    for _ in range(5):
        proc = subprocess.run(
            [need_tool("qemu-img"), "create", "-q", "-f", fmt, *options, str(path), "4M"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # LUKS times its key derivation with the thread's CPU clock, which can read 0 ms on an
        # idle or a loaded machine ("Unable to get accurate CPU usage"): retry, then fall back.
        if "Unable to get accurate CPU usage" not in proc.stderr:
            break
    else:
        if fmt == "luks":
            path.write_bytes(luks1_header() + bytes(4 * MiB))
            return path
    assert proc.returncode == 0, proc.stderr
    return path


def luks1_header() -> bytes:
    """A LUKS1 header as cryptsetup's on-disk format document lays it out (magic, version,
    cipher, mode, hash, payload offset, key bytes, digest, salt, iterations, uuid; key slots
    disabled): used only when qemu-img cannot time its key derivation on this machine."""
    import struct

    header = b"LUKS\xba\xbe" + struct.pack(">H", 1)
    header += b"aes".ljust(32, b"\0") + b"xts-plain64".ljust(32, b"\0") + b"sha256".ljust(32, b"\0")
    header += struct.pack(">II", 4096, 64) + bytes(20) + bytes(32) + struct.pack(">I", 1000)
    header += b"00000000-0000-4000-8000-000000000000".ljust(40, b"\0")
    header += struct.pack(">IIII", 0x0000DEAD, 1000, 8, 4000) * 8
    return header.ljust(4096, b"\0")


def head_tail(path: Path) -> tuple[bytes, bytes]:
    data = path.read_bytes()
    return data[:HEAD_BYTES], data[-TAIL_BYTES:]


@pytest.mark.parametrize(("fmt", "options", "expected", "name"), QEMU_FORMATS)
def test_probe_and_cli_refusal(
    tmp_path: Path, fmt: str, options: list[str], expected: ImageFormat, name: str
) -> None:
    src = qemu_image(tmp_path, fmt, options)
    assert probe(*head_tail(src)) is expected
    with pytest.raises(vhd.ForeignFormatError, match=name):
        vhd.open(src)
    for args in (["convert", src, tmp_path / "out.vhd"], ["info", src], ["check", src]):
        proc = subprocess.run(
            [VHD_CLI, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 2, proc.stdout
        assert proc.stderr.count("\n") == 1 and name in proc.stderr, proc.stderr
        if expected is not ImageFormat.LUKS:
            assert f"qemu-img convert -f {expected.qemu}" in proc.stderr
    assert not (tmp_path / "out.vhd").exists()


def test_vhdx_is_probed_and_opened_not_refused(tmp_path: Path) -> None:
    # VHDX is read by vhd.vhdx since the vhdx branch: the probe still names it, vhd.open opens it.
    src = qemu_image(tmp_path, "vhdx", [])
    assert probe(*head_tail(src)) is ImageFormat.VHDX
    with vhd.open(src) as disk:
        assert type(disk).__name__ == "VHDXDisk" and disk.size == 4 * MiB


def test_compressed_and_dmg_and_raw(tmp_path: Path) -> None:
    import gzip

    assert probe(gzip.compress(b"x" * 1000)) is ImageFormat.GZIP
    assert probe(b"\xfd7zXZ\0" + bytes(100)) is ImageFormat.XZ
    assert probe(bytes(4096), b"koly" + bytes(508)) is ImageFormat.DMG
    assert probe(bytes(4096), bytes(512)) is ImageFormat.RAW
    assert probe(b"\xeb\x3c\x90mkfs.fat" + bytes(500)) is ImageFormat.RAW
    vdi = bytearray(512)
    vdi[:4] = b"<<< "
    vdi[0x40:0x44] = (0xBEDA107F).to_bytes(4, "little")
    assert probe(bytes(vdi)) is ImageFormat.VDI


def test_from_raw_overrides_the_probe(tmp_path: Path) -> None:
    src = qemu_image(tmp_path, "qcow2", [])
    out = tmp_path / "o.img"
    proc = subprocess.run(
        [VHD_CLI, "convert", "--from", "raw", str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    ("name", "to", "expected"),
    [
        ("o.vhd", None, "vhd"),
        ("O.VHD", None, "vhd"),
        ("o.img", None, "raw"),
        ("o.raw", None, "raw"),
        ("o.bin", None, "raw"),
        ("disk", None, "raw"),
        ("o.vhdx", "raw", "raw"),
        ("o.vhdx", None, "vhdx"),
        ("o.AVHDX", None, "vhdx"),
        ("o.data", "vhd", "vhd"),
    ],
)
def test_output_format(name: str, to: str | None, expected: str) -> None:
    assert output_format(name, to) == expected


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("o.qcow2", "qcow2"),
        ("o.vmdk", "VMDK"),
        ("o.foo", "unknown output extension"),
    ],
)
def test_output_extension_refused(tmp_path: Path, name: str, message: str) -> None:
    src = tmp_path / "s.raw"
    src.write_bytes(b"\1" * MiB)
    proc = subprocess.run(
        [VHD_CLI, "convert", str(src), str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / name).exists()
