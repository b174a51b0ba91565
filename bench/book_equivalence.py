"""Both book paths on real captures: the same check.json and the same tables, bit for bit.

    .venv/bin/python bench/book_equivalence.py CAPTURES... [--group a.gz,b.gz ...]

Each positional capture is one run; `--group` runs several files as one (a file without a
snapshot continues the previous one). For each run: bookTicker checked / mismatches per
book, whether check.json (without provenance) and book_events / top / trades are equal
between the native and the pure-Python path, and both paths' wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mega_trading.book.build import (
    EVENT_SCHEMA,
    TOP_SCHEMA,
    TRADE_SCHEMA,
    check_document,
    concat_frames,
    rebuild_captures,
)

TABLES = (("events", EVENT_SCHEMA), ("top", TOP_SCHEMA), ("trades", TRADE_SCHEMA))


def run(paths: list[Path], engine: str) -> tuple[dict, dict, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    rebuilt = rebuild_captures(paths, engine)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tables = {name: concat_frames(rebuilt, name, schema) for name, schema in TABLES}
    return check_document(rebuilt), tables, wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("captures", nargs="*", type=Path)
    ap.add_argument("--group", action="append", default=[],
                    help="comma-separated files rebuilt as one run")
    args = ap.parse_args()
    runs = [[p] for p in args.captures] + [[Path(p) for p in g.split(",")] for g in args.group]
    all_equal = True
    for paths in runs:
        check_py, tables_py, wall_py, cpu_py = run(paths, "python")
        check_c, tables_c, wall_c, cpu_c = run(paths, "native")
        equal = check_py == check_c and all(
            tables_py[name].equals(tables_c[name], null_equal=True) for name, _ in TABLES)
        all_equal &= equal
        books = "; ".join(f"{name}: {b['bookticker_checked']:,} checked / "
                          f"{b['bookticker_total']:,}, {b['bookticker_mismatches']} mismatches, "
                          f"{b['diffs_applied']:,}/{b['diffs']:,} diffs, {len(b['gaps'])} gaps"
                          for name, b in check_c["books"].items())
        print(f"{' + '.join(p.name for p in paths)}: {books}; paths equal: {equal}; "
              f"python {wall_py:.2f} s wall / {cpu_py:.2f} s CPU, "
              f"native {wall_c:.2f} s wall / {cpu_c:.2f} s CPU", flush=True)
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
