"""The ``vhd`` command: argument parsing and the one place where errors become exit codes.

Exit codes (shared by every sub-command): 0 success, 1 "checked and found a problem / differs",
2 error (one line on stderr, no traceback unless ``--debug``: a ``vhd.VHDError``, a blockback
``ProtocolError``, an ``OSError`` or a ``ValueError``).  Each sub-command lives in its own
module under :mod:`vhdtools.commands` and is discovered here, so commands can be added without
touching this file: a command module defines ``register(subparsers)`` which adds its parser and
sets ``func`` to a ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence

import vhd
from blockback.errors import ProtocolError

from . import commands

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_ERROR = 2


def _help_width() -> int:
    """The width argparse's HelpFormatter picks, found as ``shutil.get_terminal_size`` finds it
    ($COLUMNS, else the terminal's, else 80), less 2.  argparse formats a usage line on every
    run (for the sub-commands' prog and for intermixed parsing), and left to itself it imports
    shutil for the width: bz2, lzma and zlib behind it, about 3 ms of every command."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, its width from :func:`_help_width` rather than shutil's."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _help_width() if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on usage errors already; keep its one-line style."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


class _CommandParser(argparse.ArgumentParser):
    """A sub-command's parser that lets options and positionals mix in any order, so that
    ``vhd create IMAGE --type fixed 10G`` works like ``vhd create IMAGE 10G --type fixed``
    (plain argparse stops filling an optional positional once an option came between)."""

    _intermixing = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        # `vhd convert A B --debug` works like `vhd --debug convert A B`; SUPPRESS leaves the
        # top-level value alone when the option is not given here
        self.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return super().parse_known_intermixed_args(args, namespace)
        except TypeError:  # a layout intermixing cannot handle: parse the ordinary way
            return super().parse_known_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the command it names is imported (fast start-up)."""
    parser = _Parser(prog="vhd", description="Work with Microsoft VHD disk images on Linux.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    sub.required = True
    names = _command_names()
    wanted = _command_module(argv, names)
    for name in [wanted] if wanted else [] if wanted == "" else names:
        module = importlib.import_module(f"{commands.__name__}.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


class _VersionAction(argparse.Action):
    """argparse's "version" action, with the text made only when asked for: it names the CRC
    implementation, which imports the VHDX package (every command would pay for it)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(_version())
        parser.exit()


def _version() -> str:
    # vhd.crc32c_backend, not vhd.vhdx.crc: that would import the whole VHDX package (about
    # 20 ms) to print one line.
    from vhd.crc32c_backend import using_c_extension

    crc = "crcmod C extension" if using_c_extension() else "crcmod pure Python (slow)"
    return f"vhdkit {vhd.__version__} (VHDX CRC-32C: {crc})"


def _command_names() -> list[str]:
    """The command modules: the public ``*.py`` files of :mod:`vhdtools.commands`.  (A listing of
    its folder: ``pkgutil.iter_modules`` would cost every command the import of pkgutil,
    importlib.util and typing: about 6 ms by `python -X importtime`.)"""
    names: set[str] = set()
    for folder in commands.__path__:
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            stem, ext = os.path.splitext(entry)
            if ext == ".py" and stem.isidentifier() and not stem.startswith("_"):
                names.add(stem)
    return sorted(names)


def _command_module(argv: Sequence[str] | None, names: list[str]) -> str | None:
    """The module of the command ``argv`` names, if it clearly names one."""
    if argv is None:
        return None
    for arg in argv:
        if arg.startswith("-"):
            if arg in ("-h", "--help"):
                return None
            if arg == "--version":
                return ""  # printed before any command is needed: import none
            continue
        name = arg.replace("-", "_")
        return name if name in names else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt as exc:
        print("vhd: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # SIGINT, or the SIGTERM/SIGHUP it stands for
    except BrokenPipeError:
        return EXIT_OK
    # A blockback ProtocolError (xenstored refused or went away, ...) is reported like an image
    # error: it is not one (it is about a peer), but the user needs the same one line.
    except (vhd.VHDError, ProtocolError, OSError, ValueError) as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"vhd: error: {_describe(exc, args)}", file=sys.stderr)
        return EXIT_ERROR


def _describe(exc: BaseException, args: argparse.Namespace | None = None) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        if exc.errno == errno.EEXIST:
            # only create/convert make files, and both have --force to overwrite
            hint = " (pass --force to overwrite it)" if hasattr(args, "force") else ""
            return f"{exc.filename}: already exists{hint}"
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
