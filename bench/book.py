"""Benchmark: the `book` rebuild, native and pure-Python paths, beside a bare JSON parse.

The input is SYNTHETIC (`mega_trading.book.synthetic`): a snapshot and depth diffs in the
capture format, gzipped, `--levels` level changes per diff (the real spot BTCUSDT capture
averages ~36 per 100 ms diff, NEXOUSDT ~3), with or without a bookTicker per diff.

    PYTHONPATH=src .venv/bin/python bench/book.py --diffs 200000 --levels 8 --repeats 3

Prints, for the same file, in book messages (lines) per second of wall time and per
CPU-second of this process (all its threads; the machine may be shared, so the CPU figure
is the steadier one):

* bare parse: gunzip + line split + msgspec JSON decode, the floor of any decoder-based
  rebuild (no book at all);
* native: `rebuild_captures(..., "native")` (C scanner + C steady-state loop, outputs as
  arrays, no Parquet write; by default a reader thread inflates and scans the next block
  while the book runs on this one);
* python: the pure-Python path (`--python-diffs` of the diffs only: it is ~100x slower).

The goal is >= 1M book messages/s.
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
import time
from pathlib import Path

import msgspec
from isal import igzip

from mega_trading.book import capture, native_scan
from mega_trading.book.build import rebuild_captures
from mega_trading.book.synthetic import synthetic_capture

GOAL_MSG_S = 1_000_000


def bare_parse(path: Path) -> int:
    decoder = msgspec.json.Decoder()
    n = 0
    with igzip.open(path, "rb") as handle:
        for line in handle:
            decoder.decode(line.partition(b" ")[2])
            n += 1
    return n


def best_of(repeats: int, fn, *args) -> tuple[float, float, object]:
    """(best wall s, CPU s of that run, result)."""
    best, out = (float("inf"), float("inf")), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = min(best, (wall, cpu))
    return best[0], best[1], out


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", compresslevel=6))
    return path


def line(label: str, n_msgs: int, wall: float, cpu: float, reference: float | None) -> str:
    ratio = f"  ({reference / (n_msgs / wall):.2f}x the bare parse's time)" if reference else ""
    return (f"{label:<44} {wall:6.2f} s wall {n_msgs / wall:>12,.0f} msg/s | "
            f"{cpu:6.2f} s CPU {n_msgs / cpu:>12,.0f} msg/CPU-s{ratio}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffs", type=int, default=200_000)
    ap.add_argument("--levels", type=int, default=8, help="level changes per diff")
    ap.add_argument("--tickers", action="store_true", help="a bookTicker after every diff")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--python-diffs", type=int, default=20_000,
                    help="diffs for the pure-Python path (0: skip it)")
    ap.add_argument("--scan-thread", type=int, default=int(native_scan.SCAN_THREAD),
                    choices=(0, 1), help="native: 1 = inflate + scan in a reader thread while "
                    "the book runs on the previous block")
    ap.add_argument("--inflate-threads", type=int, default=capture.INFLATE_THREADS,
                    choices=(0, 1), help="1: ISA-L inflates in a background thread (the "
                    "Python path, and the native one without --scan-thread)")
    args = ap.parse_args()
    capture.INFLATE_THREADS = args.inflate_threads
    native_scan.SCAN_THREAD = bool(args.scan_thread)
    lines = synthetic_capture(args.diffs, levels_per_diff=args.levels, tickers=args.tickers)
    n_msgs = len(lines)
    print(f"synthetic capture: {n_msgs:,} messages ({args.diffs:,} diffs x {args.levels} "
          f"levels{', + bookTickers' if args.tickers else ''}), "
          f"{sum(map(len, lines)) / 1e6:,.0f} MB of lines; scan thread: {args.scan_thread}, "
          f"inflate threads: {args.inflate_threads}; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "spot-BTCUSDT-20240808.gz", lines)
        parse_wall, parse_cpu, _ = best_of(args.repeats, bare_parse, path)
        print(line("bare parse (gunzip + msgspec decode)", n_msgs, parse_wall, parse_cpu, None))
        wall, cpu, rebuilt = best_of(args.repeats, rebuild_captures, [path], "native")
        (book,) = rebuilt.books.values()
        assert rebuilt.engine == "native" and book.counts["diffs_applied"] == args.diffs
        print(line("native book (parse + book + rows)", n_msgs, wall, cpu, n_msgs / parse_wall))
        native_msg_s = n_msgs / wall, n_msgs / cpu
        if args.python_diffs:
            small = synthetic_capture(args.python_diffs, levels_per_diff=args.levels,
                                      tickers=args.tickers)
            (Path(tmp) / "small").mkdir()
            small_path = write(Path(tmp) / "small" / "spot-BTCUSDT-20240808.gz", small)
            p_wall, p_cpu, _ = best_of(1, rebuild_captures, [small_path], "python")
            print(line(f"python book ({args.python_diffs:,} diffs)", len(small), p_wall, p_cpu,
                       None))
    verdict = {True: "met", False: "MISSED"}
    print(f"goal {GOAL_MSG_S:,} msg/s, native: {verdict[native_msg_s[0] >= GOAL_MSG_S]} in wall "
          f"time, {verdict[native_msg_s[1] >= GOAL_MSG_S]} per CPU-second (load average "
          f"{os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
