"""The CSV parse (one native Polars read with an explicit schema) and, only when it fails
or yields nulls, the diagnosis whose one job is to name the first bad line in the
`DataError`.

Separate because the diagnosis is the slow, rarely run half of parsing: two lenient
native parses, and a split into lines and fields for odd files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl

from mega_trading.core.errors import DataError
from mega_trading.data.ingest.schema import RAW_DTYPES


def _count_lines(data: bytes) -> int:
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


_NON_SPACE = re.compile(rb"\S")


def parse_csv(data: bytes, path: Path, columns: tuple[str, ...], has_header: bool) -> pl.DataFrame:
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
