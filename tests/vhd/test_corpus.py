"""The real Windows samples of the corpus through every maintenance command: check, resize,
compact, check --repair after damage; qemu-img reads the results."""

from __future__ import annotations

import gzip
from pathlib import Path

from tests.images import MiB
from tests.vhd.helpers import qemu_info, qemu_raw, read_image, run_cli
from vhd.check import azure_check, check


def unpack(corpus: Path, name: str, tmp: Path) -> Path:
    out = tmp / name[: -len(".gz")]
    out.write_bytes(gzip.decompress((corpus / name).read_bytes()))
    return out


def test_windows_dynamic_sample(corpus: Path, tmp_path: Path, require_tool: object) -> None:
    path = unpack(corpus, "dynamic.vhd.gz", tmp_path)
    content = read_image(path)
    assert check(path, deep=True).clean
    rc, out = run_cli("resize", str(path), "+10M")
    assert rc == 0, out
    grown = content + bytes(10 * MiB)
    assert read_image(path) == grown
    assert qemu_info(path)["virtual-size"] == len(grown)
    rc, out = run_cli("compact", str(path))
    assert rc == 0, out
    assert read_image(path) == grown
    assert check(path, deep=True).clean
    assert qemu_raw(path, tmp_path / "q.raw") == grown
    with open(path, "r+b") as f:  # damage: trailing footer zeroed
        f.seek(-512, 2)
        f.write(bytes(512))
    rc, out = run_cli("check", "--repair", str(path))
    assert rc == 0, out
    assert read_image(path) == grown


def test_windows_fixed_sample(corpus: Path, tmp_path: Path, require_tool: object) -> None:
    path = unpack(corpus, "fixed.vhd.gz", tmp_path)
    content = read_image(path)
    assert any("20 MiB" in p for p in azure_check(path))
    rc, out = run_cli("resize", str(path), "20M")
    assert rc == 0, out
    assert azure_check(path) == []
    want = content + bytes(20 * MiB - len(content))
    assert read_image(path) == want
    assert qemu_raw(path, tmp_path / "q.raw") == want
    assert check(path, deep=True).clean
