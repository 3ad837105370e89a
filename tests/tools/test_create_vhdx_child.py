"""``vhd create CHILD.vhdx --parent P --logical-sector-size N``: a child has its parent's
logical sector size (README, VHDX: a parent whose sector size differs from its child's is
refused), so an N that differs is refused, not dropped in silence."""

from __future__ import annotations

from pathlib import Path

from tests.vhd.helpers import run_cli
from tests.vhd.vhdx.helpers import MiB
from vhd.vhdx import create_vhdx, open_vhdx


def test_a_child_sector_size_other_than_the_parents_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "k.vhdx"
    create_vhdx(parent, 8 * MiB, logical_sector_size=4096).close()
    child = tmp_path / "c.vhdx"
    rc, out = run_cli("create", str(child), "--parent", str(parent), "--logical-sector-size", "512")
    assert rc == 2 and "4096" in out and out.count("\n") == 1, out
    assert not child.exists()
    # the parent's own size, given or not, is fine
    for extra in (["--logical-sector-size", "4096"], []):
        rc, out = run_cli("create", str(child), "--parent", str(parent), "--force", *extra)
        assert rc == 0, out
        with open_vhdx(child, parent_dirs=[str(tmp_path)]) as disk:
            assert disk.logical_sector_size == 4096
