"""Interop with qemu-img/qemu-io (format ``vpc``), both ways.

* Images qemu makes (fixed, dynamic, ``force_size``, odd sizes), written by qemu-io, read here
  byte-identical to ``qemu-img convert -O raw``, and at qemu's size.
* Images vhdkit makes (library and CLI) pass ``qemu-img compare`` against their source and
  show the exact size in ``qemu-img info``; qemu-io can write into them and we read what it
  wrote.
qemu ignores differencing parents, so it is never the oracle for a child.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vhd
from tests.conftest import need_tool
from tests.interop.oracles import TIMEOUT, qemu_img, qemu_info, qemu_raw
from tests.model import ModelImage
from tests.strategies import hsettings, payload, ranges

KiB = 1024
MiB = 1024 * KiB
VHD_CLI = str(Path(sys.executable).with_name("vhd"))

# (offset, length, byte) writes, unaligned ones included: qemu-io does the read-modify-write.
WRITES = [(0, 4096, 0x11), (1000, 5000, 0xAB), (2 * MiB - 700, 1400, 0x5C), (3 * MiB, 512, 0x7E)]


def qemu_io(image: Path, *commands: str) -> None:
    tool = need_tool("qemu-io")
    args = [tool, "-f", "vpc"]
    for command in commands:
        args += ["-c", command]
    proc = subprocess.run(
        [*args, str(image)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("subformat", "size", "force"),
    [
        ("dynamic", 4 * MiB, False),
        ("dynamic", 10 * MiB + 1536, False),  # odd size, rounded up to C·H·S by qemu
        ("dynamic", 5 * MiB + 512, True),  # force_size: 'qem2', exact size, max geometry
        ("dynamic", 130 * MiB, True),
        ("fixed", 4 * MiB, False),
        ("fixed", 7 * MiB + 512, True),
        ("dynamic", 100 * MiB, False),
    ],
)
def test_qemu_made_images_read_like_qemu(
    tmp_path: Path, subformat: str, size: int, force: bool
) -> None:
    image = tmp_path / "q.vhd"
    options = f"subformat={subformat}" + (",force_size=on" if force else "")
    proc = qemu_img("create", "-f", "vpc", "-o", options, str(image), str(size))
    assert proc.returncode == 0, proc.stderr
    qsize = qemu_info(image)["virtual-size"]
    writes = [w for w in WRITES if w[0] + w[1] <= qsize] + [(qsize - 1024, 1024, 0xEE)]
    qemu_io(image, *(f"write -P {b:#x} {o} {n}" for o, n, b in writes))
    expected = qemu_raw(image, tmp_path / "q.raw")
    with vhd.open(image) as disk:
        assert disk.size == qsize == len(expected)
        assert disk.pread(disk.size, 0) == expected
        if force:
            assert disk.footer.creator_app == b"qem2"
        for ext in disk.extents():
            if ext.layer is None:
                assert expected[ext.offset : ext.end] == bytes(ext.length)
    assert ModelImage(image).read_all() == expected


def test_qemu_made_image_written_by_us_reads_in_qemu(tmp_path: Path) -> None:
    image = tmp_path / "q.vhd"
    assert qemu_img("create", "-f", "vpc", str(image), "8M").returncode == 0
    qemu_io(image, "write -P 0x22 0 1M")
    size = qemu_info(image)["virtual-size"]
    expected = bytearray(qemu_raw(image, tmp_path / "before.raw"))
    with vhd.open(image, "r+") as disk:
        for off, n, seed in ((100, 3000, 1), (3 * MiB + 7, 70000, 2), (size - 513, 513, 3)):
            disk.pwrite(payload(n, seed), off)
            expected[off : off + n] = payload(n, seed)
        disk.discard(512 * 1024, 4096)
        expected[512 * 1024 : 512 * 1024 + 4096] = bytes(4096)
    assert qemu_raw(image, tmp_path / "after.raw") == expected


def _source(tmp: Path, size: int) -> Path:
    """A raw disk, half data and half zeros, with data ending exactly at the end."""
    raw = bytearray(size)
    step = max(4096, size // 16)
    for i, off in enumerate(range(0, size, 2 * step)):
        raw[off : off + min(step, size - off)] = payload(min(step, size - off), i)
    tail = min(700, size)
    raw[size - tail :] = payload(tail, 99)
    path = tmp / "src.raw"
    path.write_bytes(bytes(raw))
    return path


_LIBRARY_CASES = [
    (size, kind, block)
    # 3481600 = 100·4·17 sectors: written with its exact C·H·S, which qemu sizes by.
    for size in (512, 3 * MiB + 512, 3481600, 10 * MiB, 100 * MiB + 3 * 512)
    for kind, block in (("dynamic", 2 * MiB), ("dynamic", 4096), ("fixed", 0))
    # A 4 KiB-block 100 MiB image adds only time over the 2 MiB-block one.
    if not (size >= 100 * MiB and block == 4096)
]


@pytest.mark.parametrize(("size", "kind", "block"), _LIBRARY_CASES)
def test_library_images_pass_qemu_compare(tmp_path: Path, size: int, kind: str, block: int) -> None:
    src = _source(tmp_path, size)
    image = tmp_path / "out.vhd"
    kw = {"block_size": block} if block else {}
    data = src.read_bytes()
    with vhd.create(image, size, type=kind, **kw) as disk:  # type: ignore[arg-type]
        for off in range(0, size, MiB):
            chunk = data[off : off + MiB]
            if chunk.strip(b"\0"):
                disk.pwrite(chunk, off)
    info = qemu_info(image)
    assert info["virtual-size"] == size, "qemu sees exactly the size asked for"
    proc = qemu_img("compare", "-f", "raw", "-F", "vpc", str(src), str(image))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("args", [[], ["--type", "fixed"], ["--block-size", "64K"]])
def test_cli_convert_passes_qemu_compare(tmp_path: Path, args: list[str]) -> None:
    size = 6 * MiB + 1024
    src = _source(tmp_path, size)
    image = tmp_path / "out.vhd"
    proc = subprocess.run(
        [VHD_CLI, "convert", *args, str(src), str(image)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert qemu_info(image)["virtual-size"] == size
    proc2 = qemu_img("compare", "-f", "raw", "-F", "vpc", str(src), str(image))
    assert proc2.returncode == 0, proc2.stdout
    # And back: vhd -> raw equals the source, and qemu's reading of the VHD.
    back = tmp_path / "back.raw"
    proc = subprocess.run(
        [VHD_CLI, "convert", str(image), str(back)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert back.read_bytes() == src.read_bytes() == qemu_raw(image, tmp_path / "q.raw")


def test_cli_create_sizes_in_qemu(tmp_path: Path) -> None:
    for kind, size_arg, size in (("dynamic", "100M", 100 * MiB), ("fixed", "3M", 3 * MiB)):
        image = tmp_path / f"{kind}.vhd"
        proc = subprocess.run(
            [VHD_CLI, "create", "--type", kind, str(image), size_arg],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert qemu_info(image)["virtual-size"] == size
        qemu_io(image, "write -P 0x33 4096 8192")
        with vhd.open(image) as disk:
            assert disk.pread(8192, 4096) == b"\x33" * 8192
            assert disk.pread(4096, 0) == bytes(4096)


@st.composite
def write_plans(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int, int]]]:
    size = draw(st.integers(1, 64)) * 64 * KiB
    block = draw(st.sampled_from([4 * KiB, 16 * KiB, 2 * MiB]))
    writes = [
        (*draw(ranges(size, max_len=100 * KiB)), draw(st.integers(1, 255)))
        for _ in range(draw(st.integers(1, 8)))
    ]
    return size, block, [w for w in writes if w[1] > 0]


@given(plan=write_plans())
@hsettings(max_examples=15)
def test_random_library_writes_read_the_same_in_qemu(
    plan: tuple[int, int, list[tuple[int, int, int]]],
) -> None:
    """Unaligned writes through the library (partial sectors, block edges) read back in qemu."""
    size, block, writes = plan
    with tempfile.TemporaryDirectory(prefix="vhd-qemu-") as tmp:
        image = Path(tmp) / "d.vhd"
        expected = bytearray(size)
        with vhd.create(image, size, block_size=block) as disk:
            for off, n, seed in writes:
                disk.pwrite(payload(n, seed), off)
                expected[off : off + n] = payload(n, seed)
        assert qemu_info(image)["virtual-size"] == size
        assert qemu_raw(image, Path(tmp) / "q.raw") == expected


@given(plan=write_plans())
@hsettings(max_examples=15)
def test_random_qemu_writes_read_the_same_here(
    plan: tuple[int, int, list[tuple[int, int, int]]],
) -> None:
    """qemu-io writes (qemu allocates and lays out the blocks) read back through the library."""
    size, _, writes = plan
    with tempfile.TemporaryDirectory(prefix="vhd-qemu-") as tmp:
        image = Path(tmp) / "q.vhd"
        proc = qemu_img("create", "-f", "vpc", "-o", "force_size=on", str(image), str(size))
        assert proc.returncode == 0, proc.stderr
        qemu_io(image, *(f"write -P {b:#x} {o} {n}" for o, n, b in writes))
        expected = bytearray(size)
        for off, n, b in writes:
            expected[off : off + n] = bytes([b]) * n
        with vhd.open(image) as disk:
            assert disk.pread(size, 0) == expected
        assert ModelImage(image).read_all() == expected


@given(
    sectors=st.one_of(
        st.integers(1, 8 * 1024 * 1024),  # up to 4 GiB
        st.builds(
            lambda c, h, s: c * h * s,
            st.integers(1, 1024),
            st.integers(1, 16),
            st.sampled_from([17, 31, 63]),
        ),  # sizes whose C·H·S may be exact
    ),
    kind=st.sampled_from(["dynamic", "fixed"]),
)
@hsettings(max_examples=25)
def test_qemu_sees_the_exact_size_of_any_library_image(sectors: int, kind: str) -> None:
    """Whatever the size, qemu (which sizes unknown creators' images by C·H·S unless the geometry is the
    maximum) reports exactly the size asked for."""
    with tempfile.TemporaryDirectory(prefix="vhd-qemu-size-") as tmp:
        image = Path(tmp) / "d.vhd"
        vhd.create(image, sectors * 512, type=kind).close()
        assert qemu_info(image)["virtual-size"] == sectors * 512
