"""Benchmark: new tokens/s of the three callers of the one decoder engine, in one run.

One micro run (trained for one step on the bundled sample, as bench/serve.py builds it;
speed does not depend on the weights), one batch size, one prompt length and one number
of new tokens for all three, the same torch thread count:

* ``generate``   mega_trading.generation.generate.generate on a batch of ``--batch`` prompts (the
                 loop of bench/generate.py), best of ``--repeat``
* ``serve``      the rollout service (``mega-trading serve`` subprocess, batching on,
                 batch_rows = ``--batch``) driven by ``--batch`` concurrent clients, one
                 row per request (bench/serve.py's driver); new tokens returned per second
* ``simulate``   the simulator's closed loop (model source, a TWAP agent whose fills are
                 inserted), ``--batch`` episodes decoded together for ``--new`` steps;
                 committed tokens per second of ``simulate_episodes``

    .venv/bin/python bench/callers.py                     # batch 16, prompt 128, 256 new
    .venv/bin/python bench/callers.py --new 32 --prompt 32  # bench/serve.py's request shape
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
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
    parser.add_argument("--repeat", type=int, default=3, help="generate: timed runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def bench_serve_module():
    path = Path(__file__).with_name("serve.py")
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_generate(model, vocab_events: int, args) -> float:
    from mega_trading.generation.generate import SamplingConfig, generate

    prompt = torch.randint(0, vocab_events, (args.batch, args.prompt),
                           generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(top_k=16)
    generate(model, prompt, 8, cfg, torch.Generator().manual_seed(0))  # warm-up
    best = float("inf")
    for i in range(args.repeat):
        start = time.perf_counter()
        generate(model, prompt, args.new, cfg, torch.Generator().manual_seed(i))
        best = min(best, time.perf_counter() - start)
    return args.batch * args.new / best


def bench_simulate(run: Path, data: Path, args) -> float:
    from mega_trading.generation.sampling import SamplingConfig
    from mega_trading.simulate import sources
    from mega_trading.simulate.config import PolicyConfig, SimConfig
    from mega_trading.simulate.run import run_simulation

    committed = [0]
    commit = sources.ModelSource.commit

    def counting(self, tokens, consumed):
        committed[0] += len(tokens)
        return commit(self, tokens, consumed)

    sources.ModelSource.commit = counting
    try:
        cfg = SimConfig(episodes=args.batch, batch_size=args.batch, prompt_length=args.prompt,
                        max_events=args.new, replayable_starts=False, bootstrap_samples=10,
                        sampling=SamplingConfig(top_k=16, forbid_seg=True))
        policy = PolicyConfig(kind="twap", horizon_s=3600.0, slices=args.new // 4)
        doc = run_simulation(data, {"twap": policy}, cfg, seed=0, run_dir=run)
    finally:
        sources.ModelSource.commit = commit
    return committed[0] / doc["timing_s"]["twap"]


def bench_serve(serve, run: Path, data: Path, args, log_dir: Path) -> dict:
    import httpx

    overrides = [f"batch_window_ms={args.window_ms:g}", f"max_batch_requests={args.batch}",
                 f"batch_rows={args.batch}"]
    process, base = serve.start_server(run, data, overrides, args.threads,
                                       log_dir / "server.log")
    try:
        card = httpx.get(base + "/v1/model", timeout=10).json()
        vocab_events = card["tokenizer"]["n_event_tokens"]
        drive_args = argparse.Namespace(prompt=args.prompt, length=args.new,
                                        requests=args.requests, max_seconds=args.max_seconds)
        asyncio.run(serve.drive(base, 1, argparse.Namespace(**{**vars(drive_args),
                                                                "requests": 2}), vocab_events,
                                args.client))
        result = asyncio.run(serve.drive(base, args.batch, drive_args, vocab_events,
                                         args.client))
        health = httpx.get(base + "/healthz", timeout=10).json()
        return {**result, "requests_per_batch": health["requests"] / max(health["batches"], 1)}
    finally:
        serve.stop_server(process)


def main(argv: list[str] | None = None) -> dict:
    from mega_trading.data.shards import ShardSet
    from mega_trading.model.checkpoint import load_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    serve = bench_serve_module()
    with tempfile.TemporaryDirectory(prefix="bench_callers_") as tmp:
        run, data = serve.build_run(Path(tmp), "micro")
        model, _ = load_model(run, device="cpu")
        model.eval()
        vocab_events = ShardSet.open(data).tokenizer.n_event_tokens
        figures = {"generate": bench_generate(model, vocab_events, args)}
        print(f"generate: {figures['generate']:,.0f} tok/s", file=sys.stderr)
        figures["simulate"] = bench_simulate(run, data, args)
        print(f"simulate: {figures['simulate']:,.0f} tok/s", file=sys.stderr)
        served = bench_serve(serve, run, data, args, Path(tmp))
        figures["serve"] = served["new_tok_per_s"]
        print(f"serve: {figures['serve']:,.0f} tok/s ({served['ok']} requests, "
              f"{served['errors']} errors, {served['requests_per_batch']:.1f} requests a batch)",
              file=sys.stderr)
    print(f"\nmicro run ({sum(p.numel() for p in model.parameters()):,} parameters, block "
          f"{model.cfg.block_size}), batch {args.batch}, prompt {args.prompt} + {args.new} new "
          f"tokens per row, top-k 16, {args.threads} torch thread(s), serve batch window "
          f"{args.window_ms:g} ms ({served['requests_per_batch']:.1f} requests a batch)\n")
    print("| caller | new tokens/s | vs generate |\n|---|---:|---:|")
    for name, value in figures.items():
        print(f"| {name} | {value:,.0f} | {value / figures['generate']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({**figures, "args": {k: str(v) for k, v in
                                                             vars(args).items()}}, indent=2))
    return figures


if __name__ == "__main__":
    main()
