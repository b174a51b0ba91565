"""Ablations: a grid over model size x data subset x training budget, one pipeline per cell.

The questions it answers on your data: does a bigger model help on the same data, are
more symbols harder, does longer training improve likelihood but not realism? Every cell
is a full pipeline run (`pipeline.py`) under ``out_dir/<cell>``, sharing one prepared data
directory per symbol subset; every cell is also logged as one run of an MLflow experiment
in ``out_dir/mlruns.db``. Results go to ``ablation.json``, ``ablation.csv`` and a Plotly
chart ``ablation.html``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import polars as pl
from rich.console import Console

from mega_trading.config import (
    PositiveInt,
    apply_overrides,
    config_dataclass,
    from_dict,
    load_config,
    to_dict,
)
from mega_trading.errors import ConfigError
from mega_trading.lineage import provenance, read_json, write_json_atomic, write_text_atomic
from mega_trading.pipeline import RunConfig, load_run_config, run_pipeline


@config_dataclass
class AblationConfig:
    base_config: str = "configs/demo.yaml"  # the RunConfig every cell starts from
    out_dir: str = "runs/ablation"
    models: tuple[str, ...] = ("micro",)  # "preset" or "preset:key=value,key=value"
    symbol_sets: tuple[str, ...] = ("BTCUSDT,ETHUSDT",)  # comma-separated symbols per subset
    steps: tuple[PositiveInt, ...] = (200,)
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


def cell_name(model: str, symbols: str, steps: int) -> str:
    safe = model.replace(":", "-").replace(",", "-").replace("=", "")
    return f"{safe}__{symbols.replace(',', '+')}__{steps}steps"


def cell_config(base: RunConfig, cfg: AblationConfig, model: str, symbols: str, steps: int) -> RunConfig:
    preset, model_overrides = parse_model(model)
    out = Path(cfg.out_dir)
    data = to_dict(base)
    data["run_dir"] = str(out / cell_name(model, symbols, steps))
    data["data_dir"] = str(out / f"data-{symbols.replace(',', '+')}")
    data["prepare"]["symbols"] = [s.strip() for s in symbols.split(",") if s.strip()]
    data["train"].update(preset=preset, model=model_overrides, steps=steps)
    data["simulate"]["enabled"] = False
    return apply_overrides(from_dict(RunConfig, data), cfg.overrides)


def _cell_result(run_cfg: RunConfig, model: str, symbols: str, steps: int) -> dict[str, Any]:
    run = Path(run_cfg.run_dir)
    backtest = read_json(run / "backtest.json")
    facts = read_json(run / "facts.json")
    train_summary = read_json(run / "config.json") if (run / "config.json").is_file() else {}
    baselines = backtest["baselines"]
    best_name = min(baselines, key=lambda b: baselines[b]["nll_nats"])
    ks = facts["distances"]

    def mean_ks(role_getter) -> float | None:
        values = [role_getter(d) for d in ks.values()]
        values = [v["ks"]["value"] for v in values if v]
        return sum(values) / len(values) if values else None

    return {
        "cell": run.name, "model": model, "symbols": symbols, "steps": steps,
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
        with mlflow.start_run(run_name=row["cell"]):
            mlflow.log_params({k: row[k] for k in ("model", "symbols", "steps")})
            mlflow.log_metrics({k: float(v) for k, v in row.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "steps"})


def _chart(rows: list[dict[str, Any]], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "backtest NLL (nats/event) vs training steps", "realism (mean KS to real) vs NLL"))
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["symbols"]), []).append(row)
    for (model, symbols), cells in groups.items():
        cells.sort(key=lambda r: r["steps"])
        label = f"{model} | {symbols}"
        fig.add_trace(go.Scatter(x=[c["steps"] for c in cells], y=[c["model_nll"] for c in cells],
                                 mode="lines+markers", name=label), row=1, col=1)
        fig.add_trace(go.Scatter(x=[c["model_nll"] for c in cells], y=[c["realism_mean_ks_model"] for c in cells],
                                 mode="markers", name=label, showlegend=False,
                                 text=[f"{c['steps']} steps" for c in cells]), row=1, col=2)
    for row in rows[:1]:
        fig.add_hline(y=row["markov3_nll"], line_dash="dot", annotation_text="markov3 baseline", row=1, col=1)
    fig.update_xaxes(title_text="steps", row=1, col=1)
    fig.update_xaxes(title_text="NLL", row=1, col=2)
    fig.update_yaxes(title_text="nats/event", row=1, col=1)
    fig.update_yaxes(title_text="mean KS (lower = more realistic)", row=1, col=2)
    fig.update_layout(title="Mega-Trading ablation", height=480)
    write_text_atomic(path, fig.to_html(include_plotlyjs=True, full_html=True))


def run_ablation(cfg: AblationConfig, force: bool = False, console: Console | None = None) -> list[dict]:
    console = console or Console(stderr=True)
    base = load_run_config(cfg.base_config)
    rows = []
    grid = list(itertools.product(cfg.models, cfg.symbol_sets, cfg.steps))
    for i, (model, symbols, steps) in enumerate(grid, 1):
        console.rule(f"[bold]ablation cell {i}/{len(grid)}: {model} | {symbols} | {steps} steps")
        run_cfg = cell_config(base, cfg, model, symbols, steps)
        run_pipeline(run_cfg, force=force, console=console)
        rows.append(_cell_result(run_cfg, model, symbols, steps))
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
