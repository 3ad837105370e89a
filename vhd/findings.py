"""The vocabulary of ``vhd check`` (spec: the whole of docs/vhd-format.md, as a list of results):
a :class:`Finding` with a :class:`Severity`, the :class:`CheckReport` that holds them with the
image's :class:`~vhd.layout.Layout`, and the :class:`RepairFacts` the rules leave for
:mod:`vhd.repair` (the footer and header as they should be, where the trailing footer belongs,
the BAT entries to drop, the bitmaps to tidy).

The rules themselves live in :mod:`vhd.check` and :mod:`vhd.check_blocks`; this module decides
nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, MutableMapping
from enum import StrEnum

from .footer import Footer
from .header import DynamicHeader
from .layout import Layout
from .record import FrozenRecord, Record, fill

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any

# Findings listed per kind (code); the rest are counted in one more finding.
MAX_FINDINGS_PER_CODE = 50


class Severity(StrEnum):
    """How grave a finding is: errors and warnings make ``vhd check`` exit 1, notes do not."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO


class Finding(FrozenRecord):
    """One result of a check: ``repair`` says what ``vhd check --repair`` would do (``None``
    when it cannot mend it)."""

    _fields = ("code", "severity", "message", "repair")
    __slots__ = _fields
    code: str
    severity: Severity
    message: str
    repair: str | None

    def __init__(
        self, code: str, severity: Severity, message: str, repair: str | None = None
    ) -> None:
        fill(self, code, severity, message, repair)

    @property
    def repairable(self) -> bool:
        return self.repair is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity.value,
            "code": self.code,
            "message": self.message,
            "repairable": self.repairable,
            "repair": self.repair or "",
        }


class Findings(list[Finding]):
    """The findings of one check, in the order the rules made them.  A crafted BAT can break a
    rule millions of times: :meth:`add` lists the first :data:`MAX_FINDINGS_PER_CODE` of each
    kind and :meth:`summarise` counts the rest in one more finding."""

    def __init__(self) -> None:
        super().__init__()
        self._per_code: dict[str, list[Any]] = {}  # code -> [findings made, the first one]

    def add(self, severity: Severity, code: str, message: str, repair: str | None = None) -> None:
        seen = self._per_code.setdefault(code, [0, None])
        seen[0] += 1
        if seen[0] > MAX_FINDINGS_PER_CODE:
            return
        finding = Finding(code, severity, message, repair)
        if seen[1] is None:
            seen[1] = finding
        self.append(finding)

    def count_more(self, code: str, more: int) -> None:
        """Count ``more`` findings of ``code`` past the listed ones (after ``add`` of those)."""
        if more > 0:
            self._per_code[code][0] += more

    def has(self, code: str) -> bool:
        return code in self._per_code

    def summarise(self) -> None:
        for code, (count, first) in self._per_code.items():
            if count > MAX_FINDINGS_PER_CODE:
                more = count - MAX_FINDINGS_PER_CODE
                self.append(
                    Finding(
                        code,
                        first.severity,
                        f"{more} more like the above (not listed)",
                        "the same for each" if first.repairable else None,
                    )
                )


class DropMap(MutableMapping[int, str]):
    """block -> why ``--repair`` unallocates it, in one byte per block of the table.

    A crafted BAT can give millions of blocks to drop; a dict of them would cost hundreds of
    MiB.  Each distinct reason text is kept once (the first 255); later new texts read as
    "overlaps another block".
    """

    _OTHER = "overlaps another block"

    def __init__(self, count: int = 0) -> None:
        self._kind = bytearray(count)
        self._texts: list[str] = ["", self._OTHER]
        self._index: dict[str, int] = {self._OTHER: 1}
        self._len = 0

    def __setitem__(self, block: int, why: str) -> None:
        kind = self._index.get(why)
        if kind is None:
            if len(self._texts) < 256:
                kind = self._index[why] = len(self._texts)
                self._texts.append(why)
            else:
                kind = 1
        if block < 0:
            return  # only the text is registered (mark_new, mark_runs)
        if block >= len(self._kind):
            self._kind.extend(bytes(block + 1 - len(self._kind)))
        if not self._kind[block]:
            self._len += 1
        self._kind[block] = kind

    def mark_new(self, candidates: bytes, why: str, listed: int) -> tuple[int, list[int]]:
        """Drop each block whose byte in ``candidates`` (one 0/1 byte per block, from 0) is 1
        and that is not dropped yet, for ``why``: how many were new, and the first ``listed``
        of them.  A crafted table has millions: the masks are combined as big integers (C
        loops over bytes; a Python step per block cost 3 s on 4 Mi blocks)."""
        self[-1] = why  # registers the text (block -1: see __setitem__)
        kind, codes = self._index.get(why, 1), self._kind
        n = len(candidates)
        if n > len(codes):
            codes.extend(bytes(n - len(codes)))
        current = bytes(codes[:n])
        taken = int.from_bytes(current.translate(_ONE_IF_SET), "big")
        fresh = (int.from_bytes(candidates, "big") & ~taken).to_bytes(n, "big")
        count = fresh.count(1)
        if not count:
            return 0, []
        marked = int.from_bytes(current, "big") | int.from_bytes(
            fresh.translate(bytes([0, kind]) + bytes(254)), "big"
        )
        codes[:n] = marked.to_bytes(n, "big")
        self._len += count
        first: list[int] = []
        pos = 0
        while len(first) < listed and (hit := fresh.find(1, pos)) >= 0:
            first.append(hit)
            pos = hit + 1
        return count, first

    def mark_runs(self, first: int, end: int, why: str) -> int:
        """Drop blocks [first, end) not dropped yet, for ``why``, at C speed: how many."""
        self[-1] = why
        kind, codes = self._index.get(why, 1), self._kind
        segment = bytes(codes[first:end])
        count = segment.count(0)
        codes[first:end] = segment.translate(bytes([kind]) + bytes(range(1, 256)))
        self._len += count
        return count

    def flags(self) -> bytearray:
        """One byte per block, non-zero where the block is dropped."""
        return self._kind

    def __getitem__(self, block: int) -> str:
        if not 0 <= block < len(self._kind) or not self._kind[block]:
            raise KeyError(block)
        return self._texts[self._kind[block]]

    def __delitem__(self, block: int) -> None:
        self[block]  # raises KeyError for a block not dropped
        self._kind[block] = 0
        self._len -= 1

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and 0 <= block < len(self._kind) and bool(self._kind[block])

    def __iter__(self) -> Iterator[int]:
        """The dropped blocks in ascending order (found at C speed)."""
        kind = self._kind
        pos = 0
        while (hit := _NONZERO.search(kind, pos)) is not None:
            yield hit.start()
            pos = hit.start() + 1

    def __len__(self) -> int:
        return self._len


_NONZERO = re.compile(b"[^\\x00]")
_ONE_IF_SET = bytes([0]) + bytes([1]) * 255  # a translate table: any non-zero byte -> 1


class RepairFacts(Record):
    """What the rules decided that :mod:`vhd.repair` acts on."""

    _fields = ("footer_fixed", "header_fixed", "footer_target", "drop", "bitmap_fixes")
    __slots__ = _fields
    footer_fixed: Footer | None  # the footer in use with repairable field problems mended
    header_fixed: DynamicHeader | None  # likewise the header
    # Where the trailing footer belongs once the drops are done (end of the last block or of
    # the metadata; for fixed disks the current size); -1 while that is unknown.
    footer_target: int
    drop: DropMap  # BAT entries to unallocate, and why
    bitmap_fixes: dict[int, bytes]  # block -> corrected bitmap

    def __init__(
        self,
        footer_fixed: Footer | None = None,
        header_fixed: DynamicHeader | None = None,
        footer_target: int = -1,
        drop: DropMap | None = None,
        bitmap_fixes: dict[int, bytes] | None = None,
    ) -> None:
        fill(
            self,
            footer_fixed,
            header_fixed,
            footer_target,
            DropMap() if drop is None else drop,
            {} if bitmap_fixes is None else bitmap_fixes,
        )


class CheckReport(Record):
    _fields = ("path", "findings", "layout", "fixes", "deep")
    __slots__ = _fields
    path: str
    findings: list[Finding]
    layout: Layout
    fixes: RepairFacts
    deep: bool

    def __init__(
        self,
        path: str,
        findings: list[Finding],
        layout: Layout,
        fixes: RepairFacts,
        deep: bool = False,
    ) -> None:
        fill(self, path, findings, layout, fixes, deep)

    @property
    def problems(self) -> list[Finding]:
        """Errors and warnings: what makes ``vhd check`` exit 1."""
        return [f for f in self.findings if f.severity in (ERROR, WARNING)]

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def repairable(self) -> list[Finding]:
        return [f for f in self.findings if f.repairable]

    def as_dict(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "path": self.path,
            "type": layout.disk_type.label if layout.disk_type is not None else None,
            "size": layout.footer.current_size,
            "file_size": layout.file_size,
            "deep": self.deep,
            "clean": self.clean,
            "counts": {
                sev.value: sum(1 for f in self.findings if f.severity == sev) for sev in Severity
            },
            "findings": [f.as_dict() for f in self.findings],
        }
