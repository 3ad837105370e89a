"""The xenbus side of a blkif backend: the state machine and the XenStore keys (docs/blkif.md §2).

Pure: no XenStore client here.  :class:`XenbusMachine` is a transition table, in the style of
h2's connection state machine: ``(backend state, input) -> (action, next state)``.  An input
missing from the table is a protocol error -- :class:`RemoteProtocolError` when the frontend
caused it (e.g. a frontend state Linux blkback also refuses: InitWait, Reconfiguring,
Reconfigured), :class:`LocalProtocolError` when our own driver fed an impossible input.  The
driver (``blockback.vbd``) turns XenStore watch events into inputs and performs the actions.

The table follows Linux ``xen-blkback/xenbus.c`` ``frontend_changed``: Initialised *or* Connected
connects (watches coalesce), a repeated Connected is ignored, Closing follows the frontend,
Closed disconnects (drains in-flight I/O first), Initialising after Closed reconnects (back to
InitWait), Unknown means the frontend vanished.  Toolstack inputs: ``online=0`` (detach), resize,
the backend directory's removal (gone: remove without writing) and our own shutdown (SIGTERM).  Every action is idempotent, so a frontend flipping states a
thousand times only ever connects and disconnects cleanly (XSA-350).

The key helpers write exactly the keys the doc lists, and parse the frontend's keys into a
validated :class:`FrontendParams` (order <= max, 1 <= queues <= max, known protocol).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from blockback.abi import (
    ABIS,
    MAX_RING_PAGE_ORDER,
    SECTOR_SIZE,
    VDISK_CDROM,
    VDISK_READONLY,
    Abi,
    abi_for,
)
from blockback.errors import LocalProtocolError, RemoteProtocolError


class XenbusState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class Input(enum.Enum):
    # The frontend's ``state`` node changed (one input per value, including ones we refuse).
    FE_UNKNOWN = "fe-0"
    FE_INITIALISING = "fe-1"
    FE_INIT_WAIT = "fe-2"
    FE_INITIALISED = "fe-3"
    FE_CONNECTED = "fe-4"
    FE_CLOSING = "fe-5"
    FE_CLOSED = "fe-6"
    FE_RECONFIGURING = "fe-7"
    FE_RECONFIGURED = "fe-8"
    # Toolstack and our own driver.
    PROBE = "probe"  # device appeared (online=1): open the image, publish parameters
    OFFLINE = "offline"  # toolstack wrote online=0 (detach)
    CONNECT_FAILED = "connect-failed"  # the frontend's keys were invalid or mapping failed
    RESIZE = "resize"  # the image grew: publish the new size
    SHUTDOWN = "shutdown"  # we are exiting (SIGTERM)
    GONE = "gone"  # the toolstack removed the backend directory: nothing may be written there


FRONTEND_INPUTS: Final = {
    XenbusState(i): Input(f"fe-{i}") for i in range(9)
}  # state value -> input


class Action(enum.Enum):
    NONE = "none"
    PUBLISH = "publish"  # write max-ring-page-order & co, then state=InitWait
    CONNECT = (
        "connect"  # read + validate frontend keys, map ring, bind evtchn, write props, state=4
    )
    CLOSING = "closing"  # state=Closing, keep serving until the frontend closes
    CLOSE = "close"  # stop the ring, drain in-flight I/O, unmap, unbind, state=Closed
    FAIL = "fail"  # write ``error``, tear down whatever connected, state=Closing
    RESIZE = "resize"  # rewrite ``sectors``, then rewrite state to fire the frontend's watch
    REMOVE = "remove"  # close if needed, then forget the device (both sides are done)


S = XenbusState
I = Input  # noqa: E741
A = Action

# (backend state, input) -> (action, next backend state).  Anything missing: protocol error.
# GONE (the toolstack removed the backend directory: xl destroy, block-detach) removes from any
# state, and the driver then writes nothing: a write would re-create the removed directory.
TRANSITIONS: Final[dict[tuple[XenbusState, Input], tuple[Action, XenbusState]]] = {
    (S.INITIALISING, I.PROBE): (A.PUBLISH, S.INIT_WAIT),
    (S.INITIALISING, I.OFFLINE): (A.REMOVE, S.CLOSED),
    (S.INITIALISING, I.SHUTDOWN): (A.REMOVE, S.CLOSED),
    (S.INITIALISING, I.GONE): (A.REMOVE, S.CLOSED),
    # InitWait: waiting for the frontend's ring keys.
    (S.INIT_WAIT, I.FE_INITIALISING): (A.NONE, S.INIT_WAIT),
    (S.INIT_WAIT, I.FE_INITIALISED): (A.CONNECT, S.CONNECTED),
    (S.INIT_WAIT, I.FE_CONNECTED): (A.CONNECT, S.CONNECTED),  # watch coalesced 3 -> 4
    (S.INIT_WAIT, I.FE_CLOSING): (A.CLOSING, S.CLOSING),
    (S.INIT_WAIT, I.FE_CLOSED): (A.CLOSE, S.CLOSED),
    (S.INIT_WAIT, I.FE_UNKNOWN): (A.REMOVE, S.CLOSED),
    (S.INIT_WAIT, I.OFFLINE): (A.REMOVE, S.CLOSED),
    (S.INIT_WAIT, I.RESIZE): (A.NONE, S.INIT_WAIT),  # sectors are written at connect
    (S.INIT_WAIT, I.SHUTDOWN): (A.REMOVE, S.CLOSED),
    (S.INIT_WAIT, I.GONE): (A.REMOVE, S.CLOSED),
    # Connected.
    (S.CONNECTED, I.FE_INITIALISING): (A.NONE, S.CONNECTED),  # frontend walks us via 5/6
    (S.CONNECTED, I.FE_INITIALISED): (A.NONE, S.CONNECTED),  # duplicate watch
    (S.CONNECTED, I.FE_CONNECTED): (A.NONE, S.CONNECTED),
    (S.CONNECTED, I.FE_CLOSING): (A.CLOSING, S.CLOSING),
    (S.CONNECTED, I.FE_CLOSED): (A.CLOSE, S.CLOSED),
    (S.CONNECTED, I.FE_UNKNOWN): (A.REMOVE, S.CLOSED),
    (S.CONNECTED, I.CONNECT_FAILED): (A.FAIL, S.CLOSING),
    (S.CONNECTED, I.RESIZE): (A.RESIZE, S.CONNECTED),
    (S.CONNECTED, I.OFFLINE): (A.CLOSING, S.CLOSING),
    (S.CONNECTED, I.SHUTDOWN): (A.REMOVE, S.CLOSED),
    (S.CONNECTED, I.GONE): (A.REMOVE, S.CLOSED),
    # Closing: wait for the frontend to finish.
    (S.CLOSING, I.FE_INITIALISING): (A.NONE, S.CLOSING),
    (S.CLOSING, I.FE_INITIALISED): (A.NONE, S.CLOSING),
    (S.CLOSING, I.FE_CONNECTED): (A.NONE, S.CLOSING),
    (S.CLOSING, I.FE_CLOSING): (A.NONE, S.CLOSING),
    (S.CLOSING, I.FE_CLOSED): (A.CLOSE, S.CLOSED),
    (S.CLOSING, I.FE_UNKNOWN): (A.REMOVE, S.CLOSED),
    (S.CLOSING, I.OFFLINE): (A.NONE, S.CLOSING),
    (S.CLOSING, I.RESIZE): (A.NONE, S.CLOSING),
    (S.CLOSING, I.SHUTDOWN): (A.REMOVE, S.CLOSED),
    (S.CLOSING, I.GONE): (A.REMOVE, S.CLOSED),
    # Closed: reconnect when the frontend starts again, unless the toolstack detached us.
    (S.CLOSED, I.FE_INITIALISING): (A.PUBLISH, S.INIT_WAIT),
    (S.CLOSED, I.FE_INITIALISED): (A.CONNECT, S.CONNECTED),  # 1 and 3 coalesced
    (S.CLOSED, I.FE_CONNECTED): (A.NONE, S.CLOSED),  # stale: the frontend will close
    (S.CLOSED, I.FE_CLOSING): (A.NONE, S.CLOSED),
    (S.CLOSED, I.FE_CLOSED): (A.NONE, S.CLOSED),
    (S.CLOSED, I.FE_UNKNOWN): (A.REMOVE, S.CLOSED),
    (S.CLOSED, I.OFFLINE): (A.REMOVE, S.CLOSED),
    (S.CLOSED, I.RESIZE): (A.NONE, S.CLOSED),
    (S.CLOSED, I.SHUTDOWN): (A.REMOVE, S.CLOSED),
    (S.CLOSED, I.GONE): (A.REMOVE, S.CLOSED),
}

_LOCAL_INPUTS: Final = frozenset({I.PROBE, I.CONNECT_FAILED})


class XenbusMachine:
    """The backend's xenbus state, advanced only through :data:`TRANSITIONS`."""

    def __init__(self) -> None:
        self.state = XenbusState.INITIALISING

    def process(self, event: Input) -> Action:
        try:
            action, next_state = TRANSITIONS[(self.state, event)]
        except KeyError:
            message = f"input {event.value} is not allowed in backend state {self.state.name}"
            if event in _LOCAL_INPUTS:
                raise LocalProtocolError(message) from None
            raise RemoteProtocolError(message) from None
        self.state = next_state
        return action

    def frontend_state(self, value: str | None) -> Action:
        """Feed the raw text of the frontend's ``state`` node (missing node = Unknown)."""
        try:
            state = XenbusState(int(value)) if value is not None else XenbusState.UNKNOWN
        except ValueError:
            raise RemoteProtocolError(f"frontend state {value!r} is not a xenbus state") from None
        return self.process(FRONTEND_INPUTS[state])


# --- keys ----------------------------------------------------------------------------------------

DEFAULT_MAX_INDIRECT_SEGMENTS: Final = 1024  # 4 indirect pages, 4 MiB per request
DEFAULT_MAX_QUEUES: Final = 4


def initwait_keys(
    *,
    max_ring_page_order: int = MAX_RING_PAGE_ORDER,
    max_indirect_segments: int = DEFAULT_MAX_INDIRECT_SEGMENTS,
    max_queues: int = DEFAULT_MAX_QUEUES,
) -> dict[str, str]:
    """What the backend publishes before InitWait (``state`` itself is written last)."""
    keys = {
        "multi-queue-max-queues": str(max_queues),
        "max-ring-page-order": str(max_ring_page_order),
    }
    if max_indirect_segments:
        keys["feature-max-indirect-segments"] = str(max_indirect_segments)
    return keys


def connect_keys(
    *,
    size: int,
    read_only: bool,
    discard: bool,
    discard_granularity: int = 4096,
    discard_secure: bool = False,
    cdrom: bool = False,
    sector_size: int = SECTOR_SIZE,
    physical_sector_size: int = SECTOR_SIZE,
) -> dict[str, str]:
    """The device properties written in the connect transaction (before ``state``=4).

    ``info`` carries VDISK_READONLY and, for a frontend whose ``device-type`` is ``cdrom``,
    VDISK_CDROM (Linux blkback's ``vbd.type``).  ``sector-size`` is the disk's logical sector
    size (4096 for a 4K-native VHDX: blkfront makes it the guest's logical block size) and
    ``physical-sector-size`` its physical one, never below the logical one; ``sectors`` stays in
    512-byte units whatever the sector size, as request sector numbers do (Linux blkback writes
    ``bdev_nr_sectors`` and ``bdev_logical_block_size``)."""
    writable = not read_only
    info = (VDISK_READONLY if read_only else 0) | (VDISK_CDROM if cdrom else 0)
    keys = {
        "feature-flush-cache": "1" if writable else "0",
        "feature-barrier": "1" if writable else "0",
        "feature-discard": "1" if discard and writable else "0",
        "feature-persistent": "0",  # grant copy only (docs/blkif.md §3)
        "sectors": str(size // SECTOR_SIZE),
        "info": str(info),
        "sector-size": str(sector_size),
        "physical-sector-size": str(max(physical_sector_size, sector_size)),
    }
    if discard and writable:
        # A discard smaller than a logical sector cannot be expressed to the disk.
        keys["discard-granularity"] = str(max(discard_granularity, sector_size))
        keys["discard-alignment"] = "0"
        keys["discard-secure"] = "1" if discard_secure else "0"
    return keys


@dataclass(frozen=True, slots=True)
class QueueParams:
    ring_refs: tuple[int, ...]
    event_channel: int


@dataclass(frozen=True, slots=True)
class FrontendParams:
    abi: Abi
    ring_page_order: int
    queues: tuple[QueueParams, ...]
    persistent: bool


def _int(read: Callable[[str], str | None], key: str, default: int | None = None) -> int:
    value = read(key)
    if value is None:
        if default is None:
            raise RemoteProtocolError(f"frontend did not write {key}")
        return default
    try:
        number = int(value.strip(), 10)
    except ValueError:
        raise RemoteProtocolError(f"frontend {key}={value!r} is not a number") from None
    if number < 0 or number >= 1 << 32:
        raise RemoteProtocolError(f"frontend {key}={value!r} is out of range")
    return number


def read_frontend(
    read: Callable[[str], str | None],
    *,
    max_ring_page_order: int = MAX_RING_PAGE_ORDER,
    max_queues: int = DEFAULT_MAX_QUEUES,
) -> FrontendParams:
    """Parse and validate the frontend's keys; ``read(relative key)`` returns None if absent.

    Raises :class:`RemoteProtocolError` for anything the doc says to refuse.  Legacy FreeBSD
    keys (``num-ring-pages``, ``max-requests``, ...) are tolerated and ignored except that
    ``num-ring-pages`` stands in for a missing ``ring-page-order``."""
    protocol = read("protocol")
    try:
        abi = abi_for(protocol)
    except KeyError:
        raise RemoteProtocolError(
            f"unknown protocol {protocol!r} (known: {', '.join(sorted(ABIS))})"
        ) from None
    if read("ring-page-order") is not None:
        order = _int(read, "ring-page-order")
    elif read("num-ring-pages") is not None:
        pages = _int(read, "num-ring-pages")
        if pages < 1 or pages & (pages - 1):
            raise RemoteProtocolError(f"num-ring-pages={pages} is not a power of two")
        order = pages.bit_length() - 1
    else:
        order = 0
    if order > max_ring_page_order:
        raise RemoteProtocolError(
            f"ring-page-order {order} exceeds the maximum {max_ring_page_order}"
        )
    nqueues = _int(read, "multi-queue-num-queues", 1)
    if not 1 <= nqueues <= max_queues:
        raise RemoteProtocolError(f"multi-queue-num-queues={nqueues} is not in 1..{max_queues}")
    queues = []
    for q in range(nqueues):
        prefix = "" if nqueues == 1 else f"queue-{q}/"
        refs: tuple[int, ...]
        if order == 0 and read(prefix + "ring-ref") is not None:
            refs = (_int(read, prefix + "ring-ref"),)
        else:
            refs = tuple(_int(read, f"{prefix}ring-ref{i}") for i in range(1 << order))
        queues.append(QueueParams(refs, _int(read, prefix + "event-channel")))
    persistent = read("feature-persistent") == "1"
    return FrontendParams(abi, order, tuple(queues), persistent)
