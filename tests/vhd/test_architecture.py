"""Where metadata may be written (issue 10): no operation assigns to (or changes in place) a
Disk's private state or its footer, header, BAT or placement, and one module encodes BAT
sectors.

The Disk modules (``vhd/disk.py``, ``vhd/vhdx/disk.py``) and the one VHD metadata writer
(``vhd/metadata.py``, with the table it writes, ``vhd/bat.py``) own that state; every other
module of the library changes it through them.  Read from the source (ast), so a regression is
named at its line.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import vhd

PACKAGE = Path(vhd.__file__).parent
OWNERS = {"disk.py", "metadata.py", "bat.py", "vhdx/disk.py"}
# What a Disk describes (VHD: footer, header, BAT, placement; VHDX: its metadata items and
# region tables), assigned only by the Disk and the writer that keeps it in step; and the names
# the library gives an open Disk (or its VHDX metadata, ``md``).
DISK_STATE = {
    "footer", "header", "bat", "entries", "footer_offset", "file_size", "size",
    "metadata", "layout", "raw_items", "virtual_size", "parent_locator", "region_tables",
    "bat_region",
}  # fmt: skip
DISK_NAMES = {"disk", "child", "parent", "base", "top", "md"}
# Methods that change a container in place (a Disk's table, caches or dirty sets).
MUTATORS = {"add", "append", "clear", "discard", "extend", "insert", "pop", "remove", "update"}
# The BAT-sector encoders and the dirty-sector bookkeeping of the in-memory table.
BAT_ENCODERS = {"bat_sector_writes", "sector_bytes", "take_dirty", "mark_dirty"}
# vhd check --repair plans its BAT writes with the writer module's encoder (a plan is printed
# by --dry-run before it runs) and executes them through MetadataWriter.for_repair.
ENCODER_USERS = {"metadata.py", "bat.py", "disk.py", "repair.py"}


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        yield name, ast.parse(path.read_text(), filename=str(path))


def _owner(node: ast.expr) -> ast.expr:
    """The object an assignment target writes into: ``x.a[i].b`` -> ``x.a[i]`` -> ... -> x."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return node


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _root(node: ast.expr) -> str:
    """The variable an expression starts from: ``disk.bat.entries[i]`` -> ``disk``."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        out: list[ast.expr] = []
        for t in node.targets:
            out.extend(t.elts if isinstance(t, ast.Tuple) else [t])
        return out
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        return [node.target]
    return []


def _violations() -> list[str]:
    found: list[tuple[str, int, str]] = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            for target in _targets(node):
                target = _owner(target)
                while isinstance(target, ast.Attribute):
                    private = target.attr.startswith("_")
                    state = target.attr in DISK_STATE and _root(target) in DISK_NAMES
                    if (private or state) and not _is_self(_owner(target.value)):
                        if name not in OWNERS:
                            found.append((name, node.lineno, f"assigns {ast.unparse(target)}"))
                        break
                    target = _owner(target.value)
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in BAT_ENCODERS and name not in ENCODER_USERS:
                found.append((name, node.lineno, f"calls {called}"))
            if called in MUTATORS and isinstance(func, ast.Attribute) and name not in OWNERS:
                held = _owner(func.value)
                if isinstance(held, ast.Attribute) and not _is_self(_owner(held.value)):
                    private = held.attr.startswith("_")
                    if private or (held.attr in DISK_STATE and _root(held) in DISK_NAMES):
                        found.append((name, node.lineno, f"changes {ast.unparse(held)}"))
    return [f"{name}:{line} {what}" for name, line, what in sorted(found)]


def test_no_operation_writes_a_disks_state() -> None:
    assert _violations() == []


def test_the_rule_sees_what_it_forbids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself: each forbidden form, planted in a module, is named (and a Disk module
    may do what an operation may not)."""
    planted = tmp_path / "vhd"
    (planted / "vhdx").mkdir(parents=True)
    (planted / "op.py").write_text(
        "def f(disk, w):\n"
        "    disk._closed = True\n"
        "    disk.bat.entries[3] = 7\n"
        "    disk.footer = None\n"
        "    w.disk._eof += 1\n"
        "    self.x = disk.bat.take_dirty()\n"
        "    self._ok = 1\n"
        "    report.size = 1\n"
        "    disk.metadata.raw_items[5] = b''\n"
        "    md.entries = ()\n"
        "    disk._dirty_bat.add(3)\n"
        "    disk.bat.extend([0])\n"
        "    self._pages.pop(1)\n"
        "    pending.pop()\n"
    )
    (planted / "vhdx" / "disk.py").write_text("def g(disk):\n    disk._eof = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", planted)
    assert _violations() == [
        "op.py:2 assigns disk._closed",
        "op.py:3 assigns disk.bat.entries",
        "op.py:4 assigns disk.footer",
        "op.py:5 assigns w.disk._eof",
        "op.py:6 calls take_dirty",
        "op.py:9 assigns disk.metadata.raw_items",
        "op.py:10 assigns md.entries",
        "op.py:11 changes disk._dirty_bat",
        "op.py:12 changes disk.bat",
    ]
