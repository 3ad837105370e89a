#!/bin/sh
# dom0 stage 2 (PID 1, on the host's root under a tmpfs overlay): start Xen's dom0 services,
# run the selected tests/xen/dom0 tests with pytest, bring the logs back to /vhdlab, power off.
. /vhdlab/lab.env
exec >/vhdlab/dom0.log 2>&1
set -x
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
# No tmpfs on /tmp: the checkout (and the lab's unpacked kernel modules) may live under the host's
# /tmp, as a CI clone can; the overlay's tmpfs upper already keeps dom0's writes in memory.
# The unpacked 6.1 kernel's modules (the host runs another kernel).
version=$(uname -r)
mkdir -p "/lib/modules/$version"
mount --bind "$LAB_MODULES/$version" "/lib/modules/$version"
# xen-blkback is loaded only by the NBD route's test: it claims every backend/vbd device.
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd; do
    modprobe "$m" || echo "vhdlab: modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/log/xen/console /var/lib/xenstored
XEN=/usr/lib/xen-4.17/bin
export PATH="$XEN:/usr/sbin:/usr/bin:/sbin:/bin"
xenstored --pid-file /run/xenstored.pid
xen-init-dom0
# Guest consoles go straight to the results share: a run can be watched from the host.
mkdir -p /vhdlab/console
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/vhdlab/console
xl info | head -20
# The CPU dom0's programs see (QEMU's model, filtered by Xen) and what glibc picked from it: the
# first things to compare when a process in dom0 dies in a way the host never shows.
grep -m1 '^flags' /proc/cpuinfo
/lib64/ld-linux-x86-64.so.2 --list-diagnostics >/vhdlab/ld-diagnostics.txt 2>&1
# A process that crashes leaves its core with the results (gdb on the host reads it: dom0 runs
# the host's own binaries).
ulimit -c unlimited
echo '/vhdlab/core.%e.%p' >/proc/sys/kernel/core_pattern
echo "vhdlab: dom0 ready at $(cut -d' ' -f1 /proc/uptime) s"
cd "$REPO"
export CI VHD_CORPUS LAB_KERNEL LAB_GUEST_INITRD VHD_XEN_DOM0=1 HOME=/root PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
eval "set -- $RUN_TESTS"
.venv/bin/python -m pytest -p no:cacheprovider -p no:xdist -o addopts= -o timeout=1800 -rA \
    --junitxml=/vhdlab/junit.xml "$@" >/vhdlab/pytest.log 2>&1
echo "vhdlab: pytest exit $?"
cp -r /var/log/xen /vhdlab/xen
dmesg >/vhdlab/dom0-dmesg.log
sync
echo done >/vhdlab/done
sync
poweroff -f
