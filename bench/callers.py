"""Benchmark: new tokens/s of the three callers of the one decoder engine, in one run.

One micro run (trained for one step on the bundled sample, as bench/serve.py builds it;
speed does not depend on the weights), one batch size, one prompt length and one number
of new tokens for all three, the same torch thread count:

* ``generate``   mega_trading.generation.generate.generate on a batch of ``--batch`` prompts (the
                 loop of bench/generate.py)
* ``serve``      the rollout service (``mega-trading serve`` subprocess, batching on,
                 batch_rows = ``--batch``) driven by ``--batch`` concurrent clients, one
                 row per request (bench/serve.py's driver), ``--requests`` requests a run;
                 new tokens returned per second
* ``simulate``   the simulator's closed loop (model source, a TWAP agent whose fills are
                 inserted), ``--batch`` episodes decoded together for ``--new`` steps;
                 committed tokens per second of ``simulate_episodes``

The callers are timed in ``--repeat`` rounds (generate, simulate, serve, then again), and
each caller's best run is its figure: a slow spell of a shared machine hits all three
alike, and none of them is judged on one hiccup (until issue 18's short-request work
generate had a best of 3 and the others one run each, after generate). Every run is
printed and kept in ``--json``.

    .venv/bin/python bench/callers.py                     # batch 16, prompt 128, 256 new
    .venv/bin/python bench/callers.py --new 32 --prompt 32  # bench/serve.py's request shape
    .venv/bin/python bench/callers.py --new 32 --prompt 32 --client raw  # least client CPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="rows = clients = episodes")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256, help="new tokens per row")
    parser.add_argument("--requests", type=int, default=64, help="serve: requests (max)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="serve: time (max)")
    parser.add_argument("--window-ms", type=float, default=5.0,
                        help="serve: batch_window_ms (bench/serve.py uses 5)")
    parser.add_argument("--client", choices=("httpx", "httpx-each", "raw"), default="httpx",
                        help="serve: the load generator (bench/serve.py's drive): httpx (one "
                             "pool), httpx-each (one connection per client) or raw HTTP/1.1 "
                             "on asyncio streams (the least client CPU)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each caller")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pin", action="store_true",
                        help="server on CPU 0, this process (generate, simulate, the clients) "
                             "on CPU 1: each caller's model work gets one core and the clients "
                             "do not take the server's (as clients on another machine)")
    parser.add_argument("--tick-support", action="store_true",
                        help="every caller samples with tick support (generation/support.py)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def bench_serve_module():
    path = Path(__file__).with_name("serve.py")
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate_runner(model, tokenizer, args):
    """One timed generate run per call (new tokens/s), after a warm-up."""
    from mega_trading.generation.generate import SamplingConfig, generate
    from mega_trading.generation.support import TickSupport

    prompt = torch.randint(0, tokenizer.n_event_tokens, (args.batch, args.prompt),
                           generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(top_k=16, tick_support=args.tick_support)
    support = TickSupport.from_tokenizer(tokenizer) if args.tick_support else None
    generate(model, prompt, 8, cfg, torch.Generator().manual_seed(0), support=support)  # warm-up

    def once(i: int) -> float:
        start = time.perf_counter()
        generate(model, prompt, args.new, cfg, torch.Generator().manual_seed(i), support=support)
        return args.batch * args.new / (time.perf_counter() - start)

    return once


def simulate_runner(run: Path, data: Path, args):
    """One timed closed-loop simulation per call (committed tokens/s of simulate_episodes);
    the same seed, so the same episodes every run."""
    from mega_trading.generation.sampling import SamplingConfig
    from mega_trading.simulate import sources
    from mega_trading.simulate.config import PolicyConfig, SimConfig
    from mega_trading.simulate.run import run_simulation

    cfg = SimConfig(episodes=args.batch, batch_size=args.batch, prompt_length=args.prompt,
                    max_events=args.new, replayable_starts=False, bootstrap_samples=10,
                    sampling=SamplingConfig(top_k=16, forbid_seg=True,
                                            tick_support=args.tick_support))
    policy = PolicyConfig(kind="twap", horizon_s=3600.0, slices=args.new // 4)

    def once(i: int) -> float:
        committed = [0]
        commit = sources.ModelSource.commit

        def counting(self, tokens, consumed):
            committed[0] += len(tokens)
            return commit(self, tokens, consumed)

        sources.ModelSource.commit = counting
        try:
            doc = run_simulation(data, {"twap": policy}, cfg, seed=0, run_dir=run)
        finally:
            sources.ModelSource.commit = commit
        return committed[0] / doc["timing_s"]["twap"]

    return once


@contextlib.contextmanager
def serve_runner(serve, run: Path, data: Path, args, log_dir: Path):
    """A started server (2 one-request warm-up batches done) and one timed drive of
    ``--requests`` requests per call (new tokens/s); ``requests_per_batch()`` counts the
    timed drives' batches only."""
    import httpx

    overrides = [f"batch_window_ms={args.window_ms:g}", f"max_batch_requests={args.batch}",
                 f"batch_rows={args.batch}"]
    process, base = serve.start_server(run, data, overrides, args.threads,
                                       log_dir / "server.log", {0} if args.pin else None)
    try:
        card = httpx.get(base + "/v1/model", timeout=10).json()
        vocab_events = card["tokenizer"]["n_event_tokens"]
        drive_args = argparse.Namespace(prompt=args.prompt, length=args.new,
                                        requests=args.requests, max_seconds=args.max_seconds,
                                        tick_support=args.tick_support)
        asyncio.run(serve.drive(base, 1, argparse.Namespace(**{**vars(drive_args),
                                                                "requests": 2}), vocab_events,
                                args.client))
        warm = httpx.get(base + "/healthz", timeout=10).json()
        errors = []

        def once(i: int) -> float:
            result = asyncio.run(serve.drive(base, args.batch, drive_args, vocab_events,
                                             args.client))
            errors.append(result["errors"])
            return result["new_tok_per_s"]

        def requests_per_batch() -> float:
            health = httpx.get(base + "/healthz", timeout=10).json()
            timed = {k: health[k] - warm[k] for k in ("requests", "batches")}
            return timed["requests"] / max(timed["batches"], 1)

        once.errors, once.requests_per_batch = errors, requests_per_batch
        yield once
    finally:
        serve.stop_server(process)


def main(argv: list[str] | None = None) -> dict:
    from mega_trading.data.shards import ShardSet
    from mega_trading.model.checkpoint import load_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.pin:
        os.sched_setaffinity(0, {1})
    serve = bench_serve_module()
    with tempfile.TemporaryDirectory(prefix="bench_callers_") as tmp:
        run, data = serve.build_run(Path(tmp), "micro")
        model, _ = load_model(run, device="cpu")
        model.eval()
        runners = {"generate": generate_runner(model, ShardSet.open(data).tokenizer, args),
                   "simulate": simulate_runner(run, data, args)}
        with serve_runner(serve, run, data, args, Path(tmp)) as serve_once:
            runners["serve"] = serve_once
            runs: dict[str, list[float]] = {name: [] for name in runners}
            for i in range(args.repeat):  # rounds: a slow spell of the machine hits all three
                for name, once in runners.items():
                    # a full collection of this process's heap (torch, polars, 3 models
                    # loaded by then) took ~0.2 s; due during a serve drive, it stalled the
                    # clients and split a batch: collect between runs, as timeit does
                    gc.collect()
                    runs[name].append(once(i))
                    print(f"round {i + 1}: {name} {runs[name][-1]:,.0f} tok/s", file=sys.stderr)
            per_batch, errors = serve_once.requests_per_batch(), sum(serve_once.errors)
    print(f"serve: {errors} errors, {per_batch:.1f} requests a batch", file=sys.stderr)
    figures = {name: max(values) for name, values in runs.items()}
    print(f"\nmicro run ({sum(p.numel() for p in model.parameters()):,} parameters, block "
          f"{model.cfg.block_size}), batch {args.batch}, prompt {args.prompt} + {args.new} new "
          f"tokens per row, top-k 16{', tick support' if args.tick_support else ''}, "
          f"{args.threads} torch thread(s), serve batch window "
          f"{args.window_ms:g} ms, {args.client} clients"
          f"{' (server pinned to CPU 0, the rest to CPU 1)' if args.pin else ''}, "
          f"{args.requests} requests a serve run "
          f"({per_batch:.1f} requests a batch); best of {args.repeat} rounds\n")
    print("| caller | new tokens/s | vs generate | every run (tok/s) |\n|---|---:|---:|---|")
    for name, value in figures.items():
        every = ", ".join(f"{v:,.0f}" for v in runs[name])
        print(f"| {name} | {value:,.0f} | {value / figures['generate']:.2f}x | {every} |")
    if args.json:
        args.json.write_text(json.dumps({**figures, "runs": runs,
                                         "requests_per_batch": per_batch, "errors": errors,
                                         "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=2))
    return figures


if __name__ == "__main__":
    main()
