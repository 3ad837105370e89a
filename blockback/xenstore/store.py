"""The XenStore database engine: nodes, permissions, transactions, watches (pure, no I/O).

Behaviour follows Xen's ``docs/misc/xenstore.txt`` and the C ``xenstored`` (Xen 4.17
``tools/xenstore/xenstored_core.c``, ``_transaction.c``, ``_watch.c``):

* The tree: every node has a value (bytes), a permission list and ordered children. Writing a
  node creates missing ancestors; a new node copies its parent's permissions, and an
  unprivileged creator becomes its owner (a privileged one keeps the parent's owner, so what
  dom0 writes into a guest's home stays the guest's: ``construct_node``). ``RM`` is recursive
  and succeeds when only the node is missing. ``MKDIR`` of an existing node needs write access
  to it, like ``WRITE``.
* Permissions: the first entry names the owner and the access of every domain not listed
  (``n`` none, ``r`` read, ``w`` write, ``b`` both). The owner and dom0 (privileged) have full
  access. Unprivileged connections get node, value size, watch, transaction and
  permission-list quotas (:class:`Quotas`, C's defaults).
* Paths: absolute (``/local/...``), relative to the connection's home ``/local/domain/<domid>``,
  or special (``@introduceDomain``, ``@releaseDomain``, for watches only). Only
  ``[A-Za-z0-9-/_@]`` are valid characters.
* Transactions are copy-on-write, as in C xenstored since 4.9 (``xenstored_transaction.c``):
  a transaction holds only the nodes it touched. The first time it reads or writes a node it
  takes the live node and records its generation; later reads see its own copy. At commit, if
  any touched node has a different generation in the live tree (or appeared or vanished), the
  commit fails with ``EAGAIN``; otherwise the written nodes are copied over and the watches
  fire. An open transaction costs memory in proportion to what it touched, not to the tree.
* Watches match the node and everything below it. Registering a watch fires it once at once
  (after the ``OK`` reply). A recursive removal also fires watches set *below* the removed node,
  with the watch's own path.
* An unprivileged watcher hears of a node only if it may read the node or the node's parent
  (``watch_permitted``): by the permissions the node has after a change, or had before it (a
  removal, or a ``SET_PERMS`` that took its access away).
* Outgoing queues are bounded (XSA-349: a guest churning watched nodes must not grow dom0's
  memory without bound): an event identical to one still queued is coalesced; once a
  connection's queue passes its limit further events are not queued but remembered per watch
  (bounded by the watch quota), and a single event for the watch's own path is sent when the
  queue drains, so a watcher never misses that *something* changed.

The I/O layer (``server.py``) owns sockets; this module only turns a request into messages for
connections.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from .wire import (
    ABS_PATH_MAX,
    OK,
    PAYLOAD_MAX,
    REL_PATH_MAX,
    Message,
    WireProtocolError,
    XsType,
    error_message,
    join_strings,
    split_strings,
    watch_event,
)

SPECIAL_PATHS = ("@introduceDomain", "@releaseDomain")
_VALID_PATH = re.compile(r"[A-Za-z0-9\-/_@]+")

# Quotas for unprivileged connections (C xenstored defaults) and for everyone.
QUOTA_NODES_PER_DOMAIN = 1000
QUOTA_ENTRY_SIZE = 2048
QUOTA_WATCHES = 128
QUOTA_TRANSACTIONS = 10
QUOTA_PERMS_PER_NODE = 5
PRIV_QUOTA_WATCHES = 4096
PRIV_QUOTA_TRANSACTIONS = 256
EVENT_QUEUE_BYTES = 256 * 1024  # beyond this, events are remembered per watch instead


class XsFail(Exception):
    """An operation fails with an xenstore error name; becomes an ERROR reply."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)


@dataclass(frozen=True, slots=True)
class Quotas:
    """Limits for unprivileged domains (C xenstored's ``-E -S -W -t -A`` options and defaults),
    and the watch and transaction limits that also bound dom0's connections."""

    nodes_per_domain: int = QUOTA_NODES_PER_DOMAIN
    entry_size: int = QUOTA_ENTRY_SIZE
    watches: int = QUOTA_WATCHES
    transactions: int = QUOTA_TRANSACTIONS  # open at once, per connection
    perms_per_node: int = QUOTA_PERMS_PER_NODE
    privileged_watches: int = PRIV_QUOTA_WATCHES
    privileged_transactions: int = PRIV_QUOTA_TRANSACTIONS


@dataclass(frozen=True, slots=True)
class Perm:
    domid: int
    access: str  # "n", "r", "w" or "b"

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        if len(text) < 2 or text[0] not in "nrwb" or not text[1:].isdigit():
            raise XsFail("EINVAL")
        domid = int(text[1:])
        if domid > 0xFFFF:
            raise XsFail("EINVAL")
        return cls(domid, text[0])


@dataclass(frozen=True, slots=True)
class Node:
    """One node; immutable so a transaction snapshot is a cheap dict copy."""

    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...]
    gen: int

    @property
    def owner(self) -> int:
        return self.perms[0].domid


@dataclass(eq=False)
class Watch:
    path: str  # absolute, or special
    token: str
    relative_prefix: str  # removed from event paths when the watch was set relative ("" if not)

    def reported(self, path: str) -> str:
        if self.relative_prefix and path.startswith(self.relative_prefix):
            return path[len(self.relative_prefix) :]
        return path


# Permissions a node had before a change, by path: a removal (the removed nodes) or SET_PERMS.
OldPerms = dict[str, tuple[Perm, ...]]
# A watch event to fire: the path, whether only watches at or above it match (a write) or also
# those below it (a removal), and the permissions it had before (None if it had none to lose).
Fire = tuple[str, bool, OldPerms | None]


@dataclass(eq=False)
class Transaction:
    """An open transaction: only the nodes it touched (copy-on-write), never the whole tree."""

    id: int
    view: dict[str, Node | None] = field(default_factory=dict)  # touched nodes as it sees them
    accessed: dict[str, int | None] = field(default_factory=dict)  # path -> live gen when touched
    written: dict[str, None] = field(default_factory=dict)  # ordered set
    fires: list[Fire] = field(default_factory=list)
    created: int = 0


@dataclass(eq=False)
class ConnState:
    """What the store knows about one client connection, including its outgoing queue."""

    domid: int = 0
    privileged: bool = True
    event_limit: int = EVENT_QUEUE_BYTES
    watches: list[Watch] = field(default_factory=list)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    out: deque[tuple[bytes, tuple[str, str] | None]] = field(default_factory=deque)
    out_bytes: int = 0
    queued_events: set[tuple[str, str]] = field(default_factory=set)
    overflowed: dict[tuple[str, str], None] = field(default_factory=dict)  # (watch path, token)
    events_dropped: int = 0
    events_coalesced: int = 0

    @property
    def home(self) -> str:
        return f"/local/domain/{self.domid}"

    def push_reply(self, msg: Message) -> None:
        data = msg.encode()
        self.out.append((data, None))
        self.out_bytes += len(data)

    def push_event(self, watch: Watch, path: str) -> None:
        key = (watch.reported(path), watch.token)
        if key in self.queued_events:
            self.events_coalesced += 1
            return
        if self.out_bytes >= self.event_limit:
            self.events_dropped += 1
            self.overflowed[(watch.reported(watch.path), watch.token)] = None
            return
        data = watch_event(*key).encode()
        self.out.append((data, key))
        self.out_bytes += len(data)
        self.queued_events.add(key)

    def pop_out(self) -> bytes | None:
        """The next queued message to send (the I/O layer sends it whole or puts it back)."""
        if not self.out:
            self._refill_overflowed()
            if not self.out:
                return None
        data, key = self.out.popleft()
        self.out_bytes -= len(data)
        if key is not None:
            self.queued_events.discard(key)
        return data

    def unpop_out(self, data: bytes) -> None:
        """Put back the unsent tail of a message (a short socket write)."""
        self.out.appendleft((data, None))
        self.out_bytes += len(data)

    def _refill_overflowed(self) -> None:
        while self.overflowed and self.out_bytes < self.event_limit:
            (path, token), _ = self.overflowed.popitem()
            data = watch_event(path, token).encode()
            self.out.append((data, (path, token)))
            self.out_bytes += len(data)
            self.queued_events.add((path, token))


def is_child(child: str, parent: str) -> bool:
    """True if ``child`` is ``parent`` or below it."""
    if parent == "/":
        return child.startswith("/")
    return child == parent or child.startswith(parent + "/")


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _parse_domid(text: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFF:
        raise XsFail("EINVAL")
    return int(text)


class Store:
    """The database and the request dispatcher. Not thread-safe: the caller serialises."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self._gen = itertools.count(1)
        root_perms = (Perm(0, "n"),)
        self.nodes: dict[str, Node] = {}
        for path in ("/", "/local", "/local/domain", "/local/domain/0", "/tool"):
            self.nodes[path] = Node(b"", root_perms, (), next(self._gen))
            if path != "/":
                parent = self.nodes[parent_of(path)]
                self.nodes[parent_of(path)] = replace(
                    parent, children=(*parent.children, path.rsplit("/", 1)[1])
                )
        self.owner_count: dict[int, int] = {0: len(self.nodes)}
        self.connections: list[ConnState] = []
        self.introduced: set[int] = {0}
        # The special watch paths carry permissions but no node (C xenstored 4.17,
        # ``dom_introduce_perms``/``dom_release_perms``, XSA-115): owned by dom0, readable by
        # nobody else, so only privileged connections hear of domains coming and going unless
        # dom0 grants a domain read access (a driver domain) with SET_PERMS on the path.
        self.special_perms: dict[str, tuple[Perm, ...]] = {
            p: (Perm(0, "n"),) for p in SPECIAL_PATHS
        }
        self._tx_ids = itertools.count(1)
        self._handlers: dict[int, Callable[[ConnState, _Ctx, Message], bytes]] = {
            XsType.READ: self._read,
            XsType.WRITE: self._write,
            XsType.MKDIR: self._mkdir,
            XsType.RM: self._rm,
            XsType.DIRECTORY: self._directory,
            XsType.DIRECTORY_PART: self._directory_part,
            XsType.GET_PERMS: self._get_perms,
            XsType.SET_PERMS: self._set_perms,
            XsType.GET_DOMAIN_PATH: self._get_domain_path,
            XsType.INTRODUCE: self._introduce,
            XsType.RELEASE: self._release,
            XsType.IS_DOMAIN_INTRODUCED: self._is_introduced,
            XsType.RESUME: self._resume,
            XsType.SET_TARGET: self._set_target,
            XsType.RESET_WATCHES: self._reset_watches,
        }

    # -- connections ---------------------------------------------------------------------------

    def connect(self, domid: int = 0, *, event_limit: int = EVENT_QUEUE_BYTES) -> ConnState:
        conn = ConnState(domid=domid, privileged=domid == 0, event_limit=event_limit)
        self.connections.append(conn)
        return conn

    def disconnect(self, conn: ConnState) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        conn.watches.clear()
        conn.transactions.clear()

    # -- the dispatcher ------------------------------------------------------------------------

    def handle(self, conn: ConnState, msg: Message) -> None:
        """Process one request: its reply, and any watch events, go to the connections' queues."""
        try:
            if msg.type == XsType.WATCH:
                self._watch(conn, msg)
                return
            if msg.type == XsType.UNWATCH:
                reply = self._unwatch(conn, msg)
            elif msg.type == XsType.TRANSACTION_START:
                reply = self._transaction_start(conn, msg)
            elif msg.type == XsType.TRANSACTION_END:
                reply = self._transaction_end(conn, msg)
            else:
                handler = self._handlers.get(msg.type)
                if handler is None:
                    raise XsFail("EINVAL")
                ctx = self._ctx(conn, msg.tx_id)
                reply = handler(conn, ctx, msg)
                if ctx.tx is None:
                    self._fire_all(ctx.fires)
        except XsFail as exc:
            conn.push_reply(error_message(exc.name, msg.req_id, msg.tx_id))
            return
        except WireProtocolError:
            conn.push_reply(error_message("EINVAL", msg.req_id, msg.tx_id))
            return
        if len(reply) > PAYLOAD_MAX:
            conn.push_reply(error_message("E2BIG", msg.req_id, msg.tx_id))
            return
        conn.push_reply(Message(msg.type, msg.req_id, msg.tx_id, reply))

    def _ctx(self, conn: ConnState, tx_id: int) -> _Ctx:
        if tx_id == 0:
            return _Ctx(self, conn, None)
        tx = conn.transactions.get(tx_id)
        if tx is None:
            raise XsFail("ENOENT")
        return _Ctx(self, conn, tx)

    # -- paths and permissions -----------------------------------------------------------------

    def canonical(self, conn: ConnState, path: str, *, special_ok: bool = False) -> str:
        if path.startswith("@"):
            if special_ok and path in SPECIAL_PATHS:
                return path
            raise XsFail("EINVAL")
        if not path.startswith("/"):
            if not path or len(path) > REL_PATH_MAX:
                raise XsFail("EINVAL")
            path = f"{conn.home}/{path}"
        if len(path) > ABS_PATH_MAX or not _VALID_PATH.fullmatch(path):
            raise XsFail("EINVAL")
        if path != "/" and (path.endswith("/") or "//" in path):
            raise XsFail("EINVAL")
        return path

    @staticmethod
    def access(conn: ConnState, node: Node) -> str:
        """The letters ("r", "w") ``conn`` may do on ``node``."""
        return Store.perms_access(conn, node.perms)

    @staticmethod
    def perms_access(conn: ConnState, perms: tuple[Perm, ...]) -> str:
        """The letters ("r", "w") ``conn`` may do on a node with ``perms``."""
        if conn.privileged or perms[0].domid == conn.domid:
            return "rw"
        letter = perms[0].access
        for perm in perms[1:]:
            if perm.domid == conn.domid:
                letter = perm.access
                break
        return {"n": "", "r": "r", "w": "w", "b": "rw"}[letter]

    def _args(self, msg: Message, count: int) -> list[str]:
        parts = split_strings(msg.payload)
        if len(parts) != count:
            raise XsFail("EINVAL")
        return parts

    # -- operations ----------------------------------------------------------------------------

    def _read(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        (path,) = self._args(msg, 1)
        return ctx.get_checked(self.canonical(conn, path), "r").value

    def _write(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        raw_path, sep, value = msg.payload.partition(b"\0")
        if not sep:
            raise XsFail("EINVAL")
        try:
            path = self.canonical(conn, raw_path.decode("utf-8"))
        except UnicodeDecodeError:
            raise XsFail("EINVAL") from None
        if not conn.privileged and len(value) > self.quotas.entry_size:
            raise XsFail("ENOSPC")
        node = ctx.get(path)
        if node is None:
            ctx.create(path, value)
        else:
            if "w" not in self.access(conn, node):
                raise XsFail("EACCES")
            ctx.put(path, replace(node, value=value, gen=self.next_gen()))
        ctx.fires.append((path, True, None))
        return OK

    def _mkdir(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        (raw,) = self._args(msg, 1)
        path = self.canonical(conn, raw)
        node = ctx.get(path)
        if node is None:
            ctx.create(path, b"")
            ctx.fires.append((path, True, None))
        elif "w" not in self.access(conn, node):
            # C xenstored looks the node up for writing: an existing node the caller may not
            # write is EACCES, so MKDIR does not tell an unprivileged caller that it exists.
            raise XsFail("EACCES")
        return OK

    def _rm(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        (raw,) = self._args(msg, 1)
        path = self.canonical(conn, raw)
        if path == "/":
            raise XsFail("EINVAL")
        node = ctx.get(path)
        if node is None:
            # Like C xenstored: removing a missing node is fine if its parent exists.
            if ctx.get(parent_of(path)) is None:
                raise XsFail("ENOENT")
            return OK
        if "w" not in self.access(conn, node):
            raise XsFail("EACCES")
        parent_path = parent_of(path)
        parent = ctx.get(parent_path)
        assert parent is not None
        name = path.rsplit("/", 1)[1]
        ctx.put(
            parent_path,
            replace(
                parent, children=tuple(c for c in parent.children if c != name), gen=self.next_gen()
            ),
        )
        removed: OldPerms = {}
        for sub in list(ctx.walk(path)):
            old = ctx.delete(sub)
            if old is not None:
                removed[sub] = old.perms
        ctx.fires.append((path, False, removed))
        return OK

    def _directory(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        (raw,) = self._args(msg, 1)
        node = ctx.get_checked(self.canonical(conn, raw), "r")
        return join_strings(*node.children)

    def _directory_part(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        raw, offset_text = self._args(msg, 2)
        node = ctx.get_checked(self.canonical(conn, raw), "r")
        if not offset_text.isdigit():
            raise XsFail("EINVAL")
        offset = int(offset_text)
        children = join_strings(*node.children)
        if offset > len(children):
            raise XsFail("EINVAL")
        head = f"{node.gen:x}".encode() + b"\0"
        # Whole child names only, leaving room for the final end marker (C xenstored's rule).
        end = offset
        while end < len(children):
            nxt = children.index(b"\0", end) + 1
            if len(head) + nxt - offset > PAYLOAD_MAX - 1:
                break
            end = nxt
        body = head + children[offset:end]
        if end == len(children):
            body += b"\0"
        return body

    def _get_perms(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        (raw,) = self._args(msg, 1)
        if raw in SPECIAL_PATHS:
            perms = self.special_perms[raw]
            if "r" not in self.perms_access(conn, perms):
                raise XsFail("EACCES")
            return join_strings(*(str(p) for p in perms))
        node = ctx.get_checked(self.canonical(conn, raw), "r")
        return join_strings(*(str(p) for p in node.perms))

    def _set_perms(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        parts = split_strings(msg.payload)
        if len(parts) < 2:
            raise XsFail("EINVAL")
        path = self.canonical(conn, parts[0], special_ok=True)
        if not conn.privileged and len(parts) - 1 > self.quotas.perms_per_node:
            raise XsFail("ENOSPC")  # as C's do_set_perms (quota_nb_perms_per_node)
        perms = tuple(Perm.parse(p) for p in parts[1:])
        if path in SPECIAL_PATHS:
            # C's set_perms_special: write access and ownership (dom0, or whom it gave the
            # path to); no node changes, so no watch fires.
            old = self.special_perms[path]
            if not conn.privileged and old[0].domid != conn.domid:
                raise XsFail("EACCES")
            if not conn.privileged and perms[0].domid != conn.domid:
                raise XsFail("EPERM")
            self.special_perms[path] = perms
            return OK
        node = ctx.get_checked(path, "w")
        # Only the owner (or dom0) may change permissions, and only dom0 may give a node away.
        if not conn.privileged and node.owner != conn.domid:
            raise XsFail("EACCES")
        if not conn.privileged and perms[0].domid != node.owner:
            raise XsFail("EPERM")
        ctx.put(path, replace(node, perms=perms, gen=self.next_gen()))
        # A watcher that loses read access still hears of the change (C passes old_perms).
        ctx.fires.append((path, True, {path: node.perms}))
        return OK

    def _watch(self, conn: ConnState, msg: Message) -> None:
        raw, token = self._args(msg, 2)
        path = self.canonical(conn, raw, special_ok=True)
        quota = self.quotas.privileged_watches if conn.privileged else self.quotas.watches
        if any(w.path == path and w.token == token for w in conn.watches):
            raise XsFail("EEXIST")
        if len(conn.watches) >= quota:
            raise XsFail("E2BIG")
        prefix = "" if raw.startswith(("/", "@")) else conn.home + "/"
        watch = Watch(path, token, prefix)
        conn.watches.append(watch)
        conn.push_reply(Message(msg.type, msg.req_id, msg.tx_id, OK))
        conn.push_event(watch, path)  # the initial fire, after the reply (as xenstored does)

    def _unwatch(self, conn: ConnState, msg: Message) -> bytes:
        raw, token = self._args(msg, 2)
        path = self.canonical(conn, raw, special_ok=True)
        for watch in conn.watches:
            if watch.path == path and watch.token == token:
                conn.watches.remove(watch)
                conn.overflowed.pop((watch.reported(path), token), None)
                return OK
        raise XsFail("ENOENT")

    def _transaction_start(self, conn: ConnState, msg: Message) -> bytes:
        if msg.tx_id != 0:
            raise XsFail("EBUSY")
        if msg.payload not in (b"", b"\0"):
            raise XsFail("EINVAL")
        quota = self.quotas.privileged_transactions if conn.privileged else self.quotas.transactions
        if len(conn.transactions) >= quota:
            raise XsFail("ENOSPC")
        tx_id = next(self._tx_ids)
        conn.transactions[tx_id] = Transaction(tx_id)
        return join_strings(str(tx_id))

    def _transaction_end(self, conn: ConnState, msg: Message) -> bytes:
        tx = conn.transactions.get(msg.tx_id)
        if tx is None:
            raise XsFail("ENOENT")
        (flag,) = self._args(msg, 1)
        if flag not in ("T", "F"):
            raise XsFail("EINVAL")
        del conn.transactions[msg.tx_id]
        if flag == "F":
            return OK
        for path, base_gen in tx.accessed.items():
            current = self.nodes.get(path)
            if (current.gen if current else None) != base_gen:
                raise XsFail("EAGAIN")
        for path in tx.written:
            node = tx.view.get(path)
            old = self.nodes.get(path)
            if old is not None:
                self._count(old.owner, -1)
            if node is None:
                self.nodes.pop(path, None)
            else:
                self.nodes[path] = node
                self._count(node.owner, +1)
        self._fire_all(tx.fires)
        return OK

    def _get_domain_path(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        (domid,) = self._args(msg, 1)
        return join_strings(f"/local/domain/{_parse_domid(domid)}")

    def _need_priv(self, conn: ConnState) -> None:
        if not conn.privileged:
            raise XsFail("EACCES")

    def _introduce(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        self._need_priv(conn)
        domid, mfn, port = self._args(msg, 3)
        if not mfn.isdigit() or not port.isdigit():
            raise XsFail("EINVAL")
        self.introduce_domain(_parse_domid(domid))
        return OK

    def _release(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        self._need_priv(conn)
        (domid,) = self._args(msg, 1)
        if not self.release_domain(_parse_domid(domid)):
            raise XsFail("ENOENT")
        return OK

    def _is_introduced(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        self._need_priv(conn)
        (domid,) = self._args(msg, 1)
        return join_strings("T" if _parse_domid(domid) in self.introduced else "F")

    def _resume(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        self._need_priv(conn)
        (domid,) = self._args(msg, 1)
        if _parse_domid(domid) not in self.introduced:
            raise XsFail("ENOENT")
        return OK

    def _set_target(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        self._need_priv(conn)
        domid, target = self._args(msg, 2)
        _parse_domid(domid)
        _parse_domid(target)
        return OK

    def _reset_watches(self, conn: ConnState, ctx: _Ctx, msg: Message) -> bytes:
        conn.watches.clear()
        conn.overflowed.clear()
        conn.transactions.clear()
        return OK

    # -- domains (also called in-process by a simulated toolstack) ------------------------------

    def introduce_domain(self, domid: int) -> None:
        self.introduced.add(domid)
        self._fire_all([("@introduceDomain", True, None)])

    def release_domain(self, domid: int) -> bool:
        if domid not in self.introduced or domid == 0:
            return False
        self.introduced.discard(domid)
        # As C's remove_domid_from_perm on the special paths: a later domain given the same id
        # must not inherit the dead one's access (what it owned passes to dom0).
        for special, perms in self.special_perms.items():
            owner = perms[0] if perms[0].domid != domid else Perm(0, perms[0].access)
            self.special_perms[special] = (owner, *(p for p in perms[1:] if p.domid != domid))
        self._fire_all([("@releaseDomain", True, None)])
        return True

    # -- internals -----------------------------------------------------------------------------

    def next_gen(self) -> int:
        return next(self._gen)

    def _count(self, domid: int, delta: int) -> None:
        self.owner_count[domid] = self.owner_count.get(domid, 0) + delta

    def _fire_all(self, fires: list[Fire]) -> None:
        for path, exact, old in fires:
            self._fire(path, exact, old)

    def _fire(self, path: str, exact: bool, old: OldPerms | None) -> None:
        for conn in self.connections:
            for watch in conn.watches:
                if path.startswith("@") or watch.path.startswith("@"):
                    if watch.path == path and "r" in self.perms_access(
                        conn, self.special_perms[path]
                    ):
                        conn.push_event(watch, path)
                    continue
                if is_child(path, watch.path):
                    if self._permitted(conn, path, old):
                        conn.push_event(watch, path)
                elif not exact and is_child(watch.path, path):
                    # A watch below a removed node: judged by the nearest removed node.
                    judged = watch.path
                    while old is not None and judged not in old and judged != path:
                        judged = parent_of(judged)
                    if self._permitted(conn, judged, old):
                        conn.push_event(watch, watch.path)

    def _permitted(self, conn: ConnState, path: str, old: OldPerms | None) -> bool:
        """May ``conn`` hear of a change at ``path``? (C xenstored's ``watch_permitted``.)

        Yes if it may read the node as it was before the change (``old``) or as it is now, or
        the node's parent; a node that is gone and left no permissions behind tells nothing.
        """
        if conn.privileged:
            return True
        before = old.get(path) if old is not None else None
        if before is not None and "r" in self.perms_access(conn, before):
            return True
        node = self.nodes.get(path)
        if node is not None and "r" in self.access(conn, node):
            return True
        if node is None and before is None:
            return False
        if path == "/":
            return False
        up = parent_of(path)
        parent_perms = old.get(up) if old is not None else None
        if parent_perms is None:
            parent = self.nodes.get(up)
            if parent is None:
                return False
            parent_perms = parent.perms
        return "r" in self.perms_access(conn, parent_perms)


class _Ctx:
    """The tree as one request sees it: the live tree, or the live tree overlaid with what a
    transaction touched (its first look at a node records the node's generation)."""

    def __init__(self, store: Store, conn: ConnState, tx: Transaction | None) -> None:
        self.store = store
        self.conn = conn
        self.tx = tx
        self.fires: list[Fire] = tx.fires if tx is not None else []

    def get(self, path: str) -> Node | None:
        tx = self.tx
        if tx is None:
            return self.store.nodes.get(path)
        if path in tx.view:
            return tx.view[path]
        node = self.store.nodes.get(path)
        tx.view[path] = node
        tx.accessed[path] = node.gen if node is not None else None
        return node

    def get_checked(self, path: str, letter: str) -> Node:
        node = self.get(path)
        if node is None:
            raise XsFail("ENOENT")
        if letter not in self.store.access(self.conn, node):
            raise XsFail("EACCES")
        return node

    def put(self, path: str, node: Node) -> None:
        old = self.get(path)
        if self.tx is not None:
            self.tx.view[path] = node
            self.tx.written[path] = None
        else:
            self.store.nodes[path] = node
            if old is not None:
                self.store._count(old.owner, -1)
            self.store._count(node.owner, +1)

    def delete(self, path: str) -> Node | None:
        """Remove ``path``; return the node as it was."""
        old = self.get(path)
        if self.tx is not None:
            self.tx.view[path] = None
            self.tx.written[path] = None
        else:
            self.store.nodes.pop(path, None)
            if old is not None:
                self.store._count(old.owner, -1)
        return old

    def walk(self, path: str) -> Iterator[str]:
        """``path`` and every node below it, parents first."""
        stack = [path]
        while stack:
            current = stack.pop()
            node = self.get(current)
            if node is None:
                continue
            yield current
            base = current.rstrip("/")
            stack.extend(f"{base}/{c}" for c in node.children)

    def create(self, path: str, value: bytes) -> None:
        """Create ``path`` (and missing ancestors) with the parent's permissions; an unprivileged
        creator becomes the owner, a privileged one leaves the parent's owner in place."""
        conn = self.conn
        missing: list[str] = []
        current = path
        parent = None
        while True:
            missing.append(current)
            up = parent_of(current)
            parent = self.get(up)
            if parent is not None:
                break
            current = up
        if "w" not in self.store.access(conn, parent):
            raise XsFail("EACCES")
        if not conn.privileged:
            used = self.store.owner_count.get(conn.domid, 0)
            if self.tx is not None:
                used += self.tx.created
            if used + len(missing) > self.store.quotas.nodes_per_domain:
                raise XsFail("ENOSPC")
        for sub in reversed(missing):
            up = parent_of(sub)
            parent = self.get(up)
            assert parent is not None
            name = sub.rsplit("/", 1)[1]
            self.put(
                up, replace(parent, children=(*parent.children, name), gen=self.store.next_gen())
            )
            if conn.privileged:
                perms = parent.perms
            else:
                perms = (Perm(conn.domid, parent.perms[0].access), *parent.perms[1:])
            self.put(sub, Node(value if sub == path else b"", perms, (), self.store.next_gen()))
            if self.tx is not None:
                self.tx.created += 1
