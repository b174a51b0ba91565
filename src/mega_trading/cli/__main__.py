"""python -m mega_trading.cli ...: the command line (torchrun launches training this way)."""

from mega_trading.cli import run_cli

run_cli()
