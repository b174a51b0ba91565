"""Held-out scoring of a trained run beside baselines: RUN/backtest.json.

* The model is loaded with the data's tokenizer and manifest hashes; a run trained on
  other data is refused (``ArtifactMismatchError``) rather than scored on token ids that
  mean something else.
* Baselines are fitted on the TRAIN split of the same prepared data only, one shard per
  symbol, never reading the split being scored.
* The model and every baseline score exactly the same positions of the held-out split,
  each position once, through ``scoring`` (one path), per symbol and overall. A symbol
  with no training tokens is still scored and labelled ``zero_shot``.
* Each figure comes with a block-bootstrap 95% CI, and the model's NLL difference to
  each baseline with a paired CI (``model.vs_baselines``), so "the model wins" is a claim
  with an error bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mega_trading.baselines import Baseline, BaselineConfig, fit_baselines
from mega_trading.config import to_dict
from mega_trading.errors import ArtifactMismatchError, DataError
from mega_trading.ingest.reader import split_stream_key
from mega_trading.lineage import provenance, read_json, write_json_atomic
from mega_trading.scoring import (
    FieldSpec,
    PositionScores,
    SummaryConfig,
    label_stats,
    paired_difference,
    score_baseline,
    score_model,
    summarize,
)

FORMAT = "mega-trading/backtest@1"
LN2 = float(np.log(2.0))
SPLITS = ("train", "validation", "backtest")


@dataclass(frozen=True)
class BacktestConfig:
    batch_size: int = 16
    block_size: int = 0  # 0: the model's own block_size
    stride: int = 0  # 0: half a block (each target then sees >= block/2 tokens of past)
    device: str = "auto"  # auto: cuda when available, else cpu
    step: int | None = None  # checkpoint step; None: the run's latest
    chunk_size: int = 2048  # baseline positions per scoring batch
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def fit_train_baselines(shards: Any, cfg: BaselineConfig | None = None) -> dict[str, Baseline]:
    """Every baseline, fitted on the TRAIN split's shards of a ShardSet (nothing else)."""
    cfg = cfg or BaselineConfig()
    tok = shards.tokenizer
    train = [np.asarray(shards.tokens("train", s)) for s in shards.symbols("train")]
    train = [t for t in train if len(t)]
    if not train:
        raise DataError("the train split is empty: baselines have nothing to fit", shards.root)
    return fit_baselines(train, tok.vocab_size, tok.seg_id, tok.pad_id, tok.n_event_tokens, cfg)


def _train_symbols(shards: Any) -> set[str]:
    return {s for s in shards.symbols("train") if shards.n_tokens("train", s) > 0}


def run_backtest(
    run_dir: str | Path, data_dir: str | Path, split: str = "backtest",
    max_tokens: int | None = None, cfg: BacktestConfig = BacktestConfig(),
    out: str | Path | None = None, log: Callable[[str], None] | None = None,
) -> dict:
    """Score the run's model and the baselines on `split`; write and return the report.

    ``max_tokens`` keeps the first N tokens of each symbol's shard (a quick look; the
    full split is the honest number). The JSON goes to ``out`` (default RUN/backtest.json).
    """
    from mega_trading.checkpoint import load_model
    from mega_trading.dataset import ShardSet

    log = log or (lambda _msg: None)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "train":
        log("warning: scoring the TRAIN split measures fit, not prediction")
    run_dir = Path(run_dir)
    shards = ShardSet.open(data_dir)
    # Data encoded with the run's reused tokenizer (`prepare --tokenizer`) is scored against
    # baselines fitted on, and zero-shot tags taken from, the data the run was trained on.
    config_path = run_dir / "config.json"
    trained_on = shards.training_data(read_json(config_path) if config_path.is_file() else None)
    device = resolve_device(cfg.device)
    model, state = load_model(run_dir, step=cfg.step, device=device,
                              expect_tokenizer_hash=shards.tokenizer_hash,
                              expect_manifest_hash=trained_on.manifest_hash)
    if model.cfg.vocab_size != shards.vocab_size:
        raise ArtifactMismatchError(f"model vocabulary {model.cfg.vocab_size} != data "
                                    f"vocabulary {shards.vocab_size}")
    spec = FieldSpec.from_tokenizer(shards.tokenizer)
    block_size = cfg.block_size or model.cfg.block_size

    started = time.perf_counter()
    baselines = fit_train_baselines(trained_on, cfg.baselines)
    fit_s = time.perf_counter() - started
    log(f"baselines fitted on train in {fit_s:.1f}s")

    symbols = [s for s in shards.symbols(split) if shards.n_tokens(split, s) > 0]
    if not symbols:
        raise DataError(f"the {split} split has no tokens", shards.root)
    scorers = ["model", *baselines]
    per_scorer: dict[str, list[PositionScores]] = {name: [] for name in scorers}
    elapsed = {name: 0.0 for name in scorers}
    n_tokens = {}
    for shard_id, symbol in enumerate(symbols):
        tokens = np.asarray(shards.tokens(split, symbol))[:max_tokens]
        tokens = shards.tokenizer.check_tokens(tokens)
        n_tokens[symbol] = len(tokens)
        t0 = time.perf_counter()
        per_scorer["model"].append(score_model(
            model, tokens, spec, block_size=block_size, batch_size=cfg.batch_size,
            device=device, stride=cfg.stride or None).with_shard(shard_id))
        elapsed["model"] += time.perf_counter() - t0
        for name, baseline in baselines.items():
            t0 = time.perf_counter()
            per_scorer[name].append(
                score_baseline(baseline, tokens, spec, cfg.chunk_size).with_shard(shard_id))
            elapsed[name] += time.perf_counter() - t0
        log(f"{symbol}: {len(per_scorer['model'][-1])} positions scored")

    doc = _report(per_scorer, symbols, _train_symbols(trained_on), spec, cfg.summary)
    doc["calibrated"] = _calibrated(run_dir, model, shards, split, symbols, max_tokens, spec,
                                    block_size, cfg, device)
    doc.update({
        "format": FORMAT,
        "split": split,
        "n_tokens": int(sum(n_tokens.values())),
        "max_tokens": max_tokens,
        "timing_s": {"baseline_fit": fit_s, **elapsed},
        "baseline_details": {name: _describe(b) for name, b in baselines.items()},
        "lineage": provenance(
            stage="backtest", run_dir=str(run_dir), data_dir=str(Path(data_dir)),
            tokenizer_hash=shards.tokenizer_hash, manifest_hash=shards.manifest_hash,
            checkpoint_step=state.get("step"), device=device, block_size=block_size,
            baselines_fitted_on="train", config=to_dict(cfg),
            tokenizer_reused=shards.tokenizer_reused, trained_on_manifest=trained_on.manifest_hash,
        ),
    })
    for symbol in symbols:
        doc["per_symbol"][symbol]["n_tokens"] = n_tokens[symbol]
    write_json_atomic(Path(out) if out else run_dir / "backtest.json", doc)
    return doc


def _report(per_scorer: dict[str, list[PositionScores]], symbols: list[str],
            train_symbols: set[str], spec: FieldSpec, summary: SummaryConfig) -> dict:
    names = spec.field_names
    overall = {name: PositionScores.concat(parts, names) for name, parts in per_scorer.items()}
    if len(overall["model"]) == 0:
        raise DataError("no event token to score in the held-out split")
    per_symbol = {}
    for i, symbol in enumerate(symbols):
        one = {name: parts[i] for name, parts in per_scorer.items()}
        base_symbol, market = split_stream_key(symbol)
        section = _section(one, summary)
        per_symbol[symbol] = {
            "symbol": base_symbol,
            "market": market,
            "zero_shot": symbol not in train_symbols,
            **section,
            "vs_best_baseline": _vs_rival(section, None),
            "vs_unigram": _vs_rival(section, "unigram"),
        }
    return {**_section(overall, summary), "per_symbol": per_symbol,
            **label_stats(overall["model"].targets)}


def _calibrated(run_dir: Path, model, shards, split: str, symbols: list[str],
                max_tokens: int | None, spec: FieldSpec, block_size: int, cfg: BacktestConfig,
                device: str) -> dict | None:
    """The model's NLL and ECE on this split with the temperature that RUN/calibration.json
    fitted on VALIDATION (None without one): what calibration buys on unseen data."""
    path = run_dir / "calibration.json"
    if not path.is_file():
        return None
    temperature = float(read_json(path)["temperature"])

    def scaled(x):
        return model(x) / temperature

    parts = [score_model(scaled, shards.tokenizer.check_tokens(np.asarray(shards.tokens(split, s))[:max_tokens]),
                         spec, block_size=block_size, batch_size=cfg.batch_size, device=device,
                         stride=cfg.stride or None).with_shard(i) for i, s in enumerate(symbols)]
    summary = summarize(PositionScores.concat(parts, spec.field_names), cfg.summary)
    return {"temperature": temperature, "fitted_on": "validation",
            **{k: summary.get(k) for k in ("nll_nats", "nll_nats_ci95", "ece", "top1")}}


def _vs_rival(section: dict, name: str | None) -> dict | None:
    """The model against one baseline (None: the best by NLL on these events), in bits per
    event, with the paired 95% CI: the figures of the report's per-market table."""
    baselines, deltas = section["baselines"], section["model"].get("vs_baselines", {})
    if not deltas:
        return None
    if name is None:
        name = min(baselines, key=lambda n: baselines[n].get("nll_nats", float("inf")))
    delta = deltas.get(name)
    if delta is None or delta.get("delta_nll_nats") is None:
        return None
    lo, hi = delta["ci95"]
    return {"baseline": name, "bits_per_event": baselines[name]["bits_per_event"],
            "delta_bits": delta["delta_nll_nats"] / LN2,
            "ci95_bits": [lo / LN2, hi / LN2],
            "verdict": "model better" if hi < 0 else "model worse" if lo > 0 else "no clear difference"}


def _section(scores: dict[str, PositionScores], summary: SummaryConfig) -> dict:
    model = scores["model"]
    out_model = summarize(model, summary)
    if len(model):
        out_model["vs_baselines"] = {name: paired_difference(model, s, summary)
                                     for name, s in scores.items() if name != "model"}
    return {
        "n_scored": len(model),
        "model": out_model,
        "baselines": {name: summarize(s, summary) for name, s in scores.items() if name != "model"},
    }


def _describe(baseline: Baseline) -> dict:
    info: dict[str, Any] = {"context_len": baseline.context_len}
    if hasattr(baseline, "eps"):
        info["eps"] = baseline.eps
    if hasattr(baseline, "summary"):
        info["orders"] = baseline.summary()
    return info
