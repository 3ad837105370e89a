"""The same options behave the same on every command: ``-p/--progress`` and ``-q/--quiet`` on
each long-running one, ``--debug`` before or after the command, fractional sizes (``1.5G``),
``--block-size`` refused where there are no blocks, ``serve IMAGE --xen`` refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import vhd
from tests.images import vhd_image
from tests.strategies import payload

VHD_CLI = str(Path(sys.executable).with_name("vhd"))
MiB = 1 << 20


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VHD_CLI, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    # An all-zero block at 5 MiB, for compact.
    writes = [(0, payload(3 * MiB, 1)), (5 * MiB, bytes(MiB))]
    base = vhd_image(tmp_path / "base.vhd", 8 * MiB, block_size=512 * 1024, writes=writes)
    child = vhd_image(tmp_path / "child.vhd", parent=base, writes=[(MiB, payload(MiB, 2))])
    return {"base": base.path, "child": child.path, "dir": tmp_path}


def commands(images: dict[str, Path]) -> dict[str, list[str | Path]]:
    d = images["dir"]
    return {
        "convert": ["convert", images["base"], d / "out.vhd"],
        "compare": ["compare", images["base"], images["base"]],
        "check": ["check", "--deep", images["base"]],
        "compact": ["compact", images["base"]],
        "resize": ["resize", images["base"], "+4M"],
        "commit": ["commit", "--keep", images["child"]],
    }


@pytest.mark.parametrize("name", ["convert", "compare", "check", "compact", "resize", "commit"])
def test_progress_and_quiet_everywhere(images: dict[str, Path], name: str) -> None:
    args = commands(images)[name]
    quiet = run(*args, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == "", (quiet.stdout, quiet.stderr)
    (images["dir"] / "out.vhd").unlink(missing_ok=True)
    shown = run(*args, "--progress")  # stderr is a pipe here: shown only because asked
    assert shown.returncode == 0, shown.stderr
    assert "%" in shown.stderr, shown.stderr
    both = run(*args, "-p", "-q")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_debug_after_the_command(tmp_path: Path) -> None:
    for args in (
        ["--debug", "info", tmp_path / "no.vhd"],
        ["info", tmp_path / "no.vhd", "--debug"],
    ):
        proc = run(*args)
        assert proc.returncode == 2 and "Traceback" in proc.stderr, proc.stderr
    proc = run("info", tmp_path / "no.vhd")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_fractional_sizes(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    assert run("create", image, "1.5M").returncode == 0
    with vhd.open(image) as disk:
        assert disk.size == 1536 * 1024
    assert run("resize", image, "+0.5M").returncode == 0
    with vhd.open(image) as disk:
        assert disk.size == 2 * MiB
    bad = run("create", tmp_path / "e.vhd", "0.3K")
    assert bad.returncode == 2 and "whole number of bytes" in bad.stderr


def test_block_size_needs_blocks(tmp_path: Path) -> None:
    bad = run("create", tmp_path / "f.vhd", "1M", "--type", "fixed", "--block-size", "64K")
    assert bad.returncode == 2 and "--block-size" in bad.stderr
    assert not (tmp_path / "f.vhd").exists()
    src = tmp_path / "s.vhd"
    vhd.create(src, MiB).close()
    for extra in (["--type", "fixed"], ["--to", "raw"]):
        out = tmp_path / "o.vhd"
        bad = run("convert", src, out, "--block-size", "64K", *extra)
        assert bad.returncode == 2 and "--block-size" in bad.stderr, bad.stderr
        assert not out.exists()


def test_serve_xen_refuses_an_image(tmp_path: Path) -> None:
    image = tmp_path / "d.vhd"
    vhd.create(image, MiB).close()
    proc = run("serve", image, "--xen")
    assert proc.returncode == 2 and str(image) in proc.stderr and "--xen" in proc.stderr
