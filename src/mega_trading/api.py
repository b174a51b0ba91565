"""The notebook API: one trained run, scored, sampled and simulated by the CLI's own code.

    import mega_trading

    run = mega_trading.load_run("runs/demo")
    scores = run.score()                          # what `mega-trading backtest` computes
    trades = run.generate(n=8, length=64)         # what `mega-trading generate` samples
    result = run.simulate("twap", qty=0.05, horizon_s=30, episodes=4)  # `mega-trading simulate`

Nothing here re-implements a stage: each method builds the stage's typed config (any field
by keyword) and calls the function the command calls. Nothing is written unless ``out=``
is given, so a notebook never overwrites a run's artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from torch import nn

from mega_trading.core.config import from_dict
from mega_trading.core.errors import DataError
from mega_trading.data.shards import ShardSet
from mega_trading.data.tokenizer import Tokenizer
from mega_trading.eval.backtest import BacktestConfig, run_backtest
from mega_trading.generation.generate import GenerateConfig, generate_rollouts
from mega_trading.model.checkpoint import load_model
from mega_trading.simulate import SimConfig, policy_configs, run_simulation


@dataclass
class Run:
    """A trained run folder and the prepared data it was trained on."""

    run_dir: Path
    data_dir: Path
    model: nn.Module
    tokenizer: Tokenizer
    config: dict[str, Any]  # RUN/config.json
    step: int | None

    def score(self, data: str | Path | None = None, split: str = "backtest",
              max_tokens: int | None = None, out: str | Path | None = None,
              **config: Any) -> dict:
        """Held-out scores beside the baselines: backtest.json's document. `data` may be
        any folder prepared with this run's tokenizer (default: the training data)."""
        cfg = from_dict(BacktestConfig, {"step": self.step, **config})
        return run_backtest(self.run_dir, data or self.data_dir, split, max_tokens, cfg,
                            out=out, write=out is not None)

    def generate(self, data: str | Path | None = None, **config: Any) -> pl.DataFrame:
        """Rollouts decoded to trades (one row per generated token, `rollout` column), from
        prompts of the data; keywords are GenerateConfig fields (n, length, sampling, ...)."""
        shards = ShardSet.open(data or self.data_dir)
        events, _prompts = generate_rollouts(self.model, shards, from_dict(GenerateConfig, config))
        return events

    def simulate(self, policies: str = "twap", qty: float = 1.0, horizon_s: float = 60.0,
                 side: str = "buy", seed: int = 0, data: str | Path | None = None,
                 out: str | Path | None = None, **config: Any) -> dict:
        """Execution agents against the model's flow (closed loop); keywords are SimConfig
        fields (episodes, symbol, source, ...). Returns simulate.json's document."""
        chosen = policy_configs(policies, qty=qty, horizon_s=horizon_s, side=side)
        # a small model's context may be shorter than the default prompt: use all of it
        config.setdefault("prompt_length", min(SimConfig().prompt_length,
                                               self.model.cfg.block_size))
        return run_simulation(data or self.data_dir, chosen, from_dict(SimConfig, config),
                              seed=seed, run_dir=self.run_dir, step=self.step, out=out)


def load_run(run_dir: str | Path, data: str | Path | None = None, step: int | None = None,
             device: str = "cpu") -> Run:
    """Open a run folder: the model at `step` (default: the latest checkpoint), the data's
    tokenizer and RUN/config.json. `data` defaults to the folder the run was trained on."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise DataError("not a run folder (no config.json); run `mega-trading train`", run_dir)
    config = json.loads(config_path.read_text())
    data_dir = Path(data or config.get("data_dir") or "")
    if not (data_dir / "manifest.json").is_file():
        raise DataError("the run's data folder is missing; pass data=", data_dir)
    shards = ShardSet.open(data_dir)
    model, state = load_model(run_dir, step=step, device=device,
                              expect_tokenizer_hash=shards.tokenizer_hash)
    return Run(run_dir, data_dir, model, shards.tokenizer, config, state.get("step"))
