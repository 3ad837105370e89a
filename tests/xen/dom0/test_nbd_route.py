"""The NBD route on real Xen: ``vhd serve --nbd`` attached with nbd-client as /dev/nbd0, given to a
PV guest as ``phy:/dev/nbd0`` through the kernel's own xen-blkback (README "NBD export").

Runs inside the lab's dom0; the guest runs tests/xen/guest/nbd.sh.  xen-blkback claims every
backend/vbd device while loaded, so the test unloads it again when done.

In the run.  It was out of it for a while: the `vhd serve --nbd` process in dom0 aborted with
glibc's "malloc(): corrupted top size" about 40 s into the guest's 8 MiB O_DIRECT dd.  That was the
platform, not the server: under QEMU's ``-cpu max`` Debian's own xl, ld.so and static busybox
died of corrupted memory in the same dom0 (test_boot.py says what was seen; the lab now runs a
plain x86-64 model).  The server's side was audited too: its only ctypes call is fallocate, with
declared argument types; every buffer it fills (the mmap receive buffer, the shared reply arenas,
write payloads, ``preadv`` targets) is a bounds-checked memoryview.  Seen passing on the lab twice
with the lab's CPU model (and once with ``-cpu max,-svm`` before the model changed).
"""

from __future__ import annotations

from pathlib import Path

import vhd

from .xenlab import (
    RESULTS,
    VHD,
    Console,
    backend_nodes,
    domid,
    guest_config,
    md5_of,
    nbd_route,
    run,
    vhd_check,
    wait_console,
    wait_for,
    wait_gone,
    xs_read,
)

MiB = 1 << 20


def test_nbd_route_to_kernel_blkback() -> None:
    """ext4 and the README's 8 MiB O_DIRECT dd over nbd-client -connections 4 -b 4096."""
    out = RESULTS / "test_nbd_route_to_kernel_blkback"
    image = Path("/tmp/nbd.vhd")
    vhd.create(str(image), 256 * MiB).close()
    with nbd_route(out, image, "vm1") as disk:
        run_guest = guest_config("gnbd", "nbd", [disk], vcpus=2)
        out_create = run("xl", "create", run_guest, check=False, timeout=900)
        assert out_create.returncode == 0, out_create.stdout + out_create.stderr
        fe = domid("gnbd")
        assert xs_read(f"/local/domain/0/backend/vbd/{fe}/51712/physical-device") == "2b:0"
        text = wait_console("gnbd", "VHDTEST END")
        (out / "console.log").write_text(text)
        console = Console.parse(text)
        wait_gone("gnbd")
        wait_for("blkback's nodes removed", lambda: backend_nodes(fe) == [])
    console.assert_clean(
        "xvda present",
        "8 MiB dd at 100 MiB reads back (no filesystem mounted)",
        "mkfs.ext4 xvda",
        "mount xvda",
        "remount xvda",
        "ext4 file survives remount",
    )
    line = next((ln for ln in text.splitlines() if "blkfront: xvda:" in ln and "flush" in ln), "")
    assert "flush diskcache: enabled" in line, line
    # The image holds what the guest wrote, and checks clean.
    assert md5_of(image, 100 * MiB, 8 * MiB) == console.info["md5_dd"]
    vhd_check(image)
    raw = Path("/tmp/nbd.raw")
    run(*VHD, "convert", "--to", "raw", image, raw)
    fsck = run("e2fsck", "-fn", raw, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
