"""Finding a differencing disk's parent (spec: "Parent Locator Entry", "Parent Unique ID").

Candidates are tried in this order, and the first whose footer unique id equals the child's
recorded parent id wins:

1. W2ku (absolute Windows path; ``C:\\x\\y.vhd`` is tried as ``/mnt/c/x/y.vhd``), then W2ru
   (``.\\``-relative to the child), then MacX (``file://`` URL), then the deprecated Wi2k/Wi2r;
2. the header's parent name (Windows 10 stores a full path there), relative to the child;
3. the bare file name of every path above, in the child's directory and in each extra search
   directory the caller gives.

A child's locators are data from whoever made the image, so a :class:`ParentPolicy` says where
they may lead.  By default only the child's own folder (and below it) and the folders the caller
names are searched: a path outside them (absolute, or ``..`` out of them) is refused without being looked
at, unless the caller allows absolute parents.  Symbolic links inside the allowed folders are
followed (whoever can place one there can as well replace the image itself).  Only regular files
are candidates; a block device is a parent only when the caller names it explicitly.

Each candidate's footer alone is read and its unique id compared before its own chain is
opened, so a layer costs one footer read per candidate (not a whole chain), and the number of
candidates and the length of the error are bounded.  A candidate with another unique id is
skipped (the error lists what was tried, never the ids of the files found), unless the caller
allows a mismatch.  Loops and absurdly deep chains are errors; only :class:`~vhd.errors.VHDError`
subclasses leave this module, whatever the locators point at (sockets, FIFOs, terminals,
unreadable files, paths with NUL bytes).
"""

from __future__ import annotations

import ntpath
import os
import posixpath
import stat
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .errors import (
    ChainLoopError,
    ParentMismatchError,
    ParentNotFoundError,
    VHDError,
)
from .fileio import read_upto
from .header import DynamicHeader
from .locator import (
    CODE_MACX,
    CODE_W2KU,
    CODE_W2RU,
    CODE_WI2K,
    CODE_WI2R,
    MAX_LOCATOR_BYTES,
    code_name,
    decode_payload,
    macx_to_posix,
    windows_to_posix,
)

MAX_CHAIN_DEPTH = 64
# Eight locators, the header's name and their bare names in a few folders fit well within this;
# more is a crafted image, and each candidate costs a file lookup.
MAX_CANDIDATES = 32
# The error lists this many of the candidates tried, each cut to this many characters.
_MAX_LISTED = 8
_MAX_SHOWN = 160

_ORDER = (CODE_W2KU, CODE_W2RU, CODE_MACX, CODE_WI2K, CODE_WI2R)


@dataclass(frozen=True, slots=True)
class LocatorInfo:
    slot: int
    code: int
    kind: str
    data_offset: int
    data_len: int
    data_space: int
    text: str | None
    problem: str | None


def read_locators(fd: int, file_size: int, header: DynamicHeader) -> list[LocatorInfo]:
    """Decode every used locator slot, bounded: damaged entries get a ``problem``, not an error."""
    out: list[LocatorInfo] = []
    for slot, loc in enumerate(header.locators):
        if not loc.in_use:
            continue
        text: str | None = None
        problem: str | None = None
        if loc.data_len > MAX_LOCATOR_BYTES:
            problem = f"data length {loc.data_len} is absurd for a path"
        elif loc.data_offset + loc.data_len > file_size:
            problem = "data lies past the end of the file"
        elif loc.data_offset < 512 and loc.data_len:
            problem = "data overlaps the footer copy"
        else:
            raw = read_upto(fd, loc.data_len, loc.data_offset)
            text = decode_payload(loc.code, raw)
            if text is None:
                problem = "kind cannot be resolved on Linux"
        out.append(
            LocatorInfo(
                slot=slot,
                code=loc.code,
                kind=code_name(loc.code),
                data_offset=loc.data_offset,
                data_len=loc.data_len,
                data_space=loc.data_space,
                text=text,
                problem=problem,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class ParentPolicy:
    """Where the parent of a differencing disk may be looked for.

    ``dirs``: folders searched besides the child's own (each layer's parents are searched in
    that layer's folder and in these, sub-folders included).  ``allow_absolute``: follow locators anywhere on the host
    (absolute paths, ``..`` out of the allowed folders); only for images one trusts, since a
    child's locators can name any file.  ``max_candidates`` bounds the paths tried per layer.
    Block devices are never candidates; name one explicitly (``parent=``) to use it.
    """

    dirs: tuple[str, ...] = ()
    allow_absolute: bool = False
    max_candidates: int = MAX_CANDIDATES

    @classmethod
    def trusting(cls, dirs: Sequence[str] = ()) -> ParentPolicy:
        """Follow the locators wherever they point (for one's own images)."""
        return cls(dirs=tuple(dirs), allow_absolute=True)

    def with_dirs(self, dirs: Sequence[str]) -> ParentPolicy:
        """The same policy with ``dirs`` searched too."""
        extra = tuple(d for d in dirs if d not in self.dirs)
        return replace(self, dirs=self.dirs + extra) if extra else self


def parent_candidates(
    child_path: str,
    header: DynamicHeader,
    locators: Sequence[LocatorInfo],
    search_dirs: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """``(how it was found, path)`` candidates in the order they are tried, without duplicates
    (before any policy is applied)."""
    child_dir = os.path.dirname(os.path.abspath(child_path))
    found: list[tuple[str, str]] = []
    names: list[str] = []

    def add(source: str, path: str) -> None:
        if path and all(path != p for _, p in found):
            found.append((source, path))

    by_code = {code: [info for info in locators if info.code == code] for code in _ORDER}
    for code in _ORDER:
        for info in by_code[code]:
            if info.text is None:
                continue
            names.append(info.text)
            if code == CODE_MACX:
                paths = macx_to_posix(info.text, child_dir)
            else:
                paths = windows_to_posix(info.text, child_dir)
            for path in paths:
                add(f"{info.kind} locator", path)
    name = header.parent_name
    if name:
        names.append(name)
        for path in windows_to_posix(name, child_dir):
            add("header parent name", path)
    for base in _basenames(names):
        add("parent file name next to the child", posixpath.join(child_dir, base))
        for directory in search_dirs:
            add(f"parent file name in {directory}", os.path.join(os.path.abspath(directory), base))
    return found


def _basenames(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        text = name[len("file://") :] if name.startswith("file://") else name
        base = ntpath.basename(text.replace("/", "\\"))
        if base and base not in out and base not in (".", ".."):
            out.append(base)
    return out


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _show(path: str) -> str:
    """A path for a one-line message: control characters escaped, long ones cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
    if len(text) > _MAX_SHOWN:
        half = _MAX_SHOWN // 2 - 2
        text = f"{text[:half]}...{text[-half:]}"
    return text


def _tried_text(tried: Sequence[str]) -> str:
    if not tried:
        return "no locator or name to try"
    shown = "; ".join(tried[:_MAX_LISTED])
    if len(tried) > _MAX_LISTED:
        shown += f"; and {len(tried) - _MAX_LISTED} more"
    return shown


def _footer_id(path: str, *, devices: bool) -> tuple[tuple[int, int], bytes] | None:
    """(identity, unique id) of the VHD at ``path`` from its footer alone; None when it is not
    a readable VHD (a regular file, or a block device when ``devices``)."""
    from .image import locate_footer  # image imports this module

    try:
        # O_NONBLOCK: a FIFO would otherwise block the open until a writer comes.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or (devices and stat.S_ISBLK(st.st_mode))):
            return None
        size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
        if read_upto(fd, 8, 0) == b"vhdxfile":
            # A VHDX parent of a VHD child: its identity is its DataWriteGuid (vhd.lineage).
            from .vhdx.ops import identity_at

            found = identity_at(path)
            return None if found is None else ((st.st_dev, st.st_ino), found.bytes)
        choice = locate_footer(fd, size, path)
        return (st.st_dev, st.st_ino), choice.footer.unique_id
    except (OSError, ValueError, VHDError):
        return None
    finally:
        os.close(fd)


OpenFn = Callable[..., object]


def resolve_parent(
    child_path: str,
    header: DynamicHeader,
    locators: Sequence[LocatorInfo],
    *,
    opener: OpenFn,
    policy: ParentPolicy,
    allow_mismatch: bool,
    strict: bool,
    seen: frozenset[tuple[int, int]],
    explicit: str | None = None,
) -> object:
    """Open and return the parent :class:`~vhd.disk.Disk` of a differencing child."""
    if len(seen) >= MAX_CHAIN_DEPTH:
        raise ChainLoopError(f"the chain is deeper than {MAX_CHAIN_DEPTH} disks", path=child_path)
    want = header.parent_unique_id
    child_dir = os.path.dirname(os.path.abspath(child_path))
    roots = [child_dir] + [os.path.normpath(os.path.abspath(d)) for d in policy.dirs]
    if explicit:
        candidates = [("explicit parent", explicit)]
    else:
        candidates = parent_candidates(child_path, header, locators, policy.dirs)
    tried: list[str] = []
    refused = False
    if len(candidates) > policy.max_candidates:
        tried.append(f"{len(candidates) - policy.max_candidates} candidates over the limit")
        candidates = candidates[: policy.max_candidates]
    looked_at: set[str] = set()
    chosen: tuple[str, tuple[int, int]] | None = None
    first_other: tuple[str, tuple[int, int]] | None = None
    for _source, path in candidates:
        shown = _show(path)
        if "\0" in path:
            tried.append(f"{shown} (not a valid path)")
            continue
        norm = os.path.normpath(os.path.abspath(path))
        if norm in looked_at:  # the same file spelt another way (``.\\x``, ``a\\..\\x``)
            continue
        looked_at.add(norm)
        inside = _inside(norm, roots)
        # Checked on the path as written, so that a refused path is not even looked up.  A
        # symbolic link inside an allowed folder is followed: whoever can place one there can
        # as well replace the image itself.
        if not inside and explicit is None and not policy.allow_absolute:
            tried.append(f"{shown} (outside the allowed folders)")
            refused = True
            continue
        found = _footer_id(norm, devices=explicit is not None)
        if found is None:
            # Outside the allowed folders (where the caller opted in) every failure reads the
            # same: whether a file exists there, or what it is, is not the image's business.
            tried.append(
                f"{shown} ("
                + ("not found or not a VHD" if inside or explicit else "no parent there")
                + ")"
            )
            continue
        ident, unique_id = found
        if unique_id == want or (explicit and allow_mismatch):
            if ident in seen:
                raise ChainLoopError(f"the parent chain loops back to {shown}", path=child_path)
            chosen = (norm, ident)
            break
        tried.append(f"{shown} (not this child's parent)")
        if first_other is None and ident not in seen:
            first_other = (norm, ident)
    mismatch_used = False
    if chosen is None and allow_mismatch and first_other is not None:
        chosen = first_other
        mismatch_used = True
    if chosen is not None:
        path, ident = chosen
        try:
            # The file must still be the one whose footer was read (not swapped for a link to
            # something else in between).
            disk = opener(
                path,
                "r",
                strict=strict,
                parent_policy=policy,
                allow_parent_mismatch=allow_mismatch,
                _seen=seen | {ident},
                _expect=ident,
            )
        except VHDError:
            raise
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not valid"
            raise ParentNotFoundError(
                f"the parent {_show(path)} cannot be opened ({reason})", path=child_path
            ) from None
        if getattr(disk, "logical_sector_size", 512) != 512:
            disk.close()  # type: ignore[attr-defined]
            raise ParentMismatchError(
                f"the parent {_show(path)} is a 4K-native VHDX: a VHD child has 512-byte sectors",
                path=child_path,
            )
        if mismatch_used:
            disk.warnings.append(  # type: ignore[attr-defined]
                f"parent {path} has another unique id than the child records; used anyway"
            )
        return disk
    label = _show(header.parent_name) if header.parent_name else "(no name)"
    where = _tried_text(tried)
    hint = "Pass the directory that holds it with --parent-dir"
    if refused:
        hint += " (or trust the image's locators with --allow-absolute-parents)"
    if first_other is not None:
        raise ParentMismatchError(
            f"parent {label!r} (unique id {uuid.UUID(bytes=want)}) was not found: the files "
            f"found are not this child's parent ({where}); if one is the right parent, record its "
            "id with vhd set-parent CHILD PARENT --force (library: allow_parent_mismatch=True)",
            path=child_path,
        )
    raise ParentNotFoundError(
        f"parent image {label!r} (unique id {uuid.UUID(bytes=want)}) not found; "
        f"tried: {where}. {hint}",
        path=child_path,
    )
