"""The native BookBuilder: a `rebuild.BookBuilder` whose level maps and output rows live in
C (`book_state.c`); its storage hooks call the library, and `run` hands a block of scanned
records to the C loop (`book_run`) until one needs the control logic.

Everything that decides (snapshots, bridges, gaps, resyncs, provisional snapshots and
their rollback) is the inherited Python code, so the two paths cannot drift apart in their
rules. Feeding a capture through the scanner is `native_scan.feed_file`; the bindings and
the engine choice are `native_lib`'s.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from mega_trading.book.native_lib import (
    EVENT,
    GROUP,
    TICKER_ROW,
    TOP,
    TRADE_ROW,
    array_at,
    library,
)
from mega_trading.book.rebuild import (
    EVENT_COLUMNS,
    TICKER_COLUMNS,
    TOP_COLUMNS,
    TRADE_COLUMNS,
    BookBuilder,
)

C_COUNTS = ("diffs", "diffs_applied", "diffs_stale", "crossed_after_diff")


def _levels(values: Any) -> np.ndarray:
    """[[price, size], ...] (floats or strings) as C-contiguous float64 pairs."""
    pairs = [(float(p), float(q)) for p, q in values or ()]
    return np.ascontiguousarray(np.asarray(pairs, dtype=np.float64).reshape(-1, 2))


def _ptr(array: np.ndarray) -> int:
    return array.ctypes.data


_TABLES = {"events": ("book_events", EVENT), "groups": ("book_groups", GROUP),
           "top": ("book_tops", TOP),
           "trades": ("book_trades", TRADE_ROW), "tickers": ("book_tickers", TICKER_ROW)}


class NativeRows:
    """One output table of a NativeBookBuilder, read from C when asked (the Rows API)."""

    def __init__(self, builder: NativeBookBuilder, table: str, names: tuple[str, ...]):
        self._builder, self._table, self.names = builder, table, names

    def array(self, table: str | None = None) -> np.ndarray:
        fn, dtype = _TABLES[table or self._table]
        count = ctypes.c_int64()
        address = getattr(self._builder.lib, fn)(self._builder.book, ctypes.byref(count))
        return array_at(address, count.value, dtype).copy()

    def __len__(self) -> int:
        sizes = (ctypes.c_int64 * 4)()
        self._builder.lib.book_sizes(self._builder.book, sizes)
        return sizes[("events", "top", "trades", "tickers").index(self._table)]

    def column(self, name: str) -> list:
        return self.frame_columns()[name].tolist()

    def frame_columns(self) -> dict[str, Any]:
        rows = self.array()
        if self._table == "events":   # a change's group holds what its diff's changes share
            group = self.array("groups")[rows["group"]]
            columns: dict[str, Any] = {name: group[name] if name in GROUP.names else rows[name]
                                       for name in self.names}
            columns["_valid"] = group["has_mid"] != 0
            columns["from_snapshot"] = group["from_snapshot"] != 0
            return columns
        columns = {name: rows[name] for name in self.names}
        if self._table == "top":
            columns["_valid"] = rows["has_exchange_time"] != 0
        elif self._table == "trades":
            columns["is_buyer_maker"] = rows["is_buyer_maker"] != 0
        return columns

    def frame(self, schema: dict[str, Any]) -> pl.DataFrame:
        """The table with the pure-Python path's dtypes and nulls (no mid / no "E")."""
        columns = self.frame_columns()
        valid = columns.pop("_valid", None)
        df = pl.DataFrame({n: pl.Series(n, columns[n], dtype=schema[n]) for n in self.names})
        if valid is not None:
            nullable = "mid" if self._table == "events" else "exchange_time_ms"
            df = df.with_columns(pl.when(pl.Series(valid)).then(pl.col(nullable))
                                 .otherwise(None).alias(nullable))
        return df


class NativeBookBuilder(BookBuilder):
    """A BookBuilder whose levels and output rows live in book_state.c."""

    def __init__(self, market: str, symbol: str):
        super().__init__(market, symbol)
        self.lib = library()
        self.book = self.lib.book_new(int(market == "um"))
        if not self.book:
            raise MemoryError("book_new")
        weakref.finalize(self, self.lib.book_free, self.book)
        self.state = self.lib.book_state(self.book).contents
        self.bids = self.asks = None   # the levels are C's
        self.events = NativeRows(self, "events", EVENT_COLUMNS)
        self.top = NativeRows(self, "top", TOP_COLUMNS)
        self.trades = NativeRows(self, "trades", TRADE_COLUMNS)
        self.tickers = NativeRows(self, "tickers", TICKER_COLUMNS)

    # ---- storage hooks ----------------------------------------------------------------

    def _check(self, status: int) -> None:
        if status or self.state.oom:
            raise MemoryError("the native book ran out of memory")

    def _output_sizes(self) -> tuple[int, int]:
        sizes = (ctypes.c_int64 * 4)()
        self.lib.book_sizes(self.book, sizes)
        return sizes[0], sizes[1]

    def _truncate(self, n_events: int, n_top: int | None = None) -> None:
        self.lib.book_truncate(self.book, n_events, -1 if n_top is None else n_top)

    def _clear_levels(self) -> None:
        self.lib.book_clear(self.book)

    def _add_trade(self, row: tuple) -> None:
        self._check(self.lib.book_add_trade(self.book, *row[:5], int(row[5])))

    def _add_ticker(self, row: tuple) -> None:
        self._check(self.lib.book_add_ticker(self.book, *row))

    def _load_snapshot(self, bids, asks, time_ns: int, last_id: int) -> None:
        bid_lv, ask_lv = _levels(bids), _levels(asks)
        self._check(self.lib.book_load_snapshot(self.book, _ptr(bid_lv), len(bid_lv),
                                                _ptr(ask_lv), len(ask_lv), time_ns, last_id))

    def _apply(self, levels: tuple[list, list], exchange_ms: int | None, time_ns: int,
               last: int) -> None:
        bid_lv, ask_lv = _levels(levels[0]), _levels(levels[1])
        self._check(self.lib.book_apply(self.book, _ptr(bid_lv), len(bid_lv), _ptr(ask_lv),
                                        len(ask_lv), time_ns, last, int(exchange_ms is not None),
                                        exchange_ms or 0))
        self.last_u = last   # diffs_applied and crossed_after_diff are counted in C

    # ---- the loop ---------------------------------------------------------------------

    def run(self, records: np.ndarray, levels: np.ndarray, start: int, stop: int,
            scale: int) -> int:
        """book_run over records [start, stop): the index of the first one it left."""
        st = self.state
        st.synced = int(self.synced)
        st.last_u = self.last_u if self.last_u is not None else 0
        st.unverified = int(self.unverified is not None)
        st.has_ref = 0
        st.scale = scale
        at = self.lib.book_run(self.book, _ptr(records), _ptr(levels) if len(levels) else None,
                               start, stop)
        if st.oom:
            raise MemoryError("the native book ran out of memory")
        if self.synced:
            self.last_u = st.last_u
        if st.has_ref:
            self.ref_price = st.ref_price
        return at

    def collect_counts(self) -> None:
        """Move the counts kept in C into `counts`."""
        for name in C_COUNTS:
            self.counts[name] += getattr(self.state, name)
            setattr(self.state, name, 0)


def make_builder(engine: str) -> Callable[[str, str], BookBuilder]:
    return NativeBookBuilder if engine == "native" else BookBuilder
