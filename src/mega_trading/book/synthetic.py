"""Synthetic captures with a known true book, for tests and bench/book.py (labelled synthetic).

`synthetic_capture(n_diffs, ...)` returns capture lines (``b"<ns> <json>"``): a REST
snapshot, then depth diffs (spot ``U``/``u`` or USD-M ``pu`` chains) each followed by a
bookTicker whose ``u`` is the diff's final id and whose prices and sizes are those of the
TRUE book after the diff, so a rebuild can be checked against ground truth.
`snapshot_every=k` adds a true snapshot before every k-th diff (resync points for tests).
"""

from __future__ import annotations

import json

import numpy as np

TICK = 0.01
START_NS = 1_723_161_253_000_000_000


def _fmt(x: float) -> str:
    return f"{x:.8f}"


def synthetic_capture(n_diffs: int, market: str = "spot", symbol: str = "BTCUSDT",
                      levels_per_diff: int = 8, book_levels: int = 200, seed: int = 0,
                      first_id: int = 1_000_000, tickers: bool = True,
                      snapshot_every: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    mid_ticks = 6_000_000
    bids = {mid_ticks - k: float(rng.integers(1, 500)) / 100 for k in range(1, book_levels + 1)}
    asks = {mid_ticks + k: float(rng.integers(1, 500)) / 100 for k in range(1, book_levels + 1)}
    last_id = first_id
    # USD-M: the first diff must straddle the snapshot's id (U <= lastUpdateId <= u)
    snapshot_id = last_id + 1 if market == "um" else last_id
    lines = [_snapshot_line(START_NS, snapshot_id, bids, asks, market)]
    stream = symbol.lower() + ("@depth@0ms" if market == "um" else "@depth@100ms")
    time_ns = START_NS
    for i in range(n_diffs):
        time_ns += 100_000_000
        if snapshot_every and i and i % snapshot_every == 0:  # as a recorder's resync would
            lines.append(_snapshot_line(time_ns - 50_000_000,
                                        last_id + 1 if market == "um" else last_id,
                                        bids, asks, market))
        changes = {"b": [], "a": []}
        best_bid, best_ask = max(bids), min(asks)
        for _ in range(levels_per_diff):
            side = "b" if rng.random() < 0.5 else "a"
            book, best = (bids, best_bid) if side == "b" else (asks, best_ask)
            sign = -1 if side == "b" else 1
            price = best + sign * int(rng.integers(0, 20))
            if rng.random() < 0.3 and len(book) > 5 and price in book:
                qty = 0.0          # a cancel / a level emptied
            else:
                qty = float(rng.integers(1, 500)) / 100
            if qty == 0.0:
                book.pop(price, None)
            else:
                book[price] = qty
            changes[side].append([_fmt(price * TICK), _fmt(qty)])
        first, prev = last_id + 1, last_id
        last_id += int(rng.integers(1, 5)) + levels_per_diff
        data = {"e": "depthUpdate", "E": time_ns // 1_000_000, "s": symbol, "U": first,
                "u": last_id, "b": changes["b"], "a": changes["a"]}
        if market == "um":
            data["pu"] = prev
        lines.append(_line(time_ns, {"stream": stream, "data": data}))
        if tickers:
            bid, ask = max(bids), min(asks)
            lines.append(_line(time_ns + 1000, {"stream": symbol.lower() + "@bookTicker", "data": {
                "u": last_id, "s": symbol, "b": _fmt(bid * TICK), "B": _fmt(bids[bid]),
                "a": _fmt(ask * TICK), "A": _fmt(asks[ask])}}))
    return lines


def _line(time_ns: int, doc: dict) -> bytes:
    return f"{time_ns} ".encode() + json.dumps(doc, separators=(",", ":")).encode()


def _snapshot_line(time_ns: int, last_id: int, bids: dict, asks: dict, market: str) -> bytes:
    doc = {"lastUpdateId": last_id,
           "bids": [[_fmt(p * TICK), _fmt(q)] for p, q in sorted(bids.items(), reverse=True)],
           "asks": [[_fmt(p * TICK), _fmt(q)] for p, q in sorted(asks.items())]}
    if market == "um":
        doc = {"lastUpdateId": last_id, "E": time_ns // 1_000_000, "T": time_ns // 1_000_000,
               **{k: doc[k] for k in ("bids", "asks")}}
    return _line(time_ns, doc)
