"""The Typer app every command registers on, the console, and the options every command
shares: --config FILE and --set key=value, resolved in one place (cli.config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(
    name="mega-trading",
    help="Binance spot trades as a language: ingest, tokenize, train, backtest, generate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


# Every command takes --config FILE and --set key=value (tests/test_config.py checks it):
# settings resolve as config defaults < FILE < flags given < --set (cli/config.py). A flag
# left unset (None) means "the config's value", so no option restates a default here.
def config_option() -> Any:
    return typer.Option(None, "--config", help="YAML mirroring this command's config, or a "
                        "pipeline YAML (e.g. configs/demo.yaml: the command's section).")


def set_option() -> Any:
    return typer.Option([], "--set", help="Dotted override key=value (repeatable), e.g. "
                        "--set sampling.top_k=8.")


def resolve(command: str, config: Path | None, overrides: list[str] | None,
            base: Any = None, **flags: Any) -> Any:
    """The command's config: defaults (or `base`) < --config < flags given < --set."""
    from mega_trading.cli.config import command_config

    return command_config(command, config, list(overrides or []), flags=flags, base=base)


@app.command()
def version() -> None:
    """Print the package version and git commit."""
    from mega_trading import __version__
    from mega_trading.core.lineage import git_commit

    typer.echo(f"mega-trading {__version__} ({git_commit()})")



# --- config show ------------------------------------------------------------------------------
config_app = typer.Typer(help="Inspect the resolved configuration of a command.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    command: str = typer.Option("run", "--command", help="Whose config: run, train, generate, ..."),
    config: Path | None = config_option(),
    overrides: list[str] = set_option(),
) -> None:
    """Print the resolved config (YAML, usable as --config) with derived numbers."""
    from mega_trading.cli.config import show

    if command == "run" and config is None and Path("configs/demo.yaml").is_file():
        config = Path("configs/demo.yaml")  # what `mega-trading run` reads by default
    typer.echo(show(command, resolve(command, config, overrides)), nl=False)

