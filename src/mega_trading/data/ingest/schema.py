"""The archive's vocabulary: trade kinds, markets, archive file names, stream keys, the
raw column layouts and the canonical trade table's schema.

Separate from the reader because the downloader, the partitions, the dataset and the
backtest need these names without the CSV machinery, and every step of reading (bytes,
parsing, validation) shares them.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import polars as pl

from mega_trading.core.errors import ConfigError

KINDS = ("trades", "aggTrades")
MARKETS = ("spot", "um")  # Binance spot; USD-M futures (the archive's futures/um)

# Positional layouts of the headerless Binance archive CSVs.
TRADES_LAYOUT = (
    "trade_id",
    "price",
    "qty_base",
    "quote_qty",
    "time",
    "is_buyer_maker",
    "is_best_match",
)
AGG_TRADES_LAYOUT = (
    "trade_id",
    "price",
    "qty_base",
    "first_trade_id",
    "last_trade_id",
    "time",
    "is_buyer_maker",
    "is_best_match",
)
LAYOUTS = {"trades": TRADES_LAYOUT, "aggTrades": AGG_TRADES_LAYOUT}
# USD-M futures trades: the spot trades layout without is_best_match (header row or not).
FUTURES_TRADES_LAYOUT = TRADES_LAYOUT[:-1]

RAW_DTYPES: dict[str, Any] = {
    "symbol": pl.Utf8,
    "trade_id": pl.Int64,
    "price": pl.Float64,
    "qty_base": pl.Float64,
    "quote_qty": pl.Float64,
    "first_trade_id": pl.Int64,
    "last_trade_id": pl.Int64,
    "time": pl.Int64,
    "is_buyer_maker": pl.Boolean,
    "is_best_match": pl.Boolean,
}

CANONICAL_SCHEMA: dict[str, Any] = {
    "symbol": pl.Utf8,
    "kind": pl.Utf8,
    "trade_id": pl.Int64,
    "price": pl.Float64,
    "qty_base": pl.Float64,
    "quote_qty": pl.Float64,
    "time_us": pl.Int64,
    "is_buyer_maker": pl.Boolean,
    "is_best_match": pl.Boolean,
    "first_trade_id": pl.Int64,
    "last_trade_id": pl.Int64,
    "market": pl.Utf8,  # "spot" or "um" (USD-M futures): part of a symbol's identity
}
CANONICAL_COLUMNS = tuple(CANONICAL_SCHEMA)

# Header names seen in Binance files and common exports, normalized (lower case, no '_').
HEADER_ALIASES = {
    "id": "trade_id",
    "tradeid": "trade_id",
    "aggtradeid": "trade_id",
    "aggid": "trade_id",
    "price": "price",
    "qty": "qty_base",
    "quantity": "qty_base",
    "qtybase": "qty_base",
    "baseqty": "qty_base",
    "quoteqty": "quote_qty",
    "quotequantity": "quote_qty",
    "firsttradeid": "first_trade_id",
    "firstid": "first_trade_id",
    "lasttradeid": "last_trade_id",
    "lastid": "last_trade_id",
    "time": "time",
    "transacttime": "time",
    "timestamp": "time",
    "ts": "time",
    "timeus": "time",
    "timems": "time",
    "isbuyermaker": "is_buyer_maker",
    "isbestmatch": "is_best_match",
    "symbol": "symbol",
}
REQUIRED_COLUMNS = ("trade_id", "price", "qty_base", "time", "is_buyer_maker")

ARCHIVE_NAME = re.compile(
    r"^(?P<symbol>[A-Za-z0-9]+)-(?P<kind>trades|aggTrades)-(?P<period>\d{4}-\d{2}(?:-\d{2})?)"
    r"(?:\.csv)?(?:\.zip)?$"
)



@dataclasses.dataclass(frozen=True)
class ArchiveName:
    symbol: str
    kind: str
    period: str  # YYYY-MM or YYYY-MM-DD



def parse_archive_name(path: str | Path) -> ArchiveName | None:
    """`BTCUSDT-trades-2024-08-08.zip` -> ArchiveName('BTCUSDT', 'trades', '2024-08-08')."""
    match = ARCHIVE_NAME.match(Path(path).name)
    if not match:
        return None
    return ArchiveName(match["symbol"].upper(), match["kind"], match["period"])


def normalize_kind(kind: str | None) -> str | None:
    if kind is None:
        return None
    for known in KINDS:
        if kind.lower() == known.lower():
            return known
    raise ConfigError(f"unknown kind '{kind}'; expected one of {', '.join(KINDS)}")


def normalize_market(market: str | None) -> str | None:
    if market is None:
        return None
    aliases = {"spot": "spot", "um": "um", "usdm": "um", "usd-m": "um", "futures/um": "um"}
    found = aliases.get(market.strip().lower())
    if found is None:
        raise ConfigError(f"unknown market '{market}'; expected one of {', '.join(MARKETS)}")
    return found


def stream_key(symbol: str, market: str = "spot") -> str:
    """A stream's name in shards, baselines and reports: `BTCUSDT` (spot) or `BTCUSDT.um`."""
    return symbol if market == "spot" else f"{symbol}.{market}"


def split_stream_key(key: str) -> tuple[str, str]:
    """`BTCUSDT.um` -> ("BTCUSDT", "um"); `BTCUSDT` -> ("BTCUSDT", "spot")."""
    symbol, _, market = key.partition(".")
    return symbol, market or "spot"
