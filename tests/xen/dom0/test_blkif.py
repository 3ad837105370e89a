"""``vhd serve --xen`` on real Xen: a Linux PV guest gets every disk of its xl config from it.

Runs inside the lab's dom0 (tests/xen/lab.py); the guest side is tests/xen/guest/disks.sh.

In the run.  What it asserts: all five disks connect from one backend
process; blkfront reports flush diskcache and indirect descriptors enabled (the read-only disk:
no flush offered) and uses the 4 queues offered; ro=1 on the read-only disk and its writes fail;
odd O_DIRECT writes to the differencing child and the fixed disk read back in the guest and match
the image read by our library; the parent shows through the child and is unchanged;
``blkdiscard`` reaches ``Disk.discard`` (the two whole blocks are deallocated in the image --
blkif's DISCARD promises the guest no zeros, so the guest's read-back is only reported);
mkfs.ext4/mount/remount; ``vhd check`` and ``e2fsck -fn`` clean afterwards.

Seen on the lab: the guest's side passed whole twice (once before the blockback split, once
after); the host's checks passed on the final code of 2026-11-30, where the guest also read the
discarded range back as zeros (an earlier run read non-zero data there, on code before discard
became a TRIM: the host-side deallocation check is the one that decides).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import vhd

from .xenlab import (
    RESULTS,
    VHD,
    Backend,
    Console,
    Disk,
    Soft,
    guest_config,
    install_noop_script,
    md5_of,
    run,
    sha256_file,
    vhd_check,
    wait_console,
    wait_gone,
    xl_create,
)

MiB = 1 << 20


def make_images(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    images = {
        "dynamic": root / "dynamic.vhd",
        "parent": root / "parent.vhd",
        "child": root / "child.vhd",
        "fixed": root / "fixed.vhd",
        "ro": root / "ro.vhd",
        "discard": root / "discard.vhd",
    }
    vhd.create(str(images["dynamic"]), 64 * MiB).close()
    with vhd.create(str(images["parent"]), 32 * MiB) as parent:
        parent.pwrite(os.urandom(MiB), 0)
        parent.flush()
    vhd.create(str(images["child"]), parent=str(images["parent"])).close()
    vhd.create(str(images["fixed"]), 16 * MiB, type="fixed").close()
    with vhd.create(str(images["ro"]), 8 * MiB) as ro:
        ro.pwrite(os.urandom(MiB), 0)
        ro.flush()
    vhd.create(str(images["discard"]), 32 * MiB).close()
    return images


def test_guest_disks() -> None:
    """Dynamic, differencing, fixed, read-only and discard disks, all from one backend: odd
    O_DIRECT I/O checked against the image, ext4 across a remount, blkfront's features."""
    install_noop_script()
    out = RESULTS / "test_guest_disks"
    images = make_images(Path("/tmp/disks"))
    parent_before = sha256_file(images["parent"])
    backend = Backend(out, "--xen")
    disks = [
        Disk(str(images["dynamic"]), "xvda"),
        Disk(str(images["child"]), "xvdb"),
        Disk(str(images["fixed"]), "xvdc"),
        Disk(str(images["ro"]), "xvdd", access="ro"),
        Disk(str(images["discard"]), "xvde"),
    ]
    # 4 vCPUs: blkfront then uses as many queues as the backend offers (4).
    xl_create(guest_config("disks", "disks", disks, vcpus=4))
    text = wait_console("disks", "VHDTEST END")
    (out / "console.log").write_text(text)
    console = Console.parse(text)
    wait_gone("disks")
    assert backend.alive(), backend.text()
    assert backend.stop() == 0, backend.text()

    soft = Soft()
    with soft.check("guest checks"):
        console.assert_clean(
            *(f"{d} present" for d in ("xvda", "xvdb", "xvdc", "xvdd", "xvde")),
            "xvdd write refused",
            "blkdiscard xvde",
            "mkfs.ext4 xvda",
            "mount xvda",
            "remount xvda",
            "ext4 file survives remount",
        )
    # What blkfront reported at connect, for every disk.
    for dev in ("xvda", "xvdb", "xvdc", "xvdd", "xvde"):
        with soft.check(f"blkfront features of {dev}"):
            line = next(
                (ln for ln in text.splitlines() if f"blkfront: {dev}:" in ln and "indirect" in ln),
                "",
            )
            if dev != "xvdd":  # read-only: nothing to flush, the backend offers no flush
                assert "flush diskcache: enabled" in line, line
            assert "indirect descriptors: enabled" in line, line
            assert console.info[f"mq_{dev}"] == "4", f"{console.info[f'mq_{dev}']} queues"
    with soft.check("read-only flag in the guest"):
        assert console.info["ro_xvdd"] == "1" and console.info["ro_xvda"] == "0"

    # Every odd-sized O_DIRECT write landed where the guest put it (read back by our library).
    odd = [(k, v) for k, v in console.info.items() if re.fullmatch(r"md5_xvd[bc]_\d+_\d+", k)]
    with soft.check("odd I/O reported"):
        assert len(odd) == 8, console.info
    for key, md5 in odd:
        _, dev, sector, count = key.split("_")
        image = images["child" if dev == "xvdb" else "fixed"]
        with soft.check(f"odd I/O {key} in the image"):
            assert md5_of(image, int(sector) * 512, int(count) * 512) == md5
    # Differencing: the parent's data showed through, writes went to the child only.
    with soft.check("parent visible through the child"), vhd.open(str(images["parent"])) as p:
        assert console.info["parent_md5_xvdb"] == hashlib.md5(p.pread(MiB, 0)).hexdigest()
    with soft.check("parent unchanged"):
        assert sha256_file(images["parent"]) == parent_before
    with soft.check("read-only disk content"):
        assert console.info["md5_xvdd"] == md5_of(images["ro"], 0, MiB)
    # Discard reached Disk.discard: the two whole blocks are deallocated, the rest kept.
    with soft.check("discard deallocated the blocks"), vhd.open(str(images["discard"])) as disk:
        layers = [(e.offset, e.length, e.layer) for e in disk.extents(8 * MiB, 4 * MiB)]
        assert {e[2] for e in layers} == {None}, f"extents {layers}"
    with soft.check("discarded range reads zeros in the image"):
        assert (
            md5_of(images["discard"], 8 * MiB, 4 * MiB) == hashlib.md5(bytes(4 * MiB)).hexdigest()
        )
    with soft.check("data next to the discarded range kept"):
        assert md5_of(images["discard"], 16 * MiB, MiB) == console.info["md5_xvde_keep"]

    # Every image checks clean; the ext4 filesystem too (read through a raw conversion).
    for name, image in images.items():
        with soft.check(f"vhd check {name}"):
            vhd_check(image)
    raw = Path("/tmp/disks/dynamic.raw")
    run(*VHD, "convert", "--to", "raw", images["dynamic"], raw)
    with soft.check("e2fsck -fn"):
        fsck = run("e2fsck", "-fn", raw, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    soft.verify()
