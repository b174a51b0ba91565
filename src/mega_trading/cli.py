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
# @@INGEST@@

# --- prepare: events -> tokenizer -> shards ---------------------------------------------
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
