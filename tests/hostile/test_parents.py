"""Parents of untrusted differencing disks (issue 12, items 1-3): the locators and the header's
parent name are data from whoever made the image, so by default they may lead only to the
child's own folder and the folders the caller names; ids of files found stay out of errors; the
search is linear in the chain; only VHDError leaves the library, whatever the locators name."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import vhd
from tests.images import MACX, W2KU, W2RU, craft, craft_fixed, footer_id, new_id
from vhd.check import check

MiB = 1024 * 1024
SECRET = b"tenant B's data " * 32


def _win(path: Path) -> str:
    return str(path).replace("/", "\\")


@pytest.fixture
def tenants(tmp_path: Path) -> tuple[Path, Path]:
    """tenantA/ (the untrusted child goes here) and tenantB/disk.vhd (someone else's disk)."""
    a, b = tmp_path / "tenantA", tmp_path / "tenantB"
    a.mkdir()
    b.mkdir()
    with vhd.create(b / "disk.vhd", 1 * MiB, block_size=4096) as disk:
        disk.pwrite(SECRET, 0)
    return a, b / "disk.vhd"


ESCAPES = {
    "w2ku-absolute": lambda b: {"locators": [(W2KU, _win(b))]},
    "w2ru-dotdot": lambda b: {"locators": [(W2RU, ".\\..\\tenantB\\disk.vhd")]},
    "header-name-absolute": lambda b: {"parent_name": str(b)},
    "header-name-dotdot": lambda b: {"parent_name": "..\\tenantB\\disk.vhd"},
    "macx-url": lambda b: {"locators": [(MACX, "file://" + str(b))]},
}


@pytest.mark.parametrize("route", sorted(ESCAPES))
def test_a_child_cannot_reach_another_folder(tenants: tuple[Path, Path], route: str) -> None:
    a, other = tenants
    child = craft(
        a / "child.vhd", size=1 * MiB, parent_id=footer_id(other), **ESCAPES[route](other)
    )
    with pytest.raises(vhd.ParentNotFoundError) as info:
        vhd.open(child)
    message = str(info.value)
    assert "outside the allowed folders" in message and "--allow-absolute-parents" in message
    assert str(uuid.UUID(bytes=footer_id(other))) in message  # the child's own record: fine
    # The caller may opt in: then the same child opens (the policy, not luck, refused it).
    trusting = vhd.ParentPolicy.trusting()
    with vhd.open(child, parent_policy=trusting) as disk:
        assert disk.pread(len(SECRET), 0) == SECRET
    with vhd.open(child, parent_dirs=[str(other.parent)]) as disk:
        assert disk.pread(len(SECRET), 0) == SECRET


def test_errors_never_show_the_ids_of_files_found(tenants: tuple[Path, Path]) -> None:
    """A second submission with the id from the first error must not get another disk."""
    a, other = tenants
    decoy = a / "decoy.vhd"
    vhd.create(decoy, 1 * MiB).close()
    child = craft(
        a / "child.vhd",
        size=1 * MiB,
        parent_id=new_id(99),
        locators=[(W2RU, ".\\decoy.vhd"), (W2KU, _win(other))],
    )
    for policy in (vhd.ParentPolicy(), vhd.ParentPolicy.trusting()):
        with pytest.raises(vhd.ParentError) as info:
            vhd.open(child, parent_policy=policy)
        message = str(info.value)
        for found in (decoy, other):
            assert str(uuid.UUID(bytes=footer_id(found))) not in message
        assert "decoy.vhd" in message  # what was tried is named


def test_outside_the_folders_missing_and_foreign_read_the_same(tenants: tuple[Path, Path]) -> None:
    """Opted in, an error still does not tell a missing file from a file of another kind."""
    a, _other = tenants
    secret = a.parent / "shadow"
    secret.write_bytes(b"root:x:0:0\n")
    messages = []
    for target in (secret, a.parent / "nothing-here"):
        child = craft(
            a / "c.vhd", size=1 * MiB, parent_id=new_id(5), locators=[(W2KU, _win(target))]
        )
        with pytest.raises(vhd.ParentNotFoundError) as info:
            vhd.open(child, parent_policy=vhd.ParentPolicy.trusting())
        messages.append(str(info.value).replace(str(target), "TARGET").replace(target.name, "N"))
        assert "TARGET (no parent there)" in messages[-1]
    assert messages[0] == messages[1]


def test_the_confined_search_never_opens_a_refused_path(
    tenants: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, other = tenants
    child = craft(a / "child.vhd", size=1 * MiB, parent_id=footer_id(other),
                  locators=[(W2KU, _win(other))])  # fmt: skip
    opened: list[str] = []
    real_open = os.open

    def spy(path: str, *args: object, **kw: object) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    with pytest.raises(vhd.ParentNotFoundError):
        vhd.open(child)
    assert str(other) not in opened


def test_block_devices_are_parents_only_when_named(tmp_path: Path) -> None:
    """A locator naming a block device is never followed, even when absolute paths are."""
    dev = tmp_path / "loopdev"
    try:
        os.mknod(dev, 0o600 | 0o060000, os.makedev(7, 200))  # S_IFBLK, an unused loop minor
    except PermissionError:
        pytest.skip("mknod needs root")
    for where in (str(dev), "/dev/loop0"):
        child = craft(
            tmp_path / "c.vhd", size=1 * MiB, parent_id=new_id(3), locators=[(W2KU, where)]
        )
        for policy in (vhd.ParentPolicy(), vhd.ParentPolicy.trusting()):
            with pytest.raises(vhd.ParentNotFoundError):
                vhd.open(child, parent_policy=policy)


def _unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file the process may not read (root reads everything: the refusal is simulated)."""
    path = tmp_path / "unreadable.vhd"
    vhd.create(path, 1 * MiB).close()
    path.chmod(0)
    real_open = os.open

    def guarded(name: str, *args: object, **kw: object) -> int:
        if os.fspath(name) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", guarded)
    return path


@pytest.mark.parametrize("kind", ["socket", "fifo", "tty", "unreadable", "nul-url", "dir"])
def test_only_vhd_errors_leave_the_library(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep: list[socket.socket] = []
    if kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(tmp_path / "p.sock"))
        keep.append(sock)
        text = str(tmp_path / "p.sock")
    elif kind == "fifo":
        os.mkfifo(tmp_path / "p.fifo")
        text = str(tmp_path / "p.fifo")
    elif kind == "tty":
        text = "/dev/tty"
    elif kind == "unreadable":
        text = str(_unreadable(tmp_path, monkeypatch))
    elif kind == "dir":
        text = str(tmp_path)
    else:
        text = "file:///etc/%00passwd"
    code = MACX if text.startswith("file:") else W2KU
    child = craft(tmp_path / "child.vhd", size=1 * MiB, parent_id=new_id(4),
                  locators=[(code, text)], parent_name=text)  # fmt: skip
    for policy in (vhd.ParentPolicy(), vhd.ParentPolicy.trusting()):
        with pytest.raises(vhd.VHDError) as info:
            vhd.open(child, parent_policy=policy)
        assert "\n" not in str(info.value)
        # vhd check reports it as a finding, and raises nothing.
        report = check(child, parent_policy=policy)
        assert any(f.code.startswith("parent-") for f in report.findings)
    for sock in keep:
        sock.close()


def test_the_parent_search_is_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """41 layers, eight locators each at the next one, the last parent missing: each layer
    reads its candidates' footers once (not their chains), and the error stays short."""
    depth = 40
    layers = [tmp_path / f"l{i:02}.vhd" for i in range(depth + 1)]
    for i, path in enumerate(layers):
        nxt = layers[i + 1] if i < depth else tmp_path / "missing.vhd"
        forms = [
            (W2KU, _win(nxt)),
            (W2RU, ".\\" + nxt.name),
            (MACX, "file://" + str(nxt)),
            (W2KU, ".\\" + nxt.name),
            (W2RU, ".\\.\\" + nxt.name),
            (MACX, nxt.name),
            (W2KU, _win(tmp_path) + "\\.\\" + nxt.name),
            (W2RU, ".\\sub\\..\\" + nxt.name),
        ]
        craft(path, size=1 * MiB, unique_id=new_id(i), parent_id=new_id(i + 1),
              parent_name=nxt.name, locators=forms)  # fmt: skip
    opens = 0
    real_open = os.open

    def counting(name: str, *args: object, **kw: object) -> int:
        nonlocal opens
        opens += 1
        if opens > 50 * len(layers):
            raise RuntimeError("the parent search opened too many files")
        return real_open(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting)
    with pytest.raises(vhd.ParentNotFoundError) as info:
        vhd.open(layers[0])
    assert "missing.vhd" in str(info.value)
    assert len(str(info.value)) < 4096


def test_the_number_of_candidates_is_bounded(tmp_path: Path) -> None:
    names = [f"p{i:03}.vhd" for i in range(200)]
    child = craft(tmp_path / "child.vhd", size=1 * MiB, parent_id=new_id(9),
                  locators=[(W2RU, ".\\" + n) for n in names[:8]],
                  parent_name="x.vhd")  # fmt: skip
    dirs = [str(tmp_path / f"d{i}") for i in range(100)]
    with pytest.raises(vhd.ParentNotFoundError) as info:
        vhd.open(child, parent_dirs=dirs)
    message = str(info.value)
    assert "over the limit" in message and "more" in message and len(message) < 4096


# -- normal use keeps working --------------------------------------------------------------------


def test_a_parent_next_to_the_child_is_found(tmp_path: Path) -> None:
    with vhd.create(tmp_path / "parent.vhd", 1 * MiB) as disk:
        disk.pwrite(b"base", 0)
    child = craft(tmp_path / "child.vhd", size=1 * MiB,
                  parent_id=footer_id(tmp_path / "parent.vhd"),
                  locators=[(W2KU, "C:\\Users\\someone\\VMs\\parent.vhd"), (W2RU, ".\\parent.vhd")],
                  parent_name="parent.vhd")  # fmt: skip
    with vhd.open(child) as disk:
        assert disk.pread(4, 0) == b"base"
    # Only the absolute Windows path: its file name next to the child.
    only_abs = craft(tmp_path / "c2.vhd", size=1 * MiB,
                     parent_id=footer_id(tmp_path / "parent.vhd"),
                     locators=[(W2KU, "C:\\Projects\\parent.vhd")])  # fmt: skip
    with vhd.open(only_abs) as disk:
        assert disk.parent is not None and disk.parent.path == str(tmp_path / "parent.vhd")


def test_the_corpus_differencing_disk_opens_with_the_default_policy(
    corpus: Path, tmp_path: Path
) -> None:
    """fat-differential.vhd's W2ku is C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd (refused
    as it stands: absolute) and its W2ru .\\fat-parent.vhd: a parent next to it is found."""
    child = tmp_path / "fat-differential.vhd"
    shutil.copyfile(corpus / "fat-differential.vhd", child)
    with vhd.open(child, open_parent=False) as disk:
        assert disk.header is not None
        want = disk.header.parent_unique_id
    parent = craft_fixed(tmp_path / "fat-parent.vhd", 4 * MiB, unique_id=want)
    with vhd.open(child) as disk:
        assert disk.parent is not None and disk.parent.path == str(parent)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhdtools.cli", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


def test_cli_create_with_a_parent_elsewhere_then_use_it(tmp_path: Path) -> None:
    """The user's own chain (`create --parent ../base.vhd`): local commands follow it; serve
    and mount, which hand the image to others, want the folder named or the opt-in."""
    vhd.create(tmp_path / "base.vhd", 1 * MiB).close()
    sub = tmp_path / "sub"
    sub.mkdir()
    result = subprocess.run([sys.executable, "-m", "vhdtools.cli", "create", "--parent",
                             "../base.vhd", "child.vhd"], cwd=sub, capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    child = str(sub / "child.vhd")
    for args in (["info", child], ["check", child], ["map", child],
                 ["convert", child, str(tmp_path / "out.raw")]):  # fmt: skip
        result = _cli(*args)
        assert result.returncode == 0, (args, result.stderr)
    confined = _cli("check", "--confine-parents", child)
    assert confined.returncode == 1 and "outside the allowed folders" in confined.stdout
    confined = _cli("info", "--confine-parents", child)
    assert "outside the allowed folders" in confined.stderr
