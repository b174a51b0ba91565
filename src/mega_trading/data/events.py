"""Trades -> events: the scale-free features one tokenizer can share across symbols.

Per trade (all causal: a feature uses only the trade itself and EARLIER trades of the
same symbol):

* ``side``      +1 when the taker bought, -1 when the taker sold. Binance's
                ``is_buyer_maker=True`` means the buyer was the resting order, so the
                taker SOLD.
* ``move_bps``  1e4 * (price / previous price - 1); 0 at a segment start.
* ``log_size``  ln(quote notional) minus the mean ln(quote notional) of the previous
                ``size_window`` trades of the symbol (a causal rolling geometric-mean
                level). A log ratio to a recent level is unit-free, so BTC's and ETH's
                sizes share bins; the level is the *mean of logs* because it stays exact
                when a partition is processed with only the previous window as context
                (an EWMA would need its whole history). The very first trade of a symbol
                has no history and gets 0.
* ``dt_us``     microseconds since the previous trade; 0 at a segment start.

A new *segment* starts at the first trade of a symbol, after a gap in trade ids (missing
data), or after a pause longer than ``max_pause_s``; the tokenizer emits a segment-start
token there so the model never reads a price move across a hole in the data.
"""

from __future__ import annotations

import polars as pl

from mega_trading.core.config import PositiveFloat, PositiveInt, config_dataclass

EVENT_COLUMNS = (
    "symbol", "trade_id", "time_us", "price", "quote_qty",
    "side", "move_bps", "log_size", "dt_us", "segment", "segment_start",
)


@config_dataclass
class EventConfig:
    size_window: PositiveInt = 1000
    max_pause_s: PositiveFloat = 60.0


def compute_events(
    trades: pl.DataFrame,
    cfg: EventConfig = EventConfig(),
    context: pl.DataFrame | None = None,
    first_segment: int = 0,
) -> pl.DataFrame:
    """Event table for the trades of ONE symbol, in trade-id order.

    ``context`` holds the trades just before ``trades`` (e.g. the tail of the previous
    partition, at least ``size_window`` rows): they feed the causal features and are not
    returned. ``first_segment`` numbers the segments continuing an earlier part.
    """
    if trades.height == 0:
        return _empty_events()
    symbols = trades["symbol"].unique()
    if symbols.len() != 1:
        raise ValueError(f"compute_events takes one symbol at a time, got {symbols.to_list()}")
    n_context = 0
    frame = trades.select(["symbol", "trade_id", "time_us", "price", "quote_qty", "is_buyer_maker"])
    if context is not None and context.height:
        context = context.tail(cfg.size_window + 1).select(frame.columns)
        n_context = context.height
        frame = pl.concat([context, frame], how="vertical_relaxed")

    max_pause_us = int(cfg.max_pause_s * 1e6)
    prev_id = pl.col("trade_id").shift(1)
    prev_time = pl.col("time_us").shift(1)
    new_segment = (
        prev_id.is_null()
        | (pl.col("trade_id") != prev_id + 1)
        | ((pl.col("time_us") - prev_time) > max_pause_us)
    )
    ln_notional = pl.col("quote_qty").log()
    level = ln_notional.rolling_mean(window_size=cfg.size_window, min_samples=1).shift(1)
    events = frame.with_columns(
        side=pl.when(pl.col("is_buyer_maker")).then(-1).otherwise(1).cast(pl.Int8),
        segment_start=new_segment,
        move_bps=pl.when(new_segment)
        .then(0.0)
        .otherwise((pl.col("price") / pl.col("price").shift(1) - 1.0) * 1e4),
        dt_us=pl.when(new_segment).then(0).otherwise(pl.col("time_us") - prev_time).cast(pl.Int64),
        log_size=(ln_notional - level).fill_null(0.0),
    )
    events = events.slice(n_context)
    # Without context the first row always opens segment `first_segment`; with context,
    # rows before the first new start continue the context's open segment `first_segment`.
    opened = pl.col("segment_start").cast(pl.Int32).cum_sum()
    offset = first_segment if n_context else first_segment - 1
    events = events.with_columns(segment=(opened + offset).cast(pl.Int32))
    return events.select(EVENT_COLUMNS)


def _empty_events() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "symbol": pl.Utf8, "trade_id": pl.Int64, "time_us": pl.Int64, "price": pl.Float64,
            "quote_qty": pl.Float64, "side": pl.Int8, "move_bps": pl.Float64,
            "log_size": pl.Float64, "dt_us": pl.Int64, "segment": pl.Int32,
            "segment_start": pl.Boolean,
        }
    )
