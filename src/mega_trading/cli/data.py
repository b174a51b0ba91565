"""Commands for raw data: download (Binance archive), ingest (local files), prepare
(events -> tokenizer -> shards), and the order book's record and rebuild."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from mega_trading.cli.app import app, config_option, console, resolve, set_option


# --- ingest: download ---------------------------------------------------------------
@app.command()
def download(
    symbols: str = typer.Option(..., "--symbols", help="Comma-separated, e.g. BTCUSDT,ETHUSDT."),
    kind: str = typer.Option("trades", "--kind", help="trades or aggTrades."),
    start: str = typer.Option(..., "--start", help="YYYY-MM (or YYYY-MM-DD with --daily)."),
    end: str = typer.Option(..., "--end", help="YYYY-MM (or YYYY-MM-DD with --daily)."),
    daily: bool = typer.Option(False, "--daily", help="Daily files instead of monthly."),
    out: Path = typer.Option(..., "--out", help="Folder to mirror the archive layout into."),
    base_url: str | None = typer.Option(None, "--base-url", help="Archive mirror (default: Binance's)."),
    workers: int | None = typer.Option(None, "--workers", help="Parallel downloads (1-64)."),
    retries: int | None = typer.Option(None, "--retries", help="Extra attempts per request."),
    market: str = typer.Option("spot", "--market", help="spot, or um (USD-M futures: futures/um/...)."),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
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
    paths: list[Path] = typer.Argument(..., help="CSV / zip files (or folders of them)."),
    out: Path = typer.Option(..., "--out", help="Partition root (kind=/symbol=/month=/)."),
    symbol: str | None = typer.Option(None, "--symbol", help="Symbol, if not in the name."),
    kind: str | None = typer.Option(None, "--kind", help="trades or aggTrades (default: detect)."),
    market: str | None = typer.Option(None, "--market", help="spot or um (USD-M futures); default: detect."),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
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
    inputs: list[Path] = typer.Argument(None, help="Trade files (.zip/.csv) or folders; default: the bundled sample."),
    out: Path = typer.Option(..., "--out", help="Prepared data directory to write."),
    block_size: int | None = typer.Option(None, "--block-size", help="The run's context length (train and generate read it from the data)."),
    stride: int | None = typer.Option(None, "--stride"),
    splits: str | None = typer.Option(None, "--splits", help="train,validation,backtest fractions (default 0.8,0.1,0.1; with --tokenizer 0,0,1)."),
    split_times: str | None = typer.Option(None, "--split-times", help="validation-start,backtest-start (ISO UTC)."),
    kind: str | None = typer.Option(None, "--kind", help="trades or aggTrades."),
    workers: int | None = typer.Option(None, "--workers"),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Reuse a fitted tokenizer: a tokenizer.json or a run folder (never refits; every event to backtest by default)."),
    market: str | None = typer.Option(None, "--market", help="spot or um (USD-M futures); default: detected per file."),
    holdout: str | None = typer.Option(None, "--holdout", help="Symbols (or SYMBOL.um streams) kept out of training: all their events go to backtest."),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
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




# --- order book: record and rebuild (issue 20) --------------------------------------------
@app.command()
def book(
    captures: list[Path] = typer.Argument(..., help="Capture files (gzip lines '<recv time> <json>'), any order."),
    out: Path = typer.Option(..., "--out", help="Directory for book_events/trades/top.parquet, check.json, book_facts.json."),
    facts: bool | None = typer.Option(None, "--facts/--no-facts", help="Also compute the order-book facts (default: yes)."),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
    engine: str | None = typer.Option(
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
    symbols: str | None = typer.Option(None, "--symbols", help="Comma-separated, e.g. BTCUSDT,ETHUSDT (required here or in --config)."),
    market: str | None = typer.Option(None, "--market", help="spot or um (USD-M futures); default spot."),
    out: Path | None = typer.Option(None, "--out", help="Directory for <market>-<SYMBOL>-<YYYYMMDD>.gz and record_log.jsonl (required here or in --config)."),
    ws_url: str | None = typer.Option(None, "--ws-url", help="Combined-stream base URL (default: Binance's public one)."),
    rest_url: str | None = typer.Option(None, "--rest-url", help="REST depth endpoint (default: Binance's public one)."),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
) -> None:
    """Record trades, depth diffs and bookTicker (+ REST snapshots at start and after gaps) until Ctrl-C."""
    from mega_trading.book.record import run_record

    cfg = resolve("record", config, overrides, symbols=symbols,
                  market=market, out=out, ws_url=ws_url, rest_url=rest_url)
    typer.echo(f"recording {', '.join(cfg.symbols)} ({cfg.market}) into {cfg.out}; Ctrl-C to stop")
    counts = run_record(cfg)
    typer.echo(f"stopped: {counts}")


