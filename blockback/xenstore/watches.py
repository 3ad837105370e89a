"""XenStore watches: registering, removing and firing them (pure, no I/O).

Behaviour follows Xen's ``docs/misc/xenstore.txt`` ("WATCH") and the C ``xenstored`` (Xen 4.17
``tools/xenstore/xenstored_watch.c``):

* A watch matches its node and everything below it; a watch set with a relative path reports
  relative paths. Registering a watch fires it once at once (after the ``OK`` reply).
* A recursive removal also fires watches set *below* the removed node, with the watch's own
  path, judged by the permissions of the nearest removed node.
* Special paths (``@introduceDomain``, ``@releaseDomain``) match only watches on that path,
  and only for connections their permissions let read (dom0 unless it granted others, as C
  xenstored since XSA-115; ``tree.Tree.special_perms``).
* An unprivileged watcher hears of a change only where ``permissions.watch_permitted`` allows.

Events go to each connection's bounded queue (``connection.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .connection import ConnState
from .permissions import OldPerms, access, watch_permitted
from .quotas import Quotas
from .tree import Tree, XsFail, is_child, parent_of

# A watch event to fire: the path, whether only watches at or above it match (a write) or also
# those below it (a removal), and the permissions it had before (None if it had none to lose).
Fire = tuple[str, bool, OldPerms | None]


@dataclass(eq=False)
class Watch:
    path: str  # absolute, or special
    token: str
    relative_prefix: str  # removed from event paths when the watch was set relative ("" if not)

    def reported(self, path: str) -> str:
        if self.relative_prefix and path.startswith(self.relative_prefix):
            return path[len(self.relative_prefix) :]
        return path


def add_watch(conn: ConnState, quotas: Quotas, raw: str, path: str, token: str) -> Watch:
    """Register a watch on canonical ``path`` (``raw`` as the client gave it); EEXIST for a
    duplicate, E2BIG past the watch quota.  The caller queues the reply, then the first fire."""
    quota = quotas.privileged_watches if conn.privileged else quotas.watches
    if any(w.path == path and w.token == token for w in conn.watches):
        raise XsFail("EEXIST")
    if len(conn.watches) >= quota:
        raise XsFail("E2BIG")
    prefix = "" if raw.startswith(("/", "@")) else conn.home + "/"
    watch = Watch(path, token, prefix)
    conn.watches.append(watch)
    return watch


def remove_watch(conn: ConnState, path: str, token: str) -> None:
    """Remove the watch on canonical ``path`` with ``token`` (ENOENT if there is none)."""
    for watch in conn.watches:
        if watch.path == path and watch.token == token:
            conn.watches.remove(watch)
            conn.overflowed.pop((watch.reported(path), token), None)
            return
    raise XsFail("ENOENT")


def fire_all(connections: Iterable[ConnState], tree: Tree, fires: Iterable[Fire]) -> None:
    """Queue the events of ``fires`` (in order) on every connection with a matching watch."""
    conns = list(connections)
    for path, exact, old in fires:
        fire(conns, tree, path, exact, old)


def fire(
    connections: Iterable[ConnState], tree: Tree, path: str, exact: bool, old: OldPerms | None
) -> None:
    for conn in connections:
        for watch in conn.watches:
            if path.startswith("@") or watch.path.startswith("@"):
                # A special path fires for those its permissions let read (XSA-115).
                if watch.path == path and "r" in access(conn, tree.special_perms[path]):
                    conn.push_event(watch, path)
                continue
            if is_child(path, watch.path):
                if watch_permitted(conn, tree, path, old):
                    conn.push_event(watch, path)
            elif not exact and is_child(watch.path, path):
                # A watch below a removed node: judged by the nearest removed node.
                judged = watch.path
                while old is not None and judged not in old and judged != path:
                    judged = parent_of(judged)
                if watch_permitted(conn, tree, judged, old):
                    conn.push_event(watch, watch.path)
