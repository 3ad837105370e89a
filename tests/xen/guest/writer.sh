# kill -9 of the backend mid-write (tests/xen/dom0/test_lifecycle.py): 4 KiB records, each written
# with O_DIRECT and fsync (a blkif flush); "acked N MD5" is printed only once the flush completed.
check "xvda present" wait_disk xvda
echo "VHDTEST READY"
i=0
while :; do
    i=$((i + 1))
    dd if=/dev/urandom of=/tmp/rec bs=4096 count=1 2>/dev/null
    dd if=/tmp/rec of=/dev/xvda bs=4096 seek=$((i * 129)) oflag=direct conv=fsync 2>/dev/null || break
    echo "VHDTEST ACKED $i $(md5sum </tmp/rec | cut -d' ' -f1)"
done
echo "VHDTEST WRITES STOPPED at $i"
while :; do sleep 10; done
