"""The real Binance sample bundled with the package (the default data set)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_dir() -> Path:
    return Path(str(resources.files("mega_trading") / "data" / "sample"))


def sample_files(kind: str = "trades") -> list[Path]:
    """The bundled archive zips of one kind (`trades` or `aggTrades`), sorted by name."""
    return sorted(sample_dir().glob(f"*-{kind}-*.zip"))
