"""The real Binance sample bundled with the package (the default data set)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_dir() -> Path:
    return Path(str(resources.files("mega_trading") / "data" / "sample"))


def sample_files(kind: str = "trades") -> list[Path]:
    """The bundled archive zips of one kind (`trades` or `aggTrades`), sorted by name."""
    return sorted(sample_dir().glob(f"*-{kind}-*.zip"))


BUNDLED = ("sample", "demo")  # demo: NEXOUSDT spot and USD-M futures (data/demo/{spot,um})


def bundled_dir(name: str) -> Path:
    """A bundled data folder: `sample` (spot BTCUSDT/ETHUSDT) or `demo` (the bigger demo's
    extra real trades)."""
    if name not in BUNDLED:
        raise ValueError(f"no bundled data set {name!r}; choose one of {', '.join(BUNDLED)}")
    return Path(str(resources.files("mega_trading") / "data" / name))


def resolve_input(item: str) -> str:
    """`bundled:NAME` -> the bundled folder's path (configs stay valid from any directory);
    anything else unchanged."""
    return str(bundled_dir(item.removeprefix("bundled:"))) if item.startswith("bundled:") else item
