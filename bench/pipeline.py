"""Benchmark: the whole pipeline at growing data sizes, wall time and peak RSS per stage.

The input is SYNTHETIC (generated trades in the Binance archive layout, see
bench/prepare.py): the real sample is far too small for a scale figure.

    .venv/bin/python bench/pipeline.py --sizes 1M,4M,16M --steps 100

Each stage runs as its own `mega-trading` process, so its peak RSS is its own
(`ru_maxrss` of the finished child). Prints one table of wall s / peak MB per stage and
size, then the growth factors from the second-largest to the largest size (the goal: peak
RSS grows at most 1.2x from 4M to 16M events; time at most linearly, 4x). The whole
1M+4M+16M run takes about 20 min on the 2-core development machine, the 16M size alone
about 11 min of stage time (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prepare import write_synthetic_archive  # a sibling benchmark script

CLI = [sys.executable, "-m", "mega_trading.cli"]
STAGES = ("prepare", "train", "backtest", "generate", "facts", "simulate", "report")


def parse_size(text: str) -> int:
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def stage_commands(raw: Path, data: Path, run: Path, steps: int) -> dict[str, list[str]]:
    return {
        "prepare": ["prepare", *map(str, sorted(raw.glob("*.zip"))), "--out", str(data),
                    "--block-size", "128", "--stride", "64", "--workers", "2"],
        "train": ["train", "--data", str(data), "--out", str(run), "--preset", "micro",
                  "--steps", str(steps), "--tracking", "none"],
        "backtest": ["backtest", "--run", str(run), "--data", str(data)],
        "generate": ["generate", "--run", str(run), "--data", str(data), "--n", "32",
                     "--length", "256", "--prompt-length", "96"],
        "facts": ["facts", "--data", str(data), "--run", str(run), "--out",
                  str(run / "facts.json")],
        "simulate": ["simulate", "--data", str(data), "--run", str(run), "--qty", "0.05",
                     "--policy", "twap", "--horizon", "30s", "--episodes", "8",
                     "--source", "model", "--out", str(run / "simulate.json")],
        "report": ["report", "--run", str(run), "--data", str(data)],
    }


# Runs one stage and prints its peak RSS: RUSAGE_CHILDREN of this wrapper holds only the
# stage's own process (and its workers), not the benchmark's earlier stages.
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(rc)")


def run_stage(args: list[str], log: Path) -> tuple[float, float]:
    """(wall s, peak RSS MB) of one stage run as a child process."""
    started = time.perf_counter()
    with log.open("ab") as out:
        done = subprocess.run([sys.executable, "-c", WRAPPER, *CLI, *args], check=False, stdout=out,
                              stderr=subprocess.PIPE)
        out.write(done.stderr)
    wall = time.perf_counter() - started
    stderr = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        sys.exit(f"stage {args[0]} failed, see {log}:\n{stderr[-2000:]}")
    return wall, int(stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,4M,16M", help="events per run, e.g. 1M,4M,16M")
    parser.add_argument("--symbols", type=int, default=2)
    parser.add_argument("--rows-per-file", type=int, default=500_000,
                        help="rows per monthly file; more data means more months, as in life "
                             "(prepare holds one file per worker)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (micro)")
    parser.add_argument("--work", default=None, help="working folder (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_pipeline_"))
    results: dict[int, dict[str, tuple[float, float]]] = {}
    for size in sizes:
        root = work / f"n{size}"
        raw, data, run = root / "raw", root / "data", root / "run"
        raw.mkdir(parents=True, exist_ok=True)
        print(f"[{size:,} events] writing the synthetic archive ...", flush=True)
        months = max(1, size // (args.symbols * args.rows_per_file))
        write_synthetic_archive(raw, size, args.symbols, months)
        results[size] = {}
        for stage, command in stage_commands(raw, data, run, args.steps).items():
            wall, rss = run_stage(command, root / "log.txt")
            results[size][stage] = (wall, rss)
            print(f"  {stage:9s} {wall:8.1f} s  {rss:8.0f} MB", flush=True)
    print_table(sizes, results)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {str(n): {s: {"wall_s": w, "peak_rss_mb": r} for s, (w, r) in per.items()}
             for n, per in results.items()}, indent=1))


def print_table(sizes: list[int], results: dict) -> None:
    head = " | ".join(f"{n / 1e6:g}M wall s | {n / 1e6:g}M peak MB" for n in sizes)
    print(f"\n| stage | {head} | time growth | RSS growth |")
    print("|---|" + "---:|" * (2 * len(sizes) + 2))
    for stage in STAGES:
        cells = " | ".join(f"{results[n][stage][0]:.1f} | {results[n][stage][1]:.0f}"
                           for n in sizes)
        growth = ""
        if len(sizes) >= 2:
            a, b = results[sizes[-2]][stage], results[sizes[-1]][stage]
            growth = f"{b[0] / a[0]:.2f}x | {b[1] / a[1]:.2f}x"
        print(f"| {stage} | {cells} | {growth} |")
    if len(sizes) >= 2:
        print(f"\ngrowth: from {sizes[-2]:,} to {sizes[-1]:,} events "
              f"({sizes[-1] / sizes[-2]:g}x the data)")


if __name__ == "__main__":
    main()
