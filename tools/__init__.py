"""vhdtools: the ``vhd`` command-line tool (installed from the ``tools/`` folder)."""
