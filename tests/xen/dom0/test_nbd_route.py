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

import time
from pathlib import Path

import vhd

from .xenlab import (
    RESULTS,
    VHD,
    Backend,
    Console,
    Disk,
    backend_nodes,
    domid,
    guest_config,
    md5_of,
    run,
    vhd_check,
    wait_console,
    wait_for,
    wait_gone,
    xs_read,
)

MiB = 1 << 20
# The lab's stand-in for /etc/xen/scripts/block: under TCG that bash script outruns libxl's
# hotplug timeout.  It does the part blkback needs: physical-device (hex major:minor) + status.
BLOCK_SCRIPT = """#!/bin/sh
[ "$1" = add ] || exit 0
dev=$(xenstore-read "$XENBUS_PATH/params")
set -- $(stat -L -c '%t %T' "$dev")
xenstore-write "$XENBUS_PATH/physical-device" "$1:$2"
xenstore-write "$XENBUS_PATH/hotplug-status" connected
"""


def test_nbd_route_to_kernel_blkback() -> None:
    """ext4 and the README's 8 MiB O_DIRECT dd over nbd-client -connections 4 -b 4096."""
    out = RESULTS / "test_nbd_route_to_kernel_blkback"
    script = Path("/etc/xen/scripts/vhdkit-lab-block")
    script.write_text(BLOCK_SCRIPT)
    script.chmod(0o755)
    image = Path("/tmp/nbd.vhd")
    vhd.create(str(image), 256 * MiB).close()
    for module in ("nbd", "xen-blkback"):
        run("modprobe", module)
    sock = "/tmp/vm1.sock"
    server = Backend(out, str(image), "--nbd", "--socket", sock, "--export-name", "vm1")
    wait_for("the NBD socket", lambda: Path(sock).exists())
    client = run(
        "nbd-client",
        "-unix",
        sock,
        "/dev/nbd0",
        "-N",
        "vm1",
        "-connections",
        "4",
        "-b",
        "4096",
        check=False,
    )
    assert client.returncode == 0, client.stdout + client.stderr
    try:
        disk = Disk("/dev/nbd0", "xvda", script=str(script))
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
    finally:
        run("nbd-client", "-d", "/dev/nbd0", check=False)
        time.sleep(1)
        server.stop()
        # Loaded, xen-blkback claims every backend/vbd device: a vhd serve --xen scenario run
        # after this one would find its disks taken.
        run("rmmod", "xen-blkback", check=False)
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
