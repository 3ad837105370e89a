"""Finding a differencing disk's parent (spec: "Parent Locator Entry", "Parent Unique ID").

Candidates are tried in this order, and the first whose footer unique id equals the child's
recorded parent id wins:

1. W2ku (absolute Windows path; ``C:\\x\\y.vhd`` is tried as ``/mnt/c/x/y.vhd``), then W2ru
   (``.\\``-relative to the child), then MacX (``file://`` URL), then the deprecated Wi2k/Wi2r;
2. the header's parent name (Windows 10 stores a full path there), relative to the child;
3. the bare file name of every path above, in the child's directory and in each extra search
   directory the caller gives.

A candidate that exists but has another unique id is skipped (and reported if nothing matches),
unless the caller allows a mismatch.  Loops and absurdly deep chains are errors.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import (
    ChainLoopError,
    NotAVHDError,
    ParentError,
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


def _unique_id(path: str) -> bytes | None:
    """The unique id in a VHD's footer (trailing copy, else the one at offset 0), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for at in (size - 512, 0):
            raw = read_upto(fd, 512, at) if at >= 0 else b""
            if raw[:8] == b"conectix":
                return raw[68:84]  # spec: unique id at footer offset 68, 16 bytes
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def parent_candidates(
    child_path: str,
    header: DynamicHeader,
    locators: Sequence[LocatorInfo],
    search_dirs: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """``(how it was found, path)`` candidates in the order they are tried, without duplicates."""
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


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


OpenFn = Callable[..., object]


def resolve_parent(
    child_path: str,
    header: DynamicHeader,
    locators: Sequence[LocatorInfo],
    *,
    opener: OpenFn,
    search_dirs: Sequence[str],
    allow_mismatch: bool,
    strict: bool,
    seen: frozenset[tuple[int, int]],
    explicit: str | None = None,
) -> object:
    """Open and return the parent :class:`~vhd.disk.Disk` of a differencing child."""
    if len(seen) >= MAX_CHAIN_DEPTH:
        raise ChainLoopError(f"the chain is deeper than {MAX_CHAIN_DEPTH} disks", path=child_path)
    want = header.parent_unique_id
    candidates = (
        [("explicit parent", explicit)]
        if explicit
        else parent_candidates(child_path, header, locators, search_dirs)
    )
    mismatched: list[tuple[str, object]] = []
    tried: list[str] = []
    for source, path in candidates:
        ident = _identity(path)
        if ident is None:
            tried.append(path)
            continue
        if ident in seen:
            raise ChainLoopError(
                f"the parent chain loops back to {path} (via the {source})", path=child_path
            )
        try:
            disk = opener(
                path,
                "r",
                strict=strict,
                parent_dirs=search_dirs,
                allow_parent_mismatch=allow_mismatch,
                _seen=seen | {ident},
            )
        except NotAVHDError:
            tried.append(f"{path} (not a VHD)")
            continue
        except ChainLoopError:
            raise
        except ParentError as exc:
            # The candidate opened but its own ancestor is missing: when the candidate is the
            # right parent, say so (its error names the missing grandparent), instead of
            # calling the parent, which exists, "not found".
            if explicit or _unique_id(path) == want:
                raise
            tried.append(f"{path} ({exc})")
            continue
        except VHDError as exc:
            if explicit:
                raise
            tried.append(f"{path} ({exc})")
            continue
        footer = disk.footer  # type: ignore[attr-defined]
        if footer.unique_id == want or (explicit and allow_mismatch):
            return disk
        mismatched.append((path, disk))
        tried.append(f"{path} (unique id {footer.uuid}, not the parent's)")
    if mismatched and allow_mismatch:
        path, disk = mismatched[0]
        for _, other in mismatched[1:]:
            other.close()  # type: ignore[attr-defined]
        disk.warnings.append(  # type: ignore[attr-defined]
            f"parent {path} has another unique id than the child records; used anyway"
        )
        return disk
    for _, other in mismatched:
        other.close()  # type: ignore[attr-defined]
    import uuid as _uuid

    label = header.parent_name or "(no name)"
    where = "; ".join(tried) if tried else "no locator or name to try"
    if mismatched:
        raise ParentMismatchError(
            f"parent {label!r} (unique id {_uuid.UUID(bytes=want)}) was not found: the files "
            f"found have other ids ({where}); if one is the right parent, record its id with "
            "vhd set-parent CHILD PARENT --force (library: allow_parent_mismatch=True)",
            path=child_path,
        )
    raise ParentNotFoundError(
        f"parent image {label!r} (unique id {_uuid.UUID(bytes=want)}) not found; "
        f"tried: {where}. Pass the directory that holds it with --parent-dir",
        path=child_path,
    )
