"""`mega-trading book`: captures in, rebuilt books, their level changes and checks out.

Files are read in the order of their first receive time, so a file without a snapshot
continues the previous file of the same (market, symbol). Outputs (docs/CONTRACTS.md):

* ``book_events.parquet``: one row per level change (snapshot levels flagged),
* ``trades.parquet``: the ``@trade`` prints,
* ``top.parquet``: best bid/ask and depth at 1/5/10 levels after each applied diff,
* ``check.json``: the bookTicker check, gaps, resyncs, rejected snapshots, skipped lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from isal import igzip

from mega_trading.book.capture import (
    DIFF,
    SNAPSHOT,
    TICKER,
    TRADE,
    Message,
    Skips,
    name_identity,
    read_capture,
)
from mega_trading.book.native import NativeRows, make_builder
from mega_trading.book.native_lib import resolve_engine
from mega_trading.book.native_scan import feed_file
from mega_trading.book.rebuild import BookBuilder, Rows
from mega_trading.core.errors import DataError
from mega_trading.core.lineage import atomic_dir, provenance, sha256_file, write_json_atomic

CHECK_NAME = "check.json"


@dataclasses.dataclass
class Rebuilt:
    books: dict[str, BookBuilder]
    skips: Skips
    files: list[Path]
    engine: str = "python"          # the path that ran: "native" or "python"
    engine_note: str | None = None  # why auto fell back to Python


def _first_time(path: Path) -> float:
    try:
        with igzip.open(path, "rb") as handle:
            stamp = handle.readline().partition(b" ")[0]
        value = int(stamp)
        return value * (1 if value > 10**17 else 1000)
    except (OSError, EOFError, ValueError):
        return float("inf")


def _message_identity(msg: Message) -> tuple[str | None, str | None]:
    """(market, symbol) that one message reveals: futures diffs carry ``pu``, futures
    bookTickers and snapshots carry event times that spot ones do not."""
    data = msg.data
    symbol = data.get("s")
    if msg.kind == DIFF:
        market = "um" if "pu" in data else "spot"
    elif msg.kind in (TICKER, SNAPSHOT):
        market = "um" if "E" in data else "spot"
    else:
        market = None
    return market, symbol.upper() if isinstance(symbol, str) else None


def rebuild_captures(paths: list[Path], engine: str | None = None) -> Rebuilt:
    """Every capture replayed through one BookBuilder per (market, symbol).

    `engine`: "auto" (default, or $MEGA_TRADING_BOOK_ENGINE), "native" or "python" (see
    book/native_lib.py); both give the same books, rows and checks."""
    chosen, note = resolve_engine(engine)
    new_builder = make_builder(chosen)
    paths = sorted((Path(p) for p in paths), key=lambda p: (_first_time(p), str(p)))
    skips = Skips()
    books: dict[str, BookBuilder] = {}
    for path in paths:
        if not path.is_file():
            raise DataError("no such capture file", path)
        feeder = _FileFeeder(path, books, new_builder)
        if chosen == "native":
            feed_file(path, feeder, skips)
        else:
            for msg in read_capture(path, skips):
                feeder.feed(msg, skips)
        feeder.finish(skips)
    return Rebuilt(books, skips, paths, chosen, note)


class _FileFeeder:
    """One file's messages into its book: the file's (market, symbol) from its name, else
    from the first messages that tell (held until then); a message of another symbol is
    an error (a snapshot names no symbol, so a file holds one)."""

    def __init__(self, path: Path, books: dict[str, BookBuilder],
                 new_builder: Callable[[str, str], BookBuilder]):
        self.path, self.books, self.new_builder = path, books, new_builder
        self.market, self.symbol = name_identity(path)
        self.held: list[Message] = []
        self.builder: BookBuilder | None = None

    def feed(self, msg: Message, skips: Skips) -> None:
        msg_market, msg_symbol = _message_identity(msg)
        if msg_symbol is not None and self.symbol is not None and msg_symbol != self.symbol:
            raise DataError(f"a {msg_symbol} message in a {self.symbol} capture (one symbol "
                            "per file: a snapshot names no symbol)", self.path, msg.line)
        if self.builder is None:
            self.symbol = self.symbol or msg_symbol
            self.market = self.market or msg_market
            if self.symbol is None or self.market is None:
                self.held.append(msg)
                return
            key = f"{self.market}:{self.symbol}"
            if key not in self.books:
                self.books[key] = self.new_builder(self.market, self.symbol)
            self.builder = self.books[key]
            for earlier in self.held:
                _feed(self.builder, earlier, self.path, skips)
            self.held.clear()
        _feed(self.builder, msg, self.path, skips)

    def finish(self, skips: Skips) -> None:
        if self.held:
            skips.add(f"{len(self.held)} messages in a file whose symbol or market is unknown",
                      str(self.path))


def _feed(builder: BookBuilder, msg: Message, path: Path, skips: Skips) -> None:
    where = f"{path}:{msg.line}"
    if msg.kind == DIFF:
        builder.on_diff(msg.data, msg.time_ns, where)
    elif msg.kind == SNAPSHOT:
        builder.on_snapshot(msg.data, msg.time_ns, where)
    elif msg.kind == TRADE:
        if not builder.on_trade(msg.data, msg.time_ns, where):
            skips.add("trade without p/q/T/t/m", where)
    elif msg.kind == TICKER and not builder.on_ticker(msg.data, msg.time_ns, where):
        skips.add("bookTicker without u/b/B/a/A", where)


def frame(rows: Rows | NativeRows, schema: dict[str, Any], **constants: str) -> pl.DataFrame:
    df = rows.frame(schema)
    return df.with_columns(**{k: pl.lit(v) for k, v in constants.items()}).select(
        *constants, *rows.names)


def event_frame(builder: BookBuilder) -> pl.DataFrame:
    """Level changes with their distance from the mid before the change, away from the mid
    on the level's own side (negative: inside the spread)."""
    away = pl.when(pl.col("side") > 0).then(pl.col("mid") - pl.col("price")).otherwise(
        pl.col("price") - pl.col("mid"))
    df = frame(builder.events, EVENT_SCHEMA, market=builder.market, symbol=builder.symbol)
    return df.with_columns(distance_ticks=away / builder.tick,
                           distance_bps=1e4 * away / pl.col("mid")).select(
        "market", "symbol", "time_ns", "update_id", "side", "price", "mid", "distance_ticks",
        "distance_bps", "old_qty", "new_qty", "from_snapshot")


EVENT_SCHEMA = {"time_ns": pl.Int64, "update_id": pl.Int64, "side": pl.Int8,
                "price": pl.Float64, "mid": pl.Float64, "old_qty": pl.Float64,
                "new_qty": pl.Float64, "from_snapshot": pl.Boolean}
TOP_SCHEMA = {"time_ns": pl.Int64, "exchange_time_ms": pl.Int64, "update_id": pl.Int64,
              **{c: pl.Float64 for c in ("bid_px", "bid_qty", "ask_px", "ask_qty",
                                          "bid_depth_5", "ask_depth_5", "bid_depth_10",
                                          "ask_depth_10")}}
TRADE_SCHEMA = {"time_ns": pl.Int64, "trade_time_ms": pl.Int64, "trade_id": pl.Int64,
                "price": pl.Float64, "qty": pl.Float64, "is_buyer_maker": pl.Boolean}
TICKER_SCHEMA = {"time_ns": pl.Int64, "update_id": pl.Int64, "bid_px": pl.Float64,
                 "bid_qty": pl.Float64, "ask_px": pl.Float64, "ask_qty": pl.Float64}


def ticker_check(builder: BookBuilder) -> dict[str, Any]:
    """Each bookTicker whose update id is the final ``u`` of an applied diff, against the
    rebuilt touch right after that diff: prices and sizes must be equal."""
    tickers = frame(builder.tickers, TICKER_SCHEMA)
    top = frame(builder.top, TOP_SCHEMA).select("update_id", "bid_px", "bid_qty", "ask_px",
                                               "ask_qty").unique("update_id", keep="last")
    joined = tickers.join(top, on="update_id", how="inner", suffix="_book")
    bad = joined.filter((pl.col("bid_px") != pl.col("bid_px_book"))
                        | (pl.col("bid_qty") != pl.col("bid_qty_book"))
                        | (pl.col("ask_px") != pl.col("ask_px_book"))
                        | (pl.col("ask_qty") != pl.col("ask_qty_book")))
    return {"bookticker_total": tickers.height, "bookticker_checked": joined.height,
            "bookticker_mismatches": bad.height,
            "first_mismatches": bad.head(5).to_dicts()}


def book_summary(builder: BookBuilder) -> dict[str, Any]:
    counts = dict(builder.counts)
    return {"market": builder.market, "symbol": builder.symbol, "tick_size": builder.tick,
            **counts, **ticker_check(builder), "trades": len(builder.trades),
            "level_changes": len(builder.events), "gaps": [g.as_dict(builder.name)
                                                            for g in builder.gaps],
            "rejected_snapshots": builder.rejected_snapshots}


def check_document(rebuilt: Rebuilt) -> dict[str, Any]:
    books = {name: book_summary(b) for name, b in sorted(rebuilt.books.items())}
    if not any(b["diffs_applied"] for b in books.values()):
        raise DataError("no depth diff could be applied: the captures hold no usable snapshot "
                        "(a book cannot be rebuilt from diffs alone)",
                        ", ".join(str(p) for p in rebuilt.files))
    total = {key: sum(b[key] for b in books.values())
             for key in ("bookticker_total", "bookticker_checked", "bookticker_mismatches",
                         "resyncs", "syncs", "diffs", "diffs_applied", "diffs_untrusted")}
    return {**total, "gaps": [g for b in books.values() for g in b["gaps"]],
            "rejected_snapshots": [r for b in books.values() for r in b["rejected_snapshots"]],
            "skipped_lines": rebuilt.skips.counts, "skipped_examples": rebuilt.skips.examples,
            "books": books}


def concat_frames(rebuilt: Rebuilt, attr: str, schema: dict[str, Any]) -> pl.DataFrame:
    parts = [event_frame(b) if attr == "events" else
             frame(getattr(b, attr), schema, market=b.market, symbol=b.symbol)
             for _, b in sorted(rebuilt.books.items())]
    return pl.concat(parts) if parts else pl.DataFrame()


def write_book(paths: list[Path], out: Path, engine: str | None = None) -> dict[str, Any]:
    """Rebuild, check, write everything into `out` atomically; returns check.json's content
    (its provenance names the path that ran, and why auto fell back to Python if it did)."""
    rebuilt = rebuild_captures(paths, engine)
    check = check_document(rebuilt)
    check["provenance"] = provenance(inputs=[{"path": str(p), "sha256": sha256_file(p)}
                                             for p in rebuilt.files],
                                     book_engine=rebuilt.engine,
                                     **({"book_engine_note": rebuilt.engine_note}
                                        if rebuilt.engine_note else {}))
    with atomic_dir(out) as tmp:
        concat_frames(rebuilt, "events", EVENT_SCHEMA).write_parquet(tmp / "book_events.parquet")
        concat_frames(rebuilt, "trades", TRADE_SCHEMA).write_parquet(tmp / "trades.parquet")
        concat_frames(rebuilt, "top", TOP_SCHEMA).write_parquet(tmp / "top.parquet")
        write_json_atomic(tmp / CHECK_NAME, check)
    return check
