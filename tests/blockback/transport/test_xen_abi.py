"""The ioctl numbers, struct sizes and offsets of ``blockback/transport/xen_abi.py`` against the
kernel's uapi headers in Debian's libxen-dev, compiled by gcc (``xen_layout.c``)."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blockback.transport import xen_abi
from tests.blockback.cbuild import compile_c

STRUCTS: dict[str, type[ctypes.Structure]] = {
    "ioctl_gntdev_grant_ref": xen_abi.GntdevGrantRef,
    "ioctl_gntdev_map_grant_ref": xen_abi.GntdevMapGrantRef,
    "ioctl_gntdev_unmap_grant_ref": xen_abi.GntdevUnmapGrantRef,
    "ioctl_gntdev_set_max_grants": xen_abi.GntdevSetMaxGrants,
    "ioctl_gntdev_grant_copy_segment": xen_abi.GntdevGrantCopySegment,
    "ioctl_gntdev_grant_copy": xen_abi.GntdevGrantCopy,
    "ioctl_evtchn_bind_interdomain": xen_abi.EvtchnBindInterdomain,
    "ioctl_evtchn_bind_unbound_port": xen_abi.EvtchnBindUnboundPort,
    "ioctl_evtchn_unbind": xen_abi.EvtchnUnbind,
    "ioctl_evtchn_notify": xen_abi.EvtchnNotify,
    "ioctl_evtchn_restrict_domid": xen_abi.EvtchnRestrictDomid,
}
CONSTANTS = {
    "GNTCOPY_source_gref": "GNTCOPY_SOURCE_GREF",
    "GNTCOPY_dest_gref": "GNTCOPY_DEST_GREF",
    "GNTST_okay": "GNTST_OKAY",
}


def nested_offset(cls: Any, dotted: str) -> int:
    """The offset of ``a.b.c`` inside a ctypes structure (through unions and nested structs)."""
    offset = 0
    for name in dotted.split("."):
        field = getattr(cls, name)
        offset += field.offset
        cls = dict(cls._fields_)[name]
    return offset


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    for header in ("/usr/include/xen/sys/gntdev.h", "/usr/include/xen/sys/evtchn.h"):
        if not Path(header).exists():
            pytest.fail(f"{header} missing: install libxen-dev (make deps)")
    exe = compile_c("transport/xen_layout.c", tmp_path_factory.mktemp("xl") / "xen_layout")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


def test_every_ioctl_number_and_flag(c_layout: dict[str, str]) -> None:
    numbers = {
        k: int(v)
        for k, v in c_layout.items()
        if not k.startswith(("sizeof", "offsetof", "SEGMENT"))
    }
    assert len(numbers) == 13
    for name, value in numbers.items():
        assert getattr(xen_abi, CONSTANTS.get(name, name)) == value, name
    # The numbers docs/blkif.md quotes, as a cross-check of the document itself.
    assert xen_abi.IOCTL_GNTDEV_MAP_GRANT_REF == 0x184700
    assert xen_abi.IOCTL_GNTDEV_GRANT_COPY == 0x104708
    assert xen_abi.IOCTL_EVTCHN_BIND_INTERDOMAIN == 0x84501


def test_every_struct_size_and_offset(c_layout: dict[str, str]) -> None:
    checked = 0
    for key, value in c_layout.items():
        if key.startswith("sizeof("):
            name = key[len("sizeof(") : -1]
            assert ctypes.sizeof(STRUCTS[name]) == int(value), key
            checked += 1
        elif key.startswith("offsetof("):
            name, dotted = key[len("offsetof(") : -1].split(".", 1)
            assert nested_offset(STRUCTS[name], dotted) == int(value), key
            checked += 1
    assert checked == 32  # every line xen_layout.c prints
    assert set(STRUCTS) == {k[len("sizeof(") : -1] for k in c_layout if k.startswith("sizeof(")}


def test_grant_copy_segment_byte_images(c_layout: dict[str, str]) -> None:
    from_guest = xen_abi.CopyOp(domid=7, gref=0x11223344, offset=0x200, buffer=bytearray(0xE00))
    assert (
        xen_abi.encode_copy_segment(from_guest, 0x7F0011223000).hex()
        == c_layout["SEGMENT_FROM_GUEST"]
    )
    to_guest = xen_abi.CopyOp(domid=0x7FF0, gref=0x99, offset=0, buffer=bytes(4096), to_guest=True)
    assert (
        xen_abi.encode_copy_segment(to_guest, 0x7F0044556000).hex() == c_layout["SEGMENT_TO_GUEST"]
    )
