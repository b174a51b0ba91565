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
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np

from mega_trading.core.config import NonNegativeInt, PositiveInt, config_dataclass, to_dict
from mega_trading.core.errors import ArtifactMismatchError, DataError
from mega_trading.core.lineage import provenance, read_json, write_json_atomic
from mega_trading.data.ingest.schema import split_stream_key
from mega_trading.data.shards import ShardSet
from mega_trading.eval.baselines import Baseline, BaselineConfig, fit_baselines
from mega_trading.eval.score_sums import ScoreSums
from mega_trading.eval.scoring import (
    FieldSpec,
    SummaryConfig,
    iter_baseline_scores,
    iter_model_scores,
)
from mega_trading.model.checkpoint import load_model

FORMAT = "mega-trading/backtest@1"
LN2 = float(np.log(2.0))
SPLITS = ("train", "validation", "backtest")


@config_dataclass
class BacktestConfig:
    batch_size: PositiveInt = 16
    # scoring context; 0: the model's own block_size (= the data's, see PrepareConfig)
    block_size: NonNegativeInt = 0
    stride: NonNegativeInt = 0  # 0: half a block (each target then sees >= block/2 tokens of past)
    device: str = "auto"  # auto: cuda when available, else cpu
    step: NonNegativeInt | None = None  # checkpoint step; None: the run's latest
    chunk_size: PositiveInt = 2048  # baseline positions per scoring batch
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
    train = [shards.tokens("train", s) for s in shards.symbols("train")]
    train = [t for t in train if len(t)]
    if not train:
        raise DataError("the train split is empty: baselines have nothing to fit", shards.root)
    return fit_baselines(recent_tokens(train, cfg.max_fit_tokens), tok.vocab_size, tok.seg_id,
                         tok.pad_id, tok.n_event_tokens, cfg)


def recent_tokens(shards: list[np.ndarray], max_tokens: int) -> list[np.ndarray]:
    """Each shard's most recent tokens, in proportion to its size, `max_tokens` in all (all
    of them when they fit). A cut shard's tail starts mid-segment, as a window does."""
    total = sum(len(t) for t in shards)
    if total <= max_tokens:
        return shards
    return [t[len(t) - max(2, len(t) * max_tokens // total):] for t in shards]


def _train_symbols(shards: Any) -> set[str]:
    return {s for s in shards.symbols("train") if shards.n_tokens("train", s) > 0}


def run_backtest(
    run_dir: str | Path, data_dir: str | Path, split: str = "backtest",
    max_tokens: int | None = None, cfg: BacktestConfig = BacktestConfig(),
    out: str | Path | None = None, log: Callable[[str], None] | None = None,
    write: bool = True,
) -> dict:
    """Score the run's model and the baselines on `split`; write and return the report.

    ``max_tokens`` keeps the first N tokens of each symbol's shard (a quick look; the
    full split is the honest number). The JSON goes to ``out`` (default RUN/backtest.json).
    """

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
    per_scorer: dict[str, list[ScoreSums]] = {name: [] for name in scorers}
    elapsed = {name: 0.0 for name in scorers}
    n_tokens = {}
    for shard_id, symbol in enumerate(symbols):
        tokens = checked_tokens(shards, split, symbol, max_tokens)
        n_tokens[symbol] = len(tokens)
        streams = {"model": iter_model_scores(model, tokens, spec, block_size=block_size,
                                              batch_size=cfg.batch_size, device=device,
                                              stride=cfg.stride or None)}
        streams.update({name: iter_baseline_scores(baseline, tokens, spec, cfg.chunk_size)
                        for name, baseline in baselines.items()})
        for name, stream in streams.items():
            t0 = time.perf_counter()
            sums = ScoreSums(spec.field_names, spec.vocab_size, cfg.summary.n_bins,
                             cfg.summary.bootstrap_block)
            for part in stream:  # one batch at a time: nothing per position is kept
                sums.add(part, shard_id)
            per_scorer[name].append(sums)
            elapsed[name] += time.perf_counter() - t0
        log(f"{symbol}: {per_scorer['model'][-1].n} positions scored")

    doc = _report(per_scorer, symbols, _train_symbols(trained_on), cfg.summary)
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
            baseline_fit_tokens=sum(len(t) for t in recent_tokens(
                [trained_on.tokens("train", s) for s in trained_on.symbols("train")],
                cfg.baselines.max_fit_tokens)),
            tokenizer_reused=shards.tokenizer_reused, trained_on_manifest=trained_on.manifest_hash,
        ),
    })
    for symbol in symbols:
        doc["per_symbol"][symbol]["n_tokens"] = n_tokens[symbol]
    if write:  # the notebook API scores without touching the run's backtest.json
        write_json_atomic(Path(out) if out else run_dir / "backtest.json", doc)
    return doc


def checked_tokens(shards: Any, split: str, symbol: str, max_tokens: int | None) -> np.ndarray:
    """The shard's tokens (memory-mapped, first `max_tokens` only when given), checked against
    the vocabulary a million at a time so no int64 copy of the whole shard is made."""
    tokens = shards.tokens(split, symbol)[:max_tokens]
    for lo in range(0, len(tokens), 1 << 20):
        shards.tokenizer.check_tokens(tokens[lo:lo + (1 << 20)])
    return tokens


def _report(per_scorer: dict[str, list[ScoreSums]], symbols: list[str],
            train_symbols: set[str], summary: SummaryConfig) -> dict:
    overall = {name: parts[0].merged(parts[1:]) for name, parts in per_scorer.items()}
    if overall["model"].n == 0:
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
            **overall["model"].label_stats()}


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

    sums = ScoreSums(spec.field_names, spec.vocab_size, cfg.summary.n_bins,
                     cfg.summary.bootstrap_block)
    for shard_id, symbol in enumerate(symbols):  # streamed, as the main scoring pass
        tokens = checked_tokens(shards, split, symbol, max_tokens)
        for part in iter_model_scores(scaled, tokens, spec, block_size=block_size,
                                      batch_size=cfg.batch_size, device=device,
                                      stride=cfg.stride or None):
            sums.add(part, shard_id)
    summary = sums.summary(cfg.summary.bootstrap_samples, cfg.summary.seed,
                           cfg.summary.max_log_perplexity)
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


def _section(scores: dict[str, ScoreSums], summary: SummaryConfig) -> dict:
    def summarize(sums: ScoreSums) -> dict:
        return sums.summary(summary.bootstrap_samples, summary.seed, summary.max_log_perplexity)

    model = scores["model"]
    out_model = summarize(model)
    if model.n:
        out_model["vs_baselines"] = {
            name: model.paired(s, summary.bootstrap_samples, summary.seed)
            for name, s in scores.items() if name != "model"}
    return {
        "n_scored": model.n,
        "model": out_model,
        "baselines": {name: summarize(s) for name, s in scores.items() if name != "model"},
    }


def _describe(baseline: Baseline) -> dict:
    info: dict[str, Any] = {"context_len": baseline.context_len}
    if hasattr(baseline, "eps"):
        info["eps"] = baseline.eps
    if hasattr(baseline, "summary"):
        info["orders"] = baseline.summary()
    return info
