"""tests/xen: the host side (test_lab.py) runs under ``make test-xen``; dom0/ only inside the lab."""

import os

collect_ignore = ["dom0"] if not os.environ.get("VHD_XEN_DOM0") else ["test_lab.py"]
