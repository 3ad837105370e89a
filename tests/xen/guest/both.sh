# Both routes in one dom0 (tests/xen/dom0/test_both_routes.py): xvda is /dev/nbd0 served by the
# kernel's xen-blkback (backend/vbd), xvdb a VHD `vhd serve --xen` serves on vhdkit's own path
# (backend/vhd, `vhd xen attach` while the guest was paused).  Later dom0 detaches xvdb
# (`vhd xen detach`) and hot-plugs xvdc the same way.
check "xvda present" wait_disk xvda
check "xvdb present" wait_disk xvdb
dmesg | grep 'blkfront: xvd' | sed 's/^/VHDTEST DMESG /'

# 8 MiB to each disk at once, O_DIRECT + fsync, caches dropped, read back with O_DIRECT.
for d in xvda xvdb; do dd if=/dev/urandom of=/tmp/w-$d bs=1M count=8 2>/dev/null; done
for d in xvda xvdb; do
    dd if=/tmp/w-$d of=/dev/$d bs=1M seek=100 oflag=direct conv=fsync 2>/tmp/err-$d &
done
wait
echo 3 >/proc/sys/vm/drop_caches
for d in xvda xvdb; do
    dd if=/dev/$d of=/tmp/r-$d bs=1M skip=100 count=8 iflag=direct 2>/dev/null
    info "md5_dd_$d $(md5sum </tmp/w-$d | cut -d' ' -f1)"
    if cmp -s /tmp/w-$d /tmp/r-$d; then
        pass "$d 8 MiB at 100 MiB reads back"
    else
        fail "$d 8 MiB at 100 MiB reads back: $(cat /tmp/err-$d) $(cmp /tmp/w-$d /tmp/r-$d 2>&1 | head -1)"
    fi
done
odd_io xvdb 200007 13  # between the ext4 below and the dd above

# ext4 on the vhdkit disk (first 64 MiB: the dd range above stays outside it).
check "mkfs.ext4 xvdb" /usr/sbin/mke2fs -q -F -t ext4 /dev/xvdb 64M
mkdir -p /mnt
check "mount xvdb" mount -t ext4 /dev/xvdb /mnt
dd if=/dev/urandom of=/mnt/file bs=64k count=48 2>/dev/null
before=$(md5sum </mnt/file | cut -d' ' -f1) || before=
sync
check "umount xvdb" umount /mnt
echo 3 >/proc/sys/vm/drop_caches
check "remount xvdb" mount -t ext4 /dev/xvdb /mnt
after=$(md5sum </mnt/file | cut -d' ' -f1)
if [ -n "$before" ] && [ "$before" = "$after" ]; then pass "ext4 file survives remount"; else fail "ext4 file survives remount: $before != $after"; fi
check "final umount xvdb" umount /mnt

# dom0 detaches xvdb from the running guest, then hot-plugs xvdc.
echo "VHDTEST DETACH-ME"
n=0
while [ -e /sys/block/xvdb ] && [ $n -lt 600 ]; do sleep 1; n=$((n + 1)); done
if [ -e /sys/block/xvdb ]; then fail "xvdb detached"; else pass "xvdb detached"; fi
if wait_disk xvdc 1200; then
    pass "xvdc hot-plugged"
    odd_io xvdc 4095 3
else
    fail "xvdc hot-plugged"
fi
# xvda still works after all that.
odd_io xvda 9 5
