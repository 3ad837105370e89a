"""Parents of untrusted differencing VHDX (issue 12's policy, applied to issue 11's format):
the parent locator's relative_path, volume_path and absolute_win32_path are data from whoever
made the image, so by default they may lead only to the child's own folder and the folders the
caller names; only regular files are candidates; ids of files found stay out of errors; a
candidate's linkage is compared before its chain is opened; the candidates are bounded.
Mirrors tests/hostile/test_parents.py for VHD children."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import vhd
from vhd.vhdx import create as vhdx_create
from vhd.vhdx import create_vhdx, open_vhdx
from vhd.vhdx import records as r
from vhd.vhdx.disk import open_vhdx_locked

MiB = 1024 * 1024
SECRET = b"tenant B's data " * 32


def _win(path: Path) -> str:
    return str(path).replace("/", "\\")


def _linkage(path: Path) -> str:
    with open_vhdx(path) as disk:
        return "{" + str(disk.current_header.data_write_guid) + "}"


def _craft(child: Path, parent: Path, entries: dict[str, str], monkeypatch: pytest.MonkeyPatch,
           *, linkage: str | None = None) -> Path:  # fmt: skip
    """A differencing VHDX whose parent locator holds exactly ``entries`` (plus a linkage:
    ``parent``'s own unless given), as a hostile submitter could write it."""
    link = linkage or _linkage(parent)
    locator = r.ParentLocator(r.VHDX_PARENT_LOCATOR_TYPE, {"parent_linkage": link, **entries})
    with monkeypatch.context() as m:
        m.setattr(vhdx_create, "_locator", lambda _child, _parent: locator)
        # the new child is opened once with its parent: let a crafted linkage through
        m.setattr(
            vhdx_create,
            "open_vhdx_locked",
            functools.partial(open_vhdx_locked, allow_parent_mismatch=True),
        )
        with open_vhdx(parent) as p:
            create_vhdx(child, 0, type="differencing", parent=p, block_size=MiB).close()
    return child


@pytest.fixture
def tenants(tmp_path: Path) -> tuple[Path, Path]:
    """tenantA/ (the untrusted child goes here) and tenantB/disk.vhdx (someone else's disk)."""
    a, b = tmp_path / "tenantA", tmp_path / "tenantB"
    a.mkdir()
    b.mkdir()
    with create_vhdx(b / "disk.vhdx", 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(SECRET, 0)
    return a, b / "disk.vhdx"


ESCAPES: dict[str, Callable[[Path], dict[str, str]]] = {
    "relative-dotdot": lambda b: {"relative_path": "..\\tenantB\\disk.vhdx"},
    "relative-dotdot-inside": lambda b: {"relative_path": ".\\x\\..\\..\\tenantB\\disk.vhdx"},
    "absolute-win32-rooted": lambda b: {"absolute_win32_path": _win(b)},
    "absolute-win32-long": lambda b: {"absolute_win32_path": "\\\\?\\" + _win(b).lstrip("\\")},
}


@pytest.mark.parametrize("route", sorted(ESCAPES))
def test_a_child_cannot_reach_another_folder(
    tenants: tuple[Path, Path], route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, other = tenants
    child = _craft(a / "child.avhdx", other, ESCAPES[route](other), monkeypatch)
    with pytest.raises(vhd.ParentNotFoundError) as info:
        vhd.open(child)
    message = str(info.value)
    assert "outside the allowed folders" in message and "--allow-absolute-parents" in message
    # The caller may opt in: then the same child opens (the policy, not luck, refused it).
    with vhd.open(child, parent_policy=vhd.ParentPolicy.trusting()) as disk:
        assert disk.pread(len(SECRET), 0) == SECRET
    with vhd.open(child, parent_dirs=[str(other.parent)]) as disk:
        assert disk.pread(len(SECRET), 0) == SECRET


def test_volume_path_leads_only_to_the_allowed_folders(
    tenants: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume path names no Linux file: only its file name is looked for, in the folders
    allowed, whatever the policy."""
    a, other = tenants
    vol = "\\\\?\\Volume{00000000-1111-2222-3333-444444444444}\\tenantB\\disk.vhdx"
    child = _craft(a / "child.avhdx", other, {"volume_path": vol}, monkeypatch)
    for policy in (vhd.ParentPolicy(), vhd.ParentPolicy.trusting()):
        with pytest.raises(vhd.ParentNotFoundError) as info:
            vhd.open(child, parent_policy=policy)
        assert str(other) not in str(info.value)
    with vhd.open(child, parent_dirs=[str(other.parent)]) as disk:
        assert disk.pread(len(SECRET), 0) == SECRET


def test_the_cli_trusts_local_use_and_confines_on_request(
    tenants: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As for VHD: local commands follow one's own locators; --confine-parents (and serve,
    mount) apply the default policy, --parent-dir widens it."""
    from vhdtools.cli import main

    a, other = tenants
    child = _craft(a / "child.avhdx", other, ESCAPES["relative-dotdot"](other), monkeypatch)
    raw = a / "out.raw"
    assert main(["convert", str(child), str(raw)]) == 0
    assert raw.read_bytes()[: len(SECRET)] == SECRET
    capsys.readouterr()
    assert main(["info", "--confine-parents", str(child)]) == 0  # the child's own metadata
    err = capsys.readouterr().err
    assert "outside the allowed folders" in err and len(err.strip().splitlines()) == 1
    assert main(["info", "--confine-parents", "--parent-dir", str(other.parent), str(child)]) == 0
    assert "outside" not in capsys.readouterr().err


def test_errors_never_show_the_ids_of_files_found(
    tenants: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, other = tenants
    decoy = a / "decoy.vhdx"
    create_vhdx(decoy, 4 * MiB).close()
    vhd_decoy = a / "decoy.vhd"
    vhd.create(vhd_decoy, 4 * MiB).close()
    wanted = "{01234567-89ab-cdef-0123-456789abcdef}"
    entries = {"relative_path": ".\\decoy.vhdx", "volume_path": "\\\\?\\Volume{x}\\decoy.vhd",
               "absolute_win32_path": "\\\\?\\" + _win(other).lstrip("\\")}  # fmt: skip
    child = _craft(a / "child.avhdx", decoy, entries, monkeypatch, linkage=wanted)
    ids = [_linkage(decoy).strip("{}"), _linkage(other).strip("{}")]
    with vhd.open(vhd_decoy) as d:
        ids.append(str(d.footer.uuid))
    for policy in (vhd.ParentPolicy(), vhd.ParentPolicy.trusting()):
        with pytest.raises(vhd.ParentError) as info:
            vhd.open(child, parent_policy=policy)
        message = str(info.value)
        assert all(i not in message.lower() for i in ids), message
        assert "decoy.vhdx" in message and "not this child's parent" in message


def test_outside_the_folders_missing_and_foreign_read_the_same(
    tenants: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, other = tenants
    secret = a.parent / "shadow"
    secret.write_bytes(b"root:x:0:0\n")
    messages = []
    for target in (secret, a.parent / "nothing-here"):
        child = _craft(a / f"c-{target.name}.avhdx", other,
                       {"absolute_win32_path": _win(target)}, monkeypatch)  # fmt: skip
        with pytest.raises(vhd.ParentNotFoundError) as info:
            vhd.open(child, parent_policy=vhd.ParentPolicy.trusting())
        text = str(info.value).replace(str(target), "TARGET").replace(target.name, "N")
        messages.append(text.replace(str(child), "CHILD"))
        assert "TARGET (no parent there)" in messages[-1]
    assert messages[0] == messages[1]


def test_the_confined_search_never_opens_a_refused_path(
    tenants: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, other = tenants
    child = _craft(a / "child.avhdx", other, ESCAPES["absolute-win32-rooted"](other), monkeypatch)
    opened: list[str] = []
    real_open = os.open

    def spy(path: str, *args: object, **kw: object) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    with pytest.raises(vhd.ParentNotFoundError):
        vhd.open(child)
    assert str(other) not in opened


def test_only_regular_files_are_candidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO, a directory or a socket path inside the folder: no hang, a one-line error."""
    base = tmp_path / "base.vhdx"
    create_vhdx(base, 4 * MiB).close()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name in ("fifo", "dir", "/dev/zero"):
        child = _craft(tmp_path / "child.avhdx", base, {"relative_path": name}, monkeypatch)
        with pytest.raises(vhd.ParentNotFoundError) as info:
            vhd.open(child, parent_policy=vhd.ParentPolicy.trusting())
        assert "\n" not in str(info.value)
        child.unlink()


def test_linkage_is_compared_before_a_candidate_chain_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong candidate whose own parent is missing is skipped by its linkage alone: its
    chain is never opened (else its missing parent would be the error)."""
    base = tmp_path / "base.vhdx"
    with create_vhdx(base, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"base", 0)
    gone = tmp_path / "gone.vhdx"
    create_vhdx(gone, 4 * MiB).close()
    _craft(tmp_path / "orphan.vhdx", gone, {"relative_path": ".\\gone.vhdx"}, monkeypatch)
    gone.unlink()
    child = _craft(tmp_path / "child.avhdx", base,
                   {"relative_path": ".\\orphan.vhdx", "volume_path": "\\\\?\\V\\base.vhdx"},
                   monkeypatch)  # fmt: skip
    with vhd.open(child) as disk:
        assert disk.pread(4, 0) == b"base"


def test_the_number_of_candidates_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.vhdx"
    create_vhdx(base, 4 * MiB).close()
    child = _craft(tmp_path / "child.avhdx", base,
                   {"relative_path": "x.vhdx", "volume_path": "y.vhdx",
                    "absolute_win32_path": "z.vhdx"}, monkeypatch,
                   linkage="{01234567-89ab-cdef-0123-456789abcdef}")  # fmt: skip
    dirs = [str(tmp_path / f"d{i}") for i in range(100)]
    with pytest.raises(vhd.ParentNotFoundError) as info:
        vhd.open(child, parent_dirs=dirs)
    message = str(info.value)
    assert "over the limit" in message and "more" in message and len(message) < 4096


def test_a_parent_next_to_the_child_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hyper-V's own locators (a drive path, a volume path) resolve by file name next to the
    child, and a vhdkit-made child in a sub-folder finds its parent once the folder is named."""
    base = tmp_path / "base.vhdx"
    with create_vhdx(base, 4 * MiB, block_size=MiB) as disk:
        disk.pwrite(b"base", 0)
    child = _craft(tmp_path / "child.avhdx", base,
                   {"relative_path": ".\\base.vhdx",
                    "volume_path": "\\\\?\\Volume{1}\\VMs\\base.vhdx",
                    "absolute_win32_path": "C:\\VMs\\base.vhdx"}, monkeypatch)  # fmt: skip
    with vhd.open(child) as disk:
        assert disk.pread(4, 0) == b"base"
    sub = tmp_path / "snap"
    sub.mkdir()
    with open_vhdx(base) as p:
        create_vhdx(sub / "c.avhdx", 0, type="differencing", parent=p).close()
    with pytest.raises(vhd.ParentNotFoundError):
        vhd.open(sub / "c.avhdx")
    with vhd.open(sub / "c.avhdx", parent_dirs=[str(tmp_path)]) as disk:
        assert disk.pread(4, 0) == b"base"
