"""The real-Xen lab: Xen 4.17 and a Debian 6.1 dom0 booted under QEMU (TCG), for ``make test-xen``.

Issue 13: ``vhd serve --xen`` and the NBD route must meet a real hypervisor, a real toolstack (xl)
and a real Linux PV guest (xen-blkfront), not only the simulated transports of ``make test``.

What it builds, under ``build/xen-lab/`` (cached: a second run only boots):

- ``debs/``: Debian's ``xen-hypervisor-4.17-amd64`` and the current ``linux-image-6.1.0-*-amd64``
  (``apt-get download``), unpacked into ``root/`` (nothing is installed on the host).
- ``dom0.img``: a busybox initramfs that loads virtio/9p/overlay modules, mounts the host's own
  root read-only over 9p under a tmpfs overlay and runs ``tests/xen/dom0.sh`` in it -- so dom0
  runs the host's xl, xenstored, python and this checkout's venv unchanged.
- ``guest.img``: a busybox initramfs for the PV guests (xen-blkfront, ext4, mke2fs) running one
  of ``tests/xen/guest/*.sh``, chosen on the kernel command line (``vhdtest=NAME``).
- ``lab.iso``: GRUB (multiboot2) booting ``xen.gz`` with the kernel and ``dom0.img``.

``boot()`` starts QEMU once, dom0 runs the selected ``tests/xen/dom0/`` tests with pytest and
powers off; results and logs come back through a second, writable 9p share (``run/``).
Run ``python -m tests.xen.lab build`` to build only.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LAB = REPO / "build" / "xen-lab"
RUN = LAB / "run"

XEN_DEB = "xen-hypervisor-4.17-amd64"
# Modules dom0's initramfs needs to reach the host root: virtio-pci, 9p over virtio, overlay.
DOM0_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
# The guest: the PV block frontend and ext4 (crc32c is only a soft dependency of ext4).
GUEST_MODULES = ["xen-blkfront", "crc32c_generic", "ext4"]
GUEST_BINARIES = ["/usr/sbin/mke2fs", "/usr/sbin/e2fsck"]
# Host files dom0 reads over 9p (besides the guest kernel and initrd): the toolstack's library
# and the C library.  Their SHA-256 as the host sees them goes to dom0, which compares its own
# reads after every scenario -- a platform that corrupts dom0's memory shows there by name.
CANARY_FILES = ["/lib/x86_64-linux-gnu/libxenlight.so.4.17", "/lib/x86_64-linux-gnu/libc.so.6"]

# xpti/spec-ctrl/mitigations off: a throw-away lab under TCG, where each of them costs minutes.
XEN_CMDLINE = (
    "console=com1 com1=115200,8n1 dom0_mem=2048M,max:2048M dom0_max_vcpus=2 loglvl=all"
    " xpti=false spec-ctrl=no"
)
DOM0_CMDLINE = "console=hvc0 quiet mitigations=off"
QEMU_ARGS = [
    # XEN_LAB_ACCEL / XEN_LAB_CPU replace the accelerator and CPU model (to compare platforms).
    "-accel", os.environ.get("XEN_LAB_ACCEL", "tcg,thread=multi"),
    # Not "max": with it (SMAP/SMEP off, which otherwise fault dom0 in create_bounce_frame at
    # once) processes in dom0 and the guests died at random of corrupted memory -- heap aborts in
    # vhd serve and xl, ld.so and busybox segfaults, the guest kernel read back corrupted -- with
    # MTTCG or thread=single, with or without SVM.  A plain x86-64 with SSE4.2 runs clean (Debian
    # needs no more); SVM off so Xen never takes its VMLOAD path for PV context switches.
    # tests/xen/dom0/test_boot.py checks the platform on every run.
    "-cpu", os.environ.get("XEN_LAB_CPU", "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,-svm"),
    "-smp", "2",
    "-m", "3072",
    "-display", "none",
    "-vga", "none",
    "-monitor", "none",
    "-no-reboot",
]  # fmt: skip


def sh(*argv: str | Path, cwd: Path | None = None) -> str:
    """Run a command, return its stdout; its stderr goes to ours."""
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, check=True, stdout=subprocess.PIPE, text=True
    ).stdout


def log(message: str) -> None:
    print(f"[xen-lab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def digest(*parts: str | bytes | Path) -> str:
    """A cache key over file contents and strings: a changed input rebuilds that image."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        else:
            h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()


def fresh(target: Path, key: str) -> bool:
    stamp = target.with_name(target.name + ".key")
    return target.exists() and stamp.exists() and stamp.read_text() == key


def stamp(target: Path, key: str) -> None:
    target.with_name(target.name + ".key").write_text(key)


def kernel_package() -> str:
    """The 6.1 kernel Debian's ``linux-image-amd64`` currently points at (or the cached one)."""
    cached = sorted((LAB / "debs").glob("linux-image-6.1*-amd64_*.deb"))
    if cached:
        return cached[-1].name.split("_")[0]
    for line in sh("apt-cache", "depends", "linux-image-amd64").splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-6.1"):
            return name
    raise RuntimeError("apt-cache knows no linux-image-6.1.*-amd64 (is this Debian 12?)")


def fetch_and_unpack() -> str:
    """Download and unpack Xen and the kernel; returns the kernel version (``uname -r``)."""
    debs = LAB / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    kernel = kernel_package()
    for package in (XEN_DEB, kernel):
        if not list(debs.glob(f"{package}_*.deb")):
            log(f"apt-get download {package}")
            sh("apt-get", "download", package, cwd=debs)
    root = LAB / "root"
    version = kernel.removeprefix("linux-image-")
    if not (root / "lib" / "modules" / version / "modules.dep").exists():
        shutil.rmtree(root, ignore_errors=True)
        for deb in sorted(debs.glob("*.deb")):
            sh("dpkg-deb", "-x", deb, root)
        # Debian generates modules.dep at install time; the unpacked tree needs its own.
        sh("depmod", "-b", root, version)
    return version


def module_files(version: str, names: list[str]) -> list[Path]:
    """The .ko files for NAMES and their dependencies, in load order."""
    root = LAB / "root"
    out: list[Path] = []
    for name in names:
        text = sh("modprobe", "-d", root, "-S", version, "--show-depends", name)
        for line in text.splitlines():
            words = line.split()
            if words and words[0] == "insmod" and Path(words[1]) not in out:
                out.append(Path(words[1]))
    return out


def copy_with_libs(binary: str, tree: Path) -> None:
    """Copy a dynamic binary and the shared libraries ``ldd`` names into TREE."""
    paths = [binary]
    for line in sh("ldd", binary).splitlines():
        for word in line.split():
            if word.startswith("/"):
                paths.append(word)
    for path in paths:
        dest = tree / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), dest)


def make_initramfs(out: Path, version: str, modules: list[str], files: dict[str, Path]) -> None:
    """A gzip'd newc cpio: static busybox, MODULES (load order in /modules.order), FILES."""
    tree = out.with_suffix(".tree")
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "tmp", "mnt", "lib/modules"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", tree / "bin" / "busybox")
    order = []
    for ko in module_files(version, modules):
        shutil.copy2(ko, tree / "lib" / "modules" / ko.name)
        order.append(ko.name)
    (tree / "modules.order").write_text("\n".join(order) + "\n")
    for dest, src in files.items():
        target = tree / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        target.chmod(0o755)
    if out.name.startswith("guest"):
        for binary in GUEST_BINARIES:
            copy_with_libs(binary, tree)
    listing = sh("find", ".", cwd=tree).encode()
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=tree, input=listing, check=True, stdout=subprocess.PIPE,
    ).stdout  # fmt: skip
    out.write_bytes(
        subprocess.run(["gzip", "-1"], input=cpio, check=True, stdout=subprocess.PIPE).stdout
    )
    shutil.rmtree(tree)


def guest_files() -> dict[str, Path]:
    files = {"init": HERE / "guest" / "init"}
    for script in sorted((HERE / "guest").glob("*.sh")):
        files[f"scenarios/{script.name}"] = script
    return files


def build() -> dict[str, Path]:
    """Build (or reuse) everything the boot needs; returns the paths dom0 needs to know."""
    LAB.mkdir(parents=True, exist_ok=True)
    version = fetch_and_unpack()
    root = LAB / "root"
    kernel = root / "boot" / f"vmlinuz-{version}"
    xen = next((root / "boot").glob("xen-4.17*-amd64.gz"))

    dom0 = LAB / "dom0.img"
    dom0_files = {"init": HERE / "initramfs-init"}
    key = digest(version, *DOM0_MODULES, *dom0_files.values())
    if not fresh(dom0, key):
        log("building dom0 initramfs")
        make_initramfs(dom0, version, DOM0_MODULES, dom0_files)
        stamp(dom0, key)

    guest = LAB / "guest.img"
    files = guest_files()
    key = digest(version, *GUEST_MODULES, *sorted(files), *files.values())
    if not fresh(guest, key):
        log("building guest initramfs")
        make_initramfs(guest, version, GUEST_MODULES, files)
        stamp(guest, key)

    iso = LAB / "lab.iso"
    grub_cfg = (
        "set timeout=0\nset default=0\n"
        "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n"
        "menuentry 'Xen 4.17 + dom0' {\n"
        f"  multiboot2 /boot/xen.gz {XEN_CMDLINE}\n"
        f"  module2 /boot/vmlinuz {DOM0_CMDLINE}\n"
        "  module2 /boot/dom0.img\n"
        "}\n"
    )
    key = digest(grub_cfg, xen, kernel, dom0)
    if not fresh(iso, key):
        log("building lab.iso (grub-mkrescue)")
        tree = LAB / "iso.tree"
        shutil.rmtree(tree, ignore_errors=True)
        (tree / "boot" / "grub").mkdir(parents=True)
        (tree / "boot" / "grub" / "grub.cfg").write_text(grub_cfg)
        shutil.copy2(xen, tree / "boot" / "xen.gz")
        shutil.copy2(kernel, tree / "boot" / "vmlinuz")
        shutil.copy2(dom0, tree / "boot" / "dom0.img")
        subprocess.run(
            ["grub-mkrescue", "-o", str(iso), str(tree)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        shutil.rmtree(tree)
        stamp(iso, key)
    return {
        "iso": iso,
        "kernel": kernel,
        "guest_initrd": guest,
        "modules": root / "lib" / "modules",
    }


def boot(tests: list[str], timeout: float) -> int:
    """Boot the lab once; dom0 runs pytest on TESTS (node ids under tests/xen/dom0/).

    Returns QEMU's exit status (or -1 on timeout).  Everything dom0 reports lands in ``RUN``:
    ``serial.log`` (Xen and dom0 console), ``dom0.log``, ``pytest.log``, ``junit.xml``,
    ``xen/`` (xl, xenconsoled and guest console logs), one directory per test.
    """
    paths = build()
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    env = {
        "REPO": str(REPO),
        "RUN_TESTS": " ".join(shlex.quote(t) for t in tests),
        "LAB_KERNEL": str(paths["kernel"]),
        "LAB_GUEST_INITRD": str(paths["guest_initrd"]),
        "LAB_MODULES": str(paths["modules"]),
        "CI": os.environ.get("CI", ""),
        "VHD_CORPUS": os.environ.get("VHD_CORPUS", ""),
    }
    (RUN / "lab.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    # What dom0 must read over 9p, byte for byte: it checks its copies after every scenario.
    canaries = [paths["kernel"], paths["guest_initrd"], *(Path(p) for p in CANARY_FILES)]
    (RUN / "canaries.sha256").write_text(
        "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p}\n" for p in canaries)
    )
    argv = [
        "qemu-system-x86_64", *QEMU_ARGS,
        "-cdrom", str(paths["iso"]), "-boot", "d",
        "-serial", f"file:{RUN / 'serial.log'}",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={RUN},mount_tag=results,security_model=passthrough,multidevs=remap",
    ]  # fmt: skip
    log(f"booting Xen + dom0 (logs in {RUN}); tests: {len(tests)}")
    start = time.monotonic()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        while time.monotonic() - start < timeout:
            if qemu.poll() is not None:
                break
            # dom0 writes ``done`` last; Xen may sit in "System halted" instead of powering off.
            if (RUN / "done").exists():
                time.sleep(5)
                break
            time.sleep(2)
        else:
            log(f"timeout after {timeout:.0f} s")
            return -1
    finally:
        if qemu.poll() is None:
            qemu.terminate()
            try:
                qemu.wait(10)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait()
    log(f"lab finished in {time.monotonic() - start:.0f} s")
    return qemu.returncode or 0


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        print(build())
    elif sys.argv[1:2] == ["boot"]:
        sys.exit(boot(sys.argv[2:], float(os.environ.get("XEN_LAB_TIMEOUT", "3600"))))
    else:
        print("usage: python -m tests.xen.lab build | boot [TEST ...]", file=sys.stderr)
        sys.exit(2)
