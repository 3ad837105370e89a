"""vhdfuse: a FUSE view of a VHD chain as a raw file (installed from the ``fuse/`` folder)."""
