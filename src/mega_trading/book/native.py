"""The book's native path: `book_native.c` scans capture lines into numeric records and
runs the book's steady state; the control logic stays `rebuild.BookBuilder`'s.

`NativeBookBuilder` is a `BookBuilder` whose level maps and output rows live in C (its
storage hooks call the library); everything that decides (snapshots, bridges, gaps,
resyncs, provisional snapshots and their rollback) is the inherited Python code, so the
two paths cannot drift apart in their rules. `feed_file` drives one capture: blocks of
lines from `capture.capture_blocks` (ISA-L inflating in a thread) go through the scanner;
`book_run` applies records until one needs the control logic, Python handles that one
record (as a `Message`, through `build`'s feeder) and calls back in.

Lines the scanner does not fully understand come back as bytes and are decoded by
`capture.decode_line`, the pure-Python path's own code. Skips are reported in line order,
as the pure-Python reader does.

Which path runs: `MEGA_TRADING_BOOK_ENGINE` (or `mega-trading book --engine`) = ``auto``
(native when the library builds here, else Python with a note), ``native`` (an error when
it cannot build) or ``python``.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import polars as pl

from mega_trading.book.capture import (
    DIFF,
    READ_ERRORS,
    SNAPSHOT,
    TICKER,
    TRADE,
    Message,
    Skips,
    capture_blocks,
    decode_line,
    time_scale,
    truncation_reason,
)
from mega_trading.book.rebuild import (
    EVENT_COLUMNS,
    TICKER_COLUMNS,
    TOP_COLUMNS,
    TRADE_COLUMNS,
    BookBuilder,
)
from mega_trading.core import native
from mega_trading.core.errors import ConfigError

SOURCE = Path(__file__).with_name("book_native.c")
# Exact IEEE arithmetic: no -ffast-math, and no contraction into FMAs (-ffp-contract=off)
# so every add and multiply rounds as Python's do.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared")
ENGINE_ENV = "MEGA_TRADING_BOOK_ENGINE"
ENGINES = ("auto", "native", "python")
# Inflate + scan in a reader thread (ctypes and ISA-L release the GIL) while this thread
# runs the book on the previous block: the two halves take about the same time.
SCAN_THREAD = True
SCANNERS = 3   # scanner buffers in flight: one being filled, one queued, one in use

K_DIFF, K_TRADE, K_TICKER, K_SNAPSHOT, K_PY, K_SKIP = 1, 2, 3, 4, 5, 6
SKIP_REASONS = {1: "line without a receive time", 2: "stream not used by the book"}
F_PU, F_E, F_M = 1, 2, 4

_i8, _f8 = np.int64, np.float64
RECORD = np.dtype([("line", _i8), ("stamp", _i8), ("a", _i8), ("b", _i8), ("c", _i8),
                   ("d", _i8), ("x0", _f8), ("x1", _f8), ("x2", _f8), ("x3", _f8),
                   ("lvb", _i8), ("lva", _i8), ("nb", np.int32), ("na", np.int32),
                   ("sym", np.int32), ("kind", np.int8), ("flags", np.int8),
                   ("reason", np.int8), ("pad", np.int8)])
EVENT = np.dtype([("price", _f8), ("old_qty", _f8), ("new_qty", _f8), ("group", np.uint32),
                  ("side", np.int8), ("pad", "V3")])
GROUP = np.dtype([("time_ns", _i8), ("update_id", _i8), ("mid", _f8), ("has_mid", np.int8),
                  ("from_snapshot", np.int8), ("pad", "V6")])
TOP = np.dtype([("time_ns", _i8), ("exchange_time_ms", _i8), ("update_id", _i8),
                *((c, _f8) for c in TOP_COLUMNS[3:]), ("has_exchange_time", np.int8),
                ("pad", "V7")])
TRADE_ROW = np.dtype([("time_ns", _i8), ("trade_time_ms", _i8), ("trade_id", _i8),
                      ("price", _f8), ("qty", _f8), ("is_buyer_maker", np.int8),
                      ("pad", "V7")])
TICKER_ROW = np.dtype([("time_ns", _i8), ("update_id", _i8),
                       *((c, _f8) for c in TICKER_COLUMNS[2:])])


class _State(ctypes.Structure):
    """book_native.c's state_t: what Python and the loop share between calls."""

    _fields_ = [(name, ctypes.c_int64) for name in ("market_um", "synced", "last_u",
                                                      "unverified", "has_ref", "scale")] + [
        ("ref_price", ctypes.c_double)] + [
        (name, ctypes.c_int64) for name in ("diffs", "diffs_applied", "diffs_stale",
                                            "crossed_after_diff", "oom")]


C_COUNTS = ("diffs", "diffs_applied", "diffs_stale", "crossed_after_diff")


@functools.cache
def library() -> ctypes.CDLL:
    lib = native.build(SOURCE, FLAGS)
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    signatures = {
        "scan_new": ([], p), "scan_free": ([p], None), "scan_reset": ([p], None),
        "scan_feed": ([p, ctypes.c_char_p, i64], None), "scan_count": ([p], i64),
        "scan_lines": ([p], i64), "scan_set_lines": ([p, i64], None),
        "scan_records": ([p], p), "scan_levels": ([p], p), "scan_level_count": ([p], i64),
        "scan_py": ([p], p), "scan_symbol_count": ([p], ctypes.c_int32),
        "scan_symbol": ([p, ctypes.c_int32], ctypes.c_char_p),
        "scan_oom": ([p], ctypes.c_int32), "scan_record_size": ([], i64),
        "book_new": ([i64], p), "book_free": ([p], None),
        "book_state": ([p], ctypes.POINTER(_State)),
        "book_events": ([p, ctypes.POINTER(i64)], p), "book_tops": ([p, ctypes.POINTER(i64)], p),
        "book_groups": ([p, ctypes.POINTER(i64)], p),
        "book_trades": ([p, ctypes.POINTER(i64)], p),
        "book_tickers": ([p, ctypes.POINTER(i64)], p),
        "book_sizes": ([p, ctypes.POINTER(i64)], i64), "book_truncate": ([p, i64, i64], None),
        "book_clear": ([p], None),
        "book_apply": ([p, p, i64, p, i64, i64, i64, i64, i64], ctypes.c_int),
        "book_load_snapshot": ([p, p, i64, p, i64, i64, i64], ctypes.c_int),
        "book_add_trade": ([p, i64, i64, i64, f64, f64, i64], ctypes.c_int),
        "book_add_ticker": ([p, i64, i64, f64, f64, f64, f64], ctypes.c_int),
        "book_run": ([p, p, p, i64, i64], i64),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    if lib.scan_record_size() != RECORD.itemsize:
        raise RuntimeError(f"book_native.c's record is {lib.scan_record_size()} bytes, "
                           f"numpy's view {RECORD.itemsize}")
    return lib


@functools.cache
def native_error() -> str | None:
    """Why the native path cannot run here (no C compiler, a failed build), or None."""
    return native.load_error(library)


def resolve_engine(engine: str | None = None) -> tuple[str, str | None]:
    """(the path to run: "native" or "python", a note when auto fell back to Python)."""
    wanted = (engine or os.environ.get(ENGINE_ENV, "") or "auto").strip().lower()
    if wanted not in ENGINES:
        raise ConfigError(f"book engine {wanted!r} is not one of {', '.join(ENGINES)} "
                          f"(--engine / ${ENGINE_ENV})")
    if wanted == "python":
        return "python", None
    error = native_error()
    if error is None:
        return "native", None
    if wanted == "native":
        raise ConfigError(f"the native book path cannot run here: {error}")
    return "python", f"native book path unavailable ({error}); using the pure-Python path"


def _array(address: int, count: int, dtype: np.dtype) -> np.ndarray:
    """A numpy view of `count` items at `address` (valid while C keeps that memory)."""
    if count == 0 or not address:
        return np.empty(0, dtype)
    buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype, count=count)


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
        return _array(address, count.value, dtype).copy()

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
    """A BookBuilder whose levels and output rows live in book_native.c."""

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


class _Scan:
    """One block's records (numpy views of the scanner's buffers, valid until the next
    block) and the scanner's symbol table."""

    def __init__(self, lib: ctypes.CDLL, handle: int):
        self.handle = handle
        self.records = _array(lib.scan_records(handle), lib.scan_count(handle), RECORD)
        n_levels = lib.scan_level_count(handle)
        self.levels = _array(lib.scan_levels(handle), 2 * n_levels,
                             np.dtype(np.float64)).reshape(-1, 2)
        self.py_address = lib.scan_py(handle)
        self.symbols = [lib.scan_symbol(handle, i).decode()
                        for i in range(lib.scan_symbol_count(handle))]

    def py_line(self, i: int) -> bytes:
        r = self.records[i]
        return ctypes.string_at(self.py_address + int(r["a"]), int(r["b"]))

    def message(self, i: int, scale: int) -> Message:
        """A typed record as the Message the pure-Python reader would have made."""
        r = self.records[i]
        kind, flags, sym = int(r["kind"]), int(r["flags"]), int(r["sym"])
        data: dict[str, Any]
        if kind == K_DIFF:
            data = {"U": int(r["a"]), "u": int(r["b"])}
            if flags & F_PU:
                data["pu"] = int(r["c"])
            if flags & F_E:
                data["E"] = int(r["d"])
            data["b"] = self._side(r["lvb"], r["nb"])
            data["a"] = self._side(r["lva"], r["na"])
            name = DIFF
        elif kind == K_TRADE:
            data = {"p": float(r["x0"]), "q": float(r["x1"]), "T": int(r["a"]),
                    "t": int(r["b"]), "m": bool(flags & F_M)}
            name = TRADE
        elif kind == K_TICKER:
            data = {"u": int(r["a"]), "b": float(r["x0"]), "B": float(r["x1"]),
                    "a": float(r["x2"]), "A": float(r["x3"])}
            name = TICKER
        else:
            data = {"lastUpdateId": int(r["a"]), "bids": self._side(r["lvb"], r["nb"]),
                    "asks": self._side(r["lva"], r["na"])}
            name = SNAPSHOT
        if flags & F_E and kind in (K_TICKER, K_SNAPSHOT):
            data["E"] = None   # its presence tells the market; the value is not used
        if sym >= 0:
            data["s"] = self.symbols[sym]
        return Message(name, int(r["stamp"]) * scale, data, int(r["line"]))

    def _side(self, first: int, count: int) -> list:
        return self.levels[int(first):int(first) + int(count)].tolist()


class _DeferredSkips:
    """Skips of the fast phase, reported in line order when the file is done."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.items: list[tuple[int, str]] = []

    def add(self, reason: str, where: str) -> None:
        self.items.append((int(where.rpartition(":")[2]), reason))

    def add_records(self, lines: np.ndarray, reasons: np.ndarray) -> None:
        self.items.extend(zip(lines.tolist(), (SKIP_REASONS[r] for r in reasons.tolist()),
                              strict=True))

    def flush(self, skips: Skips) -> None:
        self.items.sort(key=lambda item: item[0])
        room = max(0, 20 - len(skips.examples))
        for line, reason in self.items[:room]:
            skips.add(reason, f"{self.path}:{line}")
        for reason, n in collections.Counter(r for _, r in self.items[room:]).items():
            skips.counts[reason] = skips.counts.get(reason, 0) + n
        self.items.clear()


def feed_file(path: Path, feeder: Any, skips: Skips, threads: int | None = None) -> None:
    """One capture through the scanner and `feeder` (build._FileFeeder: the file's
    identity, held messages, the symbol check and the feed into its builder)."""
    lib = library()
    decoder = msgspec.json.Decoder()
    deferred = _DeferredSkips(path)
    state = {"scale": None}
    reader = _ScannedBlocks(lib, path, threads)
    try:
        for scan in reader:
            _feed_block(scan, path, feeder, skips, deferred, decoder, state)
            reader.done(scan)
        deferred.flush(skips)
        if reader.error is not None:   # a cut gzip: the lines before the cut were kept
            skips.add(truncation_reason(reader.error, reader.lines), str(path))
    finally:
        reader.close()
        if isinstance(feeder.builder, NativeBookBuilder):
            feeder.builder.collect_counts()


class _ScannedBlocks:
    """The file's blocks, scanned: in a reader thread (`SCAN_THREAD`) that inflates and
    scans ahead into a small pool of scanner buffers, else inline. Iterating yields
    `_Scan`s in file order; `done(scan)` gives its buffer back; `error` / `lines` say where
    a cut gzip ended the file."""

    def __init__(self, lib: ctypes.CDLL, path: Path, threads: int | None):
        self.lib, self.path = lib, path
        self.error: BaseException | None = None
        self.lines = 0
        self.handles = [lib.scan_new() for _ in range(SCANNERS if SCAN_THREAD else 1)]
        if not all(self.handles):
            self.close()
            raise MemoryError("scan_new")
        self.free: queue.Queue = queue.Queue()
        for handle in self.handles:
            self.free.put(handle)
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        # the reader thread inflates itself: a third busy thread would only compete
        self.blocks = capture_blocks(path, threads=0 if SCAN_THREAD else threads)
        self.worker = None
        if SCAN_THREAD:
            self.worker = threading.Thread(target=self._read, name="book-scan", daemon=True)
            self.worker.start()

    def _scan_next(self) -> int | None:
        """The next block scanned into a free buffer; None at the end (or a cut)."""
        try:
            data, n = next(self.blocks)
        except StopIteration:
            return None
        except READ_ERRORS as exc:
            self.error = exc
            return None
        handle = self.free.get()
        if self.stop.is_set() or not handle:   # closing: the consumer has stopped
            return None
        self.lib.scan_reset(handle)
        self.lib.scan_set_lines(handle, self.lines)
        self.lib.scan_feed(handle, data, n)
        self.lines = self.lib.scan_lines(handle)
        if self.lib.scan_oom(handle):
            raise MemoryError("the capture scanner ran out of memory")
        return handle

    def _read(self) -> None:
        try:
            while not self.stop.is_set():
                handle = self._scan_next()
                self.ready.put(handle)
                if handle is None:
                    return
        except BaseException as exc:   # handed to the consumer, raised there
            self.ready.put(exc)

    def __iter__(self):
        while True:
            item = self.ready.get() if self.worker else self._scan_next()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield _Scan(self.lib, item)

    def done(self, scan: _Scan) -> None:
        self.free.put(scan.handle)

    def close(self) -> None:
        self.stop.set()
        if self.worker is not None:
            self.free.put(0)    # wakes a reader waiting for a buffer: it stops there
            self.worker.join()
        self.blocks.close()
        for handle in self.handles:
            if handle:
                self.lib.scan_free(handle)
        self.handles = []


def _feed_block(scan: _Scan, path: Path, feeder: Any, skips: Skips,
                deferred: _DeferredSkips, decoder: msgspec.json.Decoder,
                state: dict) -> None:
    records = scan.records
    n = len(records)
    i = 0
    while i < n and feeder.builder is None:     # the file's identity is not known yet
        _one(scan, i, path, feeder, skips, decoder, state)
        i += 1
    if i >= n:
        return
    builder: NativeBookBuilder = feeder.builder
    kinds = records["kind"][i:]
    skipped = np.flatnonzero(kinds == K_SKIP) + i
    deferred.add_records(records["line"][skipped], records["reason"][skipped])
    stop = _first_foreign(scan, i, feeder.symbol)
    scale = state["scale"]
    while i < n:
        i = builder.run(records, scan.levels, i, stop, scale)
        if i >= n:
            break
        _one(scan, i, path, feeder, deferred, decoder, state)   # raises at `stop` (< n)
        i += 1


def _first_foreign(scan: _Scan, start: int, symbol: str) -> int:
    """The first typed record from `start` whose "s" is another symbol (feeding it raises
    the one-line error), else the number of records."""
    foreign = [k for k, s in enumerate(scan.symbols) if s.upper() != symbol]
    if not foreign:
        return len(scan.records)
    tail = scan.records[start:]
    typed = (tail["kind"] >= K_DIFF) & (tail["kind"] <= K_SNAPSHOT)
    hits = np.flatnonzero(typed & np.isin(tail["sym"], foreign))
    return start + int(hits[0]) if len(hits) else len(scan.records)


def _one(scan: _Scan, i: int, path: Path, feeder: Any, skips: Any,
         decoder: msgspec.json.Decoder, state: dict) -> None:
    """Record i the pure-Python way: a skip, a PY line decoded, or a typed message fed."""
    r = scan.records[i]
    kind = int(r["kind"])
    line = int(r["line"])
    if kind == K_SKIP:
        skips.add(SKIP_REASONS[int(r["reason"])], f"{path}:{line}")
        return
    if kind == K_PY:
        name, reason, stamp, data = decode_line(scan.py_line(i), decoder)
        if name is not None and state["scale"] is None:
            state["scale"] = time_scale(stamp)
        if reason is not None:
            skips.add(reason, f"{path}:{line}")
            return
        feeder.feed(Message(name, stamp * state["scale"], data, line), skips)
        return
    if state["scale"] is None:
        state["scale"] = time_scale(int(r["stamp"]))
    feeder.feed(scan.message(i, state["scale"]), skips)


def make_builder(engine: str) -> Callable[[str, str], BookBuilder]:
    return NativeBookBuilder if engine == "native" else BookBuilder
