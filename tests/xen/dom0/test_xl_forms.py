"""Which xl disk forms can hand a PV guest's disk to ``vhd serve --xen`` in a dom0 that also runs
the kernel's xen-blkback (issue 13), answered by Xen 4.17's own xl on the real system.

libxl 4.17 writes a PV disk's backend under ``backend/vbd`` (phy: xen-blkback claims every
device there) or ``backend/qdisk`` (libxl then starts QEMU as that guest's qdisk backend, which
claims it); ``backendtype=standalone`` is for ``specification=virtio`` only.  So no xl.cfg form
keeps the two backends apart in one domain: beside xen-blkback, vhdkit's disks are attached with
``vhd xen attach`` on its own backend path (test_both_routes.py), or vhdkit serves from a domain
without xen-blkback.
"""

from __future__ import annotations

from pathlib import Path

import vhd

from .xenlab import Disk, guest_config, run, xs_ls

MiB = 1 << 20


def test_standalone_backendtype_is_refused_for_pv_disks() -> None:
    image = Path("/tmp/standalone.vhd")
    vhd.create(str(image), 8 * MiB).close()
    disk = Disk(str(image), "xvda", backendtype="standalone", script="")
    cfg = guest_config("gstand", "disks", [disk])
    out = run("xl", "create", cfg, check=False, timeout=300)
    assert out.returncode != 0, f"xl accepted backendtype=standalone for a PV disk:\n{out.stderr}"
    assert "no suitable backend for disk xvda" in out.stderr, out.stderr
    assert run("xl", "domid", "gstand", check=False).returncode != 0  # nothing left running
    assert xs_ls("/local/domain/0/backend") == [] or all(
        "/vbd/" not in n and "/qdisk/" not in n for n in xs_ls("/local/domain/0/backend")
    )
    (Path("/vhdlab") / "xl-standalone.txt").write_text(out.stdout + out.stderr)
