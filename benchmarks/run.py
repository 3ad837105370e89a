"""The ``make bench`` driver: run every benchmark module and print one table.

Imports each ``benchmarks/<name>.py`` that defines ``run(workdir) -> list[dict]`` (rows with
the keys "benchmark", "ours", "theirs", "ratio", "unit", "note", and optionally "peak_mib"),
runs it with its own work directory under ``bench-out/work/<name>``, and prints a table of
ratios, absolute values and peak memory; the same table goes to ``bench-out/results.md``.
A module that fails shows up as one error row; the others still run.

``python -m benchmarks.run [NAME ...]`` runs only the named modules.
"""

from __future__ import annotations

import importlib
import pkgutil
import platform
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import benchmarks

OUT = Path("bench-out")
COLUMNS = ("module", "benchmark", "ours", "theirs", "ratio", "unit", "peak MiB", "note")


def discover() -> list[str]:
    names = []
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if info.name in ("run",) or info.name.startswith("_"):
            continue
        names.append(info.name)
    return names


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def run_module(name: str, workroot: Path) -> tuple[list[dict[str, Any]], float]:
    """Rows of one module (or one error row) and its wall time."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        fn = getattr(module, "run", None)
        if fn is None:
            return [], 0.0
        workdir = workroot / name
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        rows = list(fn(workdir))
        shutil.rmtree(workdir, ignore_errors=True)
    except Exception as exc:
        traceback.print_exc()
        text = " ".join(str(exc).split()) or type(exc).__name__
        rows = [{"benchmark": "(module failed)", "note": f"ERROR {type(exc).__name__}: {text}"}]
    return rows, time.perf_counter() - start


def table(results: list[tuple[str, dict[str, Any]]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for module, row in results:
        cells = [
            module,
            row.get("benchmark"),
            row.get("ours"),
            row.get("theirs"),
            row.get("ratio"),
            row.get("unit"),
            row.get("peak_mib"),
            row.get("note"),
        ]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    wanted = list(sys.argv[1:] if argv is None else argv)
    names = [n for n in discover() if not wanted or n in wanted]
    OUT.mkdir(exist_ok=True)
    workroot = OUT / "work"
    results: list[tuple[str, dict[str, Any]]] = []
    timings: list[str] = []
    for name in names:
        print(f"== benchmarks.{name} ...", flush=True)
        rows, seconds = run_module(name, workroot)
        timings.append(f"- {name}: {seconds:.1f} s")
        results.extend((name, row) for row in rows)
        print(table([(name, row) for row in rows]), flush=True)
    shutil.rmtree(workroot, ignore_errors=True)
    text = table(results)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = (
        f"# vhdkit benchmarks\n\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {platform.node()}, "
        f"Python {platform.python_version()}, {platform.machine()}.\n"
        "ratio = ours / theirs (time: lower is better).\n\n"
    )
    footer = (
        f"\n\nPeak RSS of the driver process (benchmarks run in it): {peak:.0f} MiB; "
        "per-command peaks are in the table.\n\n"
        "Module wall times:\n" + "\n".join(timings) + "\n"
    )
    print("\n" + text + footer)
    (OUT / "results.md").write_text(header + text + footer)
    print(f"written {OUT / 'results.md'}")
    failed = any(row.get("benchmark") == "(module failed)" for _, row in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
