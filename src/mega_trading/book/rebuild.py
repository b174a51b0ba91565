"""Rebuild one symbol's order book from a REST snapshot plus depth diffs, exactly.

Binance's documented rules ("How to manage a local order book correctly"):

* spot: after a snapshot with ``lastUpdateId`` L, drop diffs with ``u`` <= L; the first
  diff applied must have ``U`` <= L + 1 <= ``u``; every later diff's ``U`` must be the
  previous ``u`` + 1.
* USD-M futures: drop diffs with ``u`` < L; the first diff applied must have ``U`` <= L <=
  ``u``; every later diff's ``pu`` must equal the previous ``u``.

A diff that breaks the chain is a gap: the book is thrown away, the gap is recorded, and
nothing is trusted (no level change, no top-of-book row, no bookTicker check) until a
snapshot that the following diffs bridge. Diffs received while no book is held are kept
in a bounded buffer, because a snapshot's response often arrives after diffs that are
newer than it (the capture is in receive order).

A snapshot carries no symbol. One taken for another symbol is caught by its prices: the
symbol's last trade or bookTicker price (or, failing that, the next one) must lie inside
the snapshot's price range; until that check has passed, everything built on the
snapshot is provisional and is rolled back if it fails.

Hand-written because no library keeps a Binance book: the level maps are
`sortedcontainers.SortedDict` (best price and top-N in O(log n)).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import deque
from typing import Any

import polars as pl
from sortedcontainers import SortedDict

from mega_trading.book.capture import sequence_continues

PRICE_SCALE = 10**8          # Binance prices have at most 8 decimals
DEPTH_LEVELS = (5, 10)       # depth columns of top.parquet besides the touch
PENDING_DIFFS = 50_000       # diffs kept while waiting for a snapshot
SNAPSHOT_PRICE_SLACK = 0.10  # reference price may sit 10 % outside the snapshot's range

# Rows are appended as tuples (one list append per row: the hot loop's cheapest form);
# distances from the mid are computed column-wise when the table is built (build.py).
EVENT_COLUMNS = ("time_ns", "update_id", "side", "price", "mid", "old_qty", "new_qty",
                 "from_snapshot")
TOP_COLUMNS = ("time_ns", "exchange_time_ms", "update_id", "bid_px", "bid_qty", "ask_px",
               "ask_qty", "bid_depth_5", "ask_depth_5", "bid_depth_10", "ask_depth_10")
TRADE_COLUMNS = ("time_ns", "trade_time_ms", "trade_id", "price", "qty", "is_buyer_maker")
TICKER_COLUMNS = ("time_ns", "update_id", "bid_px", "bid_qty", "ask_px", "ask_qty")


def tick_size(prices: list[float]) -> float:
    """The price grid: gcd of the distances between the snapshot's prices."""
    scaled = sorted({round(p * PRICE_SCALE) for p in prices})
    step = 0
    for a, b in itertools.pairwise(scaled):
        step = math.gcd(step, b - a)
    return step / PRICE_SCALE if step else float("nan")


class Rows:
    """Append-only row tuples that can be cut back to a mark (provisional output)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.rows: list[tuple] = []

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list:
        i = self.names.index(name)
        return [row[i] for row in self.rows]

    def truncate(self, n: int) -> None:
        del self.rows[n:]

    def frame(self, schema: dict[str, Any]) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema={n: schema[n] for n in self.names}, orient="row")


def diff_levels(data: dict) -> tuple[list, list] | None:
    """A diff's (bid, ask) level changes as (price, size) floats; None when one is not a
    [price, size] pair of numbers."""
    try:
        return ([(float(p), float(q)) for p, q in data.get("b") or ()],
                [(float(p), float(q)) for p, q in data.get("a") or ()])
    except (TypeError, ValueError):
        return None


def exchange_time_ms(data: dict) -> int | None:
    """The diff's event time "E" when it is an integer (else null in top.parquet)."""
    value = data.get("E")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _depths(bid_qty: list[float], ask_qty: list[float]) -> tuple[float, float, float, float]:
    """(bid_depth_5, ask_depth_5, bid_depth_10, ask_depth_10) of sizes listed from the
    touch out, added in that order (spelled out: sum() of floats is compensated from
    Python 3.12, and the native path must give the same bits on every version)."""
    out = []
    for sizes in (bid_qty, ask_qty):
        total = five = 0.0
        for k, size in enumerate(sizes):
            total += size
            if k == DEPTH_LEVELS[0] - 1:
                five = total
        out.append((five if len(sizes) >= DEPTH_LEVELS[0] else total, total))
    (bid5, bid10), (ask5, ask10) = out
    return bid5, ask5, bid10, ask10


@dataclasses.dataclass
class Gap:
    where: str
    time_ns: int
    reason: str
    expected: int | None = None
    got: int | None = None
    resynced_at_ns: int | None = None
    buffered_diffs: int = 0

    def as_dict(self, book: str) -> dict[str, Any]:
        return {"book": book, **dataclasses.asdict(self)}


class BookBuilder:
    """Feeds on one (market, symbol)'s messages in receive order; collects the outputs."""

    def __init__(self, market: str, symbol: str):
        self.market, self.symbol = market, symbol
        self.bids: SortedDict = SortedDict()
        self.asks: SortedDict = SortedDict()
        self.synced = False
        self.snapshot_id: int | None = None      # set while a snapshot awaits its bridge
        self.snapshot_mark = (0, 0)              # output sizes before that snapshot's rows
        self.last_u: int | None = None
        self.tick = float("nan")
        self.pending: deque = deque(maxlen=PENDING_DIFFS)
        self.ref_price: float | None = None
        self.unverified: tuple[tuple[int, int], float, float, str] | None = None
        self.events = Rows(EVENT_COLUMNS)
        self.top = Rows(TOP_COLUMNS)
        self.trades = Rows(TRADE_COLUMNS)
        self.tickers = Rows(TICKER_COLUMNS)
        self.gaps: list[Gap] = []
        self.counts = {"diffs": 0, "diffs_applied": 0, "diffs_stale": 0, "diffs_untrusted": 0,
                       "snapshots": 0,
                       "snapshots_used": 0, "snapshots_unneeded": 0, "syncs": 0, "resyncs": 0,
                       "crossed_after_diff": 0}
        self.rejected_snapshots: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return f"{self.market}:{self.symbol}"

    # ---- snapshots ------------------------------------------------------------------

    def on_snapshot(self, data: dict, time_ns: int, where: str) -> None:
        self.counts["snapshots"] += 1
        try:
            last_id = int(data["lastUpdateId"])
            bids = [(float(p), float(q)) for p, q in data["bids"]]
            asks = [(float(p), float(q)) for p, q in data["asks"]]
        except (KeyError, TypeError, ValueError):
            self._reject(where, "snapshot without lastUpdateId/bids/asks")
            return
        if not bids or not asks:
            self._reject(where, "snapshot with an empty side")
            return
        if self.synced:
            self.counts["snapshots_unneeded"] += 1  # the chain is unbroken: nothing to resync
            return
        low, high = min(p for p, _ in bids), max(p for p, _ in asks)
        if self.ref_price is not None and not self._plausible(self.ref_price, low, high):
            self._reject(where, f"snapshot prices {low:g}..{high:g} do not contain "
                         f"{self.symbol}'s last price {self.ref_price:g}: another symbol's?")
            return
        if math.isnan(self.tick):
            self.tick = tick_size([p for p, _ in bids] + [p for p, _ in asks])
        self.snapshot_mark = self._output_sizes()
        if self.ref_price is None:
            self.unverified = (self.snapshot_mark, low, high, where)
        self._load_snapshot(bids, asks, time_ns, last_id)
        self.snapshot_id = last_id
        self.last_u = None
        buffered, self.pending = list(self.pending), deque(maxlen=PENDING_DIFFS)
        for diff, diff_time, diff_where in buffered:
            self.on_diff(diff, diff_time, diff_where, replay=True)

    @staticmethod
    def _plausible(price: float, low: float, high: float) -> bool:
        return low * (1 - SNAPSHOT_PRICE_SLACK) <= price <= high * (1 + SNAPSHOT_PRICE_SLACK)

    def _reject(self, where: str, reason: str) -> None:
        self.rejected_snapshots.append({"where": where, "reason": reason})

    # ---- storage: the level maps and the output rows (book/native.py overrides these) --

    def _output_sizes(self) -> tuple[int, int]:
        return len(self.events), len(self.top)

    def _truncate(self, n_events: int, n_top: int | None = None) -> None:
        self.events.truncate(n_events)
        if n_top is not None:
            self.top.truncate(n_top)

    def _clear_levels(self) -> None:
        self.bids, self.asks = SortedDict(), SortedDict()

    def _add_trade(self, row: tuple) -> None:
        self.trades.rows.append(row)

    def _add_ticker(self, row: tuple) -> None:
        self.tickers.rows.append(row)

    def _load_snapshot(self, bids: list[tuple[float, float]], asks: list[tuple[float, float]],
                       time_ns: int, last_id: int) -> None:
        """The snapshot's book (sizes <= 0 left out, a repeated price's last size wins) and
        its levels as level-change rows, bids then asks, each by ascending price."""
        self.bids = SortedDict((p, q) for p, q in bids if q > 0)
        self.asks = SortedDict((p, q) for p, q in asks if q > 0)
        mid = self._mid()
        self.events.rows.extend((time_ns, last_id, side, price, mid, 0.0, qty, True)
                                for side, levels in ((1, self.bids), (-1, self.asks))
                                for price, qty in levels.items())

    # ---- diffs ----------------------------------------------------------------------

    def on_diff(self, data: dict, time_ns: int, where: str, replay: bool = False) -> None:
        """`replay`: a buffered diff fed again after a snapshot (already counted)."""
        if not replay:
            self.counts["diffs"] += 1
        try:
            first, last = int(data["U"]), int(data["u"])
            prev = int(data["pu"]) if self.market == "um" else 0
        except (KeyError, TypeError, ValueError):
            self._break(where, time_ns, "diff without U/u" + ("/pu" if self.market == "um" else ""))
            return
        levels = diff_levels(data)
        if levels is None:   # a garbled diff: what it changed is unknown, so is the book
            self._break(where, time_ns, "diff with a malformed level")
            return
        if self.synced:
            if last <= self.last_u:
                self.counts["diffs_stale"] += 0 if replay else 1
                return
            if not sequence_continues(self.market, self.last_u, first, prev):
                got = prev if self.market == "um" else first
                want = self.last_u if self.market == "um" else self.last_u + 1
                self._break(where, time_ns, "sequence break", want, got)
                self._hold(data, time_ns, where, replay)
                return
        elif self.snapshot_id is not None:
            lid = self.snapshot_id
            if (last <= lid) if self.market == "spot" else (last < lid):
                self.counts["diffs_stale"] += 0 if replay else 1
                return
            bridge = lid + 1 if self.market == "spot" else lid
            if first > bridge:
                self._reject(where, f"snapshot {lid} is older than the next diff (U={first})")
                self._truncate(self.snapshot_mark[0])   # its levels were never trusted
                self._drop_book()
                self._hold(data, time_ns, where, replay)
                return
            self._sync(time_ns)
        else:
            self._hold(data, time_ns, where, replay)
            return
        if replay:
            self.counts["diffs_untrusted"] -= 1
        self._apply(levels, exchange_time_ms(data), time_ns, last)

    def _hold(self, data: dict, time_ns: int, where: str, replay: bool) -> None:
        """No trusted book: keep the diff for the next snapshot; untrusted unless a
        snapshot later bridges it."""
        self.pending.append((data, time_ns, where))
        if not replay:
            self.counts["diffs_untrusted"] += 1
            if self.gaps:
                self.gaps[-1].buffered_diffs += 1

    def _sync(self, time_ns: int) -> None:
        self.synced = True
        self.snapshot_id = None
        self.counts["snapshots_used"] += 1
        self.counts["syncs"] += 1
        if self.gaps and self.gaps[-1].resynced_at_ns is None:
            self.gaps[-1].resynced_at_ns = time_ns
            self.counts["resyncs"] += 1

    def _drop_book(self) -> None:
        if self.unverified is not None:   # nothing built on an unchecked snapshot survives
            (n_events, n_top), *_ = self.unverified
            self._truncate(n_events, n_top)
            self.unverified = None
        self._clear_levels()
        self.synced = False
        self.snapshot_id = None
        self.last_u = None

    def _break(self, where: str, time_ns: int, reason: str, expected: int | None = None,
               got: int | None = None) -> None:
        if self.synced or self.snapshot_id is not None:
            self.gaps.append(Gap(where, time_ns, reason, expected, got))
            self._drop_book()

    def _apply(self, levels: tuple[list, list], exchange_ms: int | None, time_ns: int,
               last: int) -> None:
        """The diff's level changes (against the mid before it), then its top-of-book row."""
        mid = self._mid()
        append = self.events.rows.append
        for side, book, changes in ((1, self.bids, levels[0]), (-1, self.asks, levels[1])):
            for price, qty in changes:
                old = book.get(price, 0.0)
                if qty == old:
                    continue
                if qty > 0:
                    book[price] = qty
                else:
                    book.pop(price, None)  # a size <= 0 for a level not held
                append((time_ns, last, side, price, mid, old, qty, False))
        self.last_u = last
        self.counts["diffs_applied"] += 1
        self._emit_top(time_ns, exchange_ms, last)

    def _mid(self) -> float | None:
        if not self.bids or not self.asks:
            return None
        return 0.5 * (self.bids.peekitem(-1)[0] + self.asks.peekitem(0)[0])

    def _emit_top(self, time_ns: int, exchange_ms: Any, update_id: int) -> None:
        bids, asks = self.bids, self.asks
        if bids and asks:
            best_bids = bids.keys()[-DEPTH_LEVELS[-1]:]
            best_asks = asks.keys()[:DEPTH_LEVELS[-1]]
            bid_px, ask_px = best_bids[-1], best_asks[0]
            if bid_px >= ask_px:
                self.counts["crossed_after_diff"] += 1
            bid_qty = [bids[p] for p in reversed(best_bids)]
            ask_qty = [asks[p] for p in best_asks]
            self.top.rows.append((time_ns, exchange_ms, update_id, bid_px, bid_qty[0], ask_px,
                                  ask_qty[0], *_depths(bid_qty, ask_qty)))
        else:  # a side emptied (a thin book): prices unknown, depth what is left
            bid_qty = [bids[p] for p in bids.keys()[-DEPTH_LEVELS[-1]:]][::-1]
            ask_qty = [asks[p] for p in asks.keys()[:DEPTH_LEVELS[-1]]]
            self.top.rows.append((time_ns, exchange_ms, update_id,
                                  bids.peekitem(-1)[0] if bids else math.nan,
                                  bid_qty[0] if bid_qty else 0.0,
                                  asks.peekitem(0)[0] if asks else math.nan,
                                  ask_qty[0] if ask_qty else 0.0, *_depths(bid_qty, ask_qty)))

    # ---- trades and bookTickers ------------------------------------------------------

    def _see_price(self, price: float, time_ns: int, where: str) -> None:
        self.ref_price = price
        if self.unverified is None:
            return
        _, low, high, snap_where = self.unverified
        if self._plausible(price, low, high):
            self.unverified = None
            return
        self._reject(snap_where, f"snapshot prices {low:g}..{high:g} do not contain "
                     f"{self.symbol}'s price {price:g} at {where}: another symbol's?")
        self.gaps.append(Gap(snap_where, time_ns, "snapshot rejected after use"))
        self._drop_book()

    def on_trade(self, data: dict, time_ns: int, where: str) -> bool:
        try:
            price, qty = float(data["p"]), float(data["q"])
            row = (time_ns, int(data["T"]), int(data["t"]), price, qty, bool(data["m"]))
        except (KeyError, TypeError, ValueError):
            return False
        self._add_trade(row)
        self._see_price(price, time_ns, where)
        return True

    def on_ticker(self, data: dict, time_ns: int, where: str) -> bool:
        try:
            row = (time_ns, int(data["u"]), float(data["b"]), float(data["B"]),
                   float(data["a"]), float(data["A"]))
        except (KeyError, TypeError, ValueError):
            return False
        self._add_ticker(row)
        self._see_price(0.5 * (row[2] + row[4]), time_ns, where)
        return True
