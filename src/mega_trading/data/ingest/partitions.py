"""Typed Parquet partitions of canonical trade tables.

Layout: `OUT/kind=<kind>/symbol=<STREAM>/month=<YYYY-MM>/part-<sha8>.parquet` (STREAM:
`BTCUSDT` for spot, `BTCUSDT.um` for USD-M futures), where
`sha8` is a hash of the rows' content. Writing the same rows again therefore names the
same file and is skipped (idempotent), and each file appears under its final name only
once it is complete (written to a temp name, then renamed). Rows whose trade ids overlap
a different part already in the partition are refused, so a partition never holds a
trade twice and a failing write leaves what was there untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import polars as pl

from mega_trading.core.errors import DataError
from mega_trading.core.lineage import atomic_path, provenance
from mega_trading.data.ingest.canonical import IngestReport
from mega_trading.data.ingest.reader import read_trades_with_report
from mega_trading.data.ingest.schema import (
    CANONICAL_COLUMNS,
    CANONICAL_SCHEMA,
    parse_archive_name,
    stream_key,
)

PART_GLOB = "part-*.parquet"


@dataclasses.dataclass(frozen=True)
class FileIngest:
    """One input file's ingest: its report and the partition files that hold its rows."""

    report: IngestReport
    parts: tuple[Path, ...]
    written: tuple[Path, ...]  # the subset of `parts` this call created (others existed)


def month_of(time_us: pl.Expr) -> pl.Expr:
    """YYYY-MM (UTC) of each timestamp."""
    return pl.from_epoch(time_us, time_unit="us").dt.strftime("%Y-%m")


def _month_key(time_us: pl.Expr) -> pl.Expr:
    # An integer yyyymm groups 10M rows much faster than formatted strings.
    stamp = pl.from_epoch(time_us, time_unit="us")
    return (stamp.dt.year() * 100 + stamp.dt.month()).alias("month")


def partition_dir(out_dir: str | Path, kind: str, symbol: str, month: str) -> Path:
    return Path(out_dir) / f"kind={kind}" / f"symbol={symbol}" / f"month={month}"


def content_hash(frame: pl.DataFrame) -> str:
    """SHA-256 of the rows' values (not of Parquet bytes, which vary with the writer)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(frame.columns)).encode())
    for name in frame.columns:
        column = frame[name]
        if column.dtype == pl.Utf8:
            # Run-length form: a symbol/kind column is one long run, so this stays cheap.
            runs = column.fill_null("\x00").rle().struct.unnest()
            digest.update("\x1f".join(runs["value"].to_list()).encode())
            digest.update(runs["len"].cast(pl.Int64).to_numpy().tobytes())
        elif column.null_count() == column.len():
            digest.update(f"all-null:{column.len()}".encode())
        else:
            if column.null_count():
                digest.update(column.is_null().to_numpy().tobytes())
                column = column.fill_null(False if column.dtype == pl.Boolean else 0)
            digest.update(column.to_numpy().tobytes())
    return digest.hexdigest()


def _split_by_partition(frame: pl.DataFrame) -> dict[tuple[str, str, str], pl.DataFrame]:
    """(kind, stream, YYYY-MM) -> rows sorted by trade id; the stream is the symbol plus
    its market (`BTCUSDT`, `BTCUSDT.um`), so spot and futures never share a partition."""
    keys = frame.select(
        (pl.col("kind") != pl.col("kind").first()).any().alias("kinds"),
        (pl.col("symbol") != pl.col("symbol").first()).any().alias("symbols"),
        (pl.col("market") != pl.col("market").first()).any().alias("markets"),
        month_of(pl.col("time_us").min()).alias("first_month"),
        month_of(pl.col("time_us").max()).alias("last_month"),
    ).row(0, named=True)
    if (not keys["kinds"] and not keys["symbols"] and not keys["markets"]
            and keys["first_month"] == keys["last_month"]):
        # A daily or monthly archive file: one partition, no per-row grouping needed.
        stream = stream_key(frame["symbol"][0], frame["market"][0])
        groups = {(frame["kind"][0], stream, keys["first_month"]): frame}
    else:
        stream_expr = (pl.when(pl.col("market") == "spot").then(pl.col("symbol"))
                       .otherwise(pl.concat_str([pl.col("symbol"), pl.lit("."), pl.col("market")])))
        split = frame.with_columns(_month_key(pl.col("time_us")), _stream=stream_expr).partition_by(
            ["kind", "_stream", "month"], as_dict=True, maintain_order=True
        )
        groups = {
            (kind, stream, f"{month // 100:04d}-{month % 100:02d}"): rows.drop("month", "_stream")
            for (kind, stream, month), rows in split.items()
        }
    return {key: _sorted_by_id(rows) for key, rows in sorted(groups.items())}


def _sorted_by_id(rows: pl.DataFrame) -> pl.DataFrame:
    if rows.height > 1 and rows["trade_id"].diff().min() <= 0:
        return rows.sort("trade_id", maintain_order=True)
    return rows


def _as_canonical(frame: pl.DataFrame) -> pl.DataFrame:
    if "market" not in frame.columns:  # tables from before futures support were spot
        frame = frame.with_columns(market=pl.lit("spot", dtype=pl.Utf8))
    missing = [c for c in CANONICAL_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"not a canonical trade table: missing column(s) {', '.join(missing)}")
    return frame.select([pl.col(c).cast(t) for c, t in CANONICAL_SCHEMA.items()])


def _id_range(part: Path) -> tuple[int, int]:
    bounds = (
        pl.scan_parquet(part)
        .select(pl.col("trade_id").min().alias("lo"), pl.col("trade_id").max().alias("hi"))
        .collect()
    )
    return int(bounds["lo"].item()), int(bounds["hi"].item())


def write_partitions(
    frame: pl.DataFrame,
    out_dir: str | Path,
    source: str | Path | None = None,
    lineage: dict | None = None,
) -> list[Path]:
    """Write `frame` as partition files; return every part that holds its rows.

    Re-writing the same rows is a no-op. Rows overlapping (by trade id) another part
    already in a partition raise `DataError` before anything is written.
    """
    parts, _ = write_partitions_detailed(frame, out_dir, source, lineage)
    return parts


def write_partitions_detailed(
    frame: pl.DataFrame,
    out_dir: str | Path,
    source: str | Path | None = None,
    lineage: dict | None = None,
) -> tuple[list[Path], list[Path]]:
    """`write_partitions`, also returning the parts this call created (the rest existed)."""
    frame = _as_canonical(frame)
    if frame.is_empty():
        return [], []
    plans: list[tuple[Path, pl.DataFrame]] = []
    for (kind, symbol, month), rows in _split_by_partition(frame).items():
        target = (
            partition_dir(out_dir, kind, symbol, month) / f"part-{content_hash(rows)[:8]}.parquet"
        )
        _refuse_overlap(target, rows, source)
        plans.append((target, rows))
    metadata = {
        "mega_trading": json.dumps(
            provenance(stage="ingest", source=str(source) if source else None, **(lineage or {})),
            sort_keys=True,
        )
    }
    written = []
    for target, rows in plans:
        if target.exists():
            continue
        with atomic_path(target) as tmp:
            rows.write_parquet(tmp, compression="zstd", statistics=True, metadata=metadata)
        written.append(target)
    return [target for target, _ in plans], written


def _refuse_overlap(target: Path, rows: pl.DataFrame, source: str | Path | None) -> None:
    if target.exists() or not target.parent.is_dir():
        return
    lo, hi = int(rows["trade_id"][0]), int(rows["trade_id"][-1])
    for part in sorted(target.parent.glob(PART_GLOB)):
        part_lo, part_hi = _id_range(part)
        if part_lo <= hi and lo <= part_hi:
            raise DataError(
                f"trade ids {lo}..{hi} overlap {part_lo}..{part_hi} already in {part} "
                "(same trades ingested twice from different files?); nothing written",
                source,
            )


def list_partitions(
    out_dir: str | Path,
    symbols: Iterable[str] | None = None,
    kinds: Iterable[str] | None = None,
    months: Iterable[str] | None = None,
) -> list[Path]:
    """Part files under `out_dir`, optionally only some symbols / kinds / months."""
    out_dir = Path(out_dir)
    wanted = {
        "kind": set(kinds) if kinds is not None else None,
        "symbol": {s.upper() for s in symbols} if symbols is not None else None,
        "month": set(months) if months is not None else None,
    }
    parts = []
    for part in sorted(out_dir.glob(f"kind=*/symbol=*/month=*/{PART_GLOB}")):
        keys = dict(p.split("=", 1) for p in part.relative_to(out_dir).parts[:-1])
        if all(allowed is None or keys[k] in allowed for k, allowed in wanted.items()):
            parts.append(part)
    return parts


def scan_partitions(
    out_dir: str | Path,
    symbols: Iterable[str] | None = None,
    kinds: Iterable[str] | None = None,
    months: Iterable[str] | None = None,
) -> pl.LazyFrame:
    """Lazy canonical table over the matching parts, sorted by kind, symbol, trade_id."""
    parts = list_partitions(out_dir, symbols, kinds, months)
    if not parts:
        raise DataError("no trade partitions match (run `mega-trading ingest` first)", out_dir)
    return (
        # Parts written before futures support have no market column: they are spot.
        pl.scan_parquet(parts, hive_partitioning=False, schema=CANONICAL_SCHEMA,
                        missing_columns="insert")
        .with_columns(pl.col("market").fill_null("spot"))
        .select(list(CANONICAL_COLUMNS))
        .sort(["kind", "market", "symbol", "trade_id"], maintain_order=True)
    )


def read_partitions(
    out_dir: str | Path,
    symbols: Iterable[str] | None = None,
    kinds: Iterable[str] | None = None,
    months: Iterable[str] | None = None,
) -> pl.DataFrame:
    """The canonical table of the matching parts (see `scan_partitions`)."""
    return scan_partitions(out_dir, symbols, kinds, months).collect()


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files to ingest: each path as given, a directory as its *.zip and *.csv files."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".zip", ".csv"))
            if not found:
                raise DataError("directory holds no .zip or .csv files", path)
            files.extend(found)
        else:
            files.append(path)
    return files


def check_symbol_override(files: Sequence[Path], symbol: str | None) -> None:
    """One `--symbol` for files whose names say different symbols is a mistake."""
    if symbol is None:
        return
    seen: dict[str, Path] = {}
    for path in files:
        name = parse_archive_name(path)
        if name is not None:
            seen.setdefault(name.symbol, path)
        if len(seen) > 1:
            (first_symbol, first_path), *_ = seen.items()
            raise DataError(
                f"--symbol {symbol.upper()} given, but the files are for {first_symbol} "
                f"({first_path.name}) and {name.symbol}",
                path,
            )


def ingest_files(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    symbol: str | None = None,
    kind: str | None = None,
    on_file: Callable[[Path, FileIngest], None] | None = None,
    market: str | None = None,
) -> list[FileIngest]:
    """Read, validate and partition each file in turn; stop at the first bad one.

    Files before a bad one stay ingested (each write is atomic and idempotent, so the run
    can simply be repeated once the bad file is fixed or removed).
    """
    files = expand_inputs(paths)
    check_symbol_override(files, symbol)
    results = []
    for path in files:
        frame, report = read_trades_with_report(path, symbol=symbol, kind=kind, market=market)
        parts, written = write_partitions_detailed(
            frame, out_dir, source=path, lineage={"source_sha256": report.source_sha256}
        )
        result = FileIngest(report=report, parts=tuple(parts), written=tuple(written))
        results.append(result)
        if on_file is not None:
            on_file(path, result)
    return results
