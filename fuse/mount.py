"""Mount and unmount: open the image, start the FUSE server (daemonised), stop it cleanly.

``mount()`` returns once the mount is live: it starts ``python -m vhdfuse.mount`` in a new
session with a pipe, and the server writes ``ready`` to the pipe from libfuse's ``init``
callback (the kernel has then accepted the connection) or one ``error: ...`` line when the image
cannot be opened or mounted.  The server records ``pid`` and process start time in a pid file
named after the mount point, so that ``unmount()`` can wait for it to finish closing the image
after the kernel lets go.

``unmount()`` refuses a mount point that is not one of ours (type ``fuse.vhd``, source
``vhd:IMAGE``), then calls ``fsync`` on ``disk`` (→ ``Disk.flush()``: everything written through
the mount is durable), then unmounts with ``fusermount3 -u`` (``umount`` as a fallback for
root), then waits for the server to exit.  A plain ``fusermount -u``/``umount`` or SIGTERM
also ends the server cleanly: libfuse leaves its loop, and ``destroy`` flushes and closes the
disk (see :mod:`vhdfuse.adapter`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import logging.handlers
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import vhd

from .fs import DiskFilesystem
from .partitions import read_partitions

log = logging.getLogger("vhdfuse")

READY = b"ready\n"
# How our mounts show in /proc/self/mountinfo (libfuse's subtype and fsname options): what
# ``vhd umount`` checks before it unmounts anything.
SUBTYPE = "vhd"
FSTYPE = f"fuse.{SUBTYPE}"
FSNAME_PREFIX = "vhd:"


class MountError(vhd.VHDError):
    """The mount could not be set up or torn down."""


# -- serving (the daemon's side) ---------------------------------------------------------------


def open_filesystem(
    image: str,
    *,
    read_only: bool = False,
    parent_dirs: Sequence[str] = (),
    allow_absolute_parents: bool = False,
) -> DiskFilesystem:
    """Open the image (a whole chain) and read its partition table for the mount's files.

    Parents are looked for next to the image and in ``parent_dirs`` only, unless
    ``allow_absolute_parents`` (a mount serves the image to others: README "Untrusted images").
    """
    policy = vhd.ParentPolicy(dirs=tuple(parent_dirs), allow_absolute=allow_absolute_parents)
    disk = vhd.open(image, "r" if read_only else "r+", parent_policy=policy)
    try:
        partitions = read_partitions(lambda offset, length: disk.pread(length, offset), disk.size)
        mtime_ns = os.stat(image).st_mtime_ns
        return DiskFilesystem(disk, partitions, read_only=read_only, mtime_ns=mtime_ns)
    except BaseException:
        disk.close()
        raise


def serve(
    image: str,
    mountpoint: str,
    *,
    read_only: bool = False,
    allow_other: bool = False,
    parent_dirs: Sequence[str] = (),
    cache: str | None = None,
    debug: bool = False,
    on_ready: Callable[[], None] | None = None,
    allow_absolute_parents: bool = False,
    on_open: Callable[[list[str]], None] | None = None,
) -> None:
    """Mount in this process and serve until unmounted; the image is flushed and closed.
    ``on_open`` gets the files of the chain once they are open."""
    _check_mountpoint(mountpoint)
    fs = open_filesystem(
        image,
        read_only=read_only,
        parent_dirs=parent_dirs,
        allow_absolute_parents=allow_absolute_parents,
    )
    files = [str(layer.path) for layer in getattr(fs.disk, "chain", ())]
    log.info("serving %s", " <- ".join(files))
    if on_open is not None:
        on_open(files)
    from . import adapter  # loads libfuse: only where a mount is really served

    pidfile = _pidfile(mountpoint)

    def ready() -> None:
        _write_pidfile(pidfile)
        if on_ready is not None:
            on_ready()

    try:
        _run_adapter(
            adapter,
            fs,
            os.path.realpath(mountpoint),
            fsname=f"{FSNAME_PREFIX}{os.path.abspath(image)}",
            subtype=SUBTYPE,
            allow_other=allow_other,
            cache=cache or adapter.DEFAULT_CACHE,
            debug=debug,
            on_ready=ready,
        )
    finally:
        # destroy() normally closed it already; this covers a mount that never started.
        with contextlib.suppress(Exception):
            fs.close()
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()


def _run_adapter(adapter: Any, fs: DiskFilesystem, mountpoint: str, **options: Any) -> None:
    try:
        adapter.run(fs, mountpoint, **options)
    except RuntimeError as exc:
        # mfusepy reports a failed fuse_main() as a bare number; libfuse printed the reason
        # on stderr (the --log file of a daemonised mount).
        raise MountError(f"{mountpoint}: libfuse could not mount (status {exc})") from exc


def _check_mountpoint(mountpoint: str) -> None:
    if not os.path.isdir(mountpoint):
        raise MountError(f"{mountpoint}: the mount point is not a directory")
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint}: something is already mounted there")


# -- mounting (the caller's side) ---------------------------------------------------------------


def mount(
    image: str,
    mountpoint: str,
    *,
    read_only: bool = False,
    foreground: bool = False,
    allow_other: bool = False,
    parent_dirs: Sequence[str] = (),
    cache: str | None = None,
    log_file: str | None = None,
    timeout: float = 60.0,
    allow_absolute_parents: bool = False,
) -> list[str]:
    """Mount ``image`` on ``mountpoint``; returns once the mount is live (or, in the
    foreground, once it has been unmounted again) the files the server opened (the image,
    then its parents)."""
    files: list[str] = []
    _check_mountpoint(mountpoint)
    if not os.path.exists(image):
        raise MountError(f"{image}: no such file")
    if foreground:
        _setup_logging(log_file, foreground=True)
        serve(
            image,
            mountpoint,
            read_only=read_only,
            allow_other=allow_other,
            parent_dirs=parent_dirs,
            cache=cache,
            allow_absolute_parents=allow_absolute_parents,
            on_open=files.extend,
        )
        return files
    if log_file is None and not os.path.exists("/dev/log"):
        # No syslog to receive the server's messages (why a read failed with EIO, ...).
        log_file = str(default_log_file(mountpoint))
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "vhdfuse.mount", "--ready-fd", str(write_end)]
    argv += ["--read-only"] if read_only else []
    argv += ["--allow-other"] if allow_other else []
    argv += ["--allow-absolute-parents"] if allow_absolute_parents else []
    for directory in parent_dirs:
        argv += ["--parent-dir", os.path.abspath(directory)]
    argv += ["--cache", cache] if cache else []
    argv += ["--log", os.path.abspath(log_file)] if log_file else []
    argv += ["--", os.path.abspath(image), os.path.abspath(mountpoint)]
    try:
        with contextlib.ExitStack() as stack:
            null = stack.enter_context(open(os.devnull, "r+b"))
            # libfuse's own messages go to stderr: keep them with the log when there is one.
            errors = stack.enter_context(open(log_file, "ab")) if log_file else null
            # A new session and no inherited stdio: the server outlives us and never holds
            # the caller's pipes open.
            process = subprocess.Popen(
                argv,
                stdin=null,
                stdout=null,
                stderr=errors,
                pass_fds=(write_end,),
                start_new_session=True,
                cwd="/",
            )
    finally:
        os.close(write_end)
    try:
        message = _wait_ready(read_end, process, timeout)
    finally:
        os.close(read_end)
    if not message.startswith(READY[:-1]):
        text = message.decode(errors="replace").strip()
        if process.poll() is None:
            process.terminate()
        raise MountError(text.removeprefix("error: ") or "the mount server exited early")
    # "ready" may be followed by the JSON list of the files the server opened.
    with contextlib.suppress(ValueError):
        opened = json.loads(message[len(READY) - 1 :] or b"[]")
        files.extend(str(f) for f in opened if isinstance(opened, list))
    return files


def _wait_ready(fd: int, process: subprocess.Popen[bytes], timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return data  # EOF: the server exited (its error line, if any, is in data)
            data += chunk
            if data.endswith(b"\n"):
                return data
    return b"error: the mount did not come up within %d s" % timeout


# -- unmounting ------------------------------------------------------------------------------


def unmount(mountpoint: str, *, timeout: float = 120.0) -> None:
    """Flush, unmount and wait until the server has closed the image."""
    real = os.path.realpath(mountpoint)
    if not is_mounted(real):
        raise MountError(f"{mountpoint}: not mounted")
    if not is_our_mount(real):
        # Never take down someone else's file system (a tmpfs, a disk, another FUSE server).
        raise MountError(f"{mountpoint}: not a 'vhd mount' (use umount for other file systems)")
    pid = _read_pidfile(_pidfile(real))
    # fsync -> Disk.flush(): whatever reached the server is durable before the unmount.
    with contextlib.suppress(OSError):
        fd = os.open(os.path.join(real, "disk"), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _unmount_kernel(real)
    if pid is not None:
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _alive(pid):
            raise MountError(
                f"{mountpoint}: unmounted, but the server (pid {pid[0]}) is still busy"
            )
    # A server that was killed (SIGKILL, OOM) left its pid file behind.
    with contextlib.suppress(FileNotFoundError):
        _pidfile(real).unlink()


def server_pid(mountpoint: str) -> int | None:
    """The pid of the process serving ``mountpoint`` (None when unknown or gone)."""
    pid = _read_pidfile(_pidfile(os.path.realpath(mountpoint)))
    return pid[0] if pid is not None else None


def _unmount_kernel(path: str) -> None:
    errors: list[str] = []
    commands = [[tool, "-u", path] for tool in ("fusermount3", "fusermount") if shutil.which(tool)]
    if os.geteuid() == 0 and shutil.which("umount"):
        commands.append(["umount", path])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode == 0 or not is_mounted(path):
            return
        errors.append(result.stderr.strip())
    raise MountError(f"{path}: unmount failed: {'; '.join(e for e in errors if e) or 'no tool'}")


def is_mounted(path: str) -> bool:
    """Whether ``path`` is a mount point (also for a dead FUSE server, where stat fails)."""
    real = os.path.realpath(path)
    try:
        return _mount_entry(real) is not None
    except FileNotFoundError:
        return os.path.ismount(real)


def is_our_mount(path: str) -> bool:
    """Whether the topmost mount on ``path`` is a ``vhd mount`` (alive or with a dead server).

    Our mounts are FUSE mounts with subtype ``vhd`` (file system type ``fuse.vhd``) and a source
    (fsname) ``vhd:IMAGE``, both set in :func:`serve`.
    """
    try:
        entry = _mount_entry(os.path.realpath(path))
    except FileNotFoundError:
        return False
    return entry is not None and entry[0] == FSTYPE and entry[1].startswith(FSNAME_PREFIX)


def _mount_entry(real: str) -> tuple[str, str] | None:
    """(file system type, source) of the topmost mount on ``real`` in /proc/self/mountinfo."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.rstrip("\n").split(" ")
            if len(fields) > 4 and _unescape(fields[4]) == real:
                # Optional fields end at "-", followed by type, source, super options.
                rest = fields[fields.index("-", 6) + 1 :] if "-" in fields[6:] else []
                fstype = _unescape(rest[0]) if rest else ""
                source = _unescape(rest[1]) if len(rest) > 1 else ""
                found = (fstype, source)  # later lines are mounted on top of earlier ones
    return found


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


# -- pid files ------------------------------------------------------------------------------


def _runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.geteuid() == 0 else "")
    if not base or not os.access(base, os.W_OK):
        base = tempfile.gettempdir()
    path = Path(base) / f"vhdkit-{os.geteuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _mount_key(mountpoint: str) -> str:
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:24]


def _pidfile(mountpoint: str) -> Path:
    return _runtime_dir() / f"mount-{_mount_key(mountpoint)}.pid"


def default_log_file(mountpoint: str) -> Path:
    """Where a daemonised server logs without ``--log`` when there is no syslog socket."""
    return _runtime_dir() / f"mount-{_mount_key(mountpoint)}.log"


def _start_time(pid: int) -> str | None:
    """The start time of a live process (None for a gone or zombie one)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _write_pidfile(path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(f"{os.getpid()} {_start_time(os.getpid())}\n", encoding="ascii")
    temporary.replace(path)


def _read_pidfile(path: Path) -> tuple[int, str] | None:
    try:
        pid_text, start = path.read_text(encoding="ascii").split()
        pid = (int(pid_text), start)
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: tuple[int, str]) -> bool:
    # The start time guards against a recycled pid.
    return _start_time(pid[0]) == pid[1]


# -- the server's entry point ----------------------------------------------------------------


def _setup_logging(log_file: str | None, *, foreground: bool) -> None:
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(f"vhd mount[{os.getpid()}]: %(levelname)s %(message)s"))
    root = logging.getLogger("vhdfuse")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # mfusepy logs every errno at debug level and bugs at error level under "fuse".
    logging.getLogger("fuse").addHandler(handler)
    logging.getLogger("fuse").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vhdfuse.mount")
    parser.add_argument("image")
    parser.add_argument("mountpoint")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--allow-other", action="store_true")
    parser.add_argument("--allow-absolute-parents", action="store_true")
    parser.add_argument("--parent-dir", action="append", default=[])
    parser.add_argument("--cache")
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    _setup_logging(args.log, foreground=False)
    ready_fd: int | None = args.ready_fd
    opened: list[str] = []

    def report(message: bytes) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, message)
                os.close(ready_fd)
            ready_fd = None

    try:
        serve(
            args.image,
            args.mountpoint,
            read_only=args.read_only,
            allow_other=args.allow_other,
            parent_dirs=args.parent_dir,
            cache=args.cache,
            allow_absolute_parents=args.allow_absolute_parents,
            on_open=opened.extend,
            on_ready=lambda: report(READY[:-1] + b" " + json.dumps(opened).encode() + b"\n"),
        )
    except (vhd.VHDError, OSError, ValueError, RuntimeError) as exc:
        log.error("mount failed: %s", exc)
        report(f"error: {' '.join(str(exc).split()) or type(exc).__name__}\n".encode())
        return 2
    report(b"error: the mount ended before it was ready\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
