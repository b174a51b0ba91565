"""Realism of a run's generated flow on a subset of streams (e.g. the held-out ETHUSDT rows).

The pipeline's facts stage scores all backtest streams together. This script repeats the
scorecard on chosen streams only: prompts from those streams' backtest windows, the real
reference = those streams' backtest events, the noise floor = the run's real TRAINING
events (for a held-out stream that is another market, so the floor is lenient: read the
figures beside compound Hawkes's, fitted on the same training events). Sampling: the run's
measured choice (RUN/sampling.json) unless --sampling is given.

    .venv/bin/python bench/realism.py --run runs/demo --data runs/demo/data \\
        --streams ETHUSDT,ETHUSDT.um --out runs/demo/realism_ethusdt.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl


def main(argv: list[str] | None = None) -> dict:
    from mega_trading.core.config import from_dict
    from mega_trading.data.shards import ShardSet
    from mega_trading.eval.realism import headline
    from mega_trading.eval.scorecard import baseline_rollouts, scorecard, tokenized_real
    from mega_trading.eval.statistics import FactsConfig
    from mega_trading.generation.generate import GenerateConfig, generate_rollouts
    from mega_trading.generation.sampling import SamplingConfig, resolve_sampling
    from mega_trading.model.checkpoint import load_model
    from mega_trading.pipeline import load_run_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--streams", required=True, help="comma-separated stream keys")
    parser.add_argument("--config", default="configs/demo.yaml", help="for generate/facts settings")
    parser.add_argument("--n-per-stream", type=int, default=32)
    parser.add_argument("--sampling", default=None, help="e.g. 'temperature=1,top_k=16'")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    cfg = load_run_config(args.config)
    shards = ShardSet.open(args.data)
    model, _ = load_model(args.run, expect_tokenizer_hash=shards.tokenizer_hash,
                          expect_manifest_hash=shards.model_manifest_hash)
    explicit = None
    if args.sampling:
        pairs = dict(item.split("=") for item in args.sampling.split(","))
        explicit = from_dict(SamplingConfig, pairs)
    sampling, info = resolve_sampling(explicit, args.run)
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    facts_cfg: FactsConfig = cfg.facts
    model_frames, markov, hawkes = [], [], []
    trained = shards.training_data(json.loads((args.run / "config.json").read_text()))
    for i, stream in enumerate(streams):
        gen_cfg: GenerateConfig = dataclasses.replace(cfg.generate, symbol=stream, n=args.n_per_stream,
                                                      seed=cfg.generate.seed + i)
        events, _ = generate_rollouts(model, shards, gen_cfg, sampling=sampling)
        model_frames.append(events.with_columns(rollout=pl.col("rollout") + 1000 * i))
        base = baseline_rollouts(shards, gen_cfg, int(events["is_event"].sum()), gen_cfg.seed, trained)
        markov.append(base["markov3"].with_columns(rollout=pl.col("rollout") + 1000 * i))
        hawkes.append(base["compound_hawkes"].with_columns(symbol=pl.lit(stream)))
    real = shards.all_events("backtest").filter(pl.col("symbol").is_in(streams))
    tok_real = tokenized_real(shards.tokenizer, real)
    card = scorecard(real, trained.all_events("train"), pl.concat(model_frames),
                     {"markov3": pl.concat(markov), "compound_hawkes": pl.concat(hawkes, how="diagonal_relaxed"),
                      "tokenized_real": tok_real}, facts_cfg, cfg.generate.seed)
    out = {"streams": streams, "sampling": info, "n_real_events": real.height,
           "realism": card["realism"], "fact_gaps": card["fact_gaps"]}
    print(f"{','.join(streams)} ({info['label']}, {info['source']}): {headline(card['realism'])}")
    for name, s in card["realism"]["sources"].items():
        print(f"  {name:16s} within {s['within']}/{s['n_facts']}  beat {s['beat_reference']}  "
              f"geo {s['geo_mean_ratio']:.3f} {s['geo_ci95']}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2, default=float) + "\n")
    return out


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(0 if main() else 1)
