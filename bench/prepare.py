"""Benchmark: `prepare` beside a bare Polars CSV read of the same archive files.

The input is SYNTHETIC: generated trades in the exact Binance archive layout (zipped CSV,
no header, ms timestamps), since the real sample is far too small for a scale figure.

    .venv/bin/python bench/prepare.py --rows 10000000 --symbols 4 --months 3

prints wall time, events/s and peak RSS for both, at the requested size and at a quarter
of it (to show that peak memory does not grow with the input).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import polars as pl

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "ADAUSDT")


def write_synthetic_archive(root: Path, rows: int, n_symbols: int, n_months: int, seed: int = 0) -> list[Path]:
    """Zipped monthly trade files: random-walk prices on a tick grid, bursty arrivals."""
    rng = np.random.default_rng(seed)
    per_file = rows // (n_symbols * n_months)
    files = []
    for s, symbol in enumerate(SYMBOLS[:n_symbols]):
        price, trade_id, t_ms = 100.0 * (s + 1) ** 2, 1_000_000 * (s + 1), 1_704_067_200_000
        for month in range(1, n_months + 1):
            steps = rng.choice([-1, 0, 0, 0, 1], per_file) * 0.01
            prices = np.round(price + np.cumsum(steps), 2).clip(0.01)
            qty = np.round(rng.lognormal(-3, 1.5, per_file), 5) + 1e-5
            times = t_ms + np.cumsum(rng.choice([0, 0, 1, 3, 20, 150], per_file))
            frame = pl.DataFrame({
                "id": np.arange(trade_id, trade_id + per_file), "price": prices, "qty": qty,
                "quote_qty": np.round(prices * qty, 8), "time": times,
                "is_buyer_maker": rng.random(per_file) < 0.5, "is_best_match": np.ones(per_file, bool),
            })
            name = f"{symbol}-trades-{2024 + (month - 1) // 12}-{(month - 1) % 12 + 1:02d}"
            buffer = io.BytesIO()
            frame.write_csv(buffer, include_header=False)
            path = root / f"{name}.zip"
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                zf.writestr(f"{name}.csv", buffer.getvalue().replace(b"true", b"True").replace(b"false", b"False"))
            files.append(path)
            price, trade_id, t_ms = float(prices[-1]), trade_id + per_file, int(times[-1]) + 1
    return files


BARE_READ = """
import io, sys, time, zipfile, resource, json
import polars as pl
t = time.perf_counter(); n = 0
for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as zf:
        data = zf.read(zf.namelist()[0])
    n += pl.read_csv(io.BytesIO(data), has_header=False, schema={
        "id": pl.Int64, "price": pl.Float64, "qty": pl.Float64, "quote_qty": pl.Float64,
        "time": pl.Int64, "is_buyer_maker": pl.Boolean, "is_best_match": pl.Boolean}).height
print(json.dumps({"seconds": time.perf_counter() - t, "rows": n}))
"""

PREPARE = """
import sys, time, json
from mega_trading.data.prepare import PrepareConfig, prepare
t = time.perf_counter()
m = prepare(sys.argv[3:], sys.argv[1], PrepareConfig(workers=int(sys.argv[2])))
n = sum(i["n_events"] for s in m["shards"].values() for i in s.values())
print(json.dumps({"seconds": time.perf_counter() - t, "rows": sum(i["rows"] for i in m["inputs"]), "events_in_shards": n}))
"""


def run_measured(code: str, args: list[str]) -> dict:
    """Run a Python snippet in a fresh process; add its peak RSS (children included)."""
    wrapper = (
        "import resource, runpy, sys\n"
        f"exec(compile({code!r}, 'bench', 'exec'))\n"
        "r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "c = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print('RSS', max(r, c))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-2])
    result["peak_rss_mb"] = int(lines[-1].split()[1]) / 1024
    return result


def measure(rows: int, symbols: int, months: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "raw").mkdir()
        files = [str(p) for p in write_synthetic_archive(root / "raw", rows, symbols, months)]
        os.sync()  # the kernel flushing the files just written must not land in a timing
        bare = run_measured(BARE_READ, files)
        prep = run_measured(PREPARE, [str(root / "prepared"), str(workers), *files])
    return {"rows": bare["rows"], "files": len(files), "workers": workers, "bare_read": bare, "prepare": prep,
            "ratio": prep["seconds"] / bare["seconds"],
            "prepare_events_per_s": bare["rows"] / prep["seconds"],
            "bare_rows_per_s": bare["rows"] / bare["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--symbols", type=int, default=4)
    parser.add_argument("--months", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-small", action="store_true", help="skip the quarter-size run")
    args = parser.parse_args()
    # The smaller run keeps the per-file size and drops files (one symbol instead of
    # several): peak memory should not follow the input size.
    runs = [(args.rows, args.symbols)] if args.no_small else [(args.rows // args.symbols, 1), (args.rows, args.symbols)]
    print("| rows (synthetic) | files | bare read s | prepare s | prepare / bare | prepare events/s | peak RSS bare MB | peak RSS prepare MB |")
    print("|---|---|---|---|---|---|---|---|")
    for rows, symbols in runs:
        r = measure(rows, symbols, args.months, args.workers)
        print(f"| {r['rows']:,} | {r['files']} | {r['bare_read']['seconds']:.1f} | {r['prepare']['seconds']:.1f} | "
              f"{r['ratio']:.2f}x | {r['prepare_events_per_s']:,.0f} | {r['bare_read']['peak_rss_mb']:.0f} | "
              f"{r['prepare']['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
