"""The ``sampling`` stage: choose the sampling defaults by a realism score on VALIDATION data.

No sampling setting is right for every model: truncation makes an overfit model too
persistent, full sampling of an under-trained one turns its low-probability noise into
flow. So the run measures. A small grid (temperature in {1, the calibrated T} x
truncation in {none, top-k, top-p, min-p} x tick support off / on) is tried; each cell generates rollouts from
real VALIDATION prompts (the same prompts and seeds in every cell: common random numbers),
their stylized facts are compared with the validation events, and the noise floor is the
gap of the real TRAINING events to the same validation events (``realism.py``). The cell
with the lowest geometric-mean gap / noise floor wins (ties: more facts within 1.5x the
floor), except that a truncated cell must beat the best untruncated one by more than
``plain_margin`` (15 %): the scores are noisy, and the best of 8 noisy cells is partly luck
(on the demo, a truncated cell that won on validation by luck was twice as far from the
real backtest as plain sampling). Tick support is not a truncation by probability (it
removes only tokens a market of the row's tick class never made in training), so the
untruncated cells with and without it compete on their scores alone. The backtest split is never looked at: it stays an
honest test of the choice.

``RUN/sampling.json`` (``sampling.SAMPLING_FORMAT``) records the choice, its score and the
whole grid; generate, facts, simulate and serve use it unless sampling is set explicitly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mega_trading.core.config import config_dataclass, to_dict
from mega_trading.core.errors import ConfigError, DataError
from mega_trading.core.lineage import provenance, read_json, write_json_atomic
from mega_trading.data.shards import ShardSet
from mega_trading.eval.calibrate import CALIBRATION_FILE
from mega_trading.eval.facts import compute_facts, fact_gaps
from mega_trading.eval.realism import score_source
from mega_trading.generation.generate import generate_rollouts
from mega_trading.generation.sampling import (
    CHOSEN_FIELDS,
    SAMPLING_FILE,
    SAMPLING_FORMAT,
    SamplingConfig,
)
from mega_trading.model.checkpoint import load_model

TRUNCATIONS = ("none", "top_k", "top_p", "min_p")


@config_dataclass
class SamplingSearchConfig:
    enabled: bool = True
    split: str = "validation"  # prompts and reference events; never the backtest split
    n: int = 64  # rollouts per cell (16k events: a smaller sample's facts are mostly noise)
    length: int = 256  # new tokens per rollout
    prompt_length: int = 96
    rollouts_per_prompt: int = 1  # distinct prompts: the facts depend on the market state a lot
    seed: int = 0
    temperatures: tuple[float, ...] = (1.0,)
    fitted_temperature: bool = True  # add the calibrated T of RUN/calibration.json
    truncations: tuple[str, ...] = TRUNCATIONS
    top_k: int = 16
    top_p: float = 0.95
    min_p: float = 0.02
    # tick-consistent sampling off / on (generation/support.py): every cell of the grid both ways
    tick_support: tuple[bool, ...] = (False, True)
    # a truncated cell must beat the best untruncated one by more than this fraction of its
    # score: the scores are noisy (a winner among 8 noisy cells is partly luck), and a
    # calibrated model should not need truncation; 0 = pure argmin
    plain_margin: float = 0.15

    def __post_init__(self) -> None:
        if self.split == "backtest":
            raise ConfigError("sampling_search.split must not be backtest: never choose on the test")
        unknown = set(self.truncations) - set(TRUNCATIONS)
        if unknown or not self.truncations:
            raise ConfigError(f"sampling_search.truncations: choose from {TRUNCATIONS}, "
                              f"got {list(self.truncations)}")
        if any(not t > 0 for t in self.temperatures):
            raise ConfigError("sampling_search.temperatures must be > 0")
        if not self.tick_support:
            raise ConfigError("sampling_search.tick_support: give at least one of false, true")
        if not 0 <= self.plain_margin < 1:
            raise ConfigError("sampling_search.plain_margin must be in [0, 1)")
        if min(self.n, self.length, self.prompt_length, self.rollouts_per_prompt) < 1:
            raise ConfigError("sampling_search: n, length, prompt_length, rollouts_per_prompt >= 1")
        SamplingConfig(top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)  # bounds


def grid(cfg: SamplingSearchConfig, fitted_t: float | None) -> list[SamplingConfig]:
    temps = list(dict.fromkeys([*cfg.temperatures, *([round(fitted_t, 4)] if fitted_t else [])]))
    cells = []
    for support in dict.fromkeys(cfg.tick_support):
        for t in temps:
            for trunc in cfg.truncations:
                extra = {"none": {}, "top_k": {"top_k": cfg.top_k}, "top_p": {"top_p": cfg.top_p},
                         "min_p": {"min_p": cfg.min_p}}[trunc]
                cells.append(SamplingConfig(temperature=float(t), tick_support=support, **extra))
    return cells


def search(model, shards, trained, cfg: SamplingSearchConfig, gen_defaults: Any,
           fitted_t: float | None, facts_cfg: Any,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score every grid cell on cfg.split; the sampling.json document (without lineage)."""

    log = log or (lambda _msg: None)
    real = compute_facts(shards.all_events(cfg.split), facts_cfg)
    floor = fact_gaps(compute_facts(trained.all_events("train"), facts_cfg), real)
    gen_cfg = dataclasses.replace(
        gen_defaults, n=cfg.n, length=cfg.length, prompt_from=cfg.split,
        prompt_length=cfg.prompt_length, rollouts_per_prompt=cfg.rollouts_per_prompt,
        seed=cfg.seed, sampling=None)
    rows = []
    for cell in grid(cfg, fitted_t):
        started = time.perf_counter()
        events, _ = generate_rollouts(model, shards, gen_cfg, sampling=cell)
        try:
            gaps = fact_gaps(compute_facts(events, facts_cfg), real)
            score = score_source(gaps, floor)
        except DataError as exc:  # too few events (e.g. a SEG storm): the cell loses
            score = {"n_facts": 0, "within": 0, "geo_mean_ratio": None, "error": str(exc)}
        rows.append({"label": cell.label, "settings": {k: getattr(cell, k) for k in CHOSEN_FIELDS},
                     **{k: v for k, v in score.items() if k != "beat_reference"},
                     "seconds": time.perf_counter() - started})
        geo = score.get("geo_mean_ratio")
        log(f"sampling {cell.label}: geo-mean gap/floor "
            f"{'n/a' if geo is None else f'{geo:.3f}'}, {score['within']}/{score['n_facts']} "
            f"within 1.5x")
    scored = [r for r in rows if r["geo_mean_ratio"] is not None]
    if not scored:
        raise ConfigError("no sampling cell produced enough events to score")
    best = choose(scored, cfg.plain_margin)
    return {"format": SAMPLING_FORMAT, "split": cfg.split, "chosen": best["settings"],
            "label": best["label"], "score": best["geo_mean_ratio"], "within": best["within"],
            "n_facts": best["n_facts"], "score_name": "geo-mean fact gap / noise floor (lower is better)",
            "fitted_temperature": fitted_t, "plain_margin": cfg.plain_margin, "grid": rows}


def is_plain(row: dict[str, Any]) -> bool:
    s = row["settings"]
    return s["top_k"] == 0 and s["top_p"] >= 1 and s["min_p"] == 0


def choose(scored: list[dict[str, Any]], plain_margin: float) -> dict[str, Any]:
    """Lowest geo-mean (ties: more facts within); an untruncated cell wins unless the best
    truncated one is lower by more than ``plain_margin`` of the untruncated one's score."""
    def key(r: dict[str, Any]) -> tuple[float, int]:
        return r["geo_mean_ratio"], -r["within"]

    best = min(scored, key=key)
    plain = [r for r in scored if is_plain(r)]
    if plain and not is_plain(best):
        best_plain = min(plain, key=key)
        if best["geo_mean_ratio"] >= (1 - plain_margin) * best_plain["geo_mean_ratio"]:
            return best_plain
    return best


def run_sampling_search(run_dir: str | Path, data_dir: str | Path, cfg: SamplingSearchConfig,
                        gen_defaults: Any, facts_cfg: Any, device: str = "cpu",
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load the run's model and write RUN/sampling.json."""

    run_dir = Path(run_dir)
    shards = ShardSet.open(data_dir)
    model, state = load_model(run_dir, device=device, expect_tokenizer_hash=shards.tokenizer_hash,
                              expect_manifest_hash=shards.model_manifest_hash)
    config_path = run_dir / "config.json"
    trained = shards.training_data(read_json(config_path) if config_path.is_file() else None)
    calibration = run_dir / CALIBRATION_FILE
    fitted_t = (read_json(calibration)["temperature"]
                if cfg.fitted_temperature and calibration.is_file() else None)
    doc = search(model, shards, trained, cfg, gen_defaults, fitted_t, facts_cfg, log)
    doc["lineage"] = provenance(stage="sampling", run_dir=str(run_dir), data_dir=str(data_dir),
                                checkpoint_step=state.get("step"), config=to_dict(cfg),
                                tokenizer_hash=shards.tokenizer_hash)
    write_json_atomic(run_dir / SAMPLING_FILE, doc)
    log = log or (lambda _msg: None)
    log(f"sampling: chose {doc['label']} (geo-mean gap/floor {doc['score']:.3f} on "
        f"{cfg.split}, {doc['within']}/{doc['n_facts']} facts within 1.5x)")
    return doc
