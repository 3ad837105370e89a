"""Both routes in one dom0 at once (issue 13): the kernel's xen-blkback serves ``phy:/dev/nbd0``
(the NBD route, backend/vbd) while ``vhd serve --xen --backend-dir .../backend/vhd`` serves a VHD
attached with ``vhd xen attach`` (vhdkit's own backend path, blockback/attach.py) -- to one guest.

Runs inside the lab's dom0; the guest runs tests/xen/guest/both.sh (and idle.sh for the
``--attach NAME:IMAGE:VDEV`` scenario: the disk follows a guest re-created with a new domid).  The guest is created paused
(``xl create -p``), given its vhdkit disk, then unpaused (README "Xen: serving guests from
dom0"); later its vhdkit disk is detached while it runs and another is hot-plugged.  Checked
afterwards: what the guest wrote is in both images (md5 through our library), ``vhd check`` and
``e2fsck`` clean, and no node left under backend/vbd or backend/vhd once the guest is gone.
"""

from __future__ import annotations

from pathlib import Path

import vhd

from .xenlab import (
    RESULTS,
    VHD,
    Backend,
    Console,
    backend_nodes,
    console_log,
    domid,
    guest_config,
    md5_of,
    nbd_route,
    open_files,
    run,
    vhd_check,
    wait_console,
    wait_for,
    wait_gone,
    xl,
    xl_create,
    xs_read,
)

MiB = 1 << 20
OWN = "/local/domain/0/backend/vhd"


def vhd_xen(*args: str | Path) -> str:
    out = run(*VHD, "xen", *args, check=False)
    assert out.returncode == 0, f"vhd xen {' '.join(map(str, args))}: {out.stdout}{out.stderr}"
    return out.stdout


def test_both_routes_to_one_guest() -> None:
    out = RESULTS / "test_both_routes_to_one_guest"
    root = Path("/tmp/both")
    root.mkdir(parents=True, exist_ok=True)
    images = {"nbd": root / "nbd.vhd", "own": root / "own.vhd", "hot": root / "hot.vhd"}
    for name, image in images.items():
        vhd.create(str(image), (32 if name == "hot" else 256) * MiB).close()
    with nbd_route(out / "nbd", images["nbd"], "both") as disk:
        xen = Backend(out / "xen", "--xen", "--backend-dir", OWN)
        try:
            cfg = guest_config("gboth", "both", [disk])
            xl("create", "-p", cfg)
            fe = domid("gboth")
            vhd_xen("attach", "gboth", images["own"], "--vdev", "xvdb")
            xl("unpause", "gboth")
            wait_console("gboth", "VHDTEST DETACH-ME")
            # Both backends served the one guest: blkback's physical device, ours Connected.
            assert xs_read(f"/local/domain/0/backend/vbd/{fe}/51712/physical-device") == "2b:0"
            assert xs_read(f"/local/domain/0/backend/vbd/{fe}/51712/state") == "4"
            assert xs_read(f"{OWN}/{fe}/51728/state") == "4"
            (out / "xen-list.txt").write_text(vhd_xen("list", "--backend-dir", OWN))

            # Detach the vhdkit disk from the running guest, then hot-plug another.
            vhd_xen("detach", "gboth", "xvdb", "--timeout", "300")
            assert backend_nodes(fe, "vhd") == []
            assert xs_read(f"/local/domain/{fe}/device/vbd/51728") is None
            wait_for("own.vhd closed", lambda: str(images["own"]) not in open_files(xen.proc.pid))
            vhd_xen("attach", str(fe), images["hot"], "--vdev", "xvdc")

            text = wait_console("gboth", "VHDTEST END")
            (out / "console.log").write_text(text)
            wait_gone("gboth")  # it powers off; on_poweroff=destroy
            wait_for("blkback's nodes removed", lambda: backend_nodes(fe, "vbd") == [], 300)
            wait_for("vhdkit's nodes removed", lambda: backend_nodes(fe, "vhd") == [], 300)
            wait_for("hot.vhd closed", lambda: str(images["hot"]) not in open_files(xen.proc.pid))
            assert xs_read(f"/local/domain/{fe}") is None
        finally:
            xen_status = xen.stop()
    assert xen_status == 0 and "Traceback" not in xen.text(), xen.text()
    console = Console.parse(text)
    console.assert_clean(
        "xvda present",
        "xvdb present",
        "xvda 8 MiB at 100 MiB reads back",
        "xvdb 8 MiB at 100 MiB reads back",
        "odd io xvdb 200007+13",
        "mkfs.ext4 xvdb",
        "remount xvdb",
        "ext4 file survives remount",
        "xvdb detached",
        "xvdc hot-plugged",
        "odd io xvdc 4095+3",
        "odd io xvda 9+5",
    )
    for dev in ("xvda", "xvdb"):
        line = next(
            (ln for ln in text.splitlines() if f"blkfront: {dev}:" in ln and "flush" in ln), ""
        )
        assert "flush diskcache: enabled" in line, line
    # What the guest wrote is in the images, read by our library; every image checks clean.
    info = console.info
    assert md5_of(images["nbd"], 100 * MiB, 8 * MiB) == info["md5_dd_xvda"]
    assert md5_of(images["nbd"], 9 * 512, 5 * 512) == info["md5_xvda_9_5"]
    assert md5_of(images["own"], 100 * MiB, 8 * MiB) == info["md5_dd_xvdb"]
    assert md5_of(images["own"], 200007 * 512, 13 * 512) == info["md5_xvdb_200007_13"]
    assert md5_of(images["hot"], 4095 * 512, 3 * 512) == info["md5_xvdc_4095_3"]
    for image in images.values():
        vhd_check(image)
    raw = root / "own.raw"
    run(*VHD, "convert", "--to", "raw", images["own"], raw)
    fsck = run("e2fsck", "-fn", raw, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_attach_by_name_follows_a_recreated_guest() -> None:
    """``vhd serve --xen --attach gre:IMAGE:xvda``: the guest (no disk in its xl.cfg) gets xvda
    when it is created, ``xl destroy`` of it running leaves no node under backend/vhd, and the
    same guest created again (a new domid, as after a reboot) gets the disk again."""
    out = RESULTS / "test_attach_by_name_follows_a_recreated_guest"
    image = Path("/tmp/gre.vhd")
    vhd.create(str(image), 32 * MiB).close()
    xen = Backend(out, "--xen", "--backend-dir", OWN, "--attach", f"gre:{image}:xvda")
    md5s, domids = [], []
    for boot in (1, 2):
        xl_create(guest_config("gre", "idle", []))
        fe = domid("gre")
        text = wait_console("gre", "VHDTEST READY")
        (out / f"console-{boot}.log").write_text(text)
        Console.parse(text).assert_clean("xvda present", "odd io xvda 7+13")
        md5s.append(Console.parse(text).info["md5_xvda_7_13"])
        domids.append(fe)
        assert xs_read(f"{OWN}/{fe}/51712/state") == "4"
        xl("destroy", "gre")
        wait_gone("gre")
        console_log("gre").unlink()  # the next domain named gre logs to the same file
        wait_for("vhdkit's nodes removed", lambda fe=fe: backend_nodes(fe, "vhd") == [], 300)
        wait_for("gre.vhd closed", lambda: str(image) not in open_files(xen.proc.pid))
    assert domids[0] != domids[1]
    assert xen.stop() == 0 and "Traceback" not in xen.text(), xen.text()
    assert xen.text().count(f"attached {image} to xvda") == 2, xen.text()
    vhd_check(image)
    assert md5_of(image, 7 * 512, 13 * 512) == md5s[1]
