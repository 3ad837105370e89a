"""The errors of the block backends, in one place, split as h11 splits them.

* :class:`ProtocolError` -- the base of every protocol error below: whatever went wrong was
  about a wire protocol (blkif, xenbus, NBD, xenstore), not about an image.
* :class:`RemoteProtocolError` -- the peer (a blkif frontend, an NBD client) broke the protocol:
  its fault, not ours.  A blkif device is failed (docs/blkif.md §2, "error" node and Closing);
  an NBD connection is hung up on (NBD protocol doc, "Terminating the transmission phase").
* :class:`LocalProtocolError` -- our own caller misused an engine: a bug in the toolkit.
* ``blockback.xenstore.XenStoreError`` -- an xenstore request failed (xenstored answered an
  ``xsd_errors`` name, or the connection broke); a :class:`ProtocolError` that carries the errno
  (``xs_wire.h``), defined next to the table it reads; its ``WireProtocolError`` is a message
  that cannot be framed, in either direction.
* :class:`AttachError` -- ``vhd xen attach``/``detach`` refused what it was asked (unknown
  domain, device number taken, a device vhdkit did not attach).
* :class:`GrantError` -- a grant reference could not be mapped or copied (docs/blkif.md §1:
  not granted, revoked, read-only for a write, out of range); an :class:`OSError`, EFAULT unless
  the device said otherwise, so the request is answered ERROR like any other I/O failure.

None of them is a :class:`vhd.VHDError`: they are about a peer or a hypervisor, not an image.
The ``vhd`` command turns a :class:`ProtocolError` into its one-line error and exit 2, as it does
a :class:`vhd.VHDError`.
"""

from __future__ import annotations

import errno


class ProtocolError(Exception):
    """A protocol went wrong (a peer's fault, ours, or a failed xenstore request)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (its fault, not ours): the device or connection is failed."""


class LocalProtocolError(ProtocolError):
    """The caller misused this engine (a bug in the toolkit)."""


class GrantError(OSError):
    """A grant could not be mapped or copied (bad, revoked or read-only reference)."""

    def __init__(self, message: str, code: int = errno.EFAULT) -> None:
        super().__init__(code, message)


class AttachError(ProtocolError):
    """``vhd xen attach``/``detach`` refused (unknown domain, device number in use, not a
    device vhdkit attached, backend did not close in time): the toolstack's error, one line."""
