"""Commands on rollouts: generate, facts, report, serve and simulate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.console import Console

from mega_trading.cli.app import app, config_option, console, resolve, set_option


# --- generate -------------------------------------------------------------------------
@app.command()
def generate(
    run: Path = typer.Option(..., "--run", help="Run folder written by `train`."),
    data: Path = typer.Option(..., "--data", help="Prepared data directory (prompts, tokenizer)."),
    n: int | None = typer.Option(None, "--n", help="Number of rollouts."),
    length: int | None = typer.Option(None, "--length", help="New tokens per rollout."),
    prompt_from: str | None = typer.Option(None, "--prompt-from",
                                              help="train|validation|backtest (real windows) or seg."),
    prompt_length: int | None = typer.Option(None, "--prompt-length"),
    symbol: str | None = typer.Option(None, "--symbol", help="Only prompts of this symbol."),
    temperature: float | None = typer.Option(
        None, "--temperature", help="0 = greedy. Sampling options left out: the run's measured "
                                    "choice (RUN/sampling.json), else plain sampling."),
    top_k: int | None = typer.Option(None, "--top-k", help="0 = off."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus mass; 1 = off."),
    min_p: float | None = typer.Option(None, "--min-p", help="Keep p >= min_p * p_max; 0 = off."),
    forbid_seg: bool | None = typer.Option(None, "--forbid-seg/--allow-seg",
                                              help="Never sample segment starts."),
    seed: int | None = typer.Option(None, "--seed"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Rollouts decoded together."),
    step: int | None = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    out: Path | None = typer.Option(None, "--out",
                                       help=".parquet or .csv (default RUN/rollouts.parquet)."),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
) -> None:
    """Sample synthetic order flow from a trained model and decode it to trades."""
    from mega_trading.data.shards import ShardSet
    from mega_trading.generation.generate import generate_rollouts, rollout_lineage
    from mega_trading.generation.rollouts import write_rollouts
    from mega_trading.generation.sampling import SamplingConfig, resolve_sampling
    from mega_trading.model.checkpoint import load_model

    # Sampling left unset (no flag, no generate.sampling in the config): the run's measured
    # choice; --forbid-seg alone is not a sampling choice, it applies to either.
    cfg = resolve("generate", config, overrides, n=n, length=length, prompt_from=prompt_from,
                  prompt_length=prompt_length, symbol=symbol, seed=seed, batch_size=batch_size,
                  **{"sampling.temperature": temperature, "sampling.top_k": top_k,
                     "sampling.top_p": top_p, "sampling.min_p": min_p})
    explicit = cfg.sampling
    if explicit is not None and forbid_seg is not None:
        explicit = dataclasses.replace(explicit, forbid_seg=forbid_seg)
    sampling, sampling_info = resolve_sampling(explicit, run,
                                               SamplingConfig(forbid_seg=bool(forbid_seg)))
    shards = ShardSet.open(data)
    model, state = load_model(run, step=step, expect_tokenizer_hash=shards.tokenizer_hash,
                              expect_manifest_hash=shards.model_manifest_hash, device=device)
    events, prompts = generate_rollouts(model, shards, cfg, sampling=sampling)
    out = out or run / "rollouts.parquet"
    write_rollouts(events, out, rollout_lineage(cfg, shards, prompts, run=str(run.resolve()),
                                                step=state.get("step"), sampling=sampling_info))
    n_events = int(events["is_event"].sum())
    n_segments = int(events["segment_start"].sum())
    typer.echo(f"{cfg.n} rollouts x {cfg.length} tokens from {cfg.prompt_from} prompts "
               f"(step {state.get('step')}, sampling {sampling_info['label']} "
               f"[{sampling_info['source']}]): {n_events:,} events, {n_segments} segment starts "
               f"-> {out}")

# --- facts ------------------------------------------------------------------------------
@app.command()
def facts(
    data: Path = typer.Option(..., "--data", help="Prepared data directory."),
    out: Path = typer.Option(..., "--out", help="Scorecard JSON to write."),
    rollouts: Path | None = typer.Option(None, "--rollouts", help="Model rollouts (generate's output)."),
    run: Path | None = typer.Option(None, "--run", help="Run folder; default rollouts RUN/rollouts.parquet."),
    seed: int = typer.Option(0, "--seed"),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
) -> None:
    """Stylized facts: real backtest vs real train (noise floor) vs model rollouts vs baselines."""
    from rich.table import Table

    from mega_trading.eval.scorecard import run_facts, summary_table

    cfg = resolve("facts", config, overrides)
    if rollouts is None and run is not None and (run / "rollouts.parquet").is_file():
        rollouts = run / "rollouts.parquet"
    card = run_facts(data, rollouts, out, cfg, seed)
    rows = summary_table(card)
    table = Table(title=f"stylized facts  ->  {out}")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    Console().print(table)
    from mega_trading.eval.realism import headline

    Console().print(f"realism (model): {headline(card.get('realism'))}")



# --- report -----------------------------------------------------------------------------
@app.command()
def report(
    run: Path = typer.Option(..., "--run", help="Run folder (train, backtest, generate, facts output)."),
    data: Path | None = typer.Option(None, "--data", help="Prepared data directory (default: the one in RUN/config.json)."),
    out: Path | None = typer.Option(None, "--out", help="HTML file to write (default RUN/report.html)."),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
) -> None:
    """Render the run's artifacts as one self-contained, offline HTML report."""
    from mega_trading.report import build_report

    opts = resolve("report", config, overrides, data=str(data) if data else None,
                   out=str(out) if out else None)
    path = build_report(run, opts.data, opts.out, log=lambda msg: console.print(msg, highlight=False))
    size_mb = path.stat().st_size / 1e6
    typer.echo(f"wrote {path} ({size_mb:.1f} MB); open it in a browser (works offline)")


# --- serve ------------------------------------------------------------------------------
@app.command()
def serve(
    run: Path = typer.Option(..., "--run", help="Run folder written by `train`."),
    data: Path | None = typer.Option(None, "--data", help="Prepared data (named windows); "
                                        "default: the run's own, if it still matches."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    step: int | None = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default cpu)."),
    config: Path | None = config_option(),
    overrides: list[str] = typer.Option([], "--set", help="ServeSettings overrides, e.g. "
                                        "batch_window_ms=10 max_batch_requests=1 batch_rows=8."),
) -> None:
    """Serve rollouts over HTTP: POST /v1/rollouts, GET /v1/model, GET /healthz."""
    from mega_trading.serve.app import create_app, serve_forever

    settings = resolve("serve", config, overrides, step=step, device=device)
    application = create_app(run, data, settings)
    service = application.state.service
    console.print(f"serving {run} (step {service.state.get('step')}, "
                  f"{service.model.cfg.n_params():,} parameters, data "
                  f"{service.shards.root if service.shards else 'none'}) on "
                  f"http://{host}:{port}  docs: /docs", highlight=False, soft_wrap=True)
    serve_forever(application, host=host, port=port)

# --- simulate ---------------------------------------------------------------------------
@app.command()
def simulate(
    data: Path = typer.Option(..., "--data", help="Prepared data directory (starts, replay)."),
    qty: float = typer.Option(..., "--qty", help="Parent order size in BASE units, e.g. 1.5 (BTC)."),
    run: Path | None = typer.Option(None, "--run", help="Run folder (needed for --source model)."),
    policy: str = typer.Option("twap", "--policy",
                               help="immediate, twap, twap_limit, participation; comma-separated to compare."),
    side: str | None = typer.Option(None, "--side", help="buy or sell (default buy)."),
    horizon: str | None = typer.Option(None, "--horizon", help="Simulated market time, e.g. 300s, 5m (default 60s)."),
    episodes: int | None = typer.Option(None, "--episodes", help="Episodes per policy (default: scenario's)."),
    open_loop: bool = typer.Option(False, "--open-loop", help="Do not insert agent fills into the model's context."),
    scenario: str | None = typer.Option(None, "--scenario", help="calm, stressed, hot or a YAML path."),
    source: str | None = typer.Option(None, "--source", help="model or replay (default: scenario's)."),
    symbol: str | None = typer.Option(None, "--symbol", help="Start only on this symbol's tape."),
    seed: int = typer.Option(0, "--seed"),
    slices: int | None = typer.Option(None, "--slices", help="TWAP slices."),
    rate: float | None = typer.Option(None, "--rate", help="Participation rate."),
    max_child: float | None = typer.Option(None, "--max-child", help="Participation child cap, fraction of qty."),
    limit_offset_bps: float | None = typer.Option(None, "--limit-offset-bps", help="twap_limit: bps inside the last price."),
    no_finish: bool = typer.Option(False, "--no-finish", help="Leave the rest unfilled at the horizon."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    step: int | None = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    out: Path | None = typer.Option(None, "--out", help="JSON path (default RUN/simulate.json)."),
    config: Path | None = config_option(),
    overrides: list[str] = typer.Option([], "--set", help="SimConfig overrides, e.g. impact.coef_bps=5."),
) -> None:
    """Execute a parent order in a simulated market (model-generated or replayed flow)."""
    from mega_trading.core.errors import ConfigError
    from mega_trading.eval.backtest import resolve_device
    from mega_trading.simulate import (
        PolicyConfig,
        load_scenario,
        parse_duration,
        policy_configs,
        run_simulation,
    )
    from mega_trading.simulate.config import scenario_path

    cfg = resolve("simulate", config, overrides, base=load_scenario(scenario) if scenario else None,
                  source=source, episodes=episodes, symbol=symbol,
                  closed_loop=False if open_loop else None)
    given = {"side": side, "horizon_s": parse_duration(horizon) if horizon is not None else None,
             "slices": slices, "rate": rate, "max_child_fraction": max_child,
             "limit_offset_bps": limit_offset_bps, "finish": False if no_finish else None}
    if max_child is not None:  # the child floor must stay below a lowered cap
        given["min_child_fraction"] = min(PolicyConfig.min_child_fraction, max_child)
    policies = policy_configs(policy, qty=qty,
                              **{k: v for k, v in given.items() if v is not None})
    if out is None and run is None:
        raise ConfigError("give --out (or --run, to write RUN/simulate.json)")
    path = out or run / "simulate.json"
    doc = run_simulation(data, policies, cfg, seed=seed, run_dir=run, device=resolve_device(device),
                         step=step, out=path, scenario_file=scenario_path(scenario) if scenario else None,
                         log=lambda msg: console.print(msg, highlight=False))
    _print_simulation(doc, path)


def _print_simulation(doc: dict, path: Path) -> None:
    from rich.table import Table

    def stat(s: dict, fmt: str) -> str:
        if s["mean"] is None:
            return "-"
        lo, hi = s["ci95"]
        return f"{s['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"

    loop = "closed loop" if doc["closed_loop"] else "open loop"
    table = Table(title=f"{doc['scenario']}: {doc['source']} source, {loop}, "
                        f"{doc['episodes']} episodes, seed {doc['seed']}  (mean [95% CI])")
    for column in ("policy", "shortfall bps", "fill ratio", "time to fill s", "fills",
                   "impact after bps", "truncated"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for name in doc["policy_order"]:
        s = doc["policies"][name]["summary"]
        table.add_row(name, stat(s["shortfall_bps"], ".2f"), stat(s["fill_ratio"], ".3f"),
                      stat(s["time_to_complete_s"], ".1f"), stat(s["n_fills"], ".1f"),
                      stat(s["final_impact_bps"], ".2f"), str(s["truncated"]))
    Console().print(table)
    Console().print(f"wrote {path}")


