"""``vhd check`` output for VHDX (the checks live in :mod:`vhd.vhdx.check`).

The command's options and exit codes are the VHD ones: the parent policy of ``--parent-dir`` and
``--confine-parents``, ``-U``, ``-q``, ``--deep`` (every allocated block read), and exit 2 with one line (JSON: an ``error`` object) when
the file cannot be opened at all (in use, unreadable)."""

from __future__ import annotations

import argparse
import json

from vhd.errors import VHDError
from vhd.vhdx.check import check_vhdx

from ..common import parent_policy, progress_wanted
from ._progress import progress_bar


def run_vhdx_check(args: argparse.Namespace) -> int:
    try:
        report = check_vhdx(
            args.image,
            repair=args.repair and not args.dry_run,
            parent_policy=parent_policy(args),
            force_share=args.force_share,
            deep=args.deep,
            progress=progress_bar("check", args.deep and progress_wanted(args)),
        )
    except (VHDError, OSError) as exc:
        if not args.json:
            raise
        # as for VHD: scripts asking for JSON get JSON for "cannot open" too (still exit 2)
        print(json.dumps({"path": args.image, "error": str(exc), "clean": False}))
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    elif not args.quiet:  # -q: the exit code says it
        state = "clean" if report.clean else f"{len(report.problems)} problem(s)"
        print(f"{report.path}: vhdx {report.type}, {report.size} bytes: {state}")
        for done in report.repaired:
            print(f"  repaired: {done}")
        for problem in report.problems:
            print(f"  error: {problem}")
        for note in report.notes:
            print(f"  note: {note}")
        if args.repair and args.dry_run:
            for fix in report.repairable:
                print(f"  would repair: {fix}")
    return 0 if report.clean else 1
