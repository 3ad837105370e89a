"""blockback: serve VHDs as block devices (Xen blkif backend, NBD export)."""
