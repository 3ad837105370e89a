"""``vhd serve --xen`` on real Xen: a Linux PV guest gets every disk of its xl config from it.

Runs inside the lab's dom0 (tests/xen/lab.py); the guest side is tests/xen/guest/disks.sh, and
tests/xen/guest/vhdx.sh for the VHDX scenario (issue 11: serve --xen works on VHDX, chains
included), which runs disks.sh's checks on VHDX disks and then a 4K-native VHDX: the backend
advertises ``sector-size`` 4096 (docs/blkif.md §2), blkfront makes it the guest's logical block
size, whole-sector O_DIRECT I/O and ext4 (mkfs, fsck in the guest) work on it.  Its images are
checked with oracles no one here wrote: ``qemu-img check``/``convert``/``compare`` for the
512-byte single-file VHDX, libvhdi for the chains (.avhdx over VHDX, VHD over VHDX) and the 4K
disk, which qemu-img refuses.

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
from collections.abc import Callable
from pathlib import Path

import vhd
from tests.interop.oracles import libvhdi_read
from vhd.vhdx import create_vhdx

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


# Devices of the disks scenario (tests/xen/guest/disks.sh): xvda ext4, xvdb and xvdc odd O_DIRECT
# I/O (xvdb a differencing child), xvdd read-only, xvde discard.
DEVICES = ("xvda", "xvdb", "xvdc", "xvdd", "xvde")
# Reads guest bytes [offset, offset+length) of the image named KEY and returns their MD5.
Md5 = Callable[[str, int, int], str]


def serve_guest(out: Path, scenario: str, disks: list[Disk]) -> tuple[str, Console]:
    """Boot a guest running SCENARIO with DISKS, all from one ``vhd serve --xen``, until it is
    done; the backend must have survived it and exit 0 on SIGTERM."""
    install_noop_script()
    backend = Backend(out, "--xen")
    # 4 vCPUs: blkfront then uses as many queues as the backend offers (4).
    xl_create(guest_config(scenario, scenario, disks, vcpus=4))
    text = wait_console(scenario, "VHDTEST END")
    (out / "console.log").write_text(text)
    wait_gone(scenario)
    assert backend.alive(), backend.text()
    assert backend.stop() == 0, backend.text()
    return text, Console.parse(text)


def disks_checks(
    soft: Soft, text: str, console: Console, odd: dict[str, str], md5: Md5, discard: Path
) -> None:
    """What disks.sh did, checked: its markers, blkfront's features, and every guest write found in
    the images.  ODD maps xvdb/xvdc to the image key their odd I/O landed in; MD5 reads images."""
    with soft.check("guest checks"):
        console.assert_clean(
            *(f"{d} present" for d in DEVICES),
            "xvdd write refused",
            "blkdiscard xvde",
            "mkfs.ext4 xvda",
            "mount xvda",
            "remount xvda",
            "ext4 file survives remount",
        )
    # What blkfront reported at connect, for every disk.
    for dev in DEVICES:
        with soft.check(f"blkfront features of {dev}"):
            blkfront_features(text, console, dev, flush=dev != "xvdd")
    with soft.check("read-only flag in the guest"):
        assert console.info["ro_xvdd"] == "1" and console.info["ro_xvda"] == "0"

    # Every odd-sized O_DIRECT write landed where the guest put it.
    writes = [(k, v) for k, v in console.info.items() if re.fullmatch(r"md5_xvd[bc]_\d+_\d+", k)]
    with soft.check("odd I/O reported"):
        assert len(writes) == 8, console.info
    for key, want in writes:
        _, dev, sector, count = key.split("_")
        with soft.check(f"odd I/O {key} in the image"):
            assert md5(odd[dev], int(sector) * 512, int(count) * 512) == want
    with soft.check("read-only disk content"):
        assert console.info["md5_xvdd"] == md5("ro", 0, MiB)
    # Discard reached Disk.discard: the two whole blocks are deallocated, the rest kept.
    with soft.check("discard deallocated the blocks"), vhd.open(str(discard)) as disk:
        layers = [(e.offset, e.length, e.layer) for e in disk.extents(8 * MiB, 4 * MiB)]
        assert {e[2] for e in layers} == {None}, f"extents {layers}"
    with soft.check("discarded range reads zeros in the image"):
        assert md5("discard", 8 * MiB, 4 * MiB) == hashlib.md5(bytes(4 * MiB)).hexdigest()
    with soft.check("data next to the discarded range kept"):
        assert md5("discard", 16 * MiB, MiB) == console.info["md5_xvde_keep"]


def blkfront_features(text: str, console: Console, dev: str, *, flush: bool) -> None:
    line = next(
        (ln for ln in text.splitlines() if f"blkfront: {dev}:" in ln and "indirect" in ln), ""
    )
    if flush:  # a read-only disk has nothing to flush: the backend offers no flush
        assert "flush diskcache: enabled" in line, line
    assert "indirect descriptors: enabled" in line, line
    assert console.info[f"mq_{dev}"] == "4", f"{console.info[f'mq_{dev}']} queues"


def e2fsck_clean(raw: Path) -> None:
    fsck = run("e2fsck", "-fn", raw, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_guest_disks() -> None:
    """Dynamic, differencing, fixed, read-only and discard disks, all from one backend: odd
    O_DIRECT I/O checked against the image, ext4 across a remount, blkfront's features."""
    out = RESULTS / "test_guest_disks"
    images = make_images(Path("/tmp/disks"))
    parent_before = sha256_file(images["parent"])
    disks = [
        Disk(str(images["dynamic"]), "xvda"),
        Disk(str(images["child"]), "xvdb"),
        Disk(str(images["fixed"]), "xvdc"),
        Disk(str(images["ro"]), "xvdd", access="ro"),
        Disk(str(images["discard"]), "xvde"),
    ]
    text, console = serve_guest(out, "disks", disks)

    soft = Soft()

    def md5(key: str, offset: int, length: int) -> str:
        return md5_of(images[key], offset, length)

    disks_checks(soft, text, console, {"xvdb": "child", "xvdc": "fixed"}, md5, images["discard"])
    # Differencing: the parent's data showed through, writes went to the child only.
    with soft.check("parent visible through the child"):
        assert console.info["parent_md5_xvdb"] == md5("parent", 0, MiB)
    with soft.check("parent unchanged"):
        assert sha256_file(images["parent"]) == parent_before

    # Every image checks clean; the ext4 filesystem too (read through a raw conversion).
    for name, image in images.items():
        with soft.check(f"vhd check {name}"):
            vhd_check(image)
    raw = Path("/tmp/disks/dynamic.raw")
    run(*VHD, "convert", "--to", "raw", images["dynamic"], raw)
    with soft.check("e2fsck -fn"):
        e2fsck_clean(raw)
    soft.verify()


# -- VHDX ----------------------------------------------------------------------------------------


def make_vhdx_images(root: Path) -> dict[str, Path]:
    """The VHDX scenario's images: disks.sh's roles in VHDX (xvdc: a VHD child of the VHDX parent),
    2 MiB blocks where the guest's I/O straddles blocks or discards two whole ones, and k4, a
    4K-native VHDX."""
    root.mkdir(parents=True, exist_ok=True)
    images = {
        "dynamic": root / "dynamic.vhdx",
        "parent": root / "parent.vhdx",
        "child": root / "child.avhdx",
        "vhdchild": root / "vhdchild.vhd",
        "ro": root / "ro.vhdx",
        "discard": root / "discard.vhdx",
        "k4": root / "k4.vhdx",
    }
    create_vhdx(images["dynamic"], 64 * MiB).close()  # Hyper-V's 32 MiB blocks
    with create_vhdx(images["parent"], 32 * MiB, block_size=2 * MiB) as parent:
        parent.pwrite(os.urandom(MiB), 0)
        parent.flush()
        create_vhdx(
            images["child"], 0, type="differencing", block_size=2 * MiB, parent=parent
        ).close()
    vhd.create(str(images["vhdchild"]), parent=str(images["parent"])).close()
    with create_vhdx(images["ro"], 8 * MiB) as ro:
        ro.pwrite(os.urandom(MiB), 0)
        ro.flush()
    create_vhdx(images["discard"], 32 * MiB, block_size=2 * MiB).close()
    create_vhdx(images["k4"], 64 * MiB, block_size=2 * MiB, logical_sector_size=4096).close()
    return images


def oracle_raws(images: dict[str, Path], root: Path) -> dict[str, Path]:
    """Every image as a reader no one here wrote sees it: qemu-img for the 512-byte single-file
    VHDX (after ``qemu-img check`` finds no errors in them), libvhdi for the chains (qemu-img has
    no differencing VHDX) and for the 4K-native disk (qemu-img refuses it)."""
    raws: dict[str, Path] = {}
    for key in ("dynamic", "parent", "ro", "discard"):
        check = run("qemu-img", "check", "-f", "vhdx", images[key], check=False)
        assert check.returncode == 0 and "No errors" in check.stdout, check.stdout + check.stderr
        raw = root / f"{key}.qemu.raw"
        run("qemu-img", "convert", "-f", "vhdx", "-O", "raw", images[key], raw)
        raws[key] = raw
    for key, chain in (
        ("child", ["parent", "child"]),
        ("vhdchild", ["parent", "vhdchild"]),
        ("k4", ["k4"]),
    ):
        raw = root / f"{key}.libvhdi.raw"
        libvhdi_read([images[k] for k in chain], raw)
        raws[key] = raw
    return raws


def test_guest_vhdx_disks() -> None:
    """disks.sh on VHDX (dynamic, .avhdx over a VHDX parent, a VHD child of a VHDX parent,
    read-only, discard) plus a 4K-native VHDX the guest must see with 4096-byte logical blocks,
    all from one backend; every guest write checked in the images with qemu-img and libvhdi."""
    out = RESULTS / "test_guest_vhdx_disks"
    root = Path("/tmp/vhdx")
    images = make_vhdx_images(root)
    parent_before = sha256_file(images["parent"])
    disks = [
        Disk(str(images["dynamic"]), "xvda"),
        Disk(str(images["child"]), "xvdb"),
        Disk(str(images["vhdchild"]), "xvdc"),
        Disk(str(images["ro"]), "xvdd", access="ro"),
        Disk(str(images["discard"]), "xvde"),
        Disk(str(images["k4"]), "xvdf"),
    ]
    text, console = serve_guest(out, "vhdx", disks)

    soft = Soft()
    raws: dict[str, Path] = {}
    with soft.check("qemu-img check and the oracles' reads"):
        raws = oracle_raws(images, root)

    def md5(key: str, offset: int, length: int) -> str:
        with raws[key].open("rb") as f:
            f.seek(offset)
            return hashlib.md5(f.read(length)).hexdigest()

    odd = {"xvdb": "child", "xvdc": "vhdchild"}
    disks_checks(soft, text, console, odd, md5, images["discard"])
    for dev in ("xvdb", "xvdc"):
        with soft.check(f"parent visible through {dev}"):
            assert console.info[f"parent_md5_{dev}"] == md5("parent", 0, MiB)
    with soft.check("parent unchanged"):
        assert sha256_file(images["parent"]) == parent_before

    # The 4K-native disk: blkfront took sector-size 4096, whole-sector O_DIRECT I/O landed, a
    # 512-byte write was merged into its 4 KiB sector (O_DIRECT refuses it: busybox dd writes it
    # through the page cache then), ext4 was made, used and checked there.
    with soft.check("4K-native guest checks"):
        console.assert_clean(
            "xvdf present",
            "xvdf 512-byte write merged",
            "mkfs.ext4 xvdf",
            "e2fsck xvdf",
            "remount xvdf",
            "ext4 file survives remount xvdf",
            "e2fsck after use xvdf",
        )
    with soft.check("xvdf logical and physical block size"):
        assert (console.info["lbs_xvdf"], console.info["pbs_xvdf"]) == ("4096", "4096")
    with soft.check("blkfront features of xvdf"):
        blkfront_features(text, console, "xvdf", flush=True)
    writes = [(k, v) for k, v in console.info.items() if re.fullmatch(r"md5_xvdf_\d+_\d+", k)]
    with soft.check("4 KiB I/O reported"):
        assert len(writes) == 4, console.info
    for key, want in writes:
        _, _, sector, count = key.split("_")
        with soft.check(f"4 KiB I/O {key} in the image"):
            assert md5("k4", int(sector) * 4096, int(count) * 4096) == want

    # Every image checks clean with ours; ext4 on xvda and xvdf checks clean as the oracles read it.
    for name, image in images.items():
        with soft.check(f"vhd check {name}"):
            vhd_check(image)
    for key in ("dynamic", "k4"):
        with soft.check(f"e2fsck -fn {key}"):
            e2fsck_clean(raws[key])
    with soft.check("ext4 on xvdf has 4 KiB blocks (mke2fs saw 4 KiB sectors)"):
        # mke2fs takes 1 KiB blocks for a 32 MiB filesystem unless the device's logical sector
        # is larger: the block size shows what blkfront told it.
        header = run("dumpe2fs", "-h", raws["k4"]).stdout
        assert re.search(r"^Block size:\s+4096$", header, re.M), header
    # Our reading of the whole dynamic disk is qemu-img's.
    with soft.check("qemu-img compare with our raw conversion"):
        ours = root / "dynamic.ours.raw"
        run(*VHD, "convert", "--to", "raw", images["dynamic"], ours)
        compare = run("qemu-img", "compare", "-f", "vhdx", "-F", "raw", images["dynamic"], ours,
                      check=False)  # fmt: skip
        assert compare.returncode == 0, compare.stdout + compare.stderr
    soft.verify()
