"""The block rules of ``vhd check`` (spec: "Block Allocation Table", "Sector bitmap"): where each
allocated block lies against the metadata, the data area and the other blocks, and (deep) what
its sector bitmap says.

Rules over a :class:`~vhd.layout.Layout` (block spans, metadata regions, the data area's end);
bitmaps and data are read only through the layout's narrow readers, and only when deep.  What
``--repair`` should do is left in :class:`~vhd.findings.RepairFacts`: the entries to drop (the
lower block number keeps contested space) and where the trailing footer belongs.
"""

from __future__ import annotations

import heapq
import itertools
import operator
from collections.abc import Callable

from . import bitmap as bm
from .bat import UNUSED
from .findings import ERROR, INFO, MAX_FINDINGS_PER_CODE, WARNING, DropMap, Findings, RepairFacts
from .footer import DiskType
from .layout import Layout

SECTOR = 512
PAGE = 4096


_KEEP = bytes([1]) + bytes(255)  # a translate table: 0 (not dropped) -> 1, any reason -> 0


def bat_rules(layout: Layout, fixes: RepairFacts, out: Findings) -> None:
    """Entries past the data area or over metadata (dropped), blocks overlapping each other
    (the higher number dropped), blocks running past the trailing footer, misaligned data,
    orphan space and holes; sets ``fixes.footer_target``."""
    h, bat = layout.header, layout.bat
    assert h is not None and bat is not None
    count = len(bat)
    fixes.drop = drop = DropMap(count)
    if h.max_table_entries > count and layout.bat_padding_used():
        out.add(
            INFO,
            "bat-entries-past-size",
            "BAT entries beyond the disk size are allocated (ignored by every reader)",
        )
    regions = layout.regions()
    meta_end = max(end for _, end, _ in regions)
    bs, bmb = h.block_size, h.bitmap_bytes
    limit = layout.data_limit  # a trailing footer with only a bad checksum still ends the data
    # Built, like the rule checks below, from C-level iterators (map, filter, compress): a table
    # of 4 Mi crafted entries costs passes of C loops, not Python steps per block.
    entries = bat.entries
    starts, indices = layout.spans()
    allocated = len(indices)
    misaligned = allocated - operator.countOf(map(PAGE.__rmod__, map(bmb.__add__, starts)), 0)
    needed_end = layout.block_ends()

    def lost(block: int) -> str:
        g, n = layout.block_extent(block)
        return f"guest bytes {g:#x}-{g + n:#x} ({n} bytes)"

    lowest, highest = (min(starts), max(starts)) if allocated else (0, -1)
    span = bmb + bs
    last = count - 1
    # Blocks over metadata (the first region in this order names the finding), then blocks
    # whose bitmap lies past the data area.  Each rule is a range of entries for a full block;
    # the last block, which the size may cut, is judged exactly.
    rules = [(rstart, rend, label, f"overlaps {label}") for rstart, rend, label in regions]
    rules.append((limit - bmb + span, UNUSED * SECTOR, "", "past the end of the file"))
    for rstart, rend, label, reason in rules:
        bad = range(max(0, (rstart - span) // SECTOR + 1), min(UNUSED, -(-rend // SECTOR)))
        if not bad or lowest >= bad.stop * SECTOR or highest < bad.start * SECTOR:
            continue
        # One 0/1 byte per block, at C speed; the last block is judged exactly, here.
        candidates = bytearray(map(bad.__contains__, entries))
        end_start = entries[last] * SECTOR
        candidates[last] = end_start // SECTOR in bad and (
            not label or (end_start < rend and needed_end(end_start, last) > rstart)
        )
        total, first = drop.mark_new(bytes(candidates), reason, MAX_FINDINGS_PER_CODE)
        for block in first:
            start = entries[block] * SECTOR
            if label:
                out.add(
                    ERROR,
                    "bat-overlaps-metadata",
                    f"block {block} at {start:#x} overlaps {label} ({rstart:#x}-{rend:#x})",
                    f"unallocate block {block}: {lost(block)} are lost (read as "
                    + ("the parent's" if layout.disk_type == DiskType.DIFFERENCING else "zeros")
                    + ")",
                )
            else:
                out.add(
                    ERROR,
                    "bat-past-eof",
                    f"block {block} at {start:#x} lies past the end of the data "
                    f"(file {layout.file_size} bytes)",
                    f"unallocate block {block}: {lost(block)} are lost",
                )
        out.count_more("bat-overlaps-metadata" if label else "bat-past-eof", total - len(first))
    # Overlaps between blocks: the lower block number keeps the space.  Runs of blocks sharing
    # one entry (an all-equal crafted table is one run of millions) are settled first, run by
    # run at C speed: each block of a run overlaps the run's first block.
    dropped = drop.flags()
    # A repeat: an allocated block whose entry equals the previous block's (that one allocated
    # too), found over the allocated blocks only (a sparse table costs nothing here).
    repeats = itertools.compress(
        itertools.islice(indices, 1, None),
        map(operator.and_, map(operator.eq, starts, itertools.islice(starts, 1, None)),
            map(operator.eq, map((1).__add__, indices), itertools.islice(indices, 1, None))),
    )  # fmt: skip
    run_end = 0
    for block in repeats:
        if block < run_end:
            continue
        run_end = bat.run_end(block)
        winner = block - 1
        if dropped[winner]:
            continue  # the same entry: dropped for the same metadata rule
        new = drop.mark_runs(block, run_end, f"overlaps block {winner}")
        for loser in range(block, min(run_end, block + MAX_FINDINGS_PER_CODE)):
            out.add(
                ERROR,
                "bat-overlap",
                f"blocks {winner} and {loser} overlap in the file "
                f"(at {entries[winner] * SECTOR:#x} and {entries[loser] * SECTOR:#x})",
                f"unallocate block {loser}: {lost(loser)} are lost",
            )
        out.count_more("bat-overlap", new - min(new, MAX_FINDINGS_PER_CODE))
    # The rest are sorted once by (start, block), packed into one integer each.
    shift = max(allocated, 1).bit_length()
    mask = (1 << shift) - 1
    if allocated == count:  # every block allocated (a crafted full table): one translate
        keep = bytes(dropped[:count]).translate(_KEEP)
    else:
        keep = bytes(map(operator.not_, map(dropped.__getitem__, indices)))
    # Keys only for the kept blocks (a crafted table drops millions).
    kept = sorted(
        map(operator.or_,
            map(operator.lshift, itertools.compress(starts, keep), itertools.repeat(shift)),
            itertools.compress(range(allocated), keep))
    )  # fmt: skip
    del keep
    # A sweep over the blocks in file order: ``active`` is a heap (by block number) of the kept
    # blocks whose space may reach the current start.  Blocks that ended before it or were
    # dropped are removed when they come to the top; each block is pushed and popped once, so
    # the whole sweep is n log n however the blocks overlap.
    active: list[tuple[int, int, int]] = []  # (block, start, needed end)
    for key in kept:
        start, block = key >> shift, indices[key & mask]
        nend = needed_end(start, block)
        while True:
            while active and (active[0][2] <= start or active[0][0] in drop):
                heapq.heappop(active)
            if not active:
                heapq.heappush(active, (block, start, nend))
                break
            other, other_start, _ = active[0]
            loser, winner = max(block, other), min(block, other)
            drop[loser] = f"overlaps block {winner}"
            out.add(
                ERROR,
                "bat-overlap",
                f"blocks {winner} and {loser} overlap in the file "
                f"(at {other_start:#x} and {start:#x})",
                f"unallocate block {loser}: {lost(loser)} are lost",
            )
            if loser == block:
                break
            heapq.heappop(active)
    del active
    data_end = meta_end
    # Survivors in file order (``kept`` is sorted by start): the data end, and unreferenced
    # space between blocks (after discards), which compact reclaims.
    pos = meta_end
    holes = 0
    for key in kept:
        start, block = key >> shift, indices[key & mask]
        if block in drop:
            continue
        full = start + bmb + bs
        nend = needed_end(start, block)
        # A block ends at its full size when the file holds it; a last partial block may have
        # been stored short.
        end = full if full <= limit else nend
        if nend > limit:
            short = nend - layout.file_size
            out.add(
                ERROR,
                "block-past-footer",
                f"block {block} at {start:#x} runs past the trailing footer"
                + (f" and {short} bytes past the end of the file" if short > 0 else ""),
                f"move the trailing footer after block {block}"
                + (f"; its {short} bytes missing from the file read as zeros" if short > 0 else ""),
            )
        data_end = max(data_end, end)
        if start - pos >= bs + bmb:
            holes += start - pos
        pos = max(pos, full)
    del kept
    if misaligned:
        out.add(
            INFO,
            "bat-misaligned",
            f"{misaligned} of {allocated} blocks have data not 4 KiB-aligned "
            "(slower on 4 KiB-sector storage)",
        )
    _trailing_footer(layout, fixes, out, -(-data_end // SECTOR) * SECTOR, min(PAGE, bmb + bs))
    if holes:
        out.add(INFO, "free-space", f"{holes} bytes between blocks are unused (vhd compact)")


def _trailing_footer(
    layout: Layout, fixes: RepairFacts, out: Findings, target: int, slack: int
) -> None:
    """Where the trailing footer is against ``target``, the end of the data.  Windows leaves the
    footer where the next block's bitmap would go (up to ``slack`` = 4 KiB - 512 after the last
    block): that is layout, not orphan space."""
    choice = layout.choice
    fixes.footer_target = target
    if choice.tail_ok and target <= choice.tail_offset < target + slack:
        fixes.footer_target = choice.tail_offset
    elif choice.tail_ok and choice.tail_offset >= target + slack:
        out.add(
            WARNING,
            "orphan-space",
            f"{choice.tail_offset - target} bytes after the last block at {target:#x} are "
            "referenced by nothing (left by an interrupted allocation or a shrink)",
            f"move the trailing footer to {target:#x} and cut the file there",
        )
    elif choice.tail_ok and choice.tail_offset < target and not out.has("block-past-footer"):
        out.add(
            ERROR,
            "footer-misplaced",
            f"the trailing footer at {choice.tail_offset:#x} lies inside the data area",
            f"move it to {target:#x}",
        )


def bitmap_rules(
    layout: Layout,
    fixes: RepairFacts,
    out: Findings,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Deep: each kept block's bitmap (bits past the disk end, padding, no bit set) and a read of
    its data; ``progress(bytes done, bytes)``."""
    h, table = layout.header, layout.bat
    assert h is not None and table is not None
    bat = table.entries  # the array itself: one C lookup per entry, a million on a 2 TiB disk
    bs, bmb, size = h.block_size, h.bitmap_bytes, layout.footer.current_size
    spb = bs // SECTOR
    used = (spb + 7) // 8
    empty = 0
    for block in range(len(bat)):
        if progress is not None:
            progress((block + 1) * bs, len(bat) * bs)
        entry = bat[block]
        if entry == UNUSED or block in fixes.drop:
            continue
        raw = layout.bitmap(block)
        if len(raw) < bmb:
            out.add(ERROR, "bitmap-short", f"block {block}: the bitmap is cut short")
            continue
        bits = bytearray(raw[:used])
        needed = -(-min(bs, size - block * bs) // SECTOR)
        if needed < spb and not bm.all_equal(bits, needed, spb, False):
            # qemu and blktap set every bit of a new block, so this is common and harmless
            # (readers stop at the disk size): a note that --repair tidies.
            out.add(
                INFO,
                "bitmap-past-end",
                f"block {block}: bits are set for sectors past the end of the disk",
                "clear those bits",
            )
            fixed = bytearray(raw)
            bm.set_range(fixed, needed, spb, False)
            fixes.bitmap_fixes[block] = bytes(fixed)
        if raw[used:].strip(b"\0"):
            out.add(INFO, "bitmap-padding", f"block {block}: bitmap padding is not zero")
        if not bm.any_set(bits, needed):
            empty += 1
        data = entry * SECTOR + bmb
        have = max(0, min(needed * SECTOR, layout.file_size - data))
        if have and (bad := layout.unreadable(data, have)):
            read_failure(out, bad, f"block {block}")
    if empty:
        out.add(
            INFO,
            "blocks-empty",
            f"{empty} allocated blocks have no bitmap bit set (vhd compact reclaims them)",
        )


def read_failure(out: Findings, bad: tuple[str, int, str], what: str) -> None:
    """The finding for a failed read of ``what`` (:meth:`Layout.unreadable`)."""
    code, at, reason = bad
    if code == "read-error":
        out.add(ERROR, code, f"reading {what} at {at:#x} failed: {reason}")
    else:
        out.add(ERROR, code, f"{what} ends early at {at:#x}")
