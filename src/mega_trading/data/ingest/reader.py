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
"""

from __future__ import annotations

import dataclasses
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import polars as pl
from isal import isal_zlib

from mega_trading.core.errors import ConfigError, DataError
from mega_trading.core.lineage import sha256_file

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

# Epoch magnitudes: ms timestamps since 1973 are >= 1e11, µs ones >= 1e14, ns >= 1e17.
_MS_MIN, _US_MIN, _NS_MIN = 10**11, 10**14, 10**17
_UNIT_SCALE = {"ms": ("mul", 1000), "us": ("mul", 1), "ns": ("div", 1000)}
MAX_GAPS_LISTED = 10


@dataclasses.dataclass(frozen=True)
class ArchiveName:
    symbol: str
    kind: str
    period: str  # YYYY-MM or YYYY-MM-DD


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
    data = _read_csv_bytes(path)
    first_line = _first_line(data)
    header = _parse_header(first_line, path)
    found_market = _market_of_layout(first_line, header)
    if market is not None and market != found_market:
        raise DataError(_wrong_market_message(found_market), path, 1)
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
        expected_kind = kind or (name.kind if name else None) or _kind_from_width(first_line, path)
        columns = LAYOUTS[expected_kind]
    raw = _parse_csv(data, path, columns, has_header=header is not None)
    raw = raw.with_row_index("_line", offset=2 if header is not None else 1)
    _check_values(raw, path)
    symbol = _resolve_symbol(raw, path, symbol, name)
    time_unit = detect_time_unit(raw["time"], raw["_line"], path)
    frame = _to_canonical(raw, symbol, expected_kind, time_unit, found_market)
    report = validate_trades(frame, path, time_unit=time_unit, has_header=header is not None)
    return frame.drop("_line"), dataclasses.replace(report, source_sha256=digest)


def _market_of_layout(first_line: str, header: tuple[str, ...] | None) -> str:
    """'um' for the futures trades layout (exactly its 6 columns, with or without the
    header row), 'spot' for everything else (7-column trades, aggTrades, other exports)."""
    if header is not None:
        return "um" if header == FUTURES_TRADES_LAYOUT else "spot"
    return "um" if first_line.count(",") + 1 == len(FUTURES_TRADES_LAYOUT) else "spot"


def _wrong_market_message(found: str) -> str:
    if found == "um":
        return ("this is a USD-M futures file (6 columns, no is_best_match) but it is read as "
                "spot; use --market um")
    return ("this is a spot file (not the 6-column futures layout) but it is read as USD-M "
            "futures; use --market spot")


def verify_checksum(path: Path) -> str:
    """SHA-256 of `path`, checked against a Binance `<file>.CHECKSUM` beside it if any."""
    _check_is_file(path)
    digest = sha256_file(path)
    sidecar = path.with_name(path.name + ".CHECKSUM")
    if sidecar.is_file():
        expected = (sidecar.read_text(errors="replace").split() or [""])[0].lower()
        if expected != digest:
            raise DataError(
                f"checksum mismatch: {sidecar.name} says {expected[:16]}…, "
                f"the file hashes to {digest[:16]}…",
                path,
            )
    return digest


# --- bytes ----------------------------------------------------------------------------


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise DataError("no such file", path)
    if not path.is_file():
        raise DataError("not a regular file (expected a CSV or zip)", path)


def _read_csv_bytes(path: Path) -> bytes:
    _check_is_file(path)
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        data = _read_zip_member(path)
    else:
        data = path.read_bytes()
    if not data or data.isspace():  # (no .strip(): it would copy a large file)
        raise DataError("empty file", path)
    # A run of blank lines at the very end is harmless padding, not a malformed row.
    if data.endswith((b"\n\n", b"\r\n\r\n")):
        data = data.rstrip(b"\r\n") + b"\n"
    return data


def _read_zip_member(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) != 1:
                raise DataError(f"a Binance zip holds one CSV, this one holds {len(members)}", path)
            member = members[0]
            if member.compress_type != zipfile.ZIP_DEFLATED or member.flag_bits & 0x1:
                return archive.read(member)
            return _inflate_member(archive, member)
    except (zipfile.BadZipFile, zlib.error, isal_zlib.error, EOFError, OSError) as exc:
        raise DataError(f"truncated or corrupt zip ({exc})", path) from exc


def _inflate_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> bytes:
    """A deflated member's bytes, inflated by ISA-L (about 2x faster than zlib, which
    `zipfile` uses, on the archive's monthly files) and checked against the zip's CRC-32
    and size, as `zipfile` checks them."""
    handle = archive.fp
    handle.seek(member.header_offset)
    local = handle.read(_LOCAL_HEADER.size)
    if len(local) != _LOCAL_HEADER.size or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local file header")
    name_len, extra_len = _LOCAL_HEADER.unpack(local)[-2:]
    handle.seek(member.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
    compressed = handle.read(member.compress_size)
    if len(compressed) != member.compress_size:
        raise EOFError(f"member {member.filename} is cut short")
    data = isal_zlib.decompress(compressed, -15, member.file_size or 1)
    if len(data) != member.file_size or isal_zlib.crc32(data) != member.CRC:
        raise zipfile.BadZipFile(f"bad CRC-32 or size for {member.filename}")
    return data


# Zip local file header: signature ... file name length, extra field length (APPNOTE 4.3.7).
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def _first_line(data: bytes) -> str:
    end = data.find(b"\n")
    line = data[: end if end >= 0 else len(data)]
    return line.rstrip(b"\r").decode("utf-8", errors="replace")


def _parse_header(line: str, path: Path) -> tuple[str, ...] | None:
    """Column names if the first line is a header, None if it is already a data row."""
    fields = [f.strip() for f in line.split(",")]
    if not fields or _is_int(fields[0]):
        return None
    columns = []
    for field in fields:
        key = field.lower().replace("_", "").replace(" ", "")
        if key not in HEADER_ALIASES:
            raise DataError(f"unknown column '{field}' in the header", path, 1)
        columns.append(HEADER_ALIASES[key])
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"the header lacks column(s) {', '.join(missing)}", path, 1)
    if len(set(columns)) != len(columns):
        raise DataError("the header names a column twice", path, 1)
    return tuple(columns)


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _kind_from_width(line: str, path: Path) -> str:
    width = line.count(",") + 1
    for kind, layout in LAYOUTS.items():
        if width == len(layout):
            return kind
    raise DataError(
        f"expected {len(TRADES_LAYOUT)} fields (trades) or {len(AGG_TRADES_LAYOUT)} fields "
        f"(aggTrades), found {width}",
        path,
        1,
    )


# --- parsing --------------------------------------------------------------------------


def _count_lines(data: bytes) -> int:
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


_NON_SPACE = re.compile(rb"\S")


def _parse_csv(data: bytes, path: Path, columns: tuple[str, ...], has_header: bool) -> pl.DataFrame:
    schema = {name: RAW_DTYPES[name] for name in columns}
    if has_header and not _NON_SPACE.search(data, data.find(b"\n") + 1 or len(data)):
        raise DataError("empty file (a header and no rows)", path)
    try:
        frame = pl.read_csv(
            data,
            has_header=False,
            skip_rows=int(has_header),
            schema=schema,
            quote_char=None,
        )
    except pl.exceptions.PolarsError as exc:
        raise _diagnose(data, path, columns, has_header) or DataError(
            f"cannot parse CSV: {str(exc).splitlines()[0]}", path
        ) from None
    # Polars reads a blank or short line as a row with nulls (a long one is an error), so a
    # clean parse has no null and, checked on the rare file that has one, a row per line.
    if frame.null_count().sum_horizontal().item() > 0:
        error = _diagnose(data, path, columns, has_header)
        if error is not None:
            raise error
        n_rows = _count_lines(data) - int(has_header)
        raise DataError(f"parsed {frame.height} rows from {n_rows} lines", path)
    return frame


def _diagnose(
    data: bytes, path: Path, columns: tuple[str, ...], has_header: bool
) -> DataError | None:
    """The `DataError` for the first malformed line.

    Two native parses that keep one row per line: the raw lines (for field counts and
    blank lines) and a lenient typed parse (a value that does not parse becomes null).
    """
    schema = {name: RAW_DTYPES[name] for name in columns}
    n_lines = _count_lines(data)
    try:
        lines = pl.read_csv(
            data,
            has_header=False,
            separator="\x1f",
            quote_char=None,
            schema={"raw": pl.Utf8},
            truncate_ragged_lines=True,
        )["raw"]
        typed = pl.read_csv(
            data,
            has_header=False,
            schema=schema,
            quote_char=None,
            ignore_errors=True,
            truncate_ragged_lines=True,
        )
    except pl.exceptions.PolarsError:
        return _diagnose_by_splitting(data, path, columns, has_header)
    if lines.len() != n_lines or typed.height != n_lines:
        return _diagnose_by_splitting(data, path, columns, has_header)
    checks = pl.DataFrame({"raw": lines}).with_columns(
        typed.select(pl.any_horizontal(pl.all().is_null()).alias("bad_value"))
    )
    checks = checks.with_row_index("line", offset=1)
    if has_header:
        checks = checks.filter(pl.col("line") > 1)
    raw = pl.col("raw").str.strip_suffix("\r")
    bad = checks.filter(
        pl.col("bad_value")
        | (raw.fill_null("").str.strip_chars() == "")
        | (raw.str.count_matches(",", literal=True) != len(columns) - 1)
    ).head(1)
    if bad.is_empty():
        return None
    line = (bad["raw"].item() or "").rstrip("\r")
    return DataError(_describe_bad_line(line, columns), path, bad["line"].item())


def _diagnose_by_splitting(
    data: bytes, path: Path, columns: tuple[str, ...], has_header: bool
) -> DataError | None:
    """`_diagnose` by splitting the text into lines and fields (for odd files only)."""
    text = data.decode("utf-8", errors="replace")
    lines = (
        pl.Series("raw", [text])
        .str.split("\n")
        .explode()
        .str.strip_suffix("\r")
        .to_frame()
        .with_row_index("line", offset=1)
    )
    if text.endswith("\n"):
        lines = lines.head(lines.height - 1)
    if has_header:
        lines = lines.filter(pl.col("line") > 1)
    fields = pl.col("raw").str.split(",")
    checks = [pl.col("raw").str.strip_chars() == "", fields.list.len() != len(columns)]
    for index, name in enumerate(columns):
        checks.append(~_valid_field(fields.list.get(index, null_on_oob=True), RAW_DTYPES[name]))
    bad = lines.filter(pl.any_horizontal(checks).fill_null(True)).head(1)
    if bad.is_empty():
        return None
    line_no, raw = bad["line"].item(), bad["raw"].item()
    return DataError(_describe_bad_line(raw, columns), path, line_no)


def _valid_field(field: pl.Expr, dtype: Any) -> pl.Expr:
    if dtype == pl.Boolean:
        return field.str.to_lowercase().is_in(["true", "false"])
    if dtype == pl.Utf8:
        return field.str.strip_chars() != ""
    return field.cast(dtype, strict=False).is_not_null()


def _describe_bad_line(raw: str, columns: tuple[str, ...]) -> str:
    if not raw.strip():
        return "empty line"
    fields = raw.split(",")
    if len(fields) != len(columns):
        return f"expected {len(columns)} comma-separated fields, found {len(fields)}: {raw[:80]!r}"
    for name, value in zip(columns, fields):
        valid = _valid_field(pl.lit(value), RAW_DTYPES[name])
        if not pl.select(valid).item():
            wanted = {pl.Int64: "an integer", pl.Float64: "a number", pl.Boolean: "true/false"}
            return f"column {name}: {value!r} is not {wanted.get(RAW_DTYPES[name], 'a value')}"
    return f"malformed row: {raw[:80]!r}"


def _check_values(raw: pl.DataFrame, path: Path) -> None:
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


def _resolve_symbol(
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


def _to_canonical(raw: pl.DataFrame, symbol: str, kind: str, time_unit: str,
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
