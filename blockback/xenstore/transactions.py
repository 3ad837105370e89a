"""XenStore transactions: the tree as one request sees it, copy-on-write (pure, no I/O).

Behaviour follows C ``xenstored`` since Xen 4.9 (Xen 4.17 ``tools/xenstore/
xenstored_transaction.c``) and ``docs/misc/xenstore.txt`` ("TRANSACTION_START/END"):

* A transaction holds only the nodes it touched. The first time it reads or writes a node it
  takes the live node and records its generation; later reads see its own copy.
* At commit, if any touched node has a different generation in the live tree (or appeared or
  vanished), the commit fails with ``EAGAIN``; otherwise the written nodes are copied over and
  the watches fire. An abort drops the copy.
* An open transaction costs memory in proportion to what it touched, not to the tree; each
  connection may hold a bounded number (``quotas.py``).

:class:`View` is also how a request outside a transaction changes the live tree, so every
operation (``store.py``) is written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from .connection import ConnState
from .permissions import Caller, access
from .quotas import Quotas
from .tree import Node, Perm, Tree, XsFail, parent_of
from .watches import Fire


@dataclass(eq=False)
class Transaction:
    """An open transaction: only the nodes it touched (copy-on-write), never the whole tree."""

    id: int
    view: dict[str, Node | None] = field(default_factory=dict)  # touched nodes as it sees them
    accessed: dict[str, int | None] = field(default_factory=dict)  # path -> live gen when touched
    written: dict[str, None] = field(default_factory=dict)  # ordered set
    fires: list[Fire] = field(default_factory=list)
    created: int = 0


def start_transaction(conn: ConnState, quotas: Quotas, ids: Iterator[int]) -> Transaction:
    """Open a transaction on ``conn`` with the next of ``ids`` (ENOSPC past the connection's
    quota, and then no id is used up)."""
    quota = quotas.privileged_transactions if conn.privileged else quotas.transactions
    if len(conn.transactions) >= quota:
        raise XsFail("ENOSPC")
    tx = Transaction(next(ids))
    conn.transactions[tx.id] = tx
    return tx


def commit(tree: Tree, tx: Transaction) -> list[Fire]:
    """Copy what ``tx`` wrote into the live tree (EAGAIN if anything it touched has changed
    since); the watch events it queued, for the caller to fire."""
    for path, base_gen in tx.accessed.items():
        current = tree.nodes.get(path)
        if (current.gen if current else None) != base_gen:
            raise XsFail("EAGAIN")
    for path in tx.written:
        node = tx.view.get(path)
        if node is None:
            tree.remove(path)
        else:
            tree.set(path, node)
    return tx.fires


class View:
    """The tree as one request sees it: the live tree, or the live tree overlaid with what a
    transaction touched (its first look at a node records the node's generation)."""

    def __init__(self, tree: Tree, quotas: Quotas, conn: Caller, tx: Transaction | None) -> None:
        self.tree = tree
        self.quotas = quotas
        self.conn = conn
        self.tx = tx
        self.fires: list[Fire] = tx.fires if tx is not None else []

    def get(self, path: str) -> Node | None:
        tx = self.tx
        if tx is None:
            return self.tree.nodes.get(path)
        if path in tx.view:
            return tx.view[path]
        node = self.tree.nodes.get(path)
        tx.view[path] = node
        tx.accessed[path] = node.gen if node is not None else None
        return node

    def get_checked(self, path: str, letter: str) -> Node:
        node = self.get(path)
        if node is None:
            raise XsFail("ENOENT")
        if letter not in access(self.conn, node.perms):
            raise XsFail("EACCES")
        return node

    def put(self, path: str, node: Node) -> None:
        self.get(path)  # a transaction records the generation it replaces
        if self.tx is not None:
            self.tx.view[path] = node
            self.tx.written[path] = None
        else:
            self.tree.set(path, node)

    def delete(self, path: str) -> Node | None:
        """Remove ``path``; return the node as it was."""
        old = self.get(path)
        if self.tx is not None:
            self.tx.view[path] = None
            self.tx.written[path] = None
        else:
            self.tree.remove(path)
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
        if "w" not in access(conn, parent.perms):
            raise XsFail("EACCES")
        if not conn.privileged:
            used = self.tree.owner_count.get(conn.domid, 0)
            if self.tx is not None:
                used += self.tx.created
            if used + len(missing) > self.quotas.nodes_per_domain:
                raise XsFail("ENOSPC")
        for sub in reversed(missing):
            up = parent_of(sub)
            parent = self.get(up)
            assert parent is not None
            name = sub.rsplit("/", 1)[1]
            self.put(
                up, replace(parent, children=(*parent.children, name), gen=self.tree.next_gen())
            )
            if conn.privileged:
                perms = parent.perms
            else:
                perms = (Perm(conn.domid, parent.perms[0].access), *parent.perms[1:])
            self.put(sub, Node(value if sub == path else b"", perms, (), self.tree.next_gen()))
            if self.tx is not None:
                self.tx.created += 1
