"""The value records that replaced dataclasses (vhd.record, issue 9 item 17: start-up) behave as
the dataclasses did: equality by class and fields, a hash for the frozen ones, no assignment to
a frozen record, ``replace``, and a repr naming the fields (``fd`` hidden in a Layout's)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest

import vhd
from vhd.chain import CandidateSearch, ParentPolicy
from vhd.findings import Finding, RepairFacts, Severity
from vhd.footer import Footer
from vhd.header import DynamicHeader, ParentLocator
from vhd.layout import Layout, read_layout
from vhd.record import FrozenRecordError
from vhd.repair import Step
from vhd.source import Source


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a.vhd"
    vhd.create(path, 8 << 20).close()
    return path


def test_frozen_records_compare_hash_and_refuse_assignment(image: Path) -> None:
    with vhd.open(image) as disk:
        footer, header = disk.footer, disk.header
    assert header is not None
    again = Footer.parse(footer.build())
    assert again == footer and hash(again) == hash(footer) and again is not footer
    assert DynamicHeader.parse(header.build()) == header
    assert footer.replace(current_size=1) != footer
    assert footer.replace(current_size=1).current_size == 1 and footer.current_size == 8 << 20
    assert footer != tuple(getattr(footer, n) for n in Footer._fields)  # not a tuple
    with pytest.raises(AttributeError):  # as dataclasses' FrozenInstanceError
        footer.current_size = 1  # type: ignore[misc]
    with pytest.raises(FrozenRecordError):
        del header.block_size  # type: ignore[misc]
    assert {ParentPolicy(), ParentPolicy()} == {ParentPolicy()}
    assert ParentPolicy(dirs=("x",)) != ParentPolicy()
    assert ParentPolicy().with_dirs(["x"]) == ParentPolicy(dirs=("x",))
    assert ParentLocator() == ParentLocator(0, 0, 0, 0, 0) and not ParentLocator().in_use
    assert Finding("c", Severity.ERROR, "m").replace(repair="r") == Finding(
        "c", Severity.ERROR, "m", "r"
    )
    for record in (footer, header, ParentPolicy(dirs=("x",)), Step("s", [(0, b"x")], 9)):
        assert copy.copy(record) == record == pickle.loads(pickle.dumps(record))


def test_mutable_records_are_unhashable_and_get_fresh_defaults(image: Path) -> None:
    a, b = RepairFacts(), RepairFacts()
    a.bitmap_fixes[1] = b"x"
    assert b.bitmap_fixes == {} and a != b
    assert CandidateSearch().tried is not CandidateSearch().tried
    assert Step("s").writes == [] and Step("s") == Step("s", [], None)
    assert Source("p", 1) == Source("p", 1, None, -1, [])
    with pytest.raises(TypeError):
        hash(Step("s"))
    with pytest.raises(AttributeError):  # slotted: no stray attributes
        Step("s").other = 1  # type: ignore[attr-defined]


def test_repr_names_the_fields(image: Path) -> None:
    assert repr(ParentPolicy()) == (
        "ParentPolicy(dirs=(), allow_absolute=False, max_candidates=32)"
    )
    assert repr(Finding("c", Severity.INFO, "m")) == (
        "Finding(code='c', severity=<Severity.INFO: 'info'>, message='m', repair=None)"
    )
    with open(image, "rb") as f:
        layout = read_layout(f.fileno(), str(image), image.stat().st_size)
    assert isinstance(layout, Layout)
    text = repr(layout)
    assert text.startswith(f"Layout(path={str(image)!r}, file_size=") and "fd=" not in text


def test_vhdx_records_behave_as_their_dataclasses_did(tmp_path: Path) -> None:
    """The VHDX package's records (headers, region tables, metadata entries, parent locators,
    log entries, a disk's layout and metadata) are vhd.record classes too (issue 11: 12 ms of a
    VHDX command's start-up was dataclasses)."""
    from vhd.vhdx import create_vhdx
    from vhd.vhdx import log as vlog
    from vhd.vhdx import records as r
    from vhd.vhdx.disk import Metadata

    with create_vhdx(tmp_path / "a.vhdx", 8 << 20) as disk:
        layout, header = disk.layout, disk.current_header
    table = layout.region_tables[0]
    assert table is not None
    again = r.Header.parse(header.build())
    assert again == header and hash(again) == hash(header) and again is not header
    assert r.RegionTable.parse(table.build()) == table
    moved = header.replace(sequence_number=header.sequence_number + 1)
    assert moved != header and moved.log_guid == header.log_guid
    assert moved.sequence_number == header.sequence_number + 1
    with pytest.raises(AttributeError):
        header.sequence_number = 0  # type: ignore[misc]
    assert r.RegionTable(table.entries) == r.RegionTable(table.entries, 0)
    locator = r.ParentLocator(r.VHDX_PARENT_LOCATOR_TYPE)
    assert locator.entries == {}
    assert locator.entries is not r.ParentLocator(locator.locator_type).entries
    assert r.ParentLocator.parse(r.ParentLocator(locator.locator_type, {"k": "v"}).build()) == (
        r.ParentLocator(locator.locator_type, {"k": "v"})
    )
    write = vlog.Write(4096, b"x")
    assert write.zero_length == 0 and write.length == 1 and "offset=4096" in repr(write)
    md = layout.metadata
    assert md == md.replace() and md.replace(block_size=1) != md
    with pytest.raises(TypeError):
        hash(md)  # mutable, as the dataclass(slots=True) was
    fresh, other = (
        Metadata(md.entries, 1, False, False, 1, md.virtual_disk_id, 512, 512, None)
        for _ in range(2)
    )
    assert fresh.raw_items == {} and fresh.raw_items is not other.raw_items
    for record in (header, table, layout.bat_region, md.entries[0], write):
        assert copy.copy(record) == record == pickle.loads(pickle.dumps(record))
