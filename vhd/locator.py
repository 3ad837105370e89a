"""Parent locator payloads (spec: "Parent Locator Entry"): what each platform code stores and how
vhdkit turns it into a path on Linux.

W2ku (absolute) and W2ru (relative, ``.\\``-prefixed) hold **UTF-16LE** text, although the
header's parent name is big-endian; MacX holds a UTF-8 ``file://`` URL; the deprecated Wi2k/Wi2r
hold ANSI text.  ``Mac `` (an alias blob) cannot be resolved and is reported only.
"""

from __future__ import annotations

import os
import posixpath
import re

CODE_NONE = 0
CODE_WI2R = 0x57693272
CODE_WI2K = 0x5769326B
CODE_W2RU = 0x57327275
CODE_W2KU = 0x57326B75
CODE_MAC = 0x4D616320
CODE_MACX = 0x4D616358

CODE_NAMES = {
    CODE_WI2R: "Wi2r",
    CODE_WI2K: "Wi2k",
    CODE_W2RU: "W2ru",
    CODE_W2KU: "W2ku",
    CODE_MAC: "Mac ",
    CODE_MACX: "MacX",
}

# Locator payloads are paths: anything bigger than this is damage, not a path.
MAX_LOCATOR_BYTES = 64 * 1024

_DRIVE = re.compile(r"^(?:\\\\\?\\)?([A-Za-z]):[\\/](.*)$")


def code_name(code: int) -> str:
    return CODE_NAMES.get(code, f"0x{code:08x}")


def decode_payload(code: int, data: bytes) -> str | None:
    """The text a locator holds, or None for codes that hold no text (``Mac `` alias, unknown)."""
    if code in (CODE_W2KU, CODE_W2RU):
        text = data[: len(data) // 2 * 2].decode("utf-16-le", errors="replace")
    elif code == CODE_MACX:
        text = data.decode("utf-8", errors="replace")
    elif code in (CODE_WI2K, CODE_WI2R):
        text = data.decode("latin-1")
    else:
        return None
    return text.split("\0", 1)[0]


def encode_payload(code: int, text: str) -> bytes:
    if code in (CODE_W2KU, CODE_W2RU):
        return text.encode("utf-16-le", errors="surrogatepass")
    if code == CODE_MACX:
        return text.encode("utf-8")
    if code in (CODE_WI2K, CODE_WI2R):
        return text.encode("latin-1", errors="replace")
    raise ValueError(f"cannot encode a locator of kind {code_name(code)}")


def windows_to_posix(text: str, child_dir: str) -> list[str]:
    """Linux candidates for a Windows path: absolute with a drive, rooted, or relative.

    ``C:\\a\\b.vhd`` maps to ``/mnt/c/a/b.vhd`` (WSL's mount layout) when that exists; the caller
    also tries the bare file name next to the child.
    """
    out: list[str] = []
    match = _DRIVE.match(text)
    if match:
        drive, rest = match.groups()
        out.append(posixpath.join("/mnt", drive.lower(), rest.replace("\\", "/")))
        return out
    path = text.replace("\\", "/")
    if path.startswith("/"):
        out.append(path)
    else:
        out.append(posixpath.normpath(posixpath.join(child_dir, path)))
    return out


def macx_to_posix(text: str, child_dir: str) -> list[str]:
    """A MacX ``file://`` URL (RFC 2396) as a Linux path; relative URLs resolve next to the child."""
    import urllib.parse  # here: its import (ipaddress behind it) costs every command ~3 ms

    if text.startswith("file://"):
        path = urllib.parse.unquote(text[len("file://") :])
    else:
        path = urllib.parse.unquote(text)
    if path.startswith("localhost/"):
        path = path[len("localhost") :]
    if not path.startswith("/"):
        path = posixpath.normpath(posixpath.join(child_dir, path))
    return [path]


def posix_to_macx(path: str) -> str:
    import urllib.parse

    return "file://" + urllib.parse.quote(os.path.abspath(path))


def relative_windows_path(target: str, start_dir: str) -> str:
    """W2ru form of ``target`` relative to ``start_dir``: ``.\\`` prefix and backslashes."""
    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(start_dir))
    return ".\\" + rel.replace("/", "\\")


def absolute_windows_path(target: str) -> str:
    """W2ku form of a Linux path: the absolute path with backslashes (no drive letter exists)."""
    return os.path.abspath(target).replace("/", "\\")
