"""Commands for the model: train, export-hf and backtest."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from mega_trading.cli.app import app, config_option, console, resolve, set_option


# --- train ----------------------------------------------------------------------------
@app.command("train")
def train_command(
    overrides: list[str] = typer.Argument(None, help="TrainConfig overrides, e.g. lr=1e-3 model.n_layer=2."),
    data: Path | None = typer.Option(None, "--data", help="Prepared data directory (default with --resume: the run's)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (RUN/)."),
    preset: str | None = typer.Option(None, "--preset", help="Model preset: micro, small or base."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN/checkpoints/latest."),
    tracking: str | None = typer.Option(None, "--tracking", help="mlflow (RUN/mlruns.db) or none."),
    config: Path | None = config_option(),
    set_overrides: list[str] = set_option(),
) -> None:
    """Train the decoder on prepared shards (also under `torchrun --nproc_per_node=N`)."""
    import os

    from mega_trading.train.config import require_data_dir, resume_base
    from mega_trading.train.loop import train

    base, data_dir = resume_base(out, resume, data)
    cfg = resolve("train", config, [*(overrides or []), *set_overrides], base=base,
                  preset=preset, steps=steps, tracking=tracking)
    data_dir = require_data_dir(data_dir)
    summary = train(data_dir, out, cfg, resume=resume, show_progress=True,
                    log=lambda message: console.print(message, highlight=False, soft_wrap=True))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    val = summary["val_loss"]
    typer.echo(f"trained {summary['steps']} steps: loss {summary['loss']:.4f}"
               + (f", validation loss {val:.4f}" if val is not None else "")
               + f", checkpoint step {summary['checkpoint_step']} -> {out}")


# --- export-hf --------------------------------------------------------------------------
@app.command("export-hf")
def export_hf_command(
    run: Path = typer.Option(..., "--run", help="Run folder written by `train`."),
    out: Path = typer.Option(..., "--out", help="Folder for LlamaForCausalLM.from_pretrained."),
    step: int | None = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
) -> None:
    """Export a run's model as a Hugging Face Llama folder (config.json + safetensors)."""
    from mega_trading.core.errors import DataError
    from mega_trading.data.tokenizer import Tokenizer
    from mega_trading.model.checkpoint import load_model
    from mega_trading.model.export_hf import export_hf

    opts = resolve("export-hf", config, overrides, step=step)
    if not run.is_dir():
        raise DataError("run folder does not exist", run)
    model, state = load_model(run, step=opts.step)
    tokenizer_path = run / "tokenizer.json"
    special, metadata = {}, {"run": str(run.resolve())}
    if isinstance(state, dict):
        metadata["step"] = state.get("step")
    if tokenizer_path.is_file():
        tokenizer = Tokenizer.load(tokenizer_path)
        # a segment starts with seg_id, so it plays the role of BOS
        special = {"bos_token_id": tokenizer.seg_id, "pad_token_id": tokenizer.pad_id}
        metadata["tokenizer_hash"] = tokenizer.hash
    export_hf(model, out, extra_metadata=metadata, special_tokens=special,
              tokenizer_path=tokenizer_path if tokenizer_path.is_file() else None)
    n_params = sum(p.numel() for p in model.parameters())
    typer.echo(f"exported {n_params:,} parameters (step {metadata.get('step')}) -> {out}")

# --- backtest -------------------------------------------------------------------------
@app.command()
def backtest(
    run: Path = typer.Option(..., "--run", help="Run folder written by `train`."),
    data: Path = typer.Option(..., "--data", help="Prepared data directory (same tokenizer)."),
    split: str = typer.Option("backtest", "--split", help="Held-out split to score."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="First N tokens per symbol."),
    out: Path | None = typer.Option(None, "--out", help="JSON path (default RUN/backtest.json)."),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
) -> None:
    """Score the model and the baselines on held-out tokens (NLL, top-k, calibration, CIs)."""
    from mega_trading.core.errors import DataError
    from mega_trading.eval.backtest import run_backtest

    cfg = resolve("backtest", config, overrides)
    if not run.is_dir():
        raise DataError("run folder does not exist", run)
    doc = run_backtest(run, data, split=split, max_tokens=max_tokens, cfg=cfg, out=out,
                       log=lambda msg: console.print(msg, highlight=False))
    _print_backtest(doc, out or run / "backtest.json")


def _print_backtest(doc: dict, path: Path) -> None:
    from rich import box
    from rich.table import Table

    def ci(lo: float, hi: float, signed: bool = False) -> str:
        fmt = "{:+.2f}" if signed else "{:.2f}"
        return f"[{fmt.format(lo)},{fmt.format(hi)}]"

    table = Table(title=f"{doc['split']}: {doc['n_scored']:,} events scored "
                        f"(step {doc['lineage'].get('checkpoint_step')})", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False)
    for column in ("", "NLL nats [CI95]", "bits", "top1", "top5", "model-it [CI95]"):
        table.add_column(column, justify="left" if not column else "right", no_wrap=True)
    rows = [("model", doc["model"], None)] + [
        (name, s, doc["model"]["vs_baselines"][name]) for name, s in doc["baselines"].items()]
    for name, s, delta in rows:
        diff = "" if delta is None else (f"{delta['delta_nll_nats']:+.2f} "
                                         f"{ci(*delta['ci95'], signed=True)}")
        table.add_row(name, f"{s['nll_nats']:.2f} {ci(*s['nll_nats_ci95'])}",
                      f"{s['bits_per_event']:.2f}", f"{s['top1']:.3f}", f"{s['top5']:.3f}", diff)
    Console().print(table)
    fields = ", ".join(f"{k} {v['nll_nats']:.3f}" for k, v in doc["model"]["per_field"].items())
    Console().print(f"model per-field NLL (nats): {fields}; ECE {doc['model']['ece']:.3f}; "
                    f"effective vocab {doc['effective_vocab']:.1f} of {doc['n_distinct_labels']} "
                    f"distinct labels")
    for symbol, s in doc["per_symbol"].items():
        tag = " (zero-shot)" if s["zero_shot"] else ""
        best = {k: v.get("nll_nats", float("nan")) for k, v in s["baselines"].items()}
        rival = min(best, key=lambda k: best[k]) if best else "-"
        Console().print(f"  {symbol}{tag}: n={s['n_scored']:,}, model "
                        f"{s['model'].get('nll_nats', float('nan')):.3f} nats, best baseline "
                        f"{rival} {best.get(rival, float('nan')):.3f}")
    Console().print(f"wrote {path}")

