"""blockback's errors (``blockback/errors.py``): one protocol-error base with h11's local/remote
split, none of them an image error, and the ``vhd`` command's one-line exit 2 for all of them."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from vhdtools.cli import main

import vhd
from blockback.errors import GrantError, LocalProtocolError, ProtocolError, RemoteProtocolError
from blockback.nbd import protocol as nbd_protocol
from blockback.ring import RingOverflowError
from blockback.xenstore import XenStoreError
from blockback.xenstore.wire import WireProtocolError


@pytest.mark.parametrize(
    "error",
    [
        XenStoreError("ENOENT", "read /x failed"),
        WireProtocolError("bad length"),
        RemoteProtocolError("bad magic"),
        LocalProtocolError("misuse"),
    ],
)
def test_protocol_errors_are_not_image_errors(error: Exception) -> None:
    assert isinstance(error, ProtocolError)
    assert not isinstance(error, vhd.VHDError)


def test_the_split() -> None:
    assert issubclass(RingOverflowError, RemoteProtocolError)
    assert nbd_protocol.RemoteProtocolError is RemoteProtocolError
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    assert not issubclass(XenStoreError, RemoteProtocolError | LocalProtocolError)
    assert XenStoreError("ENOENT").errno == errno.ENOENT
    assert XenStoreError("EBOGUS").errno == errno.EIO
    grant = GrantError("revoked")
    assert isinstance(grant, OSError) and not isinstance(grant, ProtocolError | vhd.VHDError)
    assert grant.errno == errno.EFAULT


def test_cli_reports_a_xenstore_error_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``vhd serve --xen`` with no xenstored: exit 2 and one line, as for an image error."""
    missing = tmp_path / "no-xenstored.sock"
    assert main(["serve", "--xen", "--xenstore", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vhd: error: xenstore: EIO"), err
    assert str(missing) in err and "Traceback" not in err
