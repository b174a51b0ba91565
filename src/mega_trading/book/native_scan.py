"""One capture through the native scanner (`book_scan.c`) into a book: blocks of lines from
`capture.capture_blocks` (ISA-L inflating, in a reader thread that also scans ahead) become
numeric records; `NativeBookBuilder.run` applies them until one needs the control logic,
and Python handles that one record (as a `Message`, through `build`'s feeder) and calls
back in.

Lines the scanner does not fully understand come back as bytes and are decoded by
`capture.decode_line`, the pure-Python path's own code. Skips are reported in line order,
as the pure-Python reader does.
"""

from __future__ import annotations

import collections
import ctypes
import queue
import threading
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

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
from mega_trading.book.native import NativeBookBuilder
from mega_trading.book.native_lib import (
    F_E,
    F_M,
    F_PU,
    K_DIFF,
    K_PY,
    K_SKIP,
    K_SNAPSHOT,
    K_TICKER,
    K_TRADE,
    RECORD,
    SKIP_REASONS,
    array_at,
    library,
)

# Inflate + scan in a reader thread (ctypes and ISA-L release the GIL) while this thread
# runs the book on the previous block: the two halves take about the same time.
SCAN_THREAD = True
SCANNERS = 3   # scanner buffers in flight: one being filled, one queued, one in use


class _Scan:
    """One block's records (numpy views of the scanner's buffers, valid until the next
    block) and the scanner's symbol table."""

    def __init__(self, lib: ctypes.CDLL, handle: int):
        self.handle = handle
        self.records = array_at(lib.scan_records(handle), lib.scan_count(handle), RECORD)
        n_levels = lib.scan_level_count(handle)
        self.levels = array_at(lib.scan_levels(handle), 2 * n_levels,
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
