"""The tick-class context of the move and gap fields, fitted on TRAINING events in stream
order: per tick class (``binning.MoveMemory.tick_classes``, the decoder's own), the quantile
table of the moves made in each move bin (context-aware move decoding) and the count of
training events in each move and gap bin (the support of tick-consistent sampling,
``generation/support.py``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl

from mega_trading.data.binning import MoveMemory, context_quantiles, move_ranks
from mega_trading.data.field_bins import FieldBins, positive_log_dt


def fit_tick_context(move: FieldBins, dt: FieldBins, events: pl.DataFrame, memory: MoveMemory,
                     n_quantiles: int) -> tuple[FieldBins, FieldBins]:
    """(move bins with per-class tables and counts, gap bins with per-class counts)."""
    values = events["move_bps"].to_numpy().astype(np.float64)
    move_index = move.index(values)
    streams, reset = streams_of(events)
    classes = memory.tick_classes(move_ranks(move_index, move.n_neg, memory.n_classes),
                                  streams, reset)
    tables = context_quantiles(values, move_index, classes, move.n_bins, memory.n_classes,
                               n_quantiles)
    dt_index = dt.index(positive_log_dt(events["dt_us"].to_numpy().astype(np.float64)))
    return (dataclasses.replace(move, context_quantiles=tables,
                                context_counts=class_counts(classes, move_index,
                                                            memory.n_classes, move.n_bins)),
            dataclasses.replace(dt, context_counts=class_counts(classes, dt_index,
                                                                memory.n_classes, dt.n_bins)))


def class_counts(classes: np.ndarray, bin_index: np.ndarray, n_classes: int,
                 n_bins: int) -> tuple[tuple[int, ...], ...]:
    """Training events per (tick class 0..n_classes, bin)."""
    counts = np.zeros((n_classes + 1, n_bins), dtype=np.int64)
    np.add.at(counts, (classes, bin_index), 1)
    return tuple(tuple(int(n) for n in row) for row in counts)


def contiguous_sample(events: pl.DataFrame, max_rows: int, n_chunks: int = 50) -> pl.DataFrame:
    """At most ``max_rows`` rows in ``n_chunks`` contiguous runs spread over the table (the
    move context needs events in stream order; a row sample would shuffle them)."""
    if events.height <= max_rows:
        return events
    run = max(max_rows // n_chunks, 1)
    starts = np.linspace(0, events.height - run, n_chunks).astype(np.int64)
    return pl.concat([events.slice(int(s), run) for s in starts])


def streams_of(events: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(stream id, starts a segment) per event row: streams are symbols (one stream
    without a symbol column); a segment start, or a row where the stream is not the row
    before's stream (a new chunk), resets the stream's decoding context."""
    n = events.height
    if "symbol" in events.columns:
        _, streams = np.unique(events["symbol"].cast(pl.Utf8).fill_null("").to_numpy(),
                               return_inverse=True)
    else:
        streams = np.zeros(n, dtype=np.int64)
    reset = np.zeros(n, dtype=bool)
    if "segment_start" in events.columns:
        reset |= events["segment_start"].fill_null(False).to_numpy().astype(bool)
    if "segment" in events.columns:
        seg = events["segment"].to_numpy()
        reset[1:] |= seg[1:] != seg[:-1]
    if n:
        reset[0] = True
        reset[1:] |= streams[1:] != streams[:-1]
    return streams.astype(np.int64), reset
