"""VHDX through the front doors: ``vhd.open`` probes it by content, ``vhd create --format
vhdx``, ``vhd convert`` between raw, VHD and VHDX (qemu-img compare is the oracle), ``--version``
says which CRC-32C implementation runs."""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest
from vhdtools.cli import main as cli_main

import vhd
from tests.vhd.helpers import run_cli
from tests.vhd.vhdx.helpers import MiB, assert_qemu_clean, run, unpack_corpus
from vhd.vhdx import VHDXDisk, create_vhdx, open_vhdx


def test_version_names_the_crc_implementation() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["--version"])
    assert "CRC-32C: crcmod C extension" in out.getvalue()


@pytest.mark.corpus
def test_vhd_open_probes_vhdx_by_content(corpus: Path, tmp_path: Path) -> None:
    image = unpack_corpus(corpus, "dynamic.vhdx", tmp_path)
    renamed = tmp_path / "disk.img"  # the name says nothing
    image.rename(renamed)
    with vhd.open(renamed) as disk:
        assert isinstance(disk, VHDXDisk) and disk.size == 10 * MiB


def test_create_dynamic_fixed_differencing_4k(tmp_path: Path) -> None:
    dyn = tmp_path / "d.vhdx"
    rc, out = run_cli("create", str(dyn), "64M")
    assert rc == 0, out
    with open_vhdx(dyn) as disk:
        assert disk.type is vhd.DiskType.DYNAMIC and disk.block_size == 32 * MiB
        assert disk.current_header.log_length == MiB and disk.current_header.log_offset == MiB
        assert disk.layout.bat_region.file_offset % MiB == 0
    assert_qemu_clean(dyn)
    fixed = tmp_path / "f.img"
    rc, out = run_cli("create", "--format", "vhdx", "--type", "fixed", str(fixed), "8M")
    assert rc == 0, out
    assert_qemu_clean(fixed)
    k4 = tmp_path / "k.vhdx"
    assert run_cli("create", "--logical-sector-size", "4096", str(k4), "8M")[0] == 0
    with open_vhdx(k4) as disk:
        assert disk.logical_sector_size == 4096
    child = tmp_path / "c.avhdx"
    rc, out = run_cli("create", str(child), "--parent", str(dyn))
    assert rc == 0 and "differencing" in out, out
    with vhd.open(child) as disk:
        assert disk.parent is not None and disk.parent.path == str(dyn)
    rc, out = run_cli(
        "create", "--format", "vhd", "--logical-sector-size", "4096", str(tmp_path / "x.vhd"), "8M"
    )
    assert rc == 2 and "VHDX" in out


def test_convert_raw_vhd_vhdx_round_trip(tmp_path: Path) -> None:
    rng = random.Random(4)
    raw = tmp_path / "src.raw"
    with raw.open("wb") as f:
        f.truncate(40 * MiB)
        for _ in range(20):
            f.seek(rng.randrange(0, 40 * MiB - 70000))
            f.write(rng.randbytes(rng.randrange(1, 70000)))
    vhdx = tmp_path / "a.vhdx"
    assert run_cli("convert", str(raw), str(vhdx))[0] == 0
    assert_qemu_clean(vhdx)
    proc = run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(vhdx), str(raw))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    as_vhd = tmp_path / "b.vhd"
    assert run_cli("convert", str(vhdx), str(as_vhd))[0] == 0
    proc = run("qemu-img", "compare", "-f", "vpc", "-F", "raw", str(as_vhd), str(raw))
    assert proc.returncode == 0, proc.stdout
    back = tmp_path / "c.vhdx"
    assert run_cli("convert", "--to", "vhdx", "--type", "fixed", str(as_vhd), str(back))[0] == 0
    proc = run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(back), str(raw))
    assert proc.returncode == 0, proc.stdout
    azure = tmp_path / "azure.vhd"
    rc, out = run_cli("convert", "--azure", str(vhdx), str(azure))
    assert rc == 0 and "azure: OK" in out, out


@pytest.mark.parametrize("maker", ["qemu", "vhdkit"])
def test_convert_and_compare_a_fixed_vhdx(tmp_path: Path, maker: str) -> None:
    """A fixed VHDX is not raw data before a footer (as a fixed VHD is): its blocks lie after
    the headers, log, metadata and BAT.  Converting one copied the file's own data ranges."""
    image = tmp_path / "f.vhdx"
    if maker == "qemu":
        proc = run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=fixed,block_size=1M",
                   str(image), "16M")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        proc = run("qemu-io", "-f", "vhdx", "-c", "write -P 0x11 0 1M", "-c",
                   "write -P 0x22 5100k 100k", str(image))  # fmt: skip
        assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout
    else:
        with create_vhdx(image, 16 * MiB, type="fixed", block_size=MiB) as disk:
            disk.pwrite(b"\x11" * MiB, 0)
            disk.pwrite(b"\x22" * 100 * 1024, 5100 * 1024)
    want = bytearray(16 * MiB)
    want[:MiB] = b"\x11" * MiB
    want[5100 * 1024 : 5200 * 1024] = b"\x22" * 100 * 1024
    out = tmp_path / "out.raw"
    rc, text = run_cli("convert", "--to", "raw", str(image), str(out))
    assert rc == 0, text
    assert out.read_bytes() == want
    raw = tmp_path / "want.raw"
    raw.write_bytes(want)
    rc, text = run_cli("compare", str(image), str(raw))
    assert rc == 0, text
    proc = run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", str(image), str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_vhdx_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(b"vhdxfile" + bytes(400 * 1024))
    rc, out = run_cli("convert", str(bad), str(tmp_path / "o.raw"))
    assert rc == 2 and "Traceback" not in out and len(out.strip().splitlines()) == 1, out


def test_map_and_compare_on_a_vhdx_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    with create_vhdx(base, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"\x01" * MiB, 0)
    child = tmp_path / "c.avhdx"
    with create_vhdx(child, 0, type="differencing", parent=open_vhdx(base), block_size=MiB) as d:
        d.pwrite(b"\x02" * 4096, 8192)
    rc, out = run_cli("map", "--json", str(child))
    assert rc == 0, out
    layers = [(e["offset"], e["length"], e["layer"]) for e in json.loads(out)]
    assert layers[:3] == [(0, 8192, 1), (8192, 4096, 0), (12288, MiB - 12288, 1)]
    flat = tmp_path / "flat.raw"
    assert run_cli("convert", str(child), str(flat))[0] == 0
    assert run_cli("compare", str(child), str(flat))[0] == 0
    assert run_cli("compare", str(child), str(base))[0] == 1
