"""XenStore permissions: who may read or write a node, and who may hear of a change (pure).

Source: Xen's ``docs/misc/xenstore.txt`` ("Permissions") and the C ``xenstored`` (Xen 4.17
``tools/xenstore/xenstored_core.c`` ``perm_for_conn``, ``xenstored_watch.c``
``watch_permitted``):

* The first entry of a node's permission list (:class:`tree.Perm`) names the owner and the
  access of every domain not listed (``n`` none, ``r`` read, ``w`` write, ``b`` both); later
  entries give listed domains their own access. The owner and dom0 (privileged) have full
  access.
* An unprivileged watcher hears of a node only if it may read the node or the node's parent: by
  the permissions the node has after a change, or had before it (a removal, or a ``SET_PERMS``
  that took its access away).
"""

from __future__ import annotations

from typing import Protocol

from .tree import Perm, Tree, parent_of

# Permissions a node had before a change, by path: a removal (the removed nodes) or SET_PERMS.
OldPerms = dict[str, tuple[Perm, ...]]

_LETTERS = {"n": "", "r": "r", "w": "w", "b": "rw"}


class Caller(Protocol):
    """Who asks: a connection's domain and whether it is privileged (dom0)."""

    @property
    def domid(self) -> int: ...

    @property
    def privileged(self) -> bool: ...


def access(caller: Caller, perms: tuple[Perm, ...]) -> str:
    """The letters ("r", "w") ``caller`` may do on a node with ``perms``."""
    if caller.privileged or perms[0].domid == caller.domid:
        return "rw"
    letter = perms[0].access
    for perm in perms[1:]:
        if perm.domid == caller.domid:
            letter = perm.access
            break
    return _LETTERS[letter]


def watch_permitted(caller: Caller, tree: Tree, path: str, old: OldPerms | None) -> bool:
    """May ``caller`` hear of a change at ``path``? (C xenstored's ``watch_permitted``.)

    Yes if it may read the node as it was before the change (``old``) or as it is now, or
    the node's parent; a node that is gone and left no permissions behind tells nothing.
    """
    if caller.privileged:
        return True
    before = old.get(path) if old is not None else None
    if before is not None and "r" in access(caller, before):
        return True
    node = tree.nodes.get(path)
    if node is not None and "r" in access(caller, node.perms):
        return True
    if node is None and before is None:
        return False
    if path == "/":
        return False
    up = parent_of(path)
    parent_perms = old.get(up) if old is not None else None
    if parent_perms is None:
        parent = tree.nodes.get(up)
        if parent is None:
            return False
        parent_perms = parent.perms
    return "r" in access(caller, parent_perms)
