"""The ``-U/--force-share`` option of the read-only commands (``info``, ``check`` without
``--repair``, ``map``, ``compare``, ``convert``'s source), as ``qemu-img`` has it: open without
taking any lock (see :mod:`vhd.lock`), so an image that a VM, a mount or a server is writing can
still be inspected; what is read may then be changing."""

from __future__ import annotations

import argparse


def add_force_share_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="read the image even while another process writes it (takes no lock; what is "
        "read may be changing)",
    )
