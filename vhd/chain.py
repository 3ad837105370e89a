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
from collections.abc import Callable, Sequence

from .errors import (
    ChainLoopError,
    ParentMismatchError,
    ParentNotFoundError,
    VHDError,
)
from .fileio import read_upto
from .footer import uuid_text
from .header import DynamicHeader
from .layout import locate_footer
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
from .record import FrozenRecord, Record, fill

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any, TypeVar

    Key = TypeVar("Key")
    Opened = TypeVar("Opened")

MAX_CHAIN_DEPTH = 64
# Eight locators, the header's name and their bare names in a few folders fit well within this;
# more is a crafted image, and each candidate costs a file lookup.
MAX_CANDIDATES = 32
# The error lists this many of the candidates tried, each cut to this many characters.
_MAX_LISTED = 8
_MAX_SHOWN = 160

_ORDER = (CODE_W2KU, CODE_W2RU, CODE_MACX, CODE_WI2K, CODE_WI2R)


class LocatorInfo(FrozenRecord):
    _fields = ("slot", "code", "kind", "data_offset", "data_len", "data_space", "text", "problem")
    __slots__ = _fields
    slot: int
    code: int
    kind: str
    data_offset: int
    data_len: int
    data_space: int
    text: str | None
    problem: str | None

    def __init__(
        self,
        slot: int,
        code: int,
        kind: str,
        data_offset: int,
        data_len: int,
        data_space: int,
        text: str | None,
        problem: str | None,
    ) -> None:
        fill(self, slot, code, kind, data_offset, data_len, data_space, text, problem)


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


class ParentPolicy(FrozenRecord):
    """Where the parent of a differencing disk may be looked for.

    ``dirs``: folders searched besides the child's own (each layer's parents are searched in
    that layer's folder and in these, sub-folders included).  ``allow_absolute``: follow locators anywhere on the host
    (absolute paths, ``..`` out of the allowed folders); only for images one trusts, since a
    child's locators can name any file.  ``max_candidates`` bounds the paths tried per layer.
    Block devices are never candidates; name one explicitly (``parent=``) to use it.
    """

    _fields = ("dirs", "allow_absolute", "max_candidates")
    __slots__ = _fields
    dirs: tuple[str, ...]
    allow_absolute: bool
    max_candidates: int

    def __init__(
        self,
        dirs: tuple[str, ...] = (),
        allow_absolute: bool = False,
        max_candidates: int = MAX_CANDIDATES,
    ) -> None:
        fill(self, dirs, allow_absolute, max_candidates)

    @classmethod
    def trusting(cls, dirs: Sequence[str] = ()) -> ParentPolicy:
        """Follow the locators wherever they point (for one's own images)."""
        return cls(dirs=tuple(dirs), allow_absolute=True)

    def with_dirs(self, dirs: Sequence[str]) -> ParentPolicy:
        """The same policy with ``dirs`` searched too."""
        extra = tuple(d for d in dirs if d not in self.dirs)
        return self.replace(dirs=self.dirs + extra) if extra else self


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


Ident = tuple[int, int]  # (st_dev, st_ino) of a file


def read_candidate(
    path: str, *, devices: bool, read: Callable[[int, int], Key | None]
) -> tuple[Ident, Key] | None:
    """(file identity, ``read(fd, size)``) of the candidate parent at ``path``, for any format;
    None when it is not a regular file (or a block device when ``devices``), cannot be read, or
    ``read`` finds no key (or raises a VHDError) in it."""
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
        key = read(fd, size)
        return None if key is None else ((st.st_dev, st.st_ino), key)
    except (OSError, ValueError, VHDError):
        return None
    finally:
        os.close(fd)


def footer_identity(path: str, *, devices: bool) -> tuple[Ident, bytes] | None:
    """(identity, unique id) of the VHD at ``path`` from its footer alone; of a VHDX, the
    DataWriteGuid a VHD child records as its parent id (:mod:`vhd.lineage`)."""

    def key(fd: int, size: int) -> bytes | None:
        if read_upto(fd, 8, 0) == b"vhdxfile":
            from .vhdx.disk import data_write_guid_at  # vhd.vhdx imports this module

            found = data_write_guid_at(fd)
            return None if found is None else found.bytes
        return locate_footer(fd, size, path).footer.unique_id

    return read_candidate(path, devices=devices, read=key)


class CandidateSearch(Record):
    """What a walk over parent candidates found: the file ``chosen`` (normalised path and
    identity), whether it was taken despite another identity (``mismatch_used``), the first file
    of another identity (``first_other``), and the lines of what was tried for an error."""

    _fields = ("chosen", "mismatch_used", "first_other", "tried", "refused")
    __slots__ = _fields
    chosen: tuple[str, Ident] | None
    mismatch_used: bool
    first_other: tuple[str, Ident] | None
    tried: list[str]
    refused: bool  # a candidate was outside the allowed folders

    def __init__(
        self,
        chosen: tuple[str, Ident] | None = None,
        mismatch_used: bool = False,
        first_other: tuple[str, Ident] | None = None,
        tried: list[str] | None = None,
        refused: bool = False,
    ) -> None:
        fill(self, chosen, mismatch_used, first_other, [] if tried is None else tried, refused)

    @property
    def hint(self) -> str:
        hint = "Pass the directory that holds it with --parent-dir"
        if self.refused:
            # (the option of serve and mount; the other commands confine only when asked to)
            hint += (
                " (or trust the image's locators: --allow-absolute-parents for serve and mount,"
                " no --confine-parents elsewhere)"
            )
        return hint


def search_candidates(
    child_path: str,
    candidates: Sequence[tuple[str, str]],
    *,
    policy: ParentPolicy,
    explicit: bool,
    allow_mismatch: bool,
    seen: frozenset[Ident],
    identify: Callable[..., tuple[Ident, Key] | None],
    matches: Callable[[Key], bool],
    missing: str,
) -> CandidateSearch:
    """Walk ``candidates`` (``(how found, path)``, in order) under ``policy`` for any format:
    ``identify(path, devices=...)`` reads a candidate's identity and the key a child's record
    names (a VHD unique id, a VHDX linkage) from its headers alone, ``matches(key)`` says
    whether it is this child's parent.  Paths outside the child's folder and the policy's are
    refused unless ``explicit`` or the policy allows absolute parents; a loop back into
    ``seen`` raises :class:`~vhd.errors.ChainLoopError`."""
    out = CandidateSearch()
    child_dir = os.path.dirname(os.path.abspath(child_path))
    roots = [child_dir] + [os.path.normpath(os.path.abspath(d)) for d in policy.dirs]
    if len(candidates) > policy.max_candidates:
        out.tried.append(f"{len(candidates) - policy.max_candidates} candidates over the limit")
        candidates = candidates[: policy.max_candidates]
    looked_at: set[str] = set()
    for _source, path in candidates:
        shown = _show(path)
        if "\0" in path:
            out.tried.append(f"{shown} (not a valid path)")
            continue
        norm = os.path.normpath(os.path.abspath(path))
        if norm in looked_at:  # the same file spelt another way (``.\\x``, ``a\\..\\x``)
            continue
        looked_at.add(norm)
        inside = _inside(norm, roots)
        # Checked on the path as written, so that a refused path is not even looked up.  A
        # symbolic link inside an allowed folder is followed: whoever can place one there can
        # as well replace the image itself.
        if not inside and not explicit and not policy.allow_absolute:
            out.tried.append(f"{shown} (outside the allowed folders)")
            out.refused = True
            continue
        found = identify(norm, devices=explicit)
        if found is None:
            # Outside the allowed folders (where the caller opted in) every failure reads the
            # same: whether a file exists there, or what it is, is not the image's business.
            out.tried.append(f"{shown} ({missing if inside or explicit else 'no parent there'})")
            continue
        ident, key = found
        if matches(key) or (explicit and allow_mismatch):
            if ident in seen:
                raise ChainLoopError(f"the parent chain loops back to {shown}", path=child_path)
            out.chosen = (norm, ident)
            return out
        out.tried.append(f"{shown} (not this child's parent)")
        if out.first_other is None and ident not in seen:
            out.first_other = (norm, ident)
    if allow_mismatch and out.first_other is not None:
        out.chosen, out.mismatch_used = out.first_other, True
    return out


def open_chosen(open_it: Callable[[], Opened], path: str, child_path: str) -> Opened:
    """``open_it()`` for the chosen parent at ``path``; an OS-level failure becomes a
    :class:`~vhd.errors.ParentNotFoundError` of the child (a VHDError passes as it is)."""
    try:
        return open_it()
    except VHDError:
        raise
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not valid"
        raise ParentNotFoundError(
            f"the parent {_show(path)} cannot be opened ({reason})", path=child_path
        ) from None


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
    if explicit:
        candidates = [("explicit parent", explicit)]
    else:
        candidates = parent_candidates(child_path, header, locators, policy.dirs)
    found = search_candidates(
        child_path,
        candidates,
        policy=policy,
        explicit=explicit is not None,
        allow_mismatch=allow_mismatch,
        seen=seen,
        identify=footer_identity,
        matches=lambda unique_id: unique_id == want,
        missing="not found or not a VHD",
    )
    if found.chosen is not None:
        path, ident = found.chosen
        # The file must still be the one whose footer was read (not swapped for a link to
        # something else in between).
        disk: Any = open_chosen(
            lambda: opener(
                path,
                "r",
                strict=strict,
                parent_policy=policy,
                allow_parent_mismatch=allow_mismatch,
                _seen=seen | {ident},
                _expect=ident,
            ),
            path,
            child_path,
        )
        if getattr(disk, "logical_sector_size", 512) != 512:
            disk.close()
            raise ParentMismatchError(
                f"the parent {_show(path)} is a 4K-native VHDX: a VHD child has 512-byte sectors",
                path=child_path,
            )
        if found.mismatch_used:
            disk.warnings.append(
                f"parent {path} has another unique id than the child records; used anyway"
            )
        return disk
    label = _show(header.parent_name) if header.parent_name else "(no name)"
    where = _tried_text(found.tried)
    if found.first_other is not None:
        raise ParentMismatchError(
            f"parent {label!r} (unique id {uuid_text(want)}) was not found: the files "
            f"found are not this child's parent ({where}); if one is the right parent, record its "
            "id with vhd set-parent CHILD PARENT --force (library: allow_parent_mismatch=True)",
            path=child_path,
        )
    raise ParentNotFoundError(
        f"parent image {label!r} (unique id {uuid_text(want)}) not found; "
        f"tried: {where}. {found.hint}",
        path=child_path,
    )
