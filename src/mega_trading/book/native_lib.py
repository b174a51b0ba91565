"""The book's native library: building and loading it (`library()`), the numpy and ctypes
mirrors of its C structs (records, output rows, state), and which path runs.

The library is `book_scan.c` (the capture scanner) and `book_state.c` (the book and its
loop) sharing `book_native.h`, built by `mega_trading.core.native`. Separate from the
builder and the scanner's driver because both use these bindings, and the engine choice
(`resolve_engine`) must work, with a note, where the library cannot build.

Which path runs: `MEGA_TRADING_BOOK_ENGINE` (or `mega-trading book --engine`) = ``auto``
(native when the library builds here, else Python with a note), ``native`` (an error when
it cannot build) or ``python``.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from mega_trading.book.rebuild import TICKER_COLUMNS, TOP_COLUMNS
from mega_trading.core import native
from mega_trading.core.errors import ConfigError

# Linked into one library; book_native.h (shared) and book_json.h (the scanner's) are
# found beside them, and every one of these files is in the build's cache key.
SOURCES = (Path(__file__).with_name("book_scan.c"), Path(__file__).with_name("book_state.c"))
LIBRARY_NAME = "book_native"
# Exact IEEE arithmetic: no -ffast-math, and no contraction into FMAs (-ffp-contract=off)
# so every add and multiply rounds as Python's do.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared")
ENGINE_ENV = "MEGA_TRADING_BOOK_ENGINE"
ENGINES = ("auto", "native", "python")

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
    """book_state.c's state_t: what Python and the loop share between calls."""

    _fields_ = [(name, ctypes.c_int64) for name in ("market_um", "synced", "last_u",
                                                      "unverified", "has_ref", "scale")] + [
        ("ref_price", ctypes.c_double)] + [
        (name, ctypes.c_int64) for name in ("diffs", "diffs_applied", "diffs_stale",
                                            "crossed_after_diff", "oom")]


@functools.cache
def library() -> ctypes.CDLL:
    lib = native.build(SOURCES, FLAGS, name=LIBRARY_NAME)
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
        raise RuntimeError(f"book_scan.c's record is {lib.scan_record_size()} bytes, "
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


def array_at(address: int, count: int, dtype: np.dtype) -> np.ndarray:
    """A numpy view of `count` items at `address` (valid while C keeps that memory)."""
    if count == 0 or not address:
        return np.empty(0, dtype)
    buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype, count=count)
