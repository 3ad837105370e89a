"""Bad input: truncated files, wrong cookies and checksums, absurd sizes, bad BAT entries and
block sizes, broken parent chains, huge locators, invalid UTF-16 names.

Each damaged image must give a clean :class:`vhd.VHDError` (never another exception), in bounded
time and memory, and leave the file untouched; the CLI must answer with exit 2 and one line (or
a finding of ``vhd check``, exit 1), never a traceback.  ``vhd check`` must never call any of
these images clean.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

import vhd
from tests.images import build_hyperv, vhd_image
from tests.model import FOOTER_FMT, checksum
from tests.strategies import payload

KiB = 1024
SIZE = 256 * KiB
BLOCK = 4 * KiB
VHD_CLI = str(Path(sys.executable).with_name("vhd"))
# Time and Python-heap bounds for opening and reading a few-hundred-KiB damaged image.
MAX_SECONDS = 10.0
MAX_PEAK = 32 * 1024 * 1024

_FOOTER_FIELDS = [
    "cookie",
    "features",
    "version",
    "data_offset",
    "timestamp",
    "creator_app",
    "creator_version",
    "creator_host",
    "original_size",
    "current_size",
    "cylinders",
    "heads",
    "sectors",
    "disk_type",
    "checksum",
    "unique_id",
    "saved_state",
    "reserved",
]


def patch_footer(raw: bytes, **changes: object) -> bytes:
    """A footer with some fields changed and its checksum recomputed (valid but absurd)."""
    fields = dict(zip(_FOOTER_FIELDS, struct.unpack(FOOTER_FMT, raw), strict=True))
    fields.update(changes)
    fields["checksum"] = 0
    out = bytearray(struct.pack(FOOTER_FMT, *(fields[k] for k in _FOOTER_FIELDS)))
    out[64:68] = struct.pack(">I", checksum(bytes(out), 64))
    return bytes(out)


def set_footers(path: Path, **changes: object) -> None:
    raw = bytearray(path.read_bytes())
    tail = patch_footer(bytes(raw[-512:]), **changes)
    raw[-512:] = tail
    if raw[:8] == b"conectix":
        raw[:512] = tail
    path.write_bytes(bytes(raw))


def set_header(path: Path, fmt: str, at: int, value: int, *, fix_checksum: bool = True) -> None:
    """Change one big-endian header field at header offset ``at``."""
    raw = bytearray(path.read_bytes())
    base = struct.unpack(">Q", raw[16:24])[0]
    struct.pack_into(fmt, raw, base + at, value)
    if fix_checksum:
        struct.pack_into(">I", raw, base + 36, 0)
        struct.pack_into(">I", raw, base + 36, checksum(bytes(raw[base : base + 1024]), 36))
    path.write_bytes(bytes(raw))


def set_bat(path: Path, index: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    table = struct.unpack(">Q", raw[512 + 16 : 512 + 24])[0]
    struct.pack_into(">I", raw, table + 4 * index, value)
    path.write_bytes(bytes(raw))


def bat_entry(path: Path, index: int) -> int:
    raw = path.read_bytes()
    table = struct.unpack(">Q", raw[512 + 16 : 512 + 24])[0]
    return int(struct.unpack(">I", raw[table + 4 * index : table + 4 * index + 4])[0])


def make_dynamic(tmp: Path, name: str = "d.vhd") -> Path:
    writes = [(i * BLOCK, payload(BLOCK, i)) for i in (0, 1, 5, 40, 63)]
    return vhd_image(tmp / name, SIZE, block_size=BLOCK, writes=writes).path


def make_fixed(tmp: Path) -> Path:
    return vhd_image(tmp / "f.vhd", SIZE, type="fixed", writes=[(0, payload(SIZE, 1))]).path


def make_child(
    tmp: Path, *, parent_name: str = "p.vhd", parent_id: bytes | None = None, **kw: object
) -> Path:
    """A Hyper-V-style child with W2ku + W2ru locators naming ``parent_name``."""
    content = bytearray(SIZE)
    content[BLOCK : BLOCK + 512] = payload(512, 3)
    path = tmp / "child.vhd"
    build_hyperv(
        path,
        size=SIZE,
        block_size=BLOCK,
        content=bytes(content),
        present={BLOCK // 512},
        parent=(parent_name, parent_id if parent_id is not None else bytes(range(16))),
        **kw,  # type: ignore[arg-type]
    )
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def exercise(path: Path, **kw: object) -> vhd.VHDError | vhd.Disk:
    """Open, read everything, list extents, close: the error met, or the (closed) disk.

    Anything but a VHDError propagates and fails the test; time and heap are bounded.
    """
    tracemalloc.start()
    start = time.perf_counter()
    outcome: vhd.VHDError | vhd.Disk
    try:
        disk = vhd.open(path, **kw)  # type: ignore[arg-type]
        try:
            buf = bytearray(64 * KiB)
            for off in range(0, disk.size, len(buf)):
                disk.preadinto(buf, off)
            list(disk.extents())
        finally:
            disk.close()
        outcome = disk
    except vhd.VHDError as exc:
        outcome = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - start < MAX_SECONDS
    assert peak < MAX_PEAK, f"{peak} bytes of Python heap for a {path.stat().st_size}-byte file"
    return outcome


def run_cli(*args: str) -> tuple[int, str]:
    proc = subprocess.run([VHD_CLI, *args], capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 1, 2), proc.stderr
    if proc.returncode == 2:
        # Warnings may precede it; the error itself is one line.
        lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("vhd: warning:")]
        assert len(lines) == 1 and lines[0].startswith("vhd: error: "), proc.stderr
    return proc.returncode, proc.stderr


# -- the cases: (builder, error expected from the default strict read-only open-and-read) ----

Builder = Callable[[Path], Path]


def _truncate(make: Builder, keep: Callable[[int], int]) -> Builder:
    def build(tmp: Path) -> Path:
        path = make(tmp)
        size = path.stat().st_size
        os.truncate(path, keep(size))
        return path

    return build


def _footer(make: Builder, **changes: object) -> Builder:
    def build(tmp: Path) -> Path:
        path = make(tmp)
        set_footers(path, **changes)
        return path

    return build


def _header(fmt: str, at: int, value: int, *, fix: bool = True) -> Builder:
    def build(tmp: Path) -> Path:
        path = make_dynamic(tmp)
        set_header(path, fmt, at, value, fix_checksum=fix)
        return path

    return build


def _bat(index: int, value: Callable[[Path], int]) -> Builder:
    def build(tmp: Path) -> Path:
        path = make_dynamic(tmp)
        set_bat(path, index, value(path))
        return path

    return build


def _bad_bytes(make: Builder, at: Callable[[int], int], data: bytes) -> Builder:
    def build(tmp: Path) -> Path:
        path = make(tmp)
        raw = bytearray(path.read_bytes())
        pos = at(len(raw))
        raw[pos : pos + len(data)] = data
        path.write_bytes(bytes(raw))
        return path

    return build


def _both_footer_checksums(tmp: Path) -> Path:
    path = make_dynamic(tmp)
    raw = bytearray(path.read_bytes())
    raw[64] ^= 0xFF
    raw[-512 + 64] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def _parent_missing(tmp: Path) -> Path:
    return make_child(tmp, parent_name="gone-parent.vhd")


def _parent_mismatch(tmp: Path) -> Path:
    vhd.create(tmp / "p.vhd", SIZE).close()
    return make_child(tmp, parent_id=bytes(range(16)))


def _parent_self(tmp: Path) -> Path:
    own = bytes(range(100, 116))
    return make_child(tmp, parent_name="child.vhd", parent_id=own, unique_id=own)


def _parent_two_loop(tmp: Path) -> Path:
    a_id, b_id = bytes(range(16)), bytes(range(16, 32))
    child = make_child(tmp, parent_name="b.vhd", parent_id=b_id, unique_id=a_id)
    build_hyperv(
        tmp / "b.vhd",
        size=SIZE,
        block_size=BLOCK,
        content=bytes(SIZE),
        parent=("child.vhd", a_id),
        unique_id=b_id,
    )
    return child


def _huge_locator(tmp: Path) -> Path:
    """A W2ku locator claiming 2 GiB of path, the W2ru one fine: must open, bounded."""
    with vhd.create(tmp / "p.vhd", SIZE, block_size=BLOCK) as parent:
        pid = parent.footer.unique_id
    path = make_child(tmp, parent_id=pid)
    set_header(path, ">I", 576 + 8, 0x7FFFFFFF)  # slot 0 data_len
    set_header(path, ">I", 576 + 4, 0xFFFFFFFF)  # slot 0 data_space
    return path


def _locator_past_eof(tmp: Path) -> Path:
    path = make_child(tmp, parent_name="absent.vhd")
    set_header(path, ">Q", 576 + 24 + 16, 2**62)  # slot 1 data_offset
    return path


def _bad_utf16_name(tmp: Path) -> Path:
    path = make_child(tmp, parent_name="x.vhd")
    raw = bytearray(path.read_bytes())
    # Header name: a lone high surrogate, a lone low one, then text; locators cleared.
    raw[512 + 64 : 512 + 64 + 512] = (b"\xd8\x00\x00a\xdc\x00\x00b").ljust(512, b"\0")
    raw[512 + 576 : 512 + 768] = bytes(192)
    path.write_bytes(bytes(raw))
    set_header(path, ">I", 36, 0, fix_checksum=True)  # recompute the header checksum
    return path


CASES: dict[str, tuple[Builder, type[vhd.VHDError]]] = {
    "empty": (_truncate(make_dynamic, lambda n: 0), vhd.NotAVHDError),
    "100-bytes": (_truncate(make_dynamic, lambda n: 100), vhd.NotAVHDError),
    "cut-in-header": (_truncate(make_dynamic, lambda n: 1000), vhd.CorruptImageError),
    "cut-in-bat": (_truncate(make_dynamic, lambda n: 0x600 + 100), vhd.CorruptImageError),
    "cut-in-last-block": (_truncate(make_dynamic, lambda n: n - 512 - 1000), vhd.CorruptImageError),
    "fixed-cut": (_truncate(make_fixed, lambda n: n - 4096), vhd.NotAVHDError),
    "all-cookies": (
        _bad_bytes(_bad_bytes(make_dynamic, lambda n: 0, b"notavhd!"), lambda n: n - 512, b"no"),
        vhd.NotAVHDError,
    ),
    "header-cookie": (_bad_bytes(make_dynamic, lambda n: 512, b"cxspars3"), vhd.CorruptImageError),
    "footer-checksum": (_both_footer_checksums, vhd.ChecksumError),
    "header-checksum": (_header(">I", 36, 0x12345678, fix=False), vhd.ChecksumError),
    "size-huge": (_footer(make_dynamic, current_size=2**63 - 512), vhd.CorruptImageError),
    "size-odd": (_footer(make_dynamic, current_size=SIZE - 24), vhd.CorruptImageError),
    "fixed-size-huge": (_footer(make_fixed, current_size=2**60), vhd.CorruptImageError),
    "disk-type-5": (_footer(make_dynamic, disk_type=5), vhd.UnsupportedFeatureError),
    "format-version": (_footer(make_dynamic, version=0x00020000), vhd.UnsupportedFeatureError),
    "data-offset-huge": (_footer(make_dynamic, data_offset=2**64 - 512), vhd.CorruptImageError),
    "data-offset-odd": (_footer(make_dynamic, data_offset=700), vhd.CorruptImageError),
    "entries-huge": (_header(">I", 28, 0xFFFFFFFF), vhd.CorruptImageError),
    "entries-too-few": (_header(">I", 28, 3), vhd.CorruptImageError),
    "table-offset-huge": (_header(">Q", 16, 2**63), vhd.CorruptImageError),
    "bat-over-header": (_header(">Q", 16, 512), vhd.CorruptImageError),
    "block-size-0": (_header(">I", 32, 0), vhd.CorruptImageError),
    "block-size-3000": (_header(">I", 32, 3000), vhd.CorruptImageError),
    "block-size-2g": (_header(">I", 32, 2**31), vhd.CorruptImageError),
    "bat-past-eof": (_bat(40, lambda p: 0x7FFFFFF0), vhd.CorruptImageError),
    # A block over metadata is refused at open, read-only too (a table of millions of such
    # entries would otherwise cost per-block work in every reader).
    "bat-into-header": (_bat(5, lambda p: 1), vhd.CorruptImageError),
    "bat-into-bat": (_bat(5, lambda p: 0x600 // 512), vhd.CorruptImageError),
    "bat-at-end": (_bat(63, lambda p: p.stat().st_size // 512 - 2), vhd.CorruptImageError),
    "parent-missing": (_parent_missing, vhd.ParentNotFoundError),
    "parent-mismatch": (_parent_mismatch, vhd.ParentMismatchError),
    "parent-self": (_parent_self, vhd.ChainLoopError),
    "parent-loop": (_parent_two_loop, vhd.ChainLoopError),
    "locator-past-eof": (_locator_past_eof, vhd.ParentNotFoundError),
    "bad-utf16-name": (_bad_utf16_name, vhd.ParentNotFoundError),
}

# Images the library opens and reads (no error), but that are damaged: writing is refused
# where a write would destroy something, and `vhd check` must report them.
SOFT: dict[str, tuple[Builder, bool]] = {
    # (builder, whether an "r+" open must be refused)
    "bat-overlap": (_bat(5, lambda p: bat_entry(p, 1)), True),
    "bat-half-overlap": (_bat(5, lambda p: bat_entry(p, 1) + 2), True),
    "tail-footer-damaged": (_truncate(make_dynamic, lambda n: n - 200), True),
    "head-footer-damaged": (_bad_bytes(make_dynamic, lambda n: 0, b"zz"), False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_image_gives_a_clean_error(tmp_path: Path, name: str) -> None:
    build, expected = CASES[name]
    path = build(tmp_path)
    before = digest(path)
    outcome = exercise(path)
    assert isinstance(outcome, expected), f"{name}: got {outcome!r}"
    assert str(outcome) and "\n" not in str(outcome)
    # Opening for writing is refused too.
    with pytest.raises(vhd.VHDError):
        vhd.open(path, "r+")
    assert digest(path) == before, "a failed open must not change the file"
    # Lenient opening is bounded and clean as well.
    exercise(path, strict=False)
    assert digest(path) == before


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_image_cli(tmp_path: Path, name: str) -> None:
    path = CASES[name][0](tmp_path)
    before = digest(path)
    rc, _ = run_cli("info", str(path))
    assert rc in (0, 2)
    rc, _ = run_cli("map", str(path))
    assert rc in (0, 2)
    rc, _ = run_cli("check", str(path))
    assert rc in (1, 2), f"vhd check calls the damaged image {name!r} clean"
    assert digest(path) == before


@pytest.mark.parametrize("name", sorted(SOFT))
def test_damaged_but_readable(tmp_path: Path, name: str) -> None:
    build, refuse_write = SOFT[name]
    path = build(tmp_path)
    before = digest(path)
    outcome = exercise(path)
    assert isinstance(outcome, vhd.Disk), f"{name}: {outcome!r}"
    if refuse_write:
        with pytest.raises(vhd.CorruptImageError):
            vhd.open(path, "r+")
    assert digest(path) == before
    rc, _ = run_cli("check", str(path))
    assert rc == 1, f"vhd check does not report {name!r}"
    assert digest(path) == before


def test_checksum_errors_are_lenient_when_asked(tmp_path: Path) -> None:
    for name in ("footer-checksum", "header-checksum"):
        sub = tmp_path / name
        sub.mkdir()
        path = CASES[name][0](sub)
        outcome = exercise(path, strict=False)
        assert isinstance(outcome, vhd.Disk)
        assert any("checksum" in w for w in outcome.warnings)
        with vhd.open(path, strict=False) as disk:
            assert disk.pread(BLOCK, 0) == payload(BLOCK, 0)


def test_parent_errors_name_the_parent(tmp_path: Path) -> None:
    outcome = exercise(_parent_missing(tmp_path))
    assert isinstance(outcome, vhd.ParentNotFoundError)
    assert "gone-parent.vhd" in str(outcome)
    rc, err = run_cli("info", str(tmp_path / "child.vhd"))
    if rc == 2:
        assert "gone-parent.vhd" in err


def test_huge_locator_is_bounded_and_skipped(tmp_path: Path) -> None:
    path = _huge_locator(tmp_path)
    outcome = exercise(path)
    assert isinstance(outcome, vhd.Disk)
    with vhd.open(path) as disk:
        assert disk.pread(512, BLOCK) == payload(512, 3)
        assert disk.parent is not None


def test_fifo_and_directory_are_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.vhd"
    os.mkfifo(fifo)
    start = time.perf_counter()
    for path in (fifo, tmp_path):
        with pytest.raises(vhd.NotAVHDError):
            vhd.open(path)
    assert time.perf_counter() - start < MAX_SECONDS
    rc, err = run_cli("info", str(fifo))
    assert rc == 2 and "not a regular file" in err


def test_absurdly_deep_chain_is_refused(tmp_path: Path) -> None:
    """Chains are capped (64 disks): deeper ones give ChainLoopError, not a recursion error."""
    path = tmp_path / "l0.vhd"
    vhd.create(path, 64 * KiB, block_size=4 * KiB).close()
    depth = 0
    with pytest.raises(vhd.ChainLoopError):
        for depth in range(1, 80):
            nxt = tmp_path / f"l{depth}.vhd"
            vhd.create(nxt, parent=path, block_size=4 * KiB).close()
            path = nxt
    assert 60 <= depth <= 65
    assert not (tmp_path / f"l{depth}.vhd").exists()
    with vhd.open(path) as disk:  # the deepest chain that was accepted still opens
        assert len(disk.chain) == depth
