"""What the VHDX package itself imports to open, describe and map a disk (issue 11, speed: start-up
is most of a small VHDX command).  tests/tools/test_vhdx_imports.py checks whole commands; this
checks the library alone, so a CLI module that imports something itself does not hide it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vhd.vhdx import create_vhdx

_LOADED = """
import sys
before = set(sys.modules)
import vhd.vhdx
from vhd.vhdx.inspect import describe_vhdx
with vhd.vhdx.open_vhdx(sys.argv[1]) as disk:
    describe_vhdx(disk)
    list(disk.extents(0, disk.size)) if {map_it} else None
print(" ".join(sorted(set(sys.modules) - before)))
"""

# uuid (platform behind it): GUIDs are vhd.guid's; typing: annotations only; vhd.vhdx.ops: the
# maintenance operations and a differencing child's locator; bisect: only mapping present blocks.
_NOT_FOR_OPEN_AND_DESCRIBE = {"uuid", "platform", "typing", "vhd.vhdx.ops", "bisect"}


def _loaded(image: Path, *, map_it: bool) -> set[str]:
    run = subprocess.run(
        [sys.executable, "-c", _LOADED.format(map_it=map_it), str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


def test_open_and_describe_import_only_what_they_use(tmp_path: Path) -> None:
    image = tmp_path / "a.vhdx"
    with create_vhdx(image, 8 << 20, block_size=1 << 20, type="fixed") as disk:
        disk.pwrite(b"\x5a" * 4096, 1 << 20)
    loaded = _loaded(image, map_it=False)
    assert "vhd.vhdx.inspect" in loaded
    assert not loaded & _NOT_FOR_OPEN_AND_DESCRIBE, sorted(loaded & _NOT_FOR_OPEN_AND_DESCRIBE)
    # mapping a fixed disk's present blocks does use bisect, and still none of the others
    loaded = _loaded(image, map_it=True)
    assert "bisect" in loaded
    assert not loaded & (_NOT_FOR_OPEN_AND_DESCRIBE - {"bisect"})
