"""The `mega-trading` command line: one thin Typer command per pipeline stage.

Each command parses flags, calls the stage's pure core, and prints a short summary.
User errors (`MegaTradingError`) become a one-line message and a non-zero exit code,
never a traceback. Heavy imports happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from mega_trading.errors import MegaTradingError

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


@app.command()
def version() -> None:
    """Print the package version and git commit."""
    from mega_trading import __version__
    from mega_trading.lineage import git_commit

    typer.echo(f"mega-trading {__version__} ({git_commit()})")


# --- ingest: download ---------------------------------------------------------------
# (commands are added below, one section per stage, in pipeline order)
# @@DOWNLOAD@@

# --- ingest: local files -> Parquet partitions ----------------------------------------
@app.command()
def ingest(
    paths: List[Path] = typer.Argument(..., help="CSV / zip files (or folders of them)."),
    out: Path = typer.Option(..., "--out", help="Partition root (kind=/symbol=/month=/)."),
    symbol: Optional[str] = typer.Option(None, "--symbol", help="Symbol, if not in the name."),
    kind: Optional[str] = typer.Option(None, "--kind", help="trades or aggTrades (default: detect)."),
) -> None:
    """Read local Binance trade files into validated, typed Parquet partitions."""
    import datetime as dt

    from rich.progress import Progress

    from mega_trading.ingest.partitions import expand_inputs, ingest_files

    def utc(time_us: int) -> str:
        stamp = dt.datetime.fromtimestamp(time_us / 1e6, dt.timezone.utc)
        return stamp.strftime("%Y-%m-%d %H:%M:%S")

    lines: list[str] = []
    files = expand_inputs(paths)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("ingest", total=len(files))

        def on_file(path: Path, result) -> None:
            r = result.report
            unit = "µs" if r.time_unit == "us" else r.time_unit
            lines.append(
                f"{path.name}: {r.symbol} {r.kind}, {r.n_rows:,} rows, time in {unit}, "
                f"{utc(r.start_us)} → {utc(r.end_us)} UTC, {r.gap_summary()}, "
                f"{len(result.written)} new / {len(result.parts)} part(s)"
            )
            progress.advance(task)

        results = ingest_files(files, out, symbol=symbol, kind=kind, on_file=on_file)
    for line in lines:
        typer.echo(line)
    rows = sum(r.report.n_rows for r in results)
    typer.echo(f"ingested {len(results)} file(s), {rows:,} rows -> {out}")

# --- prepare: events -> tokenizer -> shards ---------------------------------------------
@app.command()
def prepare(
    inputs: List[Path] = typer.Argument(None, help="Trade files (.zip/.csv) or folders; default: the bundled sample."),
    out: Path = typer.Option(..., "--out", help="Prepared data directory to write."),
    block_size: int = typer.Option(512, "--block-size"),
    stride: int = typer.Option(256, "--stride"),
    splits: str = typer.Option("0.8,0.1,0.1", "--splits", help="train,validation,backtest fractions."),
    split_times: Optional[str] = typer.Option(None, "--split-times", help="validation-start,backtest-start (ISO UTC)."),
    kind: str = typer.Option("trades", "--kind", help="trades or aggTrades."),
    workers: int = typer.Option(2, "--workers"),
    overrides: List[str] = typer.Option([], "--set", help="Dotted overrides, e.g. tokenizer.size_bins=6."),
) -> None:
    """Raw trades -> events -> tokenizer (train split only) -> chronological token shards."""
    from mega_trading.config import apply_overrides
    from mega_trading.data import sample_files
    from mega_trading.dataset import PrepareConfig, prepare as run_prepare
    from mega_trading.config import from_dict

    cfg = from_dict(PrepareConfig, {
        "block_size": block_size, "stride": stride, "splits": splits, "kind": kind,
        "workers": workers, "split_times": split_times or (),
    })
    cfg = apply_overrides(cfg, overrides)
    paths = list(inputs) if inputs else sample_files(kind)
    manifest = run_prepare(paths, out, cfg, show_progress=True)
    _print_manifest_summary(manifest, out)


def _print_manifest_summary(manifest: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"prepared {out}  (tokenizer {manifest['tokenizer_hash'][:12]}, "
                        f"vocab {manifest['vocab_size']})")
    for column in ("split", "symbol", "events", "tokens", "windows", "from (UTC)", "to (UTC)"):
        table.add_column(column)
    import datetime as dt

    def utc(us):
        return dt.datetime.fromtimestamp(us / 1e6, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if us else "-"

    for split, by_symbol in manifest["shards"].items():
        for symbol, info in sorted(by_symbol.items()):
            table.add_row(split, symbol, f"{info['n_events']:,}", f"{info['n_tokens']:,}",
                          f"{info['n_windows']:,}", utc(info["start_time_us"]), utc(info["end_time_us"]))
    Console().print(table)
    stats = manifest["token_stats"]["train"]
    Console().print(f"train tokens: realized vocab {stats['realized_vocab']} of "
                    f"{manifest['vocab_size']}, effective vocab exp(H) = {stats['effective_vocab']:.1f}")


# @@PREPARE@@

# --- train ----------------------------------------------------------------------------
# @@TRAIN@@

# --- export-hf --------------------------------------------------------------------------
# @@EXPORT@@

# --- backtest -------------------------------------------------------------------------
# @@BACKTEST@@

# --- generate -------------------------------------------------------------------------
# @@GENERATE@@

# --- facts ------------------------------------------------------------------------------
# @@FACTS@@

# --- report -----------------------------------------------------------------------------
# @@REPORT@@

# --- run (whole pipeline) and ablate ------------------------------------------------------
# @@RUN@@

# --- serve ------------------------------------------------------------------------------
# @@SERVE@@

# --- simulate ---------------------------------------------------------------------------
# @@SIMULATE@@


if __name__ == "__main__":
    run_cli()
