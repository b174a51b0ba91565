"""Read one Binance archive file (CSV or zip) into the canonical trade table.

Two markets: spot (no header row, 7 columns with `is_best_match`) and USD-M futures
(`futures/um`: a header row `id,price,qty,quote_qty,time,is_buyer_maker`, 6 columns, no
`is_best_match`). The market is detected from the layout unless the caller names it, in
which case a file of the other layout is a `DataError` on its first line.

The canonical table (docs/CONTRACTS.md) has one row per trade or aggTrade, sorted by
`trade_id`, with `time_us` in UTC microseconds. Binance switched its archive timestamps
from milliseconds to microseconds in 2025, so the unit is detected per file from the
magnitude of the values, never from a date.

Reading is one native Polars CSV parse with an explicit schema. Only when that parse
fails (or yields nulls / a row count that does not match the line count) do we run a
slower, still vectorized, line-by-line diagnosis whose only job is to name the first bad
line in the `DataError`.

This module is the public read API; the steps live beside it, in reading order:
`schema` (kinds, markets, names, layouts), `raw_file` (bytes, zip, header, layout),
`csv_parse` (parse and bad-line diagnosis), `canonical` (canonical table, validation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import polars as pl

from mega_trading.core.errors import DataError
from mega_trading.data.ingest.canonical import (
    IngestReport,
    check_values,
    detect_time_unit,
    resolve_symbol,
    to_canonical,
    validate_trades,
)
from mega_trading.data.ingest.csv_parse import parse_csv
from mega_trading.data.ingest.raw_file import (
    kind_from_width,
    market_of_layout,
    parse_header,
    read_csv_bytes,
    read_first_line,
    verify_checksum,
    wrong_market_message,
)
from mega_trading.data.ingest.schema import (
    FUTURES_TRADES_LAYOUT,
    LAYOUTS,
    normalize_kind,
    normalize_market,
    parse_archive_name,
)


def read_trades(
    path: str | Path, symbol: str | None = None, kind: str | None = None,
    market: str | None = None,
) -> pl.DataFrame:
    """The canonical trade table of one CSV or zip file; bad input raises `DataError`."""
    frame, _ = read_trades_with_report(path, symbol=symbol, kind=kind, market=market)
    return frame


def read_trades_with_report(
    path: str | Path, symbol: str | None = None, kind: str | None = None,
    market: str | None = None,
) -> tuple[pl.DataFrame, IngestReport]:
    """Like `read_trades`, plus the `IngestReport` (time unit detected, id gaps).

    ``market`` None: detected from the layout; "spot" or "um": a file of the other
    market's layout is a `DataError` naming line 1.
    """
    path = Path(path)
    kind = normalize_kind(kind)
    market = normalize_market(market)
    name = parse_archive_name(path)
    digest = verify_checksum(path)
    data = read_csv_bytes(path)
    first_line = read_first_line(data)
    header = parse_header(first_line, path)
    found_market = market_of_layout(first_line, header)
    if market is not None and market != found_market:
        raise DataError(wrong_market_message(found_market), path, 1)
    if found_market == "um" and header is None:
        expected_kind = kind or (name.kind if name else None) or "trades"
        if expected_kind != "trades":
            raise DataError("USD-M futures files are read as trades only", path, 1)
        columns = FUTURES_TRADES_LAYOUT
    elif header is not None:
        columns = header
        file_kind = "aggTrades" if "first_trade_id" in columns else "trades"
        expected_kind = kind or (name.kind if name else None) or file_kind
        if expected_kind != file_kind:
            raise DataError(
                f"the header has {file_kind} columns but the file is read as {expected_kind}",
                path,
                1,
            )
    else:
        expected_kind = kind or (name.kind if name else None) or kind_from_width(first_line, path)
        columns = LAYOUTS[expected_kind]
    raw = parse_csv(data, path, columns, has_header=header is not None)
    raw = raw.with_row_index("_line", offset=2 if header is not None else 1)
    check_values(raw, path)
    symbol = resolve_symbol(raw, path, symbol, name)
    time_unit = detect_time_unit(raw["time"], raw["_line"], path)
    frame = to_canonical(raw, symbol, expected_kind, time_unit, found_market)
    report = validate_trades(frame, path, time_unit=time_unit, has_header=header is not None)
    return frame.drop("_line"), dataclasses.replace(report, source_sha256=digest)
