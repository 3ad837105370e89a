"""Test helpers for the NBD export: images with known content, an in-process server, and a
minimal raw-socket NBD client (for the cases real clients never produce)."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from blockback.executor import BlockDisk
from blockback.nbd import protocol as p
from blockback.nbd.server import NBDServer
from tests.images import image

MiB = 1024 * 1024


def pattern(offset: int, length: int, seed: int = 1) -> bytes:
    """Deterministic, position-dependent bytes (every 512-byte sector differs)."""
    out = bytearray()
    first = offset // 512
    last = (offset + length + 511) // 512
    for sector in range(first, last):
        out += hashlib.sha512(f"{seed}:{sector}".encode()).digest() * 8
    start = offset - first * 512
    return bytes(out[start : start + length])


# Where make_image writes data: (offset, length).  The rest stays unallocated.
DATA_RANGES = [(0, 3 * MiB), (5 * MiB + 512, 70_000), (9 * MiB, 2 * MiB), (15 * MiB - 4096, 4096)]
IMAGE_SIZE = 16 * MiB


def make_image(path: Path, *, type: str = "dynamic", size: int = IMAGE_SIZE, seed: int = 1) -> None:
    """The pattern at DATA_RANGES; a ``.vhdx`` path makes a VHDX with 1 MiB blocks (so the 16 MiB
    disk has unallocated blocks between the data, as the VHD has)."""
    writes = [(offset, pattern(offset, length, seed)) for offset, length in DATA_RANGES]
    if path.suffix == ".vhdx":
        image(path, size, type=type, block_size=MiB, writes=writes)
    else:
        image(path, size, type=type, writes=writes)


def expected_content(size: int = IMAGE_SIZE, seed: int = 1) -> bytes:
    data = bytearray(size)
    for offset, length in DATA_RANGES:
        data[offset : offset + length] = pattern(offset, length, seed)
    return bytes(data)


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A short directory path: unix socket paths are limited to 107 bytes."""
    path = tempfile.mkdtemp(prefix="nbd-", dir="/tmp")
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def serving(disk: BlockDisk, **kwargs: object) -> Iterator[tuple[NBDServer, str, str]]:
    """An in-process server on a unix socket: yields (server, nbd+unix URL, socket path)."""
    with short_tmpdir() as tmp:
        path = str(tmp / "s")
        server = NBDServer(disk, **kwargs)  # type: ignore[arg-type]
        url = server.listen_unix(path)
        server.start()
        try:
            yield server, url, path
        finally:
            server.stop(timeout=10)


@dataclass
class Reply:
    handle: int
    error: int
    data: bytes = b""
    kind: int = -1  # structured reply type, -1 for a simple reply
    offset: int = 0
    message: str = ""


class RawClient:
    """Just enough of an NBD client to send whatever we like."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False
        self.size = 0
        self.flags = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"server closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.sock.sendall(struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data)
        out = []
        while True:
            magic, opt, rep, length = struct.unpack(">QIII", self.recv_exact(20))
            assert magic == p.REPLY_MAGIC and opt == option
            payload = self.recv_exact(length)
            out.append((rep, payload))
            if rep == p.Rep.ACK or rep & (1 << 31):
                return out

    def handshake(self, *, structured: bool = True, meta: bool = True, name: str = "") -> None:
        magic, ihaveopt, _flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, ihaveopt) == (p.NBD_MAGIC, p.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        if structured:
            assert self.option(p.Opt.STRUCTURED_REPLY)[-1][0] == p.Rep.ACK
            self.structured = True
            if meta:
                raw = name.encode()
                q = b"base:allocation"
                data = struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(q)) + q
                assert self.option(p.Opt.SET_META_CONTEXT, data)[-1][0] == p.Rep.ACK
        raw = name.encode()
        answers = self.option(p.Opt.GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        assert answers[-1][0] == p.Rep.ACK, answers
        for rep, payload in answers:
            if rep == p.Rep.INFO and struct.unpack(">H", payload[:2])[0] == p.Info.EXPORT:
                self.size, self.flags = struct.unpack(">QH", payload[2:])

    def send(
        self,
        kind: int,
        offset: int = 0,
        length: int = 0,
        *,
        handle: int = 1,
        flags: int = 0,
        payload: bytes = b"",
    ) -> None:
        header = struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, kind, handle, offset, length)
        self.sock.sendall(header + payload)

    def reply(self, read_length: int | Callable[[int], int] = 0) -> Reply:
        """Read one reply.  For a simple reply to a successful read, pass its length (or a
        function of the handle giving it, when replies may come in any order)."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            if callable(read_length):
                read_length = read_length(handle)
            data = self.recv_exact(read_length) if read_length and not error else b""
            return Reply(handle, error, data)
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, kind, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
        assert flags & p.REPLY_FLAG_DONE  # this server always sends one chunk
        body = self.recv_exact(length)
        if kind == p.ReplyType.OFFSET_DATA:
            (offset,) = struct.unpack(">Q", body[:8])
            return Reply(handle, 0, body[8:], kind, offset)
        if kind == p.ReplyType.ERROR:
            error, mlen = struct.unpack(">IH", body[:6])
            return Reply(handle, error, b"", kind, message=body[6 : 6 + mlen].decode())
        return Reply(handle, 0, body, kind)

    def read(self, offset: int, length: int, handle: int = 1) -> Reply:
        self.send(p.Cmd.READ, offset, length, handle=handle)
        return self.reply(length)

    def write(self, offset: int, data: bytes, handle: int = 1, flags: int = 0) -> Reply:
        self.send(p.Cmd.WRITE, offset, len(data), handle=handle, flags=flags, payload=data)
        return self.reply()
