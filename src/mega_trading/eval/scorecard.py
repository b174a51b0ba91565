"""The facts.json scorecard (facts, distances and gaps of every source beside the real
noise floor, and the realism block), its summary table, and the facts stage that builds
it from real splits, model rollouts and baseline generators."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mega_trading.core.config import (
    from_dict,
    to_dict,
)
from mega_trading.core.errors import DataError
from mega_trading.core.lineage import provenance, read_json, write_json_atomic
from mega_trading.data.shards import ShardSet
from mega_trading.eval.backtest import fit_train_baselines
from mega_trading.eval.distances import distances
from mega_trading.eval.facts import CURVE_GAPS, SCALAR_GAPS, compute_facts, fact_gaps, json_ready
from mega_trading.eval.hawkes import CompoundHawkes
from mega_trading.eval.realism import realism_block
from mega_trading.eval.statistics import DISTRIBUTIONS, FactsConfig
from mega_trading.generation.generate import GenerateConfig, make_prompts
from mega_trading.generation.rollouts import read_rollouts, rollouts_to_events

SCHEMA = "mega_trading.facts/v1"


# --- scorecard ------------------------------------------------------------------------------

def scorecard(
    real_backtest: pl.DataFrame,
    real_train: pl.DataFrame,
    model_rollouts: pl.DataFrame | None = None,
    baselines: Mapping[str, pl.DataFrame] | None = None,
    cfg: FactsConfig = FactsConfig(),
    seed: int = 0,
) -> dict[str, Any]:
    """Facts of every source, distances to the real backtest, and the noise floor beside them."""
    baselines = dict(baselines or {})
    generated: dict[str, pl.DataFrame | None] = {"noise_floor": real_train, "model": model_rollouts}
    facts: dict[str, Any] = {"real": compute_facts(real_backtest, cfg)}
    for role, frame in generated.items():
        facts[role] = compute_facts(frame, cfg) if frame is not None else None
    facts["baselines"] = {name: compute_facts(frame, cfg) for name, frame in baselines.items()}

    rng = np.random.default_rng(seed)
    by_role: dict[str, Any] = {
        role: distances(frame, real_backtest, cfg, rng) if frame is not None else None
        for role, frame in generated.items()
    }
    by_baseline = {name: distances(frame, real_backtest, cfg, rng) for name, frame in baselines.items()}
    dist_section = {
        name: {**{role: (d[name] if d else None) for role, d in by_role.items()},
               "baselines": {b: d[name] for b, d in by_baseline.items()}}
        for name in DISTRIBUTIONS
    }

    gaps_by_source = {role: fact_gaps(facts[role], facts["real"]) if facts[role] else None
                      for role in generated}
    gaps_by_baseline = {b: fact_gaps(f, facts["real"]) for b, f in facts["baselines"].items()}
    gap_section = {
        name: {**{role: (g[name] if g else None) for role, g in gaps_by_source.items()},
               "baselines": {b: g[name] for b, g in gaps_by_baseline.items()}}
        for name in (*CURVE_GAPS, *SCALAR_GAPS)
    }

    realism = realism_block(json_ready(gap_section), {"model": model_rollouts, **baselines},
                            facts["real"], cfg, cfg.realism_boot, cfg.realism_block_events, seed)
    return json_ready({"schema": SCHEMA, "config": to_dict(cfg), "seed": seed,
                        "facts": facts, "distances": dist_section, "fact_gaps": gap_section,
                        "realism": realism})


def write_scorecard(path: str | Path, card: Mapping[str, Any], **lineage: Any) -> None:
    """Write ``facts.json`` atomically with a provenance block (``lineage`` adds run ids etc.)."""
    write_json_atomic(path, {**card, "provenance": provenance(**lineage)})


# --- summary table --------------------------------------------------------------------------

_SUMMARY_FACTS = (
    ("events", ("n_events",)),
    ("return excess kurtosis", ("returns", "excess_kurtosis")),
    ("Hill tail index |r|", ("tail", "hill_index")),
    ("return acf lag 1", ("return_acf", 0)),
    ("|r| acf lag 1", ("abs_return_acf", 0)),
    ("|r| acf lag 10", ("abs_return_acf", 9)),
    ("kurtosis, 64-event sums", ("aggregation", "event", "64", "excess_kurtosis")),
    ("sign acf lag 1", ("sign", "acf", 0)),
    ("sign acf power-law gamma", ("sign", "powerlaw", "gamma")),
    ("share of zero gaps", ("inter_arrival", "share_zero")),
    ("dt coefficient of variation", ("inter_arrival", "cv")),
    ("log size std", ("size", "std")),
    ("response R(1) bps", ("response", 0)),
    ("response R(max lag) bps", ("response", -1)),
)


def lookup(node: Any, path: tuple[Any, ...]) -> Any:
    """node[p0][p1]... or None where any step is missing."""
    for part in path:
        if node is None:
            return None
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _fmt_distance(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "—"
    return f"{_fmt(d['value'])} [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]"


def summary_table(card: Mapping[str, Any]) -> list[dict[str, str]]:
    """Rows {"metric", "real", "noise_floor", "model", <baseline>...} of formatted strings."""
    facts = card["facts"]
    baselines = list(facts["baselines"])
    sources = {"real": facts["real"], "noise_floor": facts["noise_floor"], "model": facts["model"],
               **{b: facts["baselines"][b] for b in baselines}}
    rows = []
    for label, path in _SUMMARY_FACTS:
        rows.append({"metric": label, **{s: _fmt(lookup(f, path)) for s, f in sources.items()}})
    rows.append({"metric": "valid", **{s: _fmt(f["valid"]) if f else "—" for s, f in sources.items()}})
    for name, section in card["distances"].items():
        for stat in ("ks", "wasserstein"):
            row = {"metric": f"{stat} {name}", "real": "—"}
            row["noise_floor"] = _fmt_distance(lookup(section, ("noise_floor", stat)))
            row["model"] = _fmt_distance(lookup(section, ("model", stat)))
            for b in baselines:
                row[b] = _fmt_distance(lookup(section, ("baselines", b, stat)))
            rows.append(row)
    return rows



# --- the facts stage: real vs rollouts vs baseline generators --------------------------------

def tokenized_real(tokenizer: Any, events: pl.DataFrame) -> pl.DataFrame:
    """Real events passed through the tokenizer and decoded back (the quantization floor).

    Model rollouts are decoded tokens, so part of their distance from real flow is just the
    bins; this source shows how much, so the model is not blamed for the tokenizer. Each
    (symbol, segment) is decoded as its own stream, in order, like a rollout is.
    """
    keys = [c for c in ("symbol", "segment") if c in events.columns]
    streams = (events.select(pl.struct(keys).rank("dense")).to_series().to_numpy()
               if keys else None)
    decoded = tokenizer.decode(tokenizer.encode(events), streams=streams)
    return events.select("symbol", "time_us", "segment", "segment_start").hstack(
        decoded.select("side", "move_bps", "log_size", "dt_us"))


def baseline_rollouts(shards: Any, gen_cfg: Any, n_events: int, seed: int,
                      trained: Any = None, train_events: pl.DataFrame | None = None,
                      ) -> dict[str, pl.DataFrame]:
    """Markov-3 continuations of the model's own prompts, and a compound Hawkes process,
    both fitted on the train split of ``trained`` (default: ``shards`` itself); Hawkes on
    `train_events` when given (the bounded sample of that split)."""
    trained = trained or shards

    markov = fit_train_baselines(trained)["markov3"]
    prompts, info = make_prompts(shards, gen_cfg, np.random.default_rng(gen_cfg.seed))
    tokens = markov.generate_batch(prompts.numpy(), gen_cfg.length, np.random.default_rng(seed))
    markov_events = rollouts_to_events(
        tokens[:, prompts.shape[1]:], shards.tokenizer, info["last_price"].to_numpy(),
        info["last_time_us"].to_numpy(), info["symbol"].to_list(), info["size_level"].to_numpy(),
        context_tokens=prompts.numpy())
    hawkes = CompoundHawkes.fit(train_events if train_events is not None
                                else trained.all_events("train"))
    hawkes_events = hawkes.sample(n_events, np.random.default_rng(seed + 1))
    return {"markov3": markov_events, "compound_hawkes": hawkes_events}


def run_facts(data_dir: str | Path, rollouts_path: str | Path | None, out: str | Path,
              cfg: FactsConfig = FactsConfig(on_degenerate="flag"), seed: int = 0,
              gen_cfg: Any = None) -> dict[str, Any]:
    """facts.json: real backtest vs real train (noise floor) vs model rollouts vs baselines."""

    shards = ShardSet.open(data_dir)
    model_events, lineage = (None, {})
    if rollouts_path is not None:
        model_events, lineage = read_rollouts(rollouts_path)
        if lineage.get("tokenizer_hash") not in (None, shards.tokenizer_hash):
            raise DataError("rollouts were made with another tokenizer than this data's", rollouts_path)
    if gen_cfg is None:

        gen_cfg = from_dict(GenerateConfig, lineage["config"]) if "config" in lineage else GenerateConfig()
    n_events = int(model_events["is_event"].sum()) if model_events is not None else gen_cfg.n * gen_cfg.length
    # Data encoded with a reused tokenizer has no train split of its own: the baselines and
    # the noise floor come from the data the run was trained on.
    run_config = Path(lineage.get("run") or "/nonexistent") / "config.json"
    trained = shards.training_data(read_json(run_config) if run_config.is_file() else None)
    window = cfg.real_window_events or gen_cfg.length
    real, real_sample = shards.sample_events("backtest", cfg.max_real_events, window, seed)
    floor, floor_sample = trained.sample_events("train", cfg.max_real_events, window, seed + 1)
    baselines = baseline_rollouts(shards, gen_cfg, n_events, seed, trained, floor)
    baselines["tokenized_real"] = tokenized_real(shards.tokenizer, real)
    card = scorecard(real, floor, model_events, baselines, cfg, seed)
    card["real_sample"] = {"real": real_sample, "noise_floor": floor_sample}
    card["sampling"] = lineage.get("sampling")  # which sampling produced the model rollouts
    write_scorecard(out, card, stage="facts", tokenizer_hash=shards.tokenizer_hash,
                    manifest_hash=shards.manifest_hash,
                    rollouts=str(rollouts_path) if rollouts_path else None,
                    rollouts_lineage={k: lineage.get(k) for k in ("run", "step", "seed", "sampling")
                                      if k in lineage})
    return card
