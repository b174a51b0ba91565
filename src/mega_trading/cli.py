"""The `mega-trading` command line: one thin Typer command per pipeline stage.

Each command parses flags, calls the stage's pure core, and prints a short summary.
User errors (`MegaTradingError`) become a one-line message and a non-zero exit code,
never a traceback. Heavy imports happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

from mega_trading.core.errors import MegaTradingError

app = typer.Typer(
    name="mega-trading",
    help="Binance spot trades as a language: ingest, tokenize, train, backtest, generate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; return the exit code (user errors print one line, no traceback)."""
    try:
        app(args=argv, prog_name="mega-trading", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except MegaTradingError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        return 130
    return 0


def run_cli() -> None:
    sys.exit(main())


# Every command takes --config FILE and --set key=value (tests/test_config.py checks it):
# settings resolve as config defaults < FILE < flags given < --set (cli_config.py). A flag
# left unset (None) means "the config's value", so no option restates a default here.
def config_option() -> Any:
    return typer.Option(None, "--config", help="YAML mirroring this command's config, or a "
                        "pipeline YAML (e.g. configs/demo.yaml: the command's section).")


def set_option() -> Any:
    return typer.Option([], "--set", help="Dotted override key=value (repeatable), e.g. "
                        "--set sampling.top_k=8.")


def resolve(command: str, config: Optional[Path], overrides: Optional[List[str]],
            base: Any = None, **flags: Any) -> Any:
    """The command's config: defaults (or `base`) < --config < flags given < --set."""
    from mega_trading.cli_config import command_config

    return command_config(command, config, list(overrides or []), flags=flags, base=base)


@app.command()
def version() -> None:
    """Print the package version and git commit."""
    from mega_trading import __version__
    from mega_trading.core.lineage import git_commit

    typer.echo(f"mega-trading {__version__} ({git_commit()})")


# --- ingest: download ---------------------------------------------------------------
@app.command()
def download(
    symbols: str = typer.Option(..., "--symbols", help="Comma-separated, e.g. BTCUSDT,ETHUSDT."),
    kind: str = typer.Option("trades", "--kind", help="trades or aggTrades."),
    start: str = typer.Option(..., "--start", help="YYYY-MM (or YYYY-MM-DD with --daily)."),
    end: str = typer.Option(..., "--end", help="YYYY-MM (or YYYY-MM-DD with --daily)."),
    daily: bool = typer.Option(False, "--daily", help="Daily files instead of monthly."),
    out: Path = typer.Option(..., "--out", help="Folder to mirror the archive layout into."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Archive mirror (default: Binance's)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel downloads (1-64)."),
    retries: Optional[int] = typer.Option(None, "--retries", help="Extra attempts per request."),
    market: str = typer.Option("spot", "--market", help="spot, or um (USD-M futures: futures/um/...)."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
) -> None:
    """Download Binance archive zips: SHA-256 verified, resumable, skips finished files."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
    from rich.table import Table

    from mega_trading.core.errors import DataError
    from mega_trading.data.ingest.download import download_archive, plan_files

    cfg = resolve("download", config, overrides, base_url=base_url, workers=workers, retries=retries)
    files = plan_files(symbols.split(","), kind, start, end, daily=daily, market=market)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task(f"{len(files)} file(s)", total=len(files))
        tasks: dict[str, int] = {}

        def on_start(file) -> None:
            tasks[file.name] = progress.add_task(file.name, total=None)

        def on_bytes(file, done: int, total) -> None:
            progress.update(tasks[file.name], completed=done, total=total)

        def on_done(outcome) -> None:
            progress.remove_task(tasks.pop(outcome.file.name))
            progress.advance(overall)

        result = download_archive(files, out, cfg, on_start, on_bytes, on_done)
    table = Table(title=f"download -> {out}")
    for header in ("file", "status", "MB", "note"):
        table.add_column(header)
    for o in result.outcomes:
        table.add_row(o.file.name, o.status, f"{o.n_bytes / 1e6:.1f}", o.message)
    Console().print(table)
    typer.echo(
        f"{len(result.downloaded)} downloaded, {len(result.skipped)} already there, "
        f"{len(result.missing)} missing, {len(result.failed)} failed"
    )
    if result.failed:
        first = result.failed[0]
        raise DataError(f"{len(result.failed)} file(s) failed; first: {first.message}", first.path)

# --- ingest: local files -> Parquet partitions ----------------------------------------
@app.command()
def ingest(
    paths: List[Path] = typer.Argument(..., help="CSV / zip files (or folders of them)."),
    out: Path = typer.Option(..., "--out", help="Partition root (kind=/symbol=/month=/)."),
    symbol: Optional[str] = typer.Option(None, "--symbol", help="Symbol, if not in the name."),
    kind: Optional[str] = typer.Option(None, "--kind", help="trades or aggTrades (default: detect)."),
    market: Optional[str] = typer.Option(None, "--market", help="spot or um (USD-M futures); default: detect."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
) -> None:
    """Read local Binance trade files into validated, typed Parquet partitions."""
    import datetime as dt

    from rich.progress import Progress

    from mega_trading.data.ingest.partitions import expand_inputs, ingest_files

    def utc(time_us: int) -> str:
        stamp = dt.datetime.fromtimestamp(time_us / 1e6, dt.UTC)
        return stamp.strftime("%Y-%m-%d %H:%M:%S")

    opts = resolve("ingest", config, overrides, symbol=symbol, kind=kind, market=market)
    lines: list[str] = []
    files = expand_inputs(paths)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("ingest", total=len(files))

        def on_file(path: Path, result) -> None:
            r = result.report
            unit = "µs" if r.time_unit == "us" else r.time_unit
            lines.append(
                f"{path.name}: {r.symbol} {r.market} {r.kind}, {r.n_rows:,} rows, time in {unit}, "
                f"{utc(r.start_us)} → {utc(r.end_us)} UTC, {r.gap_summary()}, "
                f"{len(result.written)} new / {len(result.parts)} part(s)"
            )
            progress.advance(task)

        results = ingest_files(files, out, symbol=opts.symbol, kind=opts.kind, on_file=on_file,
                               market=opts.market)
    for line in lines:
        typer.echo(line)
    rows = sum(r.report.n_rows for r in results)
    typer.echo(f"ingested {len(results)} file(s), {rows:,} rows -> {out}")

# --- prepare: events -> tokenizer -> shards ---------------------------------------------
@app.command()
def prepare(
    inputs: List[Path] = typer.Argument(None, help="Trade files (.zip/.csv) or folders; default: the bundled sample."),
    out: Path = typer.Option(..., "--out", help="Prepared data directory to write."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="The run's context length (train and generate read it from the data)."),
    stride: Optional[int] = typer.Option(None, "--stride"),
    splits: Optional[str] = typer.Option(None, "--splits", help="train,validation,backtest fractions (default 0.8,0.1,0.1; with --tokenizer 0,0,1)."),
    split_times: Optional[str] = typer.Option(None, "--split-times", help="validation-start,backtest-start (ISO UTC)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="trades or aggTrades."),
    workers: Optional[int] = typer.Option(None, "--workers"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Reuse a fitted tokenizer: a tokenizer.json or a run folder (never refits; every event to backtest by default)."),
    market: Optional[str] = typer.Option(None, "--market", help="spot or um (USD-M futures); default: detected per file."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="Symbols (or SYMBOL.um streams) kept out of training: all their events go to backtest."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
) -> None:
    """Raw trades -> events -> tokenizer (train split only) -> chronological token shards."""
    from mega_trading.data.bundled import sample_files
    from mega_trading.data.prepare import prepare as run_prepare

    # Data encoded with a reused tokenizer is new data to score: all of it to backtest.
    base = {"splits": [0, 0, 1]} if tokenizer is not None and not split_times else None
    cfg = resolve("prepare", config, overrides, base=base, block_size=block_size, stride=stride,
                  splits=splits, split_times=split_times, kind=kind, workers=workers,
                  market=market, holdout_symbols=holdout)
    paths = list(inputs) if inputs else sample_files(cfg.kind)
    manifest = run_prepare(paths, out, cfg, show_progress=True, reuse_tokenizer=tokenizer)
    _print_manifest_summary(manifest, out)


def _print_manifest_summary(manifest: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"prepared {out}  (tokenizer {manifest['tokenizer_hash'][:12]}, "
                        f"vocab {manifest['vocab_size']})")
    for column in ("split", "symbol", "events", "tokens", "windows", "from (UTC)", "to (UTC)"):
        table.add_column(column)
    import datetime as dt

    def utc(us):
        return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if us else "-"

    for split, by_symbol in manifest["shards"].items():
        for symbol, info in sorted(by_symbol.items()):
            table.add_row(split, symbol, f"{info['n_events']:,}", f"{info['n_tokens']:,}",
                          f"{info['n_windows']:,}", utc(info["start_time_us"]), utc(info["end_time_us"]))
    Console().print(table)
    stats = manifest["token_stats"]["train"]
    Console().print(f"train tokens: realized vocab {stats['realized_vocab']} of "
                    f"{manifest['vocab_size']}, effective vocab exp(H) = {stats['effective_vocab']:.1f}")
    _print_reuse_summary(manifest)


def _print_reuse_summary(manifest: dict) -> None:
    """Reused tokenizer, held-out streams and outlier-bin counts (features beyond the
    tokenizer's training range land there: counted, never an error)."""
    reuse = manifest.get("tokenizer_reuse")
    if reuse:
        trained = reuse.get("train_streams")
        new = sorted(s for s in manifest["shards"].get("backtest", {}) if trained is not None and s not in trained)
        Console().print(f"tokenizer reused (hash {reuse['hash'][:12]}, not refitted); "
                        f"zero-shot streams: {', '.join(new) or 'none'}"
                        + ("" if trained is not None else " (the tokenizer's training data is unknown)"))
    if manifest.get("held_out_streams"):
        Console().print(f"held out of training (all events to backtest): {', '.join(manifest['held_out_streams'])}")
    for split, by_stream in manifest.get("outliers", {}).items():
        for stream, counts in sorted(by_stream.items()):
            if counts["any"] and (reuse or split != "train"):
                Console().print(f"  {split} {stream}: {counts['any']:,} of {counts['n_events']:,} events in "
                                f"an outlier bin (move {counts['move']:,}, size {counts['size']:,}, dt {counts['dt']:,})")



# --- train ----------------------------------------------------------------------------
@app.command("train")
def train_command(
    overrides: List[str] = typer.Argument(None, help="TrainConfig overrides, e.g. lr=1e-3 model.n_layer=2."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data directory (default with --resume: the run's)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (RUN/)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Model preset: micro, small or base."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from RUN/checkpoints/latest."),
    tracking: Optional[str] = typer.Option(None, "--tracking", help="mlflow (RUN/mlruns.db) or none."),
    config: Optional[Path] = config_option(),
    set_overrides: List[str] = set_option(),
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
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
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
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="First N tokens per symbol."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON path (default RUN/backtest.json)."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
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

# --- generate -------------------------------------------------------------------------
@app.command()
def generate(
    run: Path = typer.Option(..., "--run", help="Run folder written by `train`."),
    data: Path = typer.Option(..., "--data", help="Prepared data directory (prompts, tokenizer)."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of rollouts."),
    length: Optional[int] = typer.Option(None, "--length", help="New tokens per rollout."),
    prompt_from: Optional[str] = typer.Option(None, "--prompt-from",
                                              help="train|validation|backtest (real windows) or seg."),
    prompt_length: Optional[int] = typer.Option(None, "--prompt-length"),
    symbol: Optional[str] = typer.Option(None, "--symbol", help="Only prompts of this symbol."),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", help="0 = greedy. Sampling options left out: the run's measured "
                                    "choice (RUN/sampling.json), else plain sampling."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="0 = off."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus mass; 1 = off."),
    min_p: Optional[float] = typer.Option(None, "--min-p", help="Keep p >= min_p * p_max; 0 = off."),
    forbid_seg: Optional[bool] = typer.Option(None, "--forbid-seg/--allow-seg",
                                              help="Never sample segment starts."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rollouts decoded together."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help=".parquet or .csv (default RUN/rollouts.parquet)."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
) -> None:
    """Sample synthetic order flow from a trained model and decode it to trades."""
    from mega_trading.data.shards import ShardSet
    from mega_trading.generation.generate import generate_rollouts, rollout_lineage, write_rollouts
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
    rollouts: Optional[Path] = typer.Option(None, "--rollouts", help="Model rollouts (generate's output)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run folder; default rollouts RUN/rollouts.parquet."),
    seed: int = typer.Option(0, "--seed"),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
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
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data directory (default: the one in RUN/config.json)."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default RUN/report.html)."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
) -> None:
    """Render the run's artifacts as one self-contained, offline HTML report."""
    from mega_trading.report import build_report

    opts = resolve("report", config, overrides, data=str(data) if data else None,
                   out=str(out) if out else None)
    path = build_report(run, opts.data, opts.out, log=lambda msg: console.print(msg, highlight=False))
    size_mb = path.stat().st_size / 1e6
    typer.echo(f"wrote {path} ({size_mb:.1f} MB); open it in a browser (works offline)")

# --- run (whole pipeline) and ablate ------------------------------------------------------
@app.command("run")
def run_all(
    config: Path = typer.Option(Path("configs/demo.yaml"), "--config", help="Pipeline YAML (RunConfig)."),
    overrides: List[str] = typer.Argument(None, help="Dotted overrides, e.g. train.steps=200."),
    force: bool = typer.Option(False, "--force", help="Redo every stage, even up-to-date ones."),
    set_overrides: List[str] = set_option(),
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
    overrides: List[str] = typer.Argument(None, help="Dotted overrides, e.g. steps=[50,100]."),
    force: bool = typer.Option(False, "--force"),
    set_overrides: List[str] = set_option(),
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



# --- serve ------------------------------------------------------------------------------
@app.command()
def serve(
    run: Path = typer.Option(..., "--run", help="Run folder written by `train`."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data (named windows); "
                                        "default: the run's own, if it still matches."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default cpu)."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = typer.Option([], "--set", help="ServeSettings overrides, e.g. "
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
    run: Optional[Path] = typer.Option(None, "--run", help="Run folder (needed for --source model)."),
    policy: str = typer.Option("twap", "--policy",
                               help="immediate, twap, twap_limit, participation; comma-separated to compare."),
    side: Optional[str] = typer.Option(None, "--side", help="buy or sell (default buy)."),
    horizon: Optional[str] = typer.Option(None, "--horizon", help="Simulated market time, e.g. 300s, 5m (default 60s)."),
    episodes: Optional[int] = typer.Option(None, "--episodes", help="Episodes per policy (default: scenario's)."),
    open_loop: bool = typer.Option(False, "--open-loop", help="Do not insert agent fills into the model's context."),
    scenario: Optional[str] = typer.Option(None, "--scenario", help="calm, stressed, hot or a YAML path."),
    source: Optional[str] = typer.Option(None, "--source", help="model or replay (default: scenario's)."),
    symbol: Optional[str] = typer.Option(None, "--symbol", help="Start only on this symbol's tape."),
    seed: int = typer.Option(0, "--seed"),
    slices: Optional[int] = typer.Option(None, "--slices", help="TWAP slices."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Participation rate."),
    max_child: Optional[float] = typer.Option(None, "--max-child", help="Participation child cap, fraction of qty."),
    limit_offset_bps: Optional[float] = typer.Option(None, "--limit-offset-bps", help="twap_limit: bps inside the last price."),
    no_finish: bool = typer.Option(False, "--no-finish", help="Leave the rest unfilled at the horizon."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON path (default RUN/simulate.json)."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = typer.Option([], "--set", help="SimConfig overrides, e.g. impact.coef_bps=5."),
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


# --- order book: record and rebuild (issue 20) --------------------------------------------
@app.command()
def book(
    captures: List[Path] = typer.Argument(..., help="Capture files (gzip lines '<recv time> <json>'), any order."),
    out: Path = typer.Option(..., "--out", help="Directory for book_events/trades/top.parquet, check.json, book_facts.json."),
    facts: Optional[bool] = typer.Option(None, "--facts/--no-facts", help="Also compute the order-book facts (default: yes)."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
    engine: Optional[str] = typer.Option(
        None, "--engine",
        help="auto (native C path when it builds here, else pure Python), native or python; "
             "default $MEGA_TRADING_BOOK_ENGINE, else auto. Both give the same outputs."),
) -> None:
    """Rebuild order books from snapshot + depth diffs, exactly, and check them against @bookTicker."""
    from mega_trading.book.build import write_book

    opts = resolve("book", config, overrides, facts=facts)
    check = write_book(captures, out, engine)
    note = check["provenance"].get("book_engine_note")
    if note:
        typer.echo(f"note: {note}", err=True)
    for name, b in check["books"].items():
        typer.echo(f"{name}: {b['diffs_applied']:,}/{b['diffs']:,} diffs applied, "
                   f"{len(b['gaps'])} gaps, {b['resyncs']} resyncs; bookTicker "
                   f"{b['bookticker_checked']:,} checkable of {b['bookticker_total']:,}, "
                   f"{b['bookticker_mismatches']} mismatches")
    if check["skipped_lines"]:
        typer.echo(f"skipped lines: {check['skipped_lines']}")
    if opts.facts:
        from mega_trading.book.facts import write_book_facts

        write_book_facts(out)
    typer.echo(f"wrote {out}")


@app.command()
def record(
    symbols: Optional[str] = typer.Option(None, "--symbols", help="Comma-separated, e.g. BTCUSDT,ETHUSDT (required here or in --config)."),
    market: Optional[str] = typer.Option(None, "--market", help="spot or um (USD-M futures); default spot."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for <market>-<SYMBOL>-<YYYYMMDD>.gz and record_log.jsonl (required here or in --config)."),
    ws_url: Optional[str] = typer.Option(None, "--ws-url", help="Combined-stream base URL (default: Binance's public one)."),
    rest_url: Optional[str] = typer.Option(None, "--rest-url", help="REST depth endpoint (default: Binance's public one)."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
) -> None:
    """Record trades, depth diffs and bookTicker (+ REST snapshots at start and after gaps) until Ctrl-C."""
    from mega_trading.book.record import run_record

    cfg = resolve("record", config, overrides, symbols=symbols,
                  market=market, out=out, ws_url=ws_url, rest_url=rest_url)
    typer.echo(f"recording {', '.join(cfg.symbols)} ({cfg.market}) into {cfg.out}; Ctrl-C to stop")
    counts = run_record(cfg)
    typer.echo(f"stopped: {counts}")


# --- config show ------------------------------------------------------------------------------
config_app = typer.Typer(help="Inspect the resolved configuration of a command.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    command: str = typer.Option("run", "--command", help="Whose config: run, train, generate, ..."),
    config: Optional[Path] = config_option(),
    overrides: List[str] = set_option(),
) -> None:
    """Print the resolved config (YAML, usable as --config) with derived numbers."""
    from mega_trading.cli_config import show

    if command == "run" and config is None and Path("configs/demo.yaml").is_file():
        config = Path("configs/demo.yaml")  # what `mega-trading run` reads by default
    typer.echo(show(command, resolve(command, config, overrides)), nl=False)


if __name__ == "__main__":
    run_cli()
