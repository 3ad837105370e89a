# VHDX from `vhd serve --xen` (tests/xen/dom0/test_blkif.py::test_guest_vhdx_disks): every check of
# disks.sh on xvda dynamic VHDX (ext4), xvdb .avhdx over a VHDX parent, xvdc VHD child of a VHDX
# parent, xvdd read-only VHDX, xvde dynamic VHDX with 2 MiB blocks (discard); then xvdf, a 4K-native
# VHDX: blkfront must take the backend's sector-size 4096 as the logical block size.
. /scenarios/disks.sh

check "xvdf present" wait_disk xvdf
dmesg | grep "blkfront: xvdf" | sed "s/^/VHDTEST DMESG /"
info "mq_xvdf $(ls /sys/block/xvdf/mq | wc -l)"
info "lbs_xvdf $(cat /sys/block/xvdf/queue/logical_block_size)"
info "pbs_xvdf $(cat /sys/block/xvdf/queue/physical_block_size)"
# O_DIRECT in 4 KiB sectors, above the 32 MiB the filesystem below takes (dom0 finds them in the
# image): one sector, three across the 2 MiB block boundary at 34 MiB, 1 MiB + 4 KiB across the one
# at 36 MiB (blkfront splits it).
odd_io xvdf 8193 1 4096
odd_io xvdf 8703 3 4096
odd_io xvdf 9215 257 4096
# Less than a logical sector: busybox dd retries a refused O_DIRECT write through the page cache,
# so write 512 bytes buffered and fsync; the kernel merges them into their 4 KiB sector, which the
# O_DIRECT read-back then gets from the image.
dd if=/dev/xvdf of=/tmp/s bs=4096 count=1 skip=10000 iflag=direct 2>/dev/null
dd if=/dev/urandom of=/tmp/p bs=512 count=1 2>/dev/null
dd if=/tmp/p of=/tmp/s bs=512 seek=3 conv=notrunc 2>/dev/null
dd if=/tmp/p of=/dev/xvdf bs=512 seek=$((10000 * 8 + 3)) count=1 conv=notrunc,fsync 2>/dev/null
dd if=/dev/xvdf of=/tmp/r bs=4096 count=1 skip=10000 iflag=direct 2>/dev/null
if cmp -s /tmp/s /tmp/r; then pass "xvdf 512-byte write merged"; else fail "xvdf 512-byte write merged"; fi
info "md5_xvdf_10000_1 $(md5sum </tmp/s | cut -d' ' -f1)"
# ext4 on the 4K disk: mkfs, fsck, a file across a remount, fsck again (dom0 checks the image).
check "mkfs.ext4 xvdf" /usr/sbin/mke2fs -q -F -t ext4 /dev/xvdf 32M
check "e2fsck xvdf" /usr/sbin/e2fsck -fn /dev/xvdf
check "mount xvdf" mount -t ext4 /dev/xvdf /mnt
dd if=/dev/urandom of=/mnt/file bs=64k count=48 2>/dev/null
before=$(md5sum </mnt/file | cut -d' ' -f1) || before=
info "file_md5_xvdf $before"
sync
check "umount xvdf" umount /mnt
echo 3 >/proc/sys/vm/drop_caches
check "remount xvdf" mount -t ext4 /dev/xvdf /mnt
after=$(md5sum </mnt/file | cut -d' ' -f1)
if [ -n "$before" ] && [ "$before" = "$after" ]; then pass "ext4 file survives remount xvdf"; else fail "ext4 file survives remount xvdf: $before != $after"; fi
check "final umount xvdf" umount /mnt
check "e2fsck after use xvdf" /usr/sbin/e2fsck -fn /dev/xvdf
