"""Events: side convention, causal features, segments, partition-boundary exactness."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mega_trading.data.events import EventConfig, compute_events


def make_trades(n: int = 300, seed: int = 0, symbol: str = "BTCUSDT", start_id: int = 100) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    price = 60_000 * np.exp(np.cumsum(rng.normal(0, 1e-4, n)))
    qty = rng.lognormal(-5, 1.5, n)
    time_us = 1_723_161_255_000_000 + np.cumsum(rng.choice([0, 1000, 5000, 250_000], n))
    return pl.DataFrame({
        "symbol": [symbol] * n, "kind": ["trades"] * n,
        "trade_id": np.arange(start_id, start_id + n), "price": price, "qty_base": qty,
        "quote_qty": price * qty, "time_us": time_us,
        "is_buyer_maker": rng.random(n) < 0.5, "is_best_match": [True] * n,
    })


def test_side_follows_taker_direction():
    trades = make_trades(50)
    events = compute_events(trades)
    # is_buyer_maker=True means the buyer rested, so the taker sold: side -1.
    assert (events["side"].to_numpy() == np.where(trades["is_buyer_maker"].to_numpy(), -1, 1)).all()


def test_move_and_elapsed_time_match_definitions():
    trades = make_trades(50)
    events = compute_events(trades)
    price, time_us = trades["price"].to_numpy(), trades["time_us"].to_numpy()
    np.testing.assert_allclose(events["move_bps"].to_numpy()[1:], 1e4 * (price[1:] / price[:-1] - 1))
    assert (events["dt_us"].to_numpy()[1:] == np.diff(time_us)).all()
    assert events["move_bps"][0] == 0.0 and events["dt_us"][0] == 0
    assert events["segment_start"][0]


def test_features_are_causal():
    trades = make_trades(400)
    base = compute_events(trades)
    future_changed = trades.with_columns(
        pl.when(pl.col("trade_id") >= 350).then(pl.col("price") * 1.5).otherwise(pl.col("price")).alias("price"),
        pl.when(pl.col("trade_id") >= 350).then(pl.col("quote_qty") * 100).otherwise(pl.col("quote_qty")).alias("quote_qty"),
    )
    changed = compute_events(future_changed)
    cut = 350 - 100
    for column in ("move_bps", "log_size", "dt_us", "side"):
        assert base[column][:cut].equals(changed[column][:cut]), column
    assert not base["log_size"][cut:].equals(changed["log_size"][cut:])


def test_size_is_scale_free_across_symbols():
    btc = make_trades(500, seed=1)
    eth = btc.with_columns(pl.col("quote_qty") / 25.0, symbol=pl.lit("ETHUSDT"))
    np.testing.assert_allclose(compute_events(btc)["log_size"].to_numpy()[1:],
                               compute_events(eth)["log_size"].to_numpy()[1:], atol=1e-9)


def test_id_gap_and_long_pause_start_new_segments():
    trades = make_trades(100)
    with_gap = trades.filter(pl.col("trade_id") != 150)  # a missing trade id
    events = compute_events(with_gap, EventConfig(max_pause_s=3600))
    starts = np.flatnonzero(events["segment_start"].to_numpy())
    assert starts.tolist() == [0, 50]
    assert events["move_bps"][50] == 0.0 and events["dt_us"][50] == 0
    assert events["segment"].to_list()[49:51] == [0, 1]

    paused = trades.with_columns(
        pl.when(pl.col("trade_id") >= 170).then(pl.col("time_us") + 120_000_000).otherwise(pl.col("time_us"))
    )
    events = compute_events(paused, EventConfig(max_pause_s=60))
    assert np.flatnonzero(events["segment_start"].to_numpy()).tolist() == [0, 70]


def test_context_makes_partitions_exact():
    trades = make_trades(3000, seed=3)
    cfg = EventConfig(size_window=500)
    whole = compute_events(trades, cfg)
    second = compute_events(trades.slice(1800), cfg, context=trades.slice(0, 1800), first_segment=0)
    tail = whole.slice(1800)
    for column in ("move_bps", "dt_us", "side", "segment", "segment_start"):
        assert second[column].equals(tail[column]), column
    np.testing.assert_allclose(second["log_size"].to_numpy(), tail["log_size"].to_numpy(), atol=1e-9)


def test_one_symbol_at_a_time():
    mixed = pl.concat([make_trades(10), make_trades(10, symbol="ETHUSDT", start_id=500)])
    with pytest.raises(ValueError, match="one symbol"):
        compute_events(mixed)
