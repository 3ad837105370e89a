"""The NBD export against clients no one here wrote: libnbd's nbdinfo and nbdcopy, qemu-img,
qemu-io and fio's nbd engine, plus a fuzzer running next to a well-behaved client."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vhd
from blockback.nbd import protocol as p
from tests.blockback.nbd.helpers import (
    IMAGE_SIZE,
    MiB,
    RawClient,
    expected_content,
    make_image,
    pattern,
    serving,
    short_tmpdir,
)
from tests.images import Image, image, sha, vhd_image
from tests.interop.oracles import libvhdi_read
from vhd.vhdx import create_vhdx

pytestmark = pytest.mark.timeout(180)
Need = Callable[[str], str]
# The export is format-neutral (a Disk): the data-path tests run on VHD and on VHDX.
FORMATS = ["vhd", "vhdx"]


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{cmd}: {result.stderr}"
    return result


def vhd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "vhdtools.cli", *args)


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


def vhd_content(path: Path) -> bytes:
    with vhd.open(str(path)) as disk:
        return disk.pread(disk.size, 0)


def make_chain(tmp: Path, fmt: str = "vhd") -> tuple[Path, Path]:
    """parent.FMT holds the pattern; child.FMT (differencing) overrides 1 MiB at 2 MiB."""
    parent, child = tmp / f"parent.{fmt}", tmp / f"child.{fmt}"
    make_image(parent)
    base = Image(parent, expected_content())
    writes = [(2 * MiB, pattern(2 * MiB, MiB, seed=2))]
    if fmt == "vhdx":
        image(child, parent=base, block_size=MiB, writes=writes)
    else:
        vhd_image(child, IMAGE_SIZE, parent=base, writes=writes)
    return parent, child


def qemu_format(path: Path) -> str:
    return "vhdx" if path.suffix == ".vhdx" else "vpc"


def assert_qemu_check_clean(path: Path) -> None:
    """``qemu-img check`` (VHDX only: qemu has no checker for VHD)."""
    result = run("qemu-img", "check", "-f", "vhdx", str(path))
    assert "No errors" in result.stdout, result.stdout


def chain_content() -> bytes:
    data = bytearray(expected_content())
    data[2 * MiB : 3 * MiB] = pattern(2 * MiB, MiB, seed=2)
    return bytes(data)


# -- nbdinfo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("read_only", [False, True])
def test_nbdinfo_size_and_flags(tmp: Path, require_tool: Need, read_only: bool) -> None:
    nbdinfo = require_tool("nbdinfo")
    make_image(tmp / "d.vhd")
    with (
        vhd.open(str(tmp / "d.vhd"), "r" if read_only else "r+") as disk,
        serving(disk, export_name="vol") as (_s, url, _path),
    ):
        info = json.loads(run(nbdinfo, "--json", url).stdout)
    (export,) = info["exports"]
    assert info["structured"] is True
    assert export["export-name"] == "vol"
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is read_only
    assert export["contexts"] == ["base:allocation"]
    for flag in ("can_flush", "can_multi_conn", "can_cache"):
        assert export[flag] is True
    for flag in ("can_trim", "can_zero", "can_fua", "can_fast_zero"):
        assert export[flag] is (not read_only)
    assert (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    ) == (1, 4096, 32 * MiB)


@pytest.mark.parametrize(("logical", "minimum"), [(4096, 4096), (512, 1)])
def test_nbdinfo_block_size_of_a_4k_native_vhdx(
    tmp: Path, require_tool: Need, logical: int, minimum: int
) -> None:
    """A 4K-native VHDX advertises its logical sector as NBD_INFO_BLOCK_SIZE's minimum (a 512-byte
    one keeps 1: the disk merges partial sectors), and nbdcopy, which honours that minimum, reads
    back what the image holds as libvhdi (the oracle: qemu-img refuses 4K-native VHDX) reads it."""
    nbdinfo, nbdcopy = require_tool("nbdinfo"), require_tool("nbdcopy")
    path = tmp / "k.vhdx"
    data = os.urandom(MiB)
    with create_vhdx(path, 8 * MiB, logical_sector_size=logical) as disk:
        disk.pwrite(data, 3 * MiB)
        disk.flush()
    with (
        vhd.open(str(path), "r+") as disk,
        serving(disk, export_name="k") as (_s, url, _path),
    ):
        info = json.loads(run(nbdinfo, "--json", url).stdout)
        run(nbdcopy, url, str(tmp / "k.raw"))
    (export,) = info["exports"]
    sizes = (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    )
    assert sizes == (minimum, 4096, 32 * MiB)
    libvhdi_read([path], tmp / "l.raw")
    assert (tmp / "k.raw").read_bytes() == (tmp / "l.raw").read_bytes()
    assert (tmp / "k.raw").read_bytes()[3 * MiB : 4 * MiB] == data


def expected_map(disk: vhd.Disk) -> list[tuple[int, int, int]]:
    """Disk.extents() as base:allocation would show it: (offset, length, type)."""
    out: list[tuple[int, int, int]] = []
    for ext in disk.extents():
        kind = 3 if ext.layer is None else 0
        if out and out[-1][2] == kind:
            out[-1] = (out[-1][0], out[-1][1] + ext.length, kind)
        else:
            out.append((ext.offset, ext.length, kind))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["dynamic", "chain"])
def test_nbdinfo_map_matches_extents(tmp: Path, require_tool: Need, layout: str, fmt: str) -> None:
    nbdinfo = require_tool("nbdinfo")
    if layout == "chain":
        _parent, path = make_chain(tmp, fmt)
    else:
        path = tmp / f"d.{fmt}"
        make_image(path)
    with vhd.open(str(path)) as disk, serving(disk) as (_s, url, _path):
        want = expected_map(disk)
        got = json.loads(run(nbdinfo, "--map", "--json", url).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in got] == want
    # The same map as `vhd map` prints (layers of the chain all count as data).
    vhd_map: list[tuple[int, int, int]] = []
    for e in json.loads(vhd_cli("map", "--json", str(path)).stdout):
        kind = 0 if e["data"] else 3
        if vhd_map and vhd_map[-1][2] == kind:
            vhd_map[-1] = (vhd_map[-1][0], vhd_map[-1][1] + e["length"], kind)
        else:
            vhd_map.append((e["offset"], e["length"], kind))
    assert vhd_map == want
    assert any(kind == 3 for _, _, kind in want) and any(kind == 0 for _, _, kind in want)
    # Holes really are zeros.
    content = chain_content() if layout == "chain" else expected_content()
    for offset, length, kind in want:
        if kind == 3:
            assert content[offset : offset + length] == bytes(length)


# -- nbdcopy, qemu-img, qemu-io ----------------------------------------------------------------


def qemu_vpc(tmp: Path, subformat: str, fmt: str = "vhd") -> Path:
    """A VHD (or VHDX) made and filled by qemu (another implementation than ours)."""
    path = tmp / f"qemu-{subformat}.{fmt}"
    if fmt == "vhdx":
        opts = f"subformat={subformat},block_size=1M"
    else:
        opts = f"subformat={subformat},force_size=on"
    qfmt = qemu_format(path)
    run("qemu-img", "create", "-q", "-f", qfmt, "-o", opts, str(path), str(IMAGE_SIZE))
    run("qemu-io", "-f", qfmt, "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 5100k 100k",
        "-c", "write -P 0x33 15M 4k", str(path))  # fmt: skip
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("source", ["qemu-fixed", "qemu-dynamic", "vhdkit-dynamic", "chain"])
def test_nbdcopy_read_equals_image(tmp: Path, require_tool: Need, source: str, fmt: str) -> None:
    nbdcopy = require_tool("nbdcopy")
    qemu_img = require_tool("qemu-img")
    require_tool("qemu-io")
    if source.startswith("qemu-"):
        path = qemu_vpc(tmp, source.split("-")[1], fmt)
    elif source == "chain":
        _parent, path = make_chain(tmp, fmt)
    else:
        path = tmp / f"d.{fmt}"
        make_image(path)
    out = tmp / "out.raw"
    with vhd.open(str(path)) as disk, serving(disk) as (_s, url, _path):
        run(nbdcopy, url, str(out))
    got = out.read_bytes()
    assert got == vhd_content(path)
    vhd_cli("convert", "--to", "raw", str(path), str(tmp / "conv.raw"))
    assert got == (tmp / "conv.raw").read_bytes()
    if source == "chain":
        # qemu reads differencing VHDs without their parent (and refuses differencing VHDX), so
        # the model applies here, and libvhdi for VHDX.
        assert got == chain_content()
        if fmt == "vhdx":
            libvhdi_read([_parent, path], tmp / "libvhdi.raw")
            assert got == (tmp / "libvhdi.raw").read_bytes()
    else:
        ref = tmp / "ref.raw"
        run(qemu_img, "convert", "-f", qemu_format(path), "-O", "raw", str(path), str(ref))
        assert got == ref.read_bytes()
    if source == "vhdkit-dynamic":
        assert got == expected_content()


@pytest.mark.parametrize("fmt", FORMATS)
def test_nbdcopy_write_into_export(tmp: Path, require_tool: Need, fmt: str) -> None:
    nbdcopy = require_tool("nbdcopy")
    qemu_img = require_tool("qemu-img")
    path = tmp / f"d.{fmt}"
    if fmt == "vhdx":
        create_vhdx(path, IMAGE_SIZE, block_size=MiB).close()
    else:
        vhd.create(str(path), IMAGE_SIZE).close()
    rng = random.Random(5)
    source = bytearray(IMAGE_SIZE)
    for _ in range(20):
        offset = rng.randrange(0, IMAGE_SIZE - 300_000)
        length = rng.randrange(1, 300_000)
        source[offset : offset + length] = rng.randbytes(length)
    (tmp / "src.raw").write_bytes(source)
    with vhd.open(str(path), "r+") as disk, serving(disk) as (_s, url, _path):
        run(nbdcopy, str(tmp / "src.raw"), url)
    assert vhd_content(path) == source
    run(qemu_img, "convert", "-f", qemu_format(path), "-O", "raw", str(path), str(tmp / "ref.raw"))
    assert (tmp / "ref.raw").read_bytes() == source
    if fmt == "vhdx":
        assert_qemu_check_clean(path)


def test_qemu_img_convert_over_nbd(tmp: Path, require_tool: Need) -> None:
    qemu_img = require_tool("qemu-img")
    _parent, child = make_chain(tmp)
    with vhd.open(str(child)) as disk, serving(disk) as (_s, url, _path):
        run(qemu_img, "convert", "-f", "raw", "-O", "raw", url, str(tmp / "out.raw"))
        info = json.loads(run(qemu_img, "info", "--output=json", url).stdout)
    assert info["virtual-size"] == IMAGE_SIZE
    assert (tmp / "out.raw").read_bytes() == chain_content()


@pytest.mark.parametrize("fmt", FORMATS)
def test_qemu_io_writes_land_in_the_leaf(tmp: Path, require_tool: Need, fmt: str) -> None:
    qemu_io = require_tool("qemu-io")
    parent, child = make_chain(tmp, fmt)
    parent_hash = sha(parent)
    with vhd.open(str(child), "r+") as disk, serving(disk) as (_s, url, _path):
        result = run(
            qemu_io, "-f", "raw",
            "-c", "write -P 0xab 1M 64k",
            "-c", "write -P 0xcd -f 9437184 4097",   # FUA, unaligned length
            "-c", "write -z 2M 4k",
            "-c", "discard 3M 1M",
            "-c", "read -P 0xab 1M 64k",
            "-c", "read -P 0 2M 4k",
            "-c", "flush",
            url,
        )  # fmt: skip
    # qemu-io reports a failed command or pattern check on stdout but still exits 0.
    assert "fail" not in result.stdout.lower() and "error" not in result.stdout.lower()
    assert result.stdout.count("ops/sec") == 6
    assert sha(parent) == parent_hash
    want = bytearray(chain_content())
    want[MiB : MiB + 65536] = b"\xab" * 65536
    want[9 * MiB : 9 * MiB + 4097] = b"\xcd" * 4097
    want[2 * MiB : 2 * MiB + 4096] = bytes(4096)
    want[3 * MiB : 4 * MiB] = bytes(MiB)
    assert vhd_content(child) == want
    assert vhd_content(parent) == expected_content()
    if fmt == "vhdx":
        libvhdi_read([parent, child], tmp / "libvhdi.raw")
        assert (tmp / "libvhdi.raw").read_bytes() == want


@pytest.mark.parametrize("fmt", FORMATS)
def test_fio_random_writes_match_the_model(tmp: Path, require_tool: Need, fmt: str) -> None:
    fio = require_tool("fio")
    path = tmp / f"d.{fmt}"
    make_image(path)
    region = (4 * MiB, 8 * MiB)
    with vhd.open(str(path), "r+") as disk, serving(disk, workers=4) as (_s, url, _path):
        common = [
            fio, "--name=t", "--ioengine=nbd", f"--uri={url}", "--bs=4k", "--iodepth=16",
            f"--offset={region[0]}", f"--size={region[1]}", "--randseed=7",
            "--verify_state_save=0",  # no verify-state file in the working directory
        ]  # fmt: skip
        # Every 4 KiB block of the region is written once, in random order, then read back
        # and checked by fio itself.
        run(*common, "--rw=randwrite", "--verify=pattern", "--verify_pattern=0x5aa5c33c",
            "--do_verify=1")  # fmt: skip
        # Mixed random reads and writes in flight together.
        run(*common, "--rw=randrw", "--verify=crc32c", "--runtime=2", "--time_based=0")
    # The model: outside the region the image is untouched; a fresh read of the fio region
    # through vhd shows only whole 4 KiB blocks of fio data (no stray image bytes).
    content = vhd_content(path)
    base = expected_content()
    assert content[: region[0]] == base[: region[0]]
    assert content[region[0] + region[1] :] == base[region[0] + region[1] :]
    fio_region = content[region[0] : region[0] + region[1]]
    original = base[region[0] : region[0] + region[1]]
    for block in range(0, region[1], 4096):
        assert fio_region[block : block + 4096] != original[block : block + 4096]
    if fmt == "vhdx":
        assert_qemu_check_clean(path)
        run("qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(path), str(tmp / "ref.raw"))
        assert (tmp / "ref.raw").read_bytes() == content


# -- hostile clients ---------------------------------------------------------------------------


def fuzz_once(path: str, rng: random.Random) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(path)
        style = rng.randrange(5)
        if style == 0:
            sock.sendall(rng.randbytes(rng.randrange(0, 200)))
        elif style == 1:
            sock.recv(18)
            # Truncated or wrong client flags / option headers.
            sock.sendall(struct.pack(">I", rng.choice([0, 1, 3, 0xFFFF])))
            sock.sendall(struct.pack(">QII", p.IHAVEOPT, rng.randrange(16), rng.randrange(64)))
            sock.sendall(rng.randbytes(rng.randrange(0, 40)))
        else:
            c = RawClient.__new__(RawClient)
            c.sock = sock
            c.handshake(structured=rng.random() < 0.7, meta=rng.random() < 0.5)
            for _ in range(rng.randrange(1, 30)):
                kind = rng.choice([*range(10), 2, 0, 0, 1])
                if kind == p.Cmd.DISC:
                    continue
                offset = rng.choice([0, rng.randrange(IMAGE_SIZE), IMAGE_SIZE, 2**64 - 1])
                length = rng.choice([0, 1, 4096, rng.randrange(2**32), 33 * MiB])
                flags = rng.randrange(1 << 16) if rng.random() < 0.3 else 0
                header = struct.pack(
                    ">IHHQQI", p.REQUEST_MAGIC, flags, kind, rng.getrandbits(64), offset, length
                )
                if kind == p.Cmd.WRITE:
                    # Short or missing payload, then hang up: the server must not wait forever.
                    sock.sendall(header + rng.randbytes(min(length, rng.randrange(0, 9000))))
                    break
                if rng.random() < 0.1:
                    sock.sendall(header[: rng.randrange(28)])
                    break
                sock.sendall(header)
                if rng.random() < 0.2:
                    sock.sendall(rng.randbytes(28))
    except (OSError, EOFError, AssertionError, struct.error):
        pass
    finally:
        sock.close()


def test_fuzzer_next_to_a_good_client(
    tmp: Path, require_tool: Need, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="blockback")
    nbdcopy = require_tool("nbdcopy")
    nbdinfo = require_tool("nbdinfo")
    path = tmp / "d.vhd"
    make_image(path)
    stop = threading.Event()
    fuzz_count = [0]

    def fuzzer(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            fuzz_once(sock_path, rng)
            fuzz_count[0] += 1

    with vhd.open(str(path)) as disk, serving(disk) as (server, url, sock_path):
        threads = [threading.Thread(target=fuzzer, args=(s,), daemon=True) for s in range(3)]
        for t in threads:
            t.start()
        try:
            i = 0
            deadline = time.monotonic() + 10
            while i < 4 or (fuzz_count[0] < 300 and time.monotonic() < deadline):
                i += 1
                out = tmp / f"copy{i}.raw"
                run(nbdcopy, url, str(out), timeout=60)
                assert out.read_bytes() == expected_content()
                out.unlink()
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert fuzz_count[0] >= 300
        run(nbdinfo, url)
        # Every fuzzing connection has been cleaned up.
        deadline = time.monotonic() + 10
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.connections == 0
    # Hostile input is refused as a protocol matter, never by tripping over a bug.
    unexpected = [r.getMessage() for r in caplog.records if "unexpected" in r.getMessage()]
    assert not unexpected
    assert any("protocol error" in r.getMessage() for r in caplog.records)


# -- the CLI -----------------------------------------------------------------------------------


def start_cli(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhdtools.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        pytest.fail(f"vhd serve printed no URI: {err}")
    return proc, line


def stop_cli(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> str:
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_a_chain_until_signalled(
    tmp: Path, require_tool: Need, sig: int, fmt: str
) -> None:
    qemu_io = require_tool("qemu-io")
    parent, child = make_chain(tmp, fmt)
    other = tmp / "elsewhere"
    other.mkdir()
    moved = other / parent.name
    os.rename(parent, moved)  # found only through --parent-dir
    sock = tmp / "cli.sock"
    proc, url = start_cli(str(child), "--nbd", "--socket", str(sock), "--export-name", "leaf",
                          "--parent-dir", str(other))  # fmt: skip
    try:
        assert url == f"nbd+unix:///leaf?socket={sock}"
        run(qemu_io, "-f", "raw", "-c", "write -P 0x77 6M 8k", "-c", "read -P 0 7M 4k", url)
    except BaseException:
        proc.kill()
        raise
    stop_cli(proc, sig)
    assert not sock.exists()
    want = bytearray(chain_content())
    want[6 * MiB : 6 * MiB + 8192] = b"\x77" * 8192
    with vhd.open(str(child), parent_dirs=[str(other)]) as disk:
        assert disk.pread(IMAGE_SIZE, 0) == want


def test_cli_serves_a_vhdx_that_qemu_then_checks(tmp: Path, require_tool: Need) -> None:
    """Read, write, FUA, flush, trim, write-zeroes and block status on a dynamic VHDX through
    `vhd serve --nbd`; afterwards qemu-img finds the image clean and equal to the model."""
    qemu_io, nbdinfo = require_tool("qemu-io"), require_tool("nbdinfo")
    qemu_img = require_tool("qemu-img")
    path = tmp / "d.vhdx"
    make_image(path)
    sock = tmp / "x.sock"
    proc, url = start_cli(str(path), "--nbd", "--socket", str(sock))
    try:
        result = run(
            qemu_io, "-f", "raw",
            "-c", "read -P 0 12M 1M",
            "-c", "write -P 0x5a 12M 1536k",     # allocates a block and a half
            "-c", "write -P 0x6b -f 3M 4096",    # FUA
            "-c", "write -z 12M 4k",             # write zeroes inside data
            "-c", "discard 0 2M",                # two whole 1 MiB blocks: given back
            "-c", "flush",
            "-c", f"read -P 0x5a {12 * MiB + 4096} 1532k",
            url,
        )  # fmt: skip
        assert "fail" not in result.stdout.lower() and "error" not in result.stdout.lower()
        extents = json.loads(run(nbdinfo, "--map", "--json", url).stdout)
    finally:
        if proc.poll() is None:
            stop_cli(proc)
    want = bytearray(expected_content())
    want[12 * MiB : 12 * MiB + 1536 * 1024] = b"\x5a" * 1536 * 1024
    want[3 * MiB : 3 * MiB + 4096] = b"\x6b" * 4096
    want[12 * MiB : 12 * MiB + 4096] = bytes(4096)
    want[: 2 * MiB] = bytes(2 * MiB)
    holes = [(e["offset"], e["offset"] + e["length"]) for e in extents if e["type"] & 1]
    assert any(a <= 0 and 2 * MiB <= b for a, b in holes), holes  # the discarded blocks
    assert vhd_content(path) == want
    assert_qemu_check_clean(path)
    (tmp / "want.raw").write_bytes(want)
    result = run(qemu_img, "compare", "-f", "vhdx", "-F", "raw", str(path), str(tmp / "want.raw"))
    assert "identical" in result.stdout.lower(), result.stdout


def test_cli_tcp_read_only(tmp: Path, require_tool: Need) -> None:
    nbdinfo = require_tool("nbdinfo")
    qemu_io = require_tool("qemu-io")
    make_image(tmp / "d.vhd")
    before = sha(tmp / "d.vhd")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc, url = start_cli(str(tmp / "d.vhd"), "--nbd", "--listen", f"127.0.0.1:{port}",
                          "--read-only")  # fmt: skip
    try:
        assert url == f"nbd://127.0.0.1:{port}/"
        info = json.loads(run(nbdinfo, "--json", url).stdout)
        assert info["exports"][0]["is_read_only"] is True
        refused = subprocess.run(
            [qemu_io, "-f", "raw", "-c", "write 0 4k", url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        # qemu sees the READ_ONLY flag and refuses to open it for writing at all.
        assert refused.returncode != 0
        assert "permission denied" in (refused.stdout + refused.stderr).lower()
    finally:
        if proc.poll() is None:
            stop_cli(proc)
    assert sha(tmp / "d.vhd") == before


def test_cli_reports_a_missing_image(tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vhdtools.cli", "serve", str(tmp / "nope.vhd"), "--nbd",
         "--socket", str(tmp / "s")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "nope.vhd" in result.stderr
