"""The `mega-trading` command line: one thin Typer command per pipeline stage, a module
per group of stages (data, model, rollouts, run), all registered on `cli.app.app`.

Each command parses flags, calls the stage's pure core, and prints a short summary.
User errors (`MegaTradingError`) become a one-line message and a non-zero exit code,
never a traceback. Heavy imports happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import sys

# Registers every command on the app (the modules decorate `app` when imported).
from mega_trading.cli import data, model, rollouts, run  # noqa: F401
from mega_trading.cli.app import app, console
from mega_trading.core.errors import MegaTradingError

__all__ = ["app", "main", "run_cli"]


def main(argv: list[str] | None = None) -> int:
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

