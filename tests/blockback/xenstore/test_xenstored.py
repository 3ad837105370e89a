"""The standalone xenstored as a library call (``serve(XenStoredOptions, stop)``) and its command
line in ``vhdtools.xenstored``: blockback parses no arguments and installs no signal handlers."""

from __future__ import annotations

import ast
import errno
import threading
from pathlib import Path

import pytest
from vhdtools.xenstored import build_parser, main, options_from_args

import blockback
from blockback.xenstore import XenStoreClient, XenStoreError
from blockback.xenstore.server import XenStoredOptions, serve
from blockback.xenstore.store import Quotas


def _imports(tree: ast.AST) -> set[str]:
    """Top-level module names imported anywhere in ``tree`` except under ``__main__`` guards."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_blockback_imports_no_argparse_and_no_cli() -> None:
    root = Path(blockback.__file__).parent
    for path in sorted(root.rglob("*.py")):
        found = _imports(ast.parse(path.read_text())) & {"argparse", "signal", "vhdtools"}
        assert not found, f"{path.relative_to(root)} imports {found}"


def test_serve_until_stop(tmp_path: Path) -> None:
    sock, guest_sock = tmp_path / "xs.sock", tmp_path / "dom7.sock"
    options = XenStoredOptions(str(sock), {7: str(guest_sock)}, Quotas(entry_size=4))
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve(options, stop)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for _ in range(400):
            if guest_sock.exists() or errors:
                break
            threading.Event().wait(0.05)
        with XenStoreClient(sock) as dom0, XenStoreClient(guest_sock) as guest:
            dom0.mkdir("/local/domain/7")
            dom0.set_perms("/local/domain/7", ["n7"])
            guest.write("ok", b"four")
            with pytest.raises(XenStoreError) as info:
                guest.write("big", b"fives")  # the quota came through the options
            assert info.value.errno == errno.ENOSPC
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and not errors
    assert not sock.exists() and not guest_sock.exists()


def test_options_from_the_command_line() -> None:
    args = build_parser().parse_args(
        ["/s", "--domain", "3:/d3", "--domain", "4:/d4", "--quota-watches", "9"]
    )
    options = options_from_args(args)
    assert options == XenStoredOptions("/s", {3: "/d3", 4: "/d4"}, Quotas(watches=9))
    for bad in (["/s", "--domain", "x:/d"], ["/s", "--quota-nodes", "0"]):
        with pytest.raises(ValueError):
            options_from_args(build_parser().parse_args(bad))


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "s"), "--domain", "5"])
    assert exit_info.value.code == 2 and "DOMID:PATH" in capsys.readouterr().err
    assert main([str(tmp_path / "missing-dir" / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xenstored: ") and err.count("\n") == 1
