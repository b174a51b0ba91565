"""Benchmark: Muon's step with small matrices stacked by shape vs one matrix at a time.

Random gradients on a preset's weights; the two settings of `optim.STACK_MAX_NUMEL`
(the default, and 0 = never stack) alternate for several rounds in one process; the
median is shown. Only Muon's step is timed (momentum, Newton-Schulz, update).

    .venv/bin/python bench/muon.py --preset micro
    .venv/bin/python bench/muon.py --preset small --steps 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mega_trading.model.transformer import ModelConfig, Transformer
from mega_trading.train import optim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(args.preset, vocab_size=args.vocab))
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    muon = optim.build_optimizer(model).muon
    shapes = sorted({tuple(p.shape) for g in muon.param_groups for p in g["params"]})
    settings = {"stacked (default)": optim.STACK_MAX_NUMEL, "one at a time": 0}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for r in range(args.rounds + 1):
        for name, limit in settings.items():
            optim.STACK_MAX_NUMEL = limit
            start = time.perf_counter()
            for _ in range(args.steps):
                muon.step()
            if r:  # round 0 warms up
                seconds[name].append((time.perf_counter() - start) / args.steps)
    optim.STACK_MAX_NUMEL = settings["stacked (default)"]
    n_matrices = sum(len(g["params"]) for g in muon.param_groups)
    print(f"preset {args.preset}: {n_matrices} Muon matrices, shapes {shapes}, "
          f"Newton-Schulz in {optim.ns_dtype(torch.device('cpu'))}, {args.threads} threads")
    for name, times in seconds.items():
        print(f"{name:<20}{statistics.median(times) * 1e3:>9.1f} ms per step "
              f"(rounds {min(times) * 1e3:.1f}–{max(times) * 1e3:.1f})")


if __name__ == "__main__":
    main()
