"""``vhd check`` output for VHDX (the checks live in :mod:`vhd.vhdx.check`)."""

from __future__ import annotations

import argparse
import json

from vhd.vhdx.check import check_vhdx


def run_vhdx_check(args: argparse.Namespace) -> int:
    report = check_vhdx(
        args.image, repair=args.repair and not args.dry_run, parent_dirs=args.parent_dir
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        state = "clean" if report.clean else f"{len(report.problems)} problem(s)"
        print(f"{report.path}: vhdx {report.type}, {report.size} bytes: {state}")
        for done in report.repaired:
            print(f"  repaired: {done}")
        for problem in report.problems:
            print(f"  error: {problem}")
        if args.repair and args.dry_run:
            for fix in report.repairable:
                print(f"  would repair: {fix}")
    return 0 if report.clean else 1
