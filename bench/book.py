"""Benchmark: the `book` rebuild beside a bare JSON parse of the same capture lines.

The input is SYNTHETIC (`mega_trading.book.synthetic`): a snapshot and depth diffs in the
capture format, gzipped, `--levels` level changes per diff (the real spot BTCUSDT capture
averages ~23 per 100 ms diff, NEXOUSDT ~3), with or without a bookTicker per diff.

    .venv/bin/python bench/book.py --diffs 200000 --levels 8

Prints, for the same file: gunzip + line split + msgspec JSON decode (the floor any
decoder-based rebuild pays), and the whole rebuild (`rebuild_captures`, no Parquet write),
as book messages/s. The goal is >= 1M book messages/s.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import msgspec
from isal import igzip

from mega_trading.book.build import rebuild_captures
from mega_trading.book.synthetic import synthetic_capture


def bare_parse(path: Path) -> int:
    decoder = msgspec.json.Decoder()
    n = 0
    with igzip.open(path, "rb") as handle:
        for line in handle:
            decoder.decode(line.partition(b" ")[2])
            n += 1
    return n


def best_of(repeats: int, fn, *args) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffs", type=int, default=200_000)
    ap.add_argument("--levels", type=int, default=8, help="level changes per diff")
    ap.add_argument("--tickers", action="store_true", help="a bookTicker after every diff")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lines = synthetic_capture(args.diffs, levels_per_diff=args.levels, tickers=args.tickers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spot-BTCUSDT-20240808.gz"
        path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", compresslevel=6))
        n_msgs = len(lines)
        parse_s, _ = best_of(args.repeats, bare_parse, path)
        rebuild_s, rebuilt = best_of(args.repeats, rebuild_captures, [path])
    (book,) = rebuilt.books.values()
    assert book.counts["diffs_applied"] == args.diffs, book.counts
    print(f"synthetic capture: {n_msgs:,} messages ({args.diffs:,} diffs x {args.levels} levels"
          f"{', + bookTickers' if args.tickers else ''}), {path.name}")
    print(f"bare parse (gunzip + msgspec decode): {parse_s:.2f} s = {n_msgs / parse_s:,.0f} msg/s")
    print(f"book rebuild (parse + book + outputs): {rebuild_s:.2f} s = {n_msgs / rebuild_s:,.0f} msg/s"
          f"  ({rebuild_s / parse_s:.1f}x the bare parse)")
    print(f"goal 1,000,000 msg/s: {'met' if n_msgs / rebuild_s >= 1e6 else 'MISSED'}")


if __name__ == "__main__":
    main()
