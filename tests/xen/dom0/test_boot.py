"""The lab itself: Xen runs, dom0 is privileged, the toolstack answers."""

import subprocess


def test_xl_lists_dom0() -> None:
    out = subprocess.run(["xl", "list"], check=True, capture_output=True, text=True).stdout
    assert "Domain-0" in out
