"""XenStore: the wire protocol, a client for xenstored, and a small in-process xenstored.

``wire`` is the ``xs_wire.h`` codec; ``store`` the database engine (pure: the dispatcher and the
operations, over ``tree``, ``permissions``, ``transactions``, ``watches``, ``connection`` and
``quotas``); ``server`` the unix socket daemon for tests and the simulator (its command line is
``vhdtools.xenstored``); ``client`` (over ``channel``, its watch events queued by ``events``)
the thread-safe client used by the Xen backend on a real dom0 and against ``server``.
"""

from __future__ import annotations

from .client import (
    Transaction,
    WatchEvent,
    XenStoreClient,
    default_socket_path,
    find_xenstore,
)
from .wire import XenStoreError

__all__ = [
    "Transaction",
    "WatchEvent",
    "XenStoreClient",
    "XenStoreError",
    "default_socket_path",
    "find_xenstore",
]
