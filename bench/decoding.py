"""Which decoding step limits which stylized fact: tokenized real under decoding variants.

Real events of one split go through the run's tokenizer and back ("tokenized real", the
decoder's own limit: no model can beat it) with the move decoded iid in its bin, with the
tick-class tables only, with level memory only, in full context (the default), and to the
bin medians; each is scored like facts.json scores a source (gap / noise floor per fact,
the floor = real TRAINING events vs the same real events). Choose decoding settings on
``--split validation``; ``backtest`` is for reporting only.

    .venv/bin/python bench/decoding.py --data runs/demo/data --split validation
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    from mega_trading.data.shards import ShardSet
    from mega_trading.eval.facts import compute_facts, fact_gaps
    from mega_trading.eval.realism import score_source
    from mega_trading.eval.scorecard import tokenized_real
    from mega_trading.eval.statistics import FactsConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="validation", choices=("validation", "backtest"))
    parser.add_argument("--window", type=int, default=256, help="events per sampled window")
    parser.add_argument("--levels", default="0,4,8,16,32", help="level-memory sizes to try")
    args = parser.parse_args(argv)

    shards = ShardSet.open(args.data)
    cfg = FactsConfig(on_degenerate="flag")
    real, _ = shards.sample_events(args.split, cfg.max_real_events, args.window, 0)
    floor_events, _ = shards.sample_events("train", cfg.max_real_events, args.window, 1)
    real_facts = compute_facts(real, cfg)
    floor = fact_gaps(compute_facts(floor_events, cfg), real_facts)
    tok = shards.tokenizer

    def variant(**config):
        return dataclasses.replace(tok, config={**tok.config, **config})

    variants = {"iid in-bin": (variant(tick_window=0, level_memory=0), "in_bin"),
                "median": (tok, "median"),
                "tick classes only": (variant(level_memory=0), "in_bin")}
    for levels in (int(x) for x in args.levels.split(",")):
        variants[f"levels {levels} only"] = (variant(tick_window=0, level_memory=levels), "in_bin")
        variants[f"context, levels {levels}"] = (variant(level_memory=levels), "in_bin")
    out = {}
    print(f"{args.split}: {real.height} real events; tokenizer default level_memory="
          f"{tok.config.get('level_memory')}, tick_window={tok.config.get('tick_window')}")
    for name, (tokenizer, mode) in variants.items():
        frame = tokenized_real(tokenizer, real)
        if mode == "median":
            decoded = tokenizer.decode(tokenizer.encode(real), mode="median")
            frame = frame.with_columns(decoded.select("move_bps", "log_size", "dt_us"))
        score = score_source(fact_gaps(compute_facts(frame, cfg), real_facts), floor)
        out[name] = score
        ratios = " ".join(f"{k}={v:.2f}" for k, v in score["ratios"].items())
        print(f"{name:22s} within {score['within']:2d}/{score['n_facts']} "
              f"geo {score['geo_mean_ratio']:.3f}  {ratios}", flush=True)
    return out


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(0 if main() else 1)
