"""Order-book stylized facts on a rebuilt book (`book` output), with a noise floor.

Reads only ``top.parquet``, ``book_events.parquet`` and ``trades.parquet``; writes
``book_facts.json``. Per book (market:symbol):

* spread distribution (ticks), depth profile by level band (1, 2-5, 6-10),
* queue size at the touch, cancel-to-trade ratio (volume and count),
* OFI regression: Cont-Kukanov-Stoikov order-flow imbalance per interval against the
  same interval's and the NEXT interval's mid move (ticks),
* resilience: the spread after a taker order that consumes the whole touch queue.

Same discipline as the trade facts (facts.py): every scalar carries a moving-block
bootstrap 95 % CI and its value on each half of the sample; ``half_gap`` (|first − second|)
is the noise floor: two real samples of the same market already differ by that much, so a
model's gap below it is as good as real. A near-constant variable (a spread that is one
tick almost always) is flagged in ``warnings`` rather than read as a distribution.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mega_trading.core.lineage import provenance, write_json_atomic

FACTS_NAME = "book_facts.json"
N_BOOT = 200
OFI_INTERVAL_S = 1.0
RESILIENCE_HORIZONS_S = (0.1, 0.5, 1.0, 5.0)
MIN_SAMPLES = 30
MAX_HOLE_S = 60.0


def bootstrap(values: np.ndarray, stat: Callable[[np.ndarray], float], seed: int = 0,
              n_boot: int = N_BOOT) -> dict[str, Any]:
    """stat on all values, a moving-block bootstrap CI (blocks keep the serial dependence)
    and its value on each time-ordered half (the noise floor)."""
    values = np.asarray(values)
    n = len(values)
    if n < MIN_SAMPLES:
        return {"value": None, "n": n, "note": f"fewer than {MIN_SAMPLES} samples"}
    rng = np.random.default_rng(seed)
    block = max(1, n // 50)
    starts_max = n - block + 1
    reps = []
    for _ in range(n_boot):
        starts = rng.integers(0, starts_max, size=-(-n // block))
        idx = (starts[:, None] + np.arange(block)[None, :]).ravel()[:n]
        reps.append(stat(values[idx]))
    first, second = stat(values[: n // 2]), stat(values[n // 2:])
    lo, hi = np.nanpercentile(reps, [2.5, 97.5])
    return {"value": float(stat(values)), "ci95": [float(lo), float(hi)], "n": n,
            "first_half": float(first), "second_half": float(second),
            "half_gap": float(abs(first - second))}


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    x = x - x.mean()
    denom = float(x @ x)
    if denom == 0:
        return float("nan"), float("nan")
    slope = float(x @ (y - y.mean())) / denom
    resid = y - y.mean() - slope * x
    total = float(((y - y.mean()) ** 2).sum())
    return slope, (1 - float(resid @ resid) / total) if total else float("nan")


def spread_facts(top: pl.DataFrame, tick: float) -> tuple[dict[str, Any], list[str]]:
    spread = ((top["ask_px"] - top["bid_px"]) / tick).round().to_numpy()
    warnings = []
    one_tick = float(np.mean(spread <= 1)) if len(spread) else float("nan")
    if one_tick > 0.95:
        warnings.append(f"spread is one tick in {100 * one_tick:.1f} % of updates: a "
                        "near-constant variable, compare its tail, not its distribution")
    quantiles = {f"p{q}": float(np.percentile(spread, q)) for q in (50, 90, 99)} if len(spread) else {}
    return {"share_one_tick": bootstrap(spread <= 1, np.mean),
            "mean_ticks": bootstrap(spread, np.mean), **quantiles}, warnings


def depth_profile(top: pl.DataFrame) -> dict[str, Any]:
    out = {}
    for side in ("bid", "ask"):
        touch = top[f"{side}_qty"].to_numpy()
        band_2_5 = (top[f"{side}_depth_5"] - top[f"{side}_qty"]).to_numpy() / 4
        band_6_10 = (top[f"{side}_depth_10"] - top[f"{side}_depth_5"]).to_numpy() / 5
        out[side] = {"level_1": bootstrap(touch, np.mean),
                     "levels_2_5_per_level": bootstrap(band_2_5, np.mean),
                     "levels_6_10_per_level": bootstrap(band_6_10, np.mean)}
    return out


def queue_at_touch(top: pl.DataFrame, trades: pl.DataFrame) -> dict[str, Any]:
    queue = np.concatenate([top["bid_qty"].to_numpy(), top["ask_qty"].to_numpy()])
    median_trade = float(trades["qty"].median()) if trades.height else float("nan")
    return {"median_qty": bootstrap(queue, np.median),
            "median_in_trade_sizes": bootstrap(queue / median_trade, np.median)
            if median_trade > 0 else None}


def cancel_to_trade(events: pl.DataFrame, trades: pl.DataFrame) -> dict[str, Any]:
    """Size removed from the book (level decreases) not explained by traded size, per
    traded size; and level decreases per trade. An upper bound on cancels: a fill and a
    cancel at one level inside one diff cannot be told apart."""
    diffs = events.filter(~pl.col("from_snapshot"))
    removed = diffs.filter(pl.col("new_qty") < pl.col("old_qty"))
    removed_qty = float((removed["old_qty"] - removed["new_qty"]).sum())
    traded = float(trades["qty"].sum())
    return {"volume_ratio": (removed_qty - traded) / traded if traded else None,
            "decreases_per_trade": removed.height / trades.height if trades.height else None,
            "level_decreases": removed.height, "trades": trades.height}


def order_flow_imbalance(top: pl.DataFrame, tick: float) -> dict[str, Any]:
    """e_n of Cont, Kukanov & Stoikov (2014), summed per interval, against the mid move.

    Only intervals that hold updates are used, and a move is not read across a hole of
    more than MAX_HOLE_S (a book fed several capture runs months apart)."""
    top = top.sort("time_ns")
    bid, ask = top["bid_px"].to_numpy(), top["ask_px"].to_numpy()
    bq, aq = top["bid_qty"].to_numpy(), top["ask_qty"].to_numpy()
    e = ((bid[1:] >= bid[:-1]) * bq[1:] - (bid[1:] <= bid[:-1]) * bq[:-1]
         - (ask[1:] <= ask[:-1]) * aq[1:] + (ask[1:] >= ask[:-1]) * aq[:-1])
    t_s = top["time_ns"].to_numpy()[1:] / 1e9
    if len(t_s) == 0:
        return {"note": "too few intervals", "intervals": 0}
    bucket = np.floor((t_s - t_s[0]) / OFI_INTERVAL_S).astype(np.int64)
    occupied, inverse = np.unique(bucket, return_inverse=True)
    ofi = np.bincount(inverse, weights=e, minlength=len(occupied))
    last_row = np.r_[np.flatnonzero(np.diff(inverse)), len(inverse) - 1]
    mid = (0.5 * (bid[1:] + ask[1:]) / tick)[last_row]     # mid at each interval's end
    step = np.diff(occupied)
    ok = step * OFI_INTERVAL_S <= MAX_HOLE_S                 # move k: interval k-1 -> k
    same = np.column_stack([ofi[1:], np.diff(mid)])[ok]
    follows = step[1:] == 1                                  # next interval is adjacent
    nxt = np.column_stack([ofi[1:-1], np.diff(mid)[1:]])[ok[:-1] & ok[1:] & follows]
    if len(same) < MIN_SAMPLES:
        return {"note": "too few intervals", "intervals": len(same)}
    return {"interval_s": OFI_INTERVAL_S, "intervals": len(same),
            "slope_same_interval_ticks_per_qty": bootstrap(same, _slope),
            "r2_same_interval": _ols(same[:, 0], same[:, 1])[1],
            "slope_next_interval_ticks_per_qty": bootstrap(nxt, _slope),
            "r2_next_interval": _ols(nxt[:, 0], nxt[:, 1])[1] if len(nxt) else None}


def _slope(pairs: np.ndarray) -> float:
    return _ols(pairs[:, 0], pairs[:, 1])[0]


def resilience(top: pl.DataFrame, trades: pl.DataFrame, tick: float) -> dict[str, Any]:
    """Taker orders (prints sharing a time and side) whose size reaches the touch queue
    just before them, and the spread (ticks) h seconds later, minus the spread before."""
    if trades.height == 0 or top.height == 0:
        return {"note": "no trades or no book"}
    orders = (trades.group_by("trade_time_ms", "is_buyer_maker", maintain_order=True)
              .agg(pl.col("time_ns").first(), pl.col("qty").sum()).sort("time_ns"))
    book = top.select("time_ns", "bid_qty", "ask_qty",
                      spread=(pl.col("ask_px") - pl.col("bid_px")) / tick).sort("time_ns")
    before = orders.join_asof(book, on="time_ns", strategy="backward").drop_nulls("spread")
    touch = pl.when(pl.col("is_buyer_maker")).then(pl.col("bid_qty")).otherwise(pl.col("ask_qty"))
    hits = before.filter(pl.col("qty") >= touch)
    out: dict[str, Any] = {"touch_consuming_orders": hits.height, "orders": orders.height}
    for horizon in RESILIENCE_HORIZONS_S:
        later = hits.select(pl.col("spread").alias("spread_before"),
                            time_ns=pl.col("time_ns") + int(horizon * 1e9))
        after = later.join_asof(book.select("time_ns", "spread"), on="time_ns",
                                strategy="backward")
        excess = (after["spread"] - after["spread_before"]).to_numpy()
        out[f"median_spread_excess_ticks_{horizon:g}s"] = bootstrap(excess, np.median)
    return out


def book_facts(out_dir: Path) -> dict[str, Any]:
    top_all = pl.read_parquet(out_dir / "top.parquet")
    events_all = pl.read_parquet(out_dir / "book_events.parquet")
    trades_all = pl.read_parquet(out_dir / "trades.parquet")
    ticks = {name: b["tick_size"] for name, b in
             json.loads((out_dir / "check.json").read_text())["books"].items()}
    books = {}
    for name, tick in sorted(ticks.items()):
        market, symbol = name.split(":")
        sel = (pl.col("market") == market) & (pl.col("symbol") == symbol)
        top = top_all.filter(sel).filter(pl.col("bid_px").is_not_nan() & pl.col("ask_px").is_not_nan())
        events, trades = events_all.filter(sel), trades_all.filter(sel)
        spread, warnings = spread_facts(top, tick)
        books[name] = {"tick_size": tick, "updates": top.height, "spread_ticks": spread,
                       "depth_profile": depth_profile(top),
                       "queue_at_touch": queue_at_touch(top, trades),
                       "cancel_to_trade": cancel_to_trade(events, trades),
                       "ofi": order_flow_imbalance(top, tick),
                       "resilience": resilience(top, trades, tick), "warnings": warnings}
    return {"format": "mega-trading/book-facts@1", "books": books}


def _finite(obj: Any) -> Any:
    """NaN/inf -> null: strict JSON for the report and other readers."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_book_facts(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    facts = _finite(book_facts(out_dir))
    facts["provenance"] = provenance(inputs=[str(out_dir / n) for n in
                                             ("top.parquet", "book_events.parquet",
                                              "trades.parquet", "check.json")])
    return write_json_atomic(out_dir / FACTS_NAME, facts)
