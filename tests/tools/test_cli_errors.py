"""One clear line naming the path, as a user meets the errors: pipes as input and output, an
existing output (naming --force), a chain whose grandparent is missing (named, not the parent
that exists), a parent with another id (no advice to pass --force to commands without it), an
occupied NBD port or unix socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import vhd

VHD_CLI = str(Path(sys.executable).with_name("vhd"))
MiB = 1 << 20


def error_line(*args: str | Path, stdin: bytes | None = None) -> str:
    proc = subprocess.run(
        [VHD_CLI, *map(str, args)], input=stdin, capture_output=True, timeout=60, check=False
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, err)
    lines = [ln for ln in err.splitlines() if not ln.startswith("vhd: warning:")]
    assert len(lines) == 1 and lines[0].startswith("vhd: error: "), err
    assert "Errno" not in lines[0], lines[0]
    return lines[0]


def test_pipes(tmp_path: Path) -> None:
    image = tmp_path / "a.vhd"
    vhd.create(image, MiB).close()
    data = image.read_bytes()
    line = error_line("convert", "/dev/stdin", tmp_path / "o.vhd", stdin=data)
    assert "/dev/stdin" in line and "pipe" in line
    line = error_line("compare", image, "/dev/stdin", stdin=data)
    assert "/dev/stdin" in line and "pipe" in line
    proc = subprocess.run(
        f"{VHD_CLI} convert --force --to raw {image} /dev/stdout | cat",
        shell=True,
        capture_output=True,
        timeout=60,
        check=False,
    )
    err = proc.stderr.decode()
    assert "/dev/stdout" in err and "Errno" not in err and err.count("\n") == 1, err


def test_existing_output_names_force(tmp_path: Path) -> None:
    image = tmp_path / "a.vhd"
    vhd.create(image, MiB).close()
    for args in (("create", image, "1M"), ("convert", image, image.with_suffix(".img"))):
        if args[0] == "convert":
            image.with_suffix(".img").write_bytes(b"")
        line = error_line(*args)
        assert "already exists" in line and "--force" in line, line


def test_missing_grandparent_is_named(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.vhd", tmp_path / "mid.vhd", tmp_path / "top.vhd"
    vhd.create(base, MiB).close()
    vhd.create(mid, parent=base).close()
    vhd.create(top, parent=mid).close()
    base.rename(tmp_path / "moved.vhd")
    for command in ("info", "convert", "map"):
        args: list[str | Path] = [command, top]
        if command == "convert":
            args.append(tmp_path / "flat.img")
        line = error_line(*args) if command != "info" else _info_parent_error(top)
        assert "base.vhd" in line and str(mid) in line, line
        assert "'mid.vhd'" not in line, line  # the parent exists: not reported missing


def _info_parent_error(image: Path) -> str:
    proc = subprocess.run(
        [VHD_CLI, "info", str(image)], capture_output=True, text=True, timeout=60, check=False
    )
    (line,) = [ln for ln in proc.stdout.splitlines() if "NOT FOUND" in ln]
    return line


def test_mismatch_advice_names_a_command_that_has_force(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    vhd.create(base, MiB).close()
    vhd.create(child, parent=base).close()
    base.unlink()
    vhd.create(base, MiB).close()  # same name, another unique id
    line = error_line("convert", child, tmp_path / "flat.img")
    assert "set-parent" in line, line  # convert's own --force means "overwrite DST"


def test_nbd_address_or_socket_in_use(tmp_path: Path) -> None:
    image = tmp_path / "a.vhd"
    vhd.create(image, MiB).close()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    path = str(tmp_path / "nbd.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(path)
    unix.listen()
    try:
        line = error_line("serve", image, "--nbd", "--listen", f"127.0.0.1:{port}")
        assert f"127.0.0.1:{port}" in line and "in use" in line, line
        line = error_line("serve", image, "--nbd", "--socket", path)
        assert path in line and "listening" in line, line
        assert os.path.exists(path)  # the live server's socket was not removed
        line = error_line("serve", image, "--nbd", "--socket", tmp_path / "no" / "s.sock")
        assert str(tmp_path / "no" / "s.sock") in line, line
    finally:
        tcp.close()
        unix.close()


@pytest.mark.parametrize(
    "command", ["convert", "create", "commit", "compact", "resize", "set_parent"]
)
def test_commands_that_write_images_take_sigterm_as_ctrl_c(command: str) -> None:
    """SIGTERM and SIGHUP in the middle of a command that writes an image: the same cleanup,
    message and exit status as Ctrl-C (vhdtools.interrupt), not a kill on the spot."""
    import importlib

    from vhdtools.interrupt import terminate_as_interrupt

    run = importlib.import_module(f"vhdtools.commands.{command}").run
    assert getattr(run, "__wrapped__", None) is not None, f"{command} runs unprotected"
    assert run.__code__ is terminate_as_interrupt(lambda: None).__code__


def test_ctrl_c_after_the_commit_finished_is_not_an_interruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt that lands once the child is removed (the commit's last step) reports the
    finished commit, exit 0, not "interrupted" (a rerun would find no child); one that lands
    before leaves the child and says interrupted (exit 130: rerun finishes the job)."""
    from tests.vhd.helpers import run_cli

    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    assert run_cli("create", str(base), "8M")[0] == 0
    assert run_cli("create", str(child), "--parent", str(base))[0] == 0
    with vhd.open(child, "r+") as disk:
        disk.pwrite(b"c" * 4096, MiB)
    import vhd.commit as commit_module

    def copy_then_interrupted(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(commit_module, "_copy_own_ranges", copy_then_interrupted)
        rc, out = run_cli("commit", str(child))
    assert rc == 130 and "vhd: interrupted" in out and child.exists(), out
    real_unlink = os.unlink

    def unlink_then_interrupted(path: str | Path) -> None:
        real_unlink(path)
        if Path(path) == child:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(commit_module.os, "unlink", unlink_then_interrupted)
        rc, out = run_cli("commit", str(child))
    assert rc == 0 and f"committed {child} into its parent; child removed" in out, out
    assert "after the commit had finished" in out and "vhd: interrupted" not in out, out
    with vhd.open(base) as disk:
        assert disk.pread(4096, MiB) == b"c" * 4096
