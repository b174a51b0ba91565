"""Ablations: a grid over model size x data subset x context x training budget (one
pipeline per cell), and over sampling settings (on each cell's trained model).

The questions it answers on your data: does a bigger model help on the same data, are
more symbols harder, what do a longer context and longer training (with early stopping
on validation) buy, does longer training improve likelihood but not realism, and which
sampling makes the flow realistic? Every cell is a full pipeline run (`pipeline.py`)
under ``out_dir/<cell>``, sharing one prepared data directory per (symbol subset,
context); each sampling variant then generates from the cell's model and scores its
stylized facts into ``<cell>/sampling-<name>/facts.json`` ("measured" is the cell's own
choice, RUN/sampling.json). Every row has the backtest NLL with its CI and the realism
score (facts within 1.5x the noise floor, better than compound Hawkes, geometric-mean gap
/ noise floor with its CI). Every row is also logged as one run of an MLflow experiment in
``out_dir/mlruns.db``. Results go to ``ablation.json``, ``ablation.csv`` and a Plotly
chart ``ablation.html``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import polars as pl
from rich.console import Console

from mega_trading.core.config import (
    NonNegativeInt,
    PositiveInt,
    apply_overrides,
    config_dataclass,
    from_dict,
    load_config,
    to_dict,
)
from mega_trading.core.errors import ConfigError
from mega_trading.core.lineage import provenance, read_json, write_json_atomic, write_text_atomic
from mega_trading.data.shards import ShardSet
from mega_trading.eval.scorecard import run_facts
from mega_trading.generation.generate import generate_rollouts, rollout_lineage
from mega_trading.generation.rollouts import write_rollouts
from mega_trading.generation.sampling import SamplingConfig, resolve_sampling
from mega_trading.model.checkpoint import load_model
from mega_trading.pipeline import RunConfig, load_run_config, run_pipeline


@config_dataclass
class AblationConfig:
    base_config: str = "configs/demo.yaml"  # the RunConfig every cell starts from
    out_dir: str = "runs/ablation"
    models: tuple[str, ...] = ("micro",)  # "preset" or "preset:key=value,key=value"
    symbol_sets: tuple[str, ...] = ("BTCUSDT,ETHUSDT",)  # comma-separated symbols, or "all"
    steps: tuple[PositiveInt, ...] = (200,)
    contexts: tuple[PositiveInt, ...] = ()  # block sizes (prepare + train); empty: the base config's
    early_stop_patience: NonNegativeInt = 0  # > 0: every cell stops early on validation (train.py)
    # sampling variants per cell: "measured" (the cell's RUN/sampling.json) or settings such
    # as "temperature=1", "top_k=16", "temperature=0.9,min_p=0.05"; empty: measured only
    samplings: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()  # dotted overrides applied to every cell
    tracking: Literal["mlflow", "none"] = "mlflow"


def parse_model(spec: str) -> tuple[str, dict[str, Any]]:
    """'micro:n_layer=2,d_model=64' -> ('micro', {'n_layer': 2, 'd_model': 64})."""
    import yaml

    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"model spec '{spec}': '{item}' is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name.strip(), overrides


def cell_name(model: str, symbols: str, steps: int, context: int | None = None) -> str:
    safe = model.replace(":", "-").replace(",", "-").replace("=", "")
    ctx = f"__ctx{context}" if context else ""
    return f"{safe}__{symbols.replace(',', '+')}{ctx}__{steps}steps"


def parse_sampling(spec: str):
    """'measured' -> None; 'temperature=0.9,min_p=0.05' -> SamplingConfig(...)."""

    if spec.strip() == "measured":
        return None
    _, overrides = parse_model(f"x:{spec}")
    return from_dict(SamplingConfig, overrides)


def cell_config(base: RunConfig, cfg: AblationConfig, model: str, symbols: str, steps: int,
                context: int | None = None) -> RunConfig:

    preset, model_overrides = parse_model(model)
    out = Path(cfg.out_dir)
    data = to_dict(base)
    data["run_dir"] = str(out / cell_name(model, symbols, steps, context))
    ctx = f"-ctx{context}" if context else ""
    data["data_dir"] = str(out / f"data-{symbols.replace(',', '+')}{ctx}")
    # "all": every symbol of the inputs (the base config's own choice)
    data["prepare"]["symbols"] = ([] if symbols == "all" else
                                  [s.strip() for s in symbols.split(",") if s.strip()])
    data["train"].update(preset=preset, model=model_overrides, steps=steps)
    if context:
        data["prepare"].update(block_size=context, stride=context // 2)
        data["train"]["block_size"] = context
    if cfg.early_stop_patience:
        data["train"]["early_stop_patience"] = cfg.early_stop_patience
    data["simulate"]["enabled"] = False
    return apply_overrides(from_dict(RunConfig, data), cfg.overrides)


def sampling_variant(run_cfg: RunConfig, name: str, console: Console) -> Path:
    """Generate from the cell's model with one sampling spec and score its facts; returns
    the facts.json (the cell's own for "measured")."""
    import dataclasses


    run = Path(run_cfg.run_dir)
    explicit = parse_sampling(name)
    if explicit is None and run_cfg.generate.sampling is None:
        return run / "facts.json"
    out = run / f"sampling-{name.replace(',', '+').replace('=', '')}"
    if (out / "facts.json").is_file():
        return out / "facts.json"
    out.mkdir(parents=True, exist_ok=True)
    shards = ShardSet.open(run_cfg.data_path)
    model, state = load_model(run, expect_tokenizer_hash=shards.tokenizer_hash,
                              expect_manifest_hash=shards.model_manifest_hash)
    sampling, info = resolve_sampling(explicit, run)
    gen_cfg = dataclasses.replace(run_cfg.generate, sampling=explicit)
    console.print(f"sampling variant {info['label']} ({info['source']})")
    events, prompts = generate_rollouts(model, shards, gen_cfg, sampling=sampling)
    write_rollouts(events, out / "rollouts.parquet",
                   rollout_lineage(gen_cfg, shards, prompts, run=str(run), step=state.get("step"),
                                   sampling=info))
    run_facts(run_cfg.data_path, out / "rollouts.parquet", out / "facts.json", run_cfg.facts,
              run_cfg.generate.seed, gen_cfg=gen_cfg)
    return out / "facts.json"


def _cell_result(run_cfg: RunConfig, model: str, symbols: str, steps: int,
                 context: int | None = None, facts_path: Path | None = None,
                 sampling: str = "measured") -> dict[str, Any]:
    run = Path(run_cfg.run_dir)
    backtest = read_json(run / "backtest.json")
    facts = read_json(facts_path or run / "facts.json")
    train_summary = read_json(run / "config.json") if (run / "config.json").is_file() else {}
    baselines = backtest["baselines"]
    best_name = min(baselines, key=lambda b: baselines[b]["nll_nats"])
    ks = facts["distances"]

    def mean_ks(role_getter) -> float | None:
        values = [role_getter(d) for d in ks.values()]
        values = [v["ks"]["value"] for v in values if v]
        return sum(values) / len(values) if values else None

    realism = facts.get("realism", {}).get("sources", {})
    model_realism, hawkes = realism.get("model", {}), realism.get("compound_hawkes", {})
    summary = read_json(run / "train_summary.json") if (run / "train_summary.json").is_file() else {}
    early = summary.get("early_stop") or {}
    return {
        "cell": run.name, "model": model, "symbols": symbols, "steps": steps,
        "context": context or run_cfg.train.block_size,
        "trained_steps": early.get("stopped_at") or steps,
        "best_step": (early.get("best") or {}).get("step"),
        "sampling": sampling, "sampling_label": (facts.get("sampling") or {}).get("label"),
        "within": model_realism.get("within"), "n_facts": model_realism.get("n_facts"),
        "beat_hawkes": model_realism.get("beat_reference"),
        "geo": model_realism.get("geo_mean_ratio"), "geo_ci95": model_realism.get("geo_ci95"),
        "hawkes_geo": hawkes.get("geo_mean_ratio"),
        "n_params": train_summary.get("derived", {}).get("n_params"),
        "model_nll": backtest["model"]["nll_nats"],
        "model_nll_ci95": backtest["model"].get("nll_nats_ci95"),
        "best_baseline": best_name, "best_baseline_nll": baselines[best_name]["nll_nats"],
        "markov3_nll": baselines["markov3"]["nll_nats"],
        "model_top1": backtest["model"]["top1"],
        "realism_mean_ks_model": mean_ks(lambda d: d.get("model")),
        "realism_mean_ks_noise_floor": mean_ks(lambda d: d.get("noise_floor")),
        "sign_acf_gap_model": facts["fact_gaps"]["sign_acf"]["model"],
        "sign_acf_gap_noise_floor": facts["fact_gaps"]["sign_acf"]["noise_floor"],
    }


def _track(cfg: AblationConfig, rows: list[dict[str, Any]]) -> None:
    if cfg.tracking == "none":
        return
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{(Path(cfg.out_dir) / 'mlruns.db').resolve()}")
    mlflow.set_experiment("ablation")
    for row in rows:
        with mlflow.start_run(run_name=f"{row['cell']}|{row['sampling']}"):
            mlflow.log_params({k: row[k] for k in ("model", "symbols", "steps", "context", "sampling")})
            mlflow.log_metrics({k: float(v) for k, v in row.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "steps"})


def _chart(rows: list[dict[str, Any]], path: Path) -> None:
    """NLL per cell and realism (geo-mean gap / noise floor) per cell x sampling, with CIs."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "backtest NLL (nats/event), 95% CI", "realism: geo-mean gap / noise floor, 95% CI"))
    cells = {r["cell"]: r for r in rows}

    def err(value, pair):
        if value is None or not pair or pair[0] is None:
            return None, None
        return pair[1] - value, value - pair[0]

    nll_plus, nll_minus = zip(*(err(r["model_nll"], r.get("model_nll_ci95")) for r in cells.values()))
    fig.add_trace(go.Scatter(x=list(cells), y=[r["model_nll"] for r in cells.values()], mode="markers",
                             name="model NLL", error_y={"type": "data", "array": list(nll_plus),
                                                        "arrayminus": list(nll_minus)}), row=1, col=1)
    for row in rows[:1]:
        fig.add_hline(y=row["markov3_nll"], line_dash="dot", annotation_text="markov3 baseline", row=1, col=1)
    for sampling in dict.fromkeys(r["sampling"] for r in rows):
        part = [r for r in rows if r["sampling"] == sampling]
        plus, minus = zip(*(err(r["geo"], r.get("geo_ci95")) for r in part))
        fig.add_trace(go.Scatter(x=[r["cell"] for r in part], y=[r["geo"] for r in part],
                                 mode="markers", name=f"sampling {sampling}",
                                 text=[r.get("sampling_label") for r in part],
                                 error_y={"type": "data", "array": list(plus), "arrayminus": list(minus)}),
                      row=1, col=2)
    fig.add_trace(go.Scatter(x=list(cells), y=[r.get("hawkes_geo") for r in cells.values()],
                             mode="markers", marker_symbol="x", name="compound Hawkes"), row=1, col=2)
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="noise floor", row=1, col=2)
    fig.update_yaxes(title_text="nats/event", row=1, col=1)
    fig.update_yaxes(title_text="lower = more realistic", row=1, col=2)
    fig.update_layout(title="Mega-Trading ablation", height=520)
    write_text_atomic(path, fig.to_html(include_plotlyjs=True, full_html=True))


def run_ablation(cfg: AblationConfig, force: bool = False, console: Console | None = None) -> list[dict]:
    console = console or Console(stderr=True)
    base = load_run_config(cfg.base_config)
    rows = []
    contexts = cfg.contexts or (None,)
    grid = list(itertools.product(cfg.models, cfg.symbol_sets, contexts, cfg.steps))
    for i, (model, symbols, context, steps) in enumerate(grid, 1):
        ctx = f" | context {context}" if context else ""
        console.rule(f"[bold]ablation cell {i}/{len(grid)}: {model} | {symbols}{ctx} | {steps} steps")
        run_cfg = cell_config(base, cfg, model, symbols, steps, context)
        run_pipeline(run_cfg, force=force, console=console)
        for name in cfg.samplings or ("measured",):
            facts_path = sampling_variant(run_cfg, name, console)
            rows.append(_cell_result(run_cfg, model, symbols, steps, context, facts_path, name))
    out = Path(cfg.out_dir)
    write_json_atomic(out / "ablation.json", {"config": to_dict(cfg), "cells": rows,
                                              "provenance": provenance(stage="ablate")})
    flat = [{k: (str(v) if isinstance(v, list) else v) for k, v in row.items()} for row in rows]
    pl.DataFrame(flat).write_csv(out / "ablation.csv")
    _chart(rows, out / "ablation.html")
    _track(cfg, rows)
    return rows


def load_ablation_config(path: str | Path, overrides=()) -> AblationConfig:
    return load_config(AblationConfig, path, overrides)
