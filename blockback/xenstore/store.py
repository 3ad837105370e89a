"""The XenStore database engine: the request dispatcher and the operations (pure, no I/O).

Behaviour follows Xen's ``docs/misc/xenstore.txt`` and the C ``xenstored`` (Xen 4.17
``tools/xenstore/xenstored_core.c``, ``xenstored_domain.c``); each request type of ``xs_wire.h``
(``wire.py``) is one method here. What the operations are made of lives in its own module:

* ``tree.py``: nodes, paths, the live tree (writing a node creates missing ancestors; ``RM`` is
  recursive and succeeds when only the node is missing; ``MKDIR`` of an existing node needs
  write access to it, like ``WRITE``);
* ``permissions.py``: who may read or write a node, and who may hear of a change (nodes dom0
  creates keep their parent's owner, so what dom0 writes into a guest's home stays the guest's;
  an unprivileged creator becomes the owner: ``transactions.View.create``);
* ``transactions.py``: copy-on-write transactions, and the view every request works through;
* ``watches.py``: registering and firing watches; ``connection.py``: one connection's watches,
  transactions and bounded outgoing queue (XSA-349);
* ``quotas.py``: C xenstored's limits for unprivileged domains.

The I/O layer (``server.py``) owns sockets; this module only turns a request into messages for
connections.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace

from .connection import ConnState
from .permissions import OldPerms, access
from .quotas import EVENT_QUEUE_BYTES, Quotas
from .transactions import View, commit, start_transaction
from .tree import SPECIAL_PATHS, Node, Perm, Tree, XsFail, canonical, parent_of, parse_domid
from .watches import Fire, add_watch, fire_all, remove_watch
from .wire import (
    OK,
    PAYLOAD_MAX,
    Message,
    WireProtocolError,
    XsType,
    error_message,
    join_strings,
    split_strings,
)

# Where the store's parts used to be imported from (tests, the server, benchmarks).
__all__ = ["EVENT_QUEUE_BYTES", "ConnState", "Quotas", "Store", "XsFail"]


class Store:
    """The database and the request dispatcher. Not thread-safe: the caller serialises."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.tree = Tree()
        self.connections: list[ConnState] = []
        self.introduced: set[int] = {0}
        self._tx_ids = itertools.count(1)
        self._handlers: dict[int, Callable[[ConnState, View, Message], bytes]] = {
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

    @property
    def nodes(self) -> dict[str, Node]:
        """The live tree's nodes by path."""
        return self.tree.nodes

    @property
    def special_perms(self) -> dict[str, tuple[Perm, ...]]:
        """The permissions of ``@introduceDomain`` and ``@releaseDomain`` (``tree.py``)."""
        return self.tree.special_perms

    @property
    def owner_count(self) -> dict[int, int]:
        """How many nodes each domain owns (the node quota)."""
        return self.tree.owner_count

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
                view = self._view(conn, msg.tx_id)
                reply = handler(conn, view, msg)
                if view.tx is None:
                    self._fire_all(view.fires)
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

    def _view(self, conn: ConnState, tx_id: int) -> View:
        if tx_id == 0:
            return View(self.tree, self.quotas, conn, None)
        tx = conn.transactions.get(tx_id)
        if tx is None:
            raise XsFail("ENOENT")
        return View(self.tree, self.quotas, conn, tx)

    def _args(self, msg: Message, count: int) -> list[str]:
        parts = split_strings(msg.payload)
        if len(parts) != count:
            raise XsFail("EINVAL")
        return parts

    # -- operations ----------------------------------------------------------------------------

    def _read(self, conn: ConnState, view: View, msg: Message) -> bytes:
        (path,) = self._args(msg, 1)
        return view.get_checked(canonical(conn.home, path), "r").value

    def _write(self, conn: ConnState, view: View, msg: Message) -> bytes:
        raw_path, sep, value = msg.payload.partition(b"\0")
        if not sep:
            raise XsFail("EINVAL")
        try:
            path = canonical(conn.home, raw_path.decode("utf-8"))
        except UnicodeDecodeError:
            raise XsFail("EINVAL") from None
        if not conn.privileged and len(value) > self.quotas.entry_size:
            raise XsFail("ENOSPC")
        node = view.get(path)
        if node is None:
            view.create(path, value)
        else:
            if "w" not in access(conn, node.perms):
                raise XsFail("EACCES")
            view.put(path, replace(node, value=value, gen=self.next_gen()))
        view.fires.append((path, True, None))
        return OK

    def _mkdir(self, conn: ConnState, view: View, msg: Message) -> bytes:
        (raw,) = self._args(msg, 1)
        path = canonical(conn.home, raw)
        node = view.get(path)
        if node is None:
            view.create(path, b"")
            view.fires.append((path, True, None))
        elif "w" not in access(conn, node.perms):
            # C xenstored looks the node up for writing: an existing node the caller may not
            # write is EACCES, so MKDIR does not tell an unprivileged caller that it exists.
            raise XsFail("EACCES")
        return OK

    def _rm(self, conn: ConnState, view: View, msg: Message) -> bytes:
        (raw,) = self._args(msg, 1)
        path = canonical(conn.home, raw)
        if path == "/":
            raise XsFail("EINVAL")
        node = view.get(path)
        if node is None:
            # Like C xenstored: removing a missing node is fine if its parent exists.
            if view.get(parent_of(path)) is None:
                raise XsFail("ENOENT")
            return OK
        if "w" not in access(conn, node.perms):
            raise XsFail("EACCES")
        parent_path = parent_of(path)
        parent = view.get(parent_path)
        assert parent is not None
        name = path.rsplit("/", 1)[1]
        view.put(
            parent_path,
            replace(
                parent, children=tuple(c for c in parent.children if c != name), gen=self.next_gen()
            ),
        )
        removed: OldPerms = {}
        for sub in list(view.walk(path)):
            old = view.delete(sub)
            if old is not None:
                removed[sub] = old.perms
        view.fires.append((path, False, removed))
        return OK

    def _directory(self, conn: ConnState, view: View, msg: Message) -> bytes:
        (raw,) = self._args(msg, 1)
        node = view.get_checked(canonical(conn.home, raw), "r")
        return join_strings(*node.children)

    def _directory_part(self, conn: ConnState, view: View, msg: Message) -> bytes:
        raw, offset_text = self._args(msg, 2)
        node = view.get_checked(canonical(conn.home, raw), "r")
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

    def _get_perms(self, conn: ConnState, view: View, msg: Message) -> bytes:
        (raw,) = self._args(msg, 1)
        if raw in SPECIAL_PATHS:
            perms = self.special_perms[raw]
            if "r" not in access(conn, perms):
                raise XsFail("EACCES")
            return join_strings(*(str(p) for p in perms))
        node = view.get_checked(canonical(conn.home, raw), "r")
        return join_strings(*(str(p) for p in node.perms))

    def _set_perms(self, conn: ConnState, view: View, msg: Message) -> bytes:
        parts = split_strings(msg.payload)
        if len(parts) < 2:
            raise XsFail("EINVAL")
        path = canonical(conn.home, parts[0], special_ok=True)
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
        node = view.get_checked(path, "w")
        # Only the owner (or dom0) may change permissions, and only dom0 may give a node away.
        if not conn.privileged and node.owner != conn.domid:
            raise XsFail("EACCES")
        if not conn.privileged and perms[0].domid != node.owner:
            raise XsFail("EPERM")
        view.put(path, replace(node, perms=perms, gen=self.next_gen()))
        # A watcher that loses read access still hears of the change (C passes old_perms).
        view.fires.append((path, True, {path: node.perms}))
        return OK

    def _watch(self, conn: ConnState, msg: Message) -> None:
        raw, token = self._args(msg, 2)
        path = canonical(conn.home, raw, special_ok=True)
        watch = add_watch(conn, self.quotas, raw, path, token)
        conn.push_reply(Message(msg.type, msg.req_id, msg.tx_id, OK))
        conn.push_event(watch, path)  # the initial fire, after the reply (as xenstored does)

    def _unwatch(self, conn: ConnState, msg: Message) -> bytes:
        raw, token = self._args(msg, 2)
        remove_watch(conn, canonical(conn.home, raw, special_ok=True), token)
        return OK

    def _transaction_start(self, conn: ConnState, msg: Message) -> bytes:
        if msg.tx_id != 0:
            raise XsFail("EBUSY")
        if msg.payload not in (b"", b"\0"):
            raise XsFail("EINVAL")
        tx = start_transaction(conn, self.quotas, self._tx_ids)
        return join_strings(str(tx.id))

    def _transaction_end(self, conn: ConnState, msg: Message) -> bytes:
        tx = conn.transactions.get(msg.tx_id)
        if tx is None:
            raise XsFail("ENOENT")
        (flag,) = self._args(msg, 1)
        if flag not in ("T", "F"):
            raise XsFail("EINVAL")
        del conn.transactions[msg.tx_id]  # gone whether it commits, aborts or conflicts
        if flag == "T":
            self._fire_all(commit(self.tree, tx))
        return OK

    def _get_domain_path(self, conn: ConnState, view: View, msg: Message) -> bytes:
        (domid,) = self._args(msg, 1)
        return join_strings(f"/local/domain/{parse_domid(domid)}")

    def _need_priv(self, conn: ConnState) -> None:
        if not conn.privileged:
            raise XsFail("EACCES")

    def _introduce(self, conn: ConnState, view: View, msg: Message) -> bytes:
        self._need_priv(conn)
        domid, mfn, port = self._args(msg, 3)
        if not mfn.isdigit() or not port.isdigit():
            raise XsFail("EINVAL")
        self.introduce_domain(parse_domid(domid))
        return OK

    def _release(self, conn: ConnState, view: View, msg: Message) -> bytes:
        self._need_priv(conn)
        (domid,) = self._args(msg, 1)
        if not self.release_domain(parse_domid(domid)):
            raise XsFail("ENOENT")
        return OK

    def _is_introduced(self, conn: ConnState, view: View, msg: Message) -> bytes:
        self._need_priv(conn)
        (domid,) = self._args(msg, 1)
        return join_strings("T" if parse_domid(domid) in self.introduced else "F")

    def _resume(self, conn: ConnState, view: View, msg: Message) -> bytes:
        self._need_priv(conn)
        (domid,) = self._args(msg, 1)
        if parse_domid(domid) not in self.introduced:
            raise XsFail("ENOENT")
        return OK

    def _set_target(self, conn: ConnState, view: View, msg: Message) -> bytes:
        self._need_priv(conn)
        domid, target = self._args(msg, 2)
        parse_domid(domid)
        parse_domid(target)
        return OK

    def _reset_watches(self, conn: ConnState, view: View, msg: Message) -> bytes:
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
        return self.tree.next_gen()

    def _fire_all(self, fires: list[Fire]) -> None:
        fire_all(self.connections, self.tree, fires)
