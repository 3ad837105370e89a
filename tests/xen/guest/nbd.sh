# The NBD route (tests/xen/dom0/test_nbd_route.py): xvda is /dev/nbd0 in dom0, served by the
# kernel's xen-blkback, backed by `vhd serve --nbd` over 4 connections with 4 KiB blocks.
check "xvda present" wait_disk xvda
dmesg | grep 'blkfront: xvd' | sed 's/^/VHDTEST DMESG /'

# The README's open question, with nothing mounted on the disk: 8 MiB written with O_DIRECT and
# fsync at 100 MiB, caches dropped, read back with O_DIRECT.
dd if=/dev/urandom of=/tmp/w bs=1M count=8 2>/dev/null
dd if=/tmp/w of=/dev/xvda bs=1M seek=100 oflag=direct conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
dd if=/dev/xvda of=/tmp/r bs=1M skip=100 count=8 iflag=direct 2>/dev/null
info "md5_dd $(md5sum </tmp/w | cut -d' ' -f1)"
if cmp -s /tmp/w /tmp/r; then
    pass "8 MiB dd at 100 MiB reads back (no filesystem mounted)"
else
    fail "8 MiB dd at 100 MiB reads back (no filesystem mounted): $(cmp /tmp/w /tmp/r 2>&1 | head -1)"
fi

# ext4 in the first 64 MiB only (the dd range above stays outside the filesystem).
check "mkfs.ext4 xvda" /usr/sbin/mke2fs -q -F -t ext4 /dev/xvda 64M
mkdir -p /mnt
check "mount xvda" mount -t ext4 /dev/xvda /mnt
dd if=/dev/urandom of=/mnt/file bs=64k count=48 2>/dev/null
before=$(md5sum </mnt/file | cut -d' ' -f1) || before=
sync
check "umount xvda" umount /mnt
echo 3 >/proc/sys/vm/drop_caches
check "remount xvda" mount -t ext4 /dev/xvda /mnt
after=$(md5sum </mnt/file | cut -d' ' -f1)
if [ -n "$before" ] && [ "$before" = "$after" ]; then pass "ext4 file survives remount"; else fail "ext4 file survives remount: $before != $after"; fi
check "final umount xvda" umount /mnt
