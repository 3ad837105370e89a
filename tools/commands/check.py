"""``vhd check IMAGE [--json] [--deep] [--repair [--dry-run]]``: validate (and mend) an image.

Exit codes: 0 clean (no error or warning; notes are fine), 1 problems found (or left after a
repair), 2 the file cannot be opened as a VHD.  The checks live in :mod:`vhd.check`, the repair
plan in :mod:`vhd.repair`.
"""

from __future__ import annotations

import argparse
import json
import sys

from vhd.check import CheckReport, check
from vhd.errors import VHDError
from vhd.repair import apply_plan, plan_repair

from ..common import add_parent_options, add_progress_options, parent_policy, progress_wanted
from ..locking import add_force_share_option
from ._progress import progress_bar

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms; vhd.record)
if TYPE_CHECKING:
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "check",
        help="validate an image against the spec and other tools (and repair it)",
        description="Check every structure of a VHD: footers, header, BAT, locators, parent; "
        "with --deep also the sector bitmaps and a read of every block. Exit 0 clean, "
        "1 problems found, 2 cannot open.",
    )
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("--deep", action="store_true", help="also check bitmaps and read every block")
    p.add_argument("--repair", action="store_true", help="mend what can be mended")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --repair: print what would change, change nothing",
    )
    add_parent_options(p, serving=False)
    add_progress_options(p)
    add_force_share_option(p)
    p.set_defaults(func=run)


def _print_report(report: CheckReport) -> None:
    layout = report.layout
    kind = layout.disk_type.label if layout.disk_type is not None else "?"
    size = layout.footer.current_size
    state = "clean" if report.clean else f"{len(report.problems)} problem(s)"
    print(f"{report.path}: {kind}, {size} bytes: {state}")
    for f in report.findings:
        line = f"  {f.severity}: [{f.code}] {f.message}"
        if f.repairable:
            line += f" (repair: {f.repair})"
        print(line)


def run(args: argparse.Namespace) -> int:
    if args.dry_run and not args.repair:
        raise ValueError("--dry-run goes with --repair")
    if args.force_share and args.repair and not args.dry_run:
        raise ValueError("-U/--force-share is for inspection: not with --repair")
    from vhd.probe import is_vhdx_file

    if is_vhdx_file(args.image):
        from ._vhdx_check import run_vhdx_check

        return run_vhdx_check(args)
    try:
        report = check(
            args.image,
            deep=args.deep,
            parent_policy=parent_policy(args),
            progress=progress_bar("check", args.deep and progress_wanted(args)),
            force_share=args.force_share,
        )
    except (VHDError, OSError) as exc:
        if not args.json:
            raise
        # Scripts asking for JSON get JSON for "cannot open" too (still exit 2).
        print(json.dumps({"path": args.image, "error": str(exc), "clean": False}))
        return 2
    if not args.repair:
        if args.json:
            print(json.dumps(report.as_dict(), indent=2))
        elif not args.quiet:  # -q: the exit code says it
            _print_report(report)
        return 0 if report.clean else 1
    plan = plan_repair(report)
    after = report
    if not args.dry_run and not plan.empty:
        apply_plan(plan)
        after = check(args.image, deep=args.deep, parent_policy=parent_policy(args))
    if args.json:
        out = report.as_dict()
        out["repair"] = plan.as_dict() | {"dry_run": args.dry_run, "applied": not args.dry_run}
        out["after"] = after.as_dict()
        print(json.dumps(out, indent=2))
    else:
        _print_report(report)
        if plan.empty:
            print("nothing to repair")
        else:
            print("would change:" if args.dry_run else "changed:")
            for step in plan.steps:
                for line in step.lines():
                    print(f"  {line}")
            for offset, length, why in plan.lost:
                print(f"  lost: guest bytes {offset:#x}-{offset + length:#x} ({why})")
        if not args.dry_run and not plan.empty:
            state = "clean" if after.clean else f"{len(after.problems)} problem(s) remain"
            print(f"after repair: {state}")
            for f in after.problems:
                print(f"  {f.severity}: [{f.code}] {f.message}", file=sys.stdout)
    if args.dry_run:
        return 0 if report.clean else 1
    return 0 if after.clean else 1
