# Smoke: the guest boots and sees /dev/xvda.
check "xvda present" wait_disk xvda
info sectors "$(cat /sys/block/xvda/size)"
