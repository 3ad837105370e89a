# Every disk of the guest comes from `vhd serve --xen` (tests/xen/dom0/test_blkif.py):
# xvda dynamic (ext4), xvdb differencing child, xvdc fixed, xvdd read-only, xvde dynamic (discard).
# vhdx.sh runs the same checks on VHDX disks (xvdc: a VHD child of a VHDX parent there).
for d in xvda xvdb xvdc xvdd xvde; do check "$d present" wait_disk $d; done
dmesg | grep 'blkfront: xvd' | sed 's/^/VHDTEST DMESG /'
for d in xvda xvdb xvdc xvdd xvde; do
    info "mq_$d $(ls /sys/block/$d/mq | wc -l)"
    info "ro_$d $(cat /sys/block/$d/ro)"
done

# The child shows its parent's first MiB before any write of its own (xvdc: a child too in the
# VHDX scenario, vhdx.sh).
for d in xvdb xvdc; do
    info "parent_md5_$d $(dd if=/dev/$d bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
done
info "md5_xvdd $(dd if=/dev/xvdd bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
for d in xvdb xvdc; do
    odd_io $d 7 13          # small and unaligned to 4 KiB
    odd_io $d 1000 11       # inside the parent's data (child: a partial block over the parent)
    odd_io $d 4095 3        # straddles the 2 MiB block boundary
    odd_io $d 8191 2049     # 1 MiB + 512 B across a block boundary: blkfront splits it
done

# Read-only: the guest sees ro=1 and a write fails.
if dd if=/tmp/w of=/dev/xvdd bs=512 count=1 oflag=direct 2>/dev/null; then
    fail "xvdd write refused"
else
    pass "xvdd write refused"
fi

# Discard reaches the image: 4 MiB (two whole 2 MiB blocks) written, then discarded.  blkif's
# DISCARD promises no zeros (Linux has no discard-zeroes-data), so the guest only reports what it
# reads back; dom0 asserts the blocks were deallocated in the image (Disk.discard).
dd if=/dev/urandom of=/dev/xvde bs=1M count=4 seek=8 oflag=direct 2>/dev/null
dd if=/dev/urandom of=/tmp/keep bs=1M count=1 2>/dev/null
dd if=/tmp/keep of=/dev/xvde bs=1M count=1 seek=16 oflag=direct 2>/dev/null
info "md5_xvde_keep $(md5sum </tmp/keep | cut -d' ' -f1)"
check "blkdiscard xvde" blkdiscard -o $((8 << 20)) -l $((4 << 20)) /dev/xvde
dd if=/dev/xvde of=/tmp/r bs=1M count=4 skip=8 iflag=direct 2>/dev/null
info "discarded_md5 $(md5sum </tmp/r | cut -d' ' -f1)"

# ext4 on xvda: mkfs, mount, write, remount, read back.
check "mkfs.ext4 xvda" /usr/sbin/mke2fs -q -F -t ext4 /dev/xvda
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
