"""The XenStore tree: nodes, paths and the live database (pure, no I/O).

Behaviour follows Xen's ``docs/misc/xenstore.txt`` and the C ``xenstored`` (Xen 4.17
``tools/xenstore/xenstored_core.c``):

* Every node has a value (bytes), a permission list of :class:`Perm` entries (what they allow:
  ``permissions.py``) and ordered children.
  Nodes are immutable records (:class:`Node`): a change replaces the node with a new generation,
  which is what transactions (``transactions.py``) compare at commit.
* Paths: absolute (``/local/...``), relative to the connection's home ``/local/domain/<domid>``,
  or special (``@introduceDomain``, ``@releaseDomain``: for watches and their permissions). Only
  ``[A-Za-z0-9-/_@]`` are valid characters; ``XENSTORE_ABS_PATH_MAX`` and ``_REL_PATH_MAX``
  bound them (``xs_wire.h``).
* The live tree counts the nodes each domain owns, for the node quota (``quotas.py``).

A failed operation raises :class:`XsFail` with an ``xsd_errors`` name; the dispatcher
(``store.py``) turns it into an ERROR reply.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

from .wire import ABS_PATH_MAX, REL_PATH_MAX

SPECIAL_PATHS = ("@introduceDomain", "@releaseDomain")
_VALID_PATH = re.compile(r"[A-Za-z0-9\-/_@]+")


class XsFail(Exception):
    """An operation fails with an xenstore error name; becomes an ERROR reply."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry, ``<letter><domid>`` on the wire (``"r5"``): ``n`` none, ``r`` read,
    ``w`` write, ``b`` both."""

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


def is_child(child: str, parent: str) -> bool:
    """True if ``child`` is ``parent`` or below it."""
    if parent == "/":
        return child.startswith("/")
    return child == parent or child.startswith(parent + "/")


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def parse_domid(text: str) -> int:
    """A domid argument (decimal, at most 0xFFFF); EINVAL otherwise."""
    if not text.isdigit() or int(text) > 0xFFFF:
        raise XsFail("EINVAL")
    return int(text)


def canonical(home: str, path: str, *, special_ok: bool = False) -> str:
    """``path`` made absolute (relative paths are under ``home``), or EINVAL if it is not a
    valid xenstore path (special paths only where ``special_ok``: watches)."""
    if path.startswith("@"):
        if special_ok and path in SPECIAL_PATHS:
            return path
        raise XsFail("EINVAL")
    if not path.startswith("/"):
        if not path or len(path) > REL_PATH_MAX:
            raise XsFail("EINVAL")
        path = f"{home}/{path}"
    if len(path) > ABS_PATH_MAX or not _VALID_PATH.fullmatch(path):
        raise XsFail("EINVAL")
    if path != "/" and (path.endswith("/") or "//" in path):
        raise XsFail("EINVAL")
    return path


class Tree:
    """The live tree: nodes by path, how many nodes each domain owns, the generation counter,
    and the permissions of the special paths (which have no node)."""

    def __init__(self) -> None:
        self._gen = itertools.count(1)
        root_perms = (Perm(0, "n"),)
        self.nodes: dict[str, Node] = {}
        for path in ("/", "/local", "/local/domain", "/local/domain/0", "/tool"):
            self.nodes[path] = Node(b"", root_perms, (), self.next_gen())
            if path != "/":
                parent = self.nodes[parent_of(path)]
                self.nodes[parent_of(path)] = replace(
                    parent, children=(*parent.children, path.rsplit("/", 1)[1])
                )
        self.owner_count: dict[int, int] = {0: len(self.nodes)}
        # The special watch paths carry permissions but no node (C xenstored 4.17,
        # ``dom_introduce_perms``/``dom_release_perms``, XSA-115): owned by dom0, readable by
        # nobody else, so only privileged connections hear of domains coming and going unless
        # dom0 grants a domain read access (a driver domain) with SET_PERMS on the path.
        self.special_perms: dict[str, tuple[Perm, ...]] = {
            p: (Perm(0, "n"),) for p in SPECIAL_PATHS
        }

    def next_gen(self) -> int:
        return next(self._gen)

    def count(self, domid: int, delta: int) -> None:
        self.owner_count[domid] = self.owner_count.get(domid, 0) + delta

    def set(self, path: str, node: Node) -> None:
        """Store ``node`` at ``path`` in the live tree, keeping the owners' counts."""
        old = self.nodes.get(path)
        if old is not None:
            self.count(old.owner, -1)
        self.nodes[path] = node
        self.count(node.owner, +1)

    def remove(self, path: str) -> Node | None:
        """Remove ``path`` from the live tree; the node as it was."""
        old = self.nodes.pop(path, None)
        if old is not None:
            self.count(old.owner, -1)
        return old
