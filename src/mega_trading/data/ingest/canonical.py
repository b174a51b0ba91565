"""From parsed rows to the canonical trade table, and its checks: values that cannot be a
trade, the symbol, the time unit (from the values' magnitude), the canonical columns, and
`validate_trades` with its `IngestReport` (unique ids, time never going back, id gaps).

Separate from the parse: these steps work on typed columns, and `validate_trades` also
checks tables that did not come from a CSV.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import polars as pl

from mega_trading.core.errors import DataError
from mega_trading.data.ingest.schema import ArchiveName

# Epoch magnitudes: ms timestamps since 1973 are >= 1e11, µs ones >= 1e14, ns >= 1e17.
_MS_MIN, _US_MIN, _NS_MIN = 10**11, 10**14, 10**17
_UNIT_SCALE = {"ms": ("mul", 1000), "us": ("mul", 1), "ns": ("div", 1000)}
MAX_GAPS_LISTED = 10


@dataclasses.dataclass(frozen=True)
class IngestReport:
    """What reading one file found: size, time span, detected unit, missing trade ids."""

    path: str
    symbol: str
    kind: str
    n_rows: int
    first_id: int
    last_id: int
    start_us: int
    end_us: int
    time_unit: str  # unit found in the file: "ms", "us" or "ns"
    has_header: bool
    n_gaps: int  # runs of missing consecutive ids
    n_missing_ids: int
    gaps: tuple[tuple[int, int], ...]  # first few (last id before, next id after)
    source_sha256: str = ""  # of the file as read (zip or CSV)
    market: str = "spot"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["gaps"] = [list(g) for g in self.gaps]
        return out

    def gap_summary(self) -> str:
        if not self.n_gaps:
            return "no gaps"
        shown = ", ".join(f"{a}→{b}" for a, b in self.gaps[:3])
        more = " …" if self.n_gaps > 3 else ""
        return f"{self.n_gaps} gap(s), {self.n_missing_ids} missing id(s): {shown}{more}"


def check_values(raw: pl.DataFrame, path: Path) -> None:
    """Values that parse but cannot be a trade: NaN/inf or non-positive price, negative qty."""
    bad_price = ~pl.col("price").is_finite() | (pl.col("price") <= 0)
    bad_qty = ~pl.col("qty_base").is_finite() | (pl.col("qty_base") < 0)
    for expr, what in ((bad_price, "price"), (bad_qty, "qty_base")):
        hit = raw.filter(expr).head(1)
        if not hit.is_empty():
            raise DataError(
                f"column {what}: {hit[what].item()!r} is not a valid {what}",
                path,
                hit["_line"].item(),
            )


def resolve_symbol(
    raw: pl.DataFrame, path: Path, symbol: str | None, name: ArchiveName | None
) -> str:
    expected = symbol.upper() if symbol else (name.symbol if name else None)
    if "symbol" not in raw.columns:
        if expected is None:
            raise DataError(
                "cannot tell the symbol: the file name is not SYMBOL-kind-DATE; pass --symbol",
                path,
            )
        return expected
    symbols = raw["symbol"].str.strip_chars().str.to_uppercase()
    first = expected or symbols[0]
    other = raw.filter(symbols != first).head(1)
    if not other.is_empty():
        found = other["symbol"].item().strip().upper()
        raise DataError(
            f"the file holds two symbols ({first} and {found})", path, other["_line"].item()
        )
    return first


def _unit_of(value: int) -> str:
    if value < _MS_MIN:
        return "bad"
    if value < _US_MIN:
        return "ms"
    return "us" if value < _NS_MIN else "ns"


def detect_time_unit(
    times: pl.Series, lines: pl.Series | None = None, path: str | Path | None = None
) -> str:
    """'ms', 'us' or 'ns' from the magnitude of the values; mixed units are a `DataError`."""
    low, high = _unit_of(int(times.min())), _unit_of(int(times.max()))
    if low == high and low != "bad":
        return low  # the common case, decided from two numbers
    frame = pl.DataFrame({"time": times})
    if lines is not None:
        frame = frame.with_columns(lines.alias("_line"))
    frame = frame.with_columns(_units_expr().alias("unit"))
    bad = frame.filter(pl.col("unit") == "bad").head(1)
    if not bad.is_empty():
        raise DataError(
            f"time {bad['time'].item()} is not an epoch timestamp in ms or µs",
            path,
            _line_of(bad),
        )
    first_unit = frame["unit"][0]
    changed = frame.filter(pl.col("unit") != first_unit).head(1)
    raise DataError(
        f"time unit changes within the file ({first_unit} then {changed['unit'].item()})",
        path,
        _line_of(changed),
    )


def _units_expr() -> pl.Expr:
    time = pl.col("time")
    return (
        pl.when(time < _MS_MIN)
        .then(pl.lit("bad"))
        .when(time < _US_MIN)
        .then(pl.lit("ms"))
        .when(time < _NS_MIN)
        .then(pl.lit("us"))
        .otherwise(pl.lit("ns"))
    )


def _line_of(row: pl.DataFrame) -> int | None:
    if "_line" in row.columns:
        return row["_line"].item()
    return None


def to_canonical(raw: pl.DataFrame, symbol: str, kind: str, time_unit: str,
                  market: str = "spot") -> pl.DataFrame:
    op, factor = _UNIT_SCALE[time_unit]
    time_us = pl.col("time") * factor if op == "mul" else pl.col("time") // factor
    columns = raw.columns
    quote = pl.col("quote_qty") if "quote_qty" in columns else pl.col("price") * pl.col("qty_base")
    null_int = pl.lit(None, dtype=pl.Int64)
    frame = raw.select(
        pl.lit(symbol, dtype=pl.Utf8).alias("symbol"),
        pl.lit(kind, dtype=pl.Utf8).alias("kind"),
        pl.col("trade_id"),
        pl.col("price"),
        pl.col("qty_base"),
        quote.alias("quote_qty"),
        time_us.alias("time_us"),
        pl.col("is_buyer_maker"),
        (
            pl.col("is_best_match")
            if "is_best_match" in columns
            else pl.lit(None, dtype=pl.Boolean)
        ).alias("is_best_match"),
        (pl.col("first_trade_id") if "first_trade_id" in columns else null_int).alias(
            "first_trade_id"
        ),
        (pl.col("last_trade_id") if "last_trade_id" in columns else null_int).alias(
            "last_trade_id"
        ),
        pl.lit(market, dtype=pl.Utf8).alias("market"),
        pl.col("_line"),
    )
    ids = frame["trade_id"]
    if ids.len() > 1 and ids.diff().min() <= 0:
        frame = frame.sort("trade_id", maintain_order=True)
    return frame




# --- validation -----------------------------------------------------------------------


def validate_trades(
    frame: pl.DataFrame,
    path: str | Path | None = None,
    time_unit: str = "us",
    has_header: bool = False,
) -> IngestReport:
    """Check a canonical table (one symbol and kind, unique ids, time never going back)
    and summarize it. Missing ids are reported as gaps, not rejected. Rows carry their CSV
    line in `_line` when they come from `read_trades`, so errors can name it."""
    if frame.is_empty():
        raise DataError("no rows", path)
    # One cheap pass for the common, clean case; the slower locating filters run only
    # when something is wrong.
    stats = frame.select(
        (pl.col("symbol") != pl.col("symbol").first()).any().alias("symbol"),
        (pl.col("kind") != pl.col("kind").first()).any().alias("kind"),
        pl.col("trade_id").diff().min().alias("min_step"),
        *([(pl.col("market") != pl.col("market").first()).any().alias("market")]
          if "market" in frame.columns else []),
    ).row(0, named=True)
    for column in ("symbol", "kind", "market"):
        if stats.get(column):
            first = frame[column][0]
            row = frame.filter(pl.col(column) != first).head(1)
            raise DataError(
                f"one table holds two {column}s ({first} and {row[column].item()})",
                path,
                _line_of(row),
            )
    if stats["min_step"] is not None and stats["min_step"] <= 0:
        frame = frame.sort("trade_id", maintain_order=True)
        dup = frame.filter(pl.col("trade_id").diff() == 0).head(1)
        if not dup.is_empty():
            trade_id = dup["trade_id"].item()
            raise DataError(f"duplicate trade id {trade_id}", path, _line_of(dup))
    step = pl.col("trade_id").diff()
    summary = frame.select(
        pl.col("time_us").diff().min().alias("min_dt"),
        (step > 1).sum().alias("n_gaps"),
        pl.when(step > 1).then(step - 1).otherwise(0).sum().alias("n_missing"),
    ).row(0, named=True)
    if summary["min_dt"] is not None and summary["min_dt"] < 0:
        back = frame.filter(pl.col("time_us").diff() < 0).head(1)
        raise DataError(
            f"time goes backwards at trade id {back['trade_id'].item()} "
            f"(time_us {back['time_us'].item()} is earlier than the previous trade's)",
            path,
            _line_of(back),
        )
    gaps: tuple[tuple[int, int], ...] = ()
    if summary["n_gaps"]:
        gap_rows = (
            frame.select(
                pl.col("trade_id").shift(1).alias("before"),
                pl.col("trade_id").alias("after"),
                step.alias("step"),
            )
            .filter(pl.col("step") > 1)
            .head(MAX_GAPS_LISTED)
        )
        gaps = tuple((int(a), int(b)) for a, b, _ in gap_rows.iter_rows())
    ids, times = frame["trade_id"], frame["time_us"]
    return IngestReport(
        path=str(path) if path is not None else "",
        symbol=frame["symbol"][0],
        kind=frame["kind"][0],
        market=frame["market"][0] if "market" in frame.columns else "spot",
        n_rows=frame.height,
        first_id=int(ids[0]),
        last_id=int(ids[-1]),
        start_us=int(times[0]),
        end_us=int(times[-1]),
        time_unit=time_unit,
        has_header=has_header,
        n_gaps=int(summary["n_gaps"]),
        n_missing_ids=int(summary["n_missing"]),
        gaps=gaps,
    )
