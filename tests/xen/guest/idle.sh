# A guest that stays up for the toolstack scenarios (tests/xen/dom0/test_lifecycle.py): checks
# xvda, says READY, then tests xvdb when `xl block-attach` brings it, and waits to be stopped.
check "xvda present" wait_disk xvda
odd_io xvda 7 13
echo "VHDTEST READY"
if wait_disk xvdb 100000; then
    odd_io xvdb 4095 3
    echo "VHDTEST ATTACHED"
fi
while :; do sleep 10; done
