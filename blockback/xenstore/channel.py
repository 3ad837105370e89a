"""The byte stream to xenstored (docs/blkif.md §2 relies on it; the transport of ``xs_wire.h``):
a unix socket, or a xenbus character device, found as ``libxenstore``'s ``xs_open(0)`` finds it:
``$XENSTORED_PATH`` if set, else ``/var/run/xenstored/socket`` (the daemon's unix socket); where
no socket exists (xenstored in a stub domain, or a guest) the kernel's xenbus device,
``/dev/xen/xenbus`` (or the older ``/proc/xen/xenbus``), carries the same messages through
``read``/``write``.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat

DEFAULT_SOCKET = "/var/run/xenstored/socket"


XENBUS_DEVICES = ("/dev/xen/xenbus", "/proc/xen/xenbus")


def default_socket_path() -> str:
    """``$XENSTORED_PATH``, else ``/var/run/xenstored/socket`` (libxenstore's rule)."""
    return os.environ.get("XENSTORED_PATH") or DEFAULT_SOCKET


def find_xenstore() -> str:
    """Where to connect: ``$XENSTORED_PATH``; else the daemon socket if it exists; else the
    first xenbus device that exists; else the socket path (for the error message)."""
    explicit = os.environ.get("XENSTORED_PATH")
    if explicit:
        return explicit
    for candidate in (DEFAULT_SOCKET, *XENBUS_DEVICES):
        if os.path.exists(candidate):
            return candidate
    return DEFAULT_SOCKET


class Channel:
    """The byte stream to xenstored: a unix socket, or a xenbus character device (fd)."""

    def __init__(self, path: str) -> None:
        self.sock: socket.socket | None = None
        self.fd = -1
        try:
            is_device = stat.S_ISCHR(os.stat(path).st_mode)
        except OSError:
            is_device = False
        self._wake_r = self._wake_w = -1
        if is_device:
            self._set_fd(os.open(path, os.O_RDWR | os.O_CLOEXEC))
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def _set_fd(self, fd: int) -> None:
        # A read blocked on a device is not woken by close(): poll it with a wake-up pipe.
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe()

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        """A channel over an already open descriptor (read/write), as for the xenbus device."""
        channel = cls.__new__(cls)
        channel.sock = None
        channel._set_fd(fd)
        return channel

    def send(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:  # the xenbus device takes whole messages; loop for short writes anyway
            view = view[os.write(self.fd, view) :]

    def recv(self) -> bytes:
        if self.sock is not None:
            return self.sock.recv(65536)
        ready, _, _ = select.select([self.fd, self._wake_r], [], [])
        if self._wake_r in ready:
            return b""
        return os.read(self.fd, 65536)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        elif self.fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def release(self) -> None:
        """Free the descriptors once the reader has stopped using them."""
        if self.sock is None and self.fd >= 0:
            for fd in (self.fd, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.fd = -1
