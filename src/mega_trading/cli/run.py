"""The whole pipeline (run) and the ablation grid (ablate)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from mega_trading.cli.app import app, console, resolve, set_option


# --- run (whole pipeline) and ablate ------------------------------------------------------
@app.command("run")
def run_all(
    config: Path = typer.Option(Path("configs/demo.yaml"), "--config", help="Pipeline YAML (RunConfig)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. train.steps=200."),
    force: bool = typer.Option(False, "--force", help="Redo every stage, even up-to-date ones."),
    set_overrides: list[str] = set_option(),
) -> None:
    """The whole pipeline: prepare -> train -> backtest -> generate -> facts -> simulate -> report."""
    import time

    from mega_trading.pipeline import run_pipeline

    cfg = resolve("run", config, [*(overrides or []), *set_overrides])
    start = time.perf_counter()
    summary = run_pipeline(cfg, force=force, console=console)
    ran = ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in summary.items() if v["status"] == "ran")
    console.print(f"[bold]pipeline finished in {time.perf_counter() - start:.0f} s[/] ({ran or 'nothing to redo'})")
    console.print(f"open {Path(cfg.run_dir, 'report.html').resolve()} in a browser")


@app.command()
def ablate(
    config: Path = typer.Option(Path("configs/ablation.yaml"), "--config", help="AblationConfig YAML."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. steps=[50,100]."),
    force: bool = typer.Option(False, "--force"),
    set_overrides: list[str] = set_option(),
) -> None:
    """A grid of pipelines over model x symbol subset x context x steps (x sampling): NLL and
    realism per cell with CIs; table, chart and MLflow runs."""
    from rich.table import Table

    from mega_trading.ablation import run_ablation

    cfg = resolve("ablate", config, [*(overrides or []), *set_overrides])
    rows = run_ablation(cfg, force=force, console=console)
    table = Table(title=f"ablation  ->  {cfg.out_dir}/ablation.{{json,csv,html}}")
    columns = ("model", "symbols", "context", "steps", "trained_steps", "sampling_label",
               "model_nll", "model_nll_ci95", "within", "beat_hawkes", "geo", "geo_ci95",
               "hawkes_geo")
    for column in columns:
        table.add_column(column)

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):
            return "[" + ", ".join("—" if v is None else f"{v:.3g}" for v in value) + "]"
        return "—" if value is None else str(value)

    for row in rows:
        table.add_row(*(cell(row.get(c)) for c in columns))
    Console().print(table)



