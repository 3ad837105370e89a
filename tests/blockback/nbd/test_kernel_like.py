"""The README's kernel-NBD route without a kernel: ``nbd-client -connections 4 -b 4096`` spreads
one 8 MiB O_DIRECT ``dd`` (bs=1M, seek=100, conv=fsync) over four connections as pipelined
simple-reply requests of at most 128 KiB, some with FUA, then one FLUSH, then reads it back
(issue 13).  The same data must come back over every connection and be in the image file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import vhd
from blockback.nbd import protocol as p
from tests.blockback.nbd.helpers import MiB, RawClient, serving, short_tmpdir

CHUNK = 128 * 1024  # the kernel's nbd splits a 1 MiB O_DIRECT write into requests this size
CONNECTIONS = 4


def test_dd_over_four_connections_into_unallocated_blocks() -> None:
    data = os.urandom(8 * MiB)
    base = 100 * MiB
    with short_tmpdir() as tmp:
        image = tmp / "disk.vhd"
        vhd.create(str(image), 256 * MiB).close()
        with vhd.open(str(image), "r+") as disk, serving(disk) as (_s, _url, path):
            clients = [RawClient(path) for _ in range(CONNECTIONS)]
            try:
                for c in clients:
                    c.handshake(structured=False)  # the kernel never negotiates structured replies
                errors: list[str] = []

                def writer(k: int) -> None:
                    # Connection k gets every 4th chunk, all pipelined before any reply is read;
                    # the last chunk of each 1 MiB "dd block" carries FUA as O_DIRECT|O_SYNC would.
                    c = clients[k]
                    mine = [i for i in range(len(data) // CHUNK) if i % CONNECTIONS == k]
                    for i in mine:
                        flags = p.CmdFlag.FUA if (i + 1) % 8 == 0 else 0
                        c.send(
                            p.Cmd.WRITE,
                            base + i * CHUNK,
                            CHUNK,
                            handle=i,
                            flags=flags,
                            payload=data[i * CHUNK : (i + 1) * CHUNK],
                        )
                    for _ in mine:
                        r = c.reply()
                        if r.error:
                            errors.append(f"write {r.handle}: errno {r.error}")

                threads = [threading.Thread(target=writer, args=(k,)) for k in range(CONNECTIONS)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                assert not errors, errors
                clients[0].send(p.Cmd.FLUSH, handle=999)
                assert clients[0].reply().error == 0
                # Read back in 4 KiB requests (-b 4096), round-robin over the connections.
                for k, c in enumerate(clients):
                    for i in range(k, len(data) // 4096, CONNECTIONS * 16):
                        r = c.read(base + i * 4096, 4096, handle=i)
                        assert r.error == 0
                        assert r.data == data[i * 4096 : (i + 1) * 4096], f"4 KiB block {i}"
            finally:
                for c in clients:
                    c.close()
        with vhd.open(str(image)) as disk:
            assert disk.pread(len(data), base) == data
        assert Path(image).exists()
