"""CRC-32C (vhd.vhdx.crc): crcmod's low-level function with the table kept as a constant, not
built by ``crcmod.predefined.mkCrcFun`` at every start.  Checked against crcmod's own table and
function, the table computed here from the polynomial, and published check values."""

from __future__ import annotations

import subprocess
import sys

import crcmod.predefined
from hypothesis import given
from hypothesis import strategies as st

from vhd.vhdx.crc import TABLE, crc32c, crc32c_with_zeroed_field, using_c_extension

# The check value of the CRC catalogues, and RFC 3720 (iSCSI) B.4's vectors.
KNOWN = [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


def _table_from_polynomial() -> list[int]:
    """Castagnoli's polynomial 0x1EDC6F41, reflected (0x82F63B78), one bit at a time."""
    out = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        out.append(crc)
    return out


def test_table_is_crcmods_and_castagnolis() -> None:
    assert list(TABLE) == crcmod.predefined.PredefinedCrc("crc-32c").table
    assert list(TABLE) == _table_from_polynomial()


def test_known_values_with_the_compiled_extension() -> None:
    assert using_c_extension()
    for data, want in KNOWN:
        assert crc32c(data) == want, data
        assert crc32c(bytearray(data)) == crc32c(memoryview(data)) == want


@given(st.binary(max_size=4096), st.integers(min_value=0, max_value=4096))
def test_same_as_crcmods_own_function(data: bytes, offset: int) -> None:
    reference = crcmod.predefined.mkCrcFun("crc-32c")
    assert crc32c(data) == reference(data)
    if offset + 4 <= len(data):
        zeroed = data[:offset] + bytes(4) + data[offset + 4 :]
        assert crc32c_with_zeroed_field(data, offset) == reference(zeroed)


_IN_A_FRESH_INTERPRETER = """
import sys
import crcmod
def refuse(*args):
    raise AssertionError("crcmod built a CRC table at import")
# (the package's attribute crcmod.crcmod is the package itself: crcmod's __init__ star-imports it)
sys.modules["crcmod.crcmod"]._mkTable = sys.modules["crcmod.crcmod"]._mkTable_r = refuse
try:
    crcmod.mkCrcFun(0x11EDC6F41)
    sys.exit("the patch did not take: crcmod still builds tables")
except AssertionError:
    pass
from vhd.vhdx.crc import crc32c, using_c_extension
print(using_c_extension(), *(crc32c(data) for data in {datas!r}))
"""


def _fresh(prelude: str) -> list[str]:
    code = prelude + _IN_A_FRESH_INTERPRETER.format(datas=[data for data, _ in KNOWN])
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_no_table_is_built_at_import() -> None:
    assert _fresh("") == ["True", *(str(want) for _, want in KNOWN)]


def test_pure_python_fallback_without_the_extension() -> None:
    """crcmod without its compiled extension (a build without a C compiler): the same values
    from its pure Python function, and the report says so."""
    no_extension = "import sys; sys.modules['crcmod._crcfunext'] = None\n"
    assert _fresh(no_extension) == ["False", *(str(want) for _, want in KNOWN)]
