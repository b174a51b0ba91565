"""Rollouts as trades: generated tokens decoded to events (``decode_rollouts``, the one
decoding that the rollouts file and the rollout service share), and the rollouts file.

Rollouts file layout (``write_rollouts``; ``RUN/rollouts.parquet`` by default), one row
per GENERATED token, sorted by (rollout, step); prompts are not repeated:

=================  =======  =====================================================
column             dtype    meaning
=================  =======  =====================================================
``rollout``        Int64    rollout index, 0 .. n-1
``step``           Int64    index of the generated token within the rollout, 0 ..
``symbol``         Utf8     symbol of the prompt the rollout continues
``token``          Int64    the sampled token id
``is_event``       Boolean  a trade event (False for PAD / SEG)
``segment_start``  Boolean  SEG was sampled: the model opened a new segment. It is a
                            marker only: price and time carry on unchanged
``side``           Int8     +1 taker buy, -1 taker sell (null for specials)
``move_bps``       Float64  decoded price move in bps (null for specials)
``log_size``       Float64  decoded log size vs the causal level (null for specials)
``dt_us``          Int64    decoded µs since the previous event (null for specials)
``time_us``        Int64    prompt's last real time_us + cumulative dt_us
``price``          Float64  prompt's last real price, integrated:
                            price_t = price_{t-1} * (1 + move_bps / 1e4);
                            specials carry the previous price
``quote_qty``      Float64  exp(log_size) * size level (null for specials), see below
=================  =======  =====================================================

Size level. ``log_size`` is ln(notional) minus the causal rolling mean of ln(notional)
over the previous ``size_window`` trades (``events.py``). A rollout's notional is
``exp(log_size) * size_level`` with ``size_level`` FIXED at the level that follows the
prompt's last real event: exp(level_last + (ln q_last - level_last) / size_window), where
level_last = ln q_last - log_size_last is the level the data used for that event (the
rolling-mean update, dropping the oldest term's deviation: an error of about 1/size_window
of a log unit). The level does not drift with the generated sizes; for a bare-SEG prompt
it is the causal level of the real segment-start event the rollout is anchored to.

Lineage (run, step, tokenizer / manifest hashes, the GenerateConfig with its sampling
settings and seed, the prompts, provenance) is stored as JSON under the Parquet schema
metadata key ``mega_trading`` (``read_rollouts`` returns it); for an ``--out`` ending in
``.csv`` the table is written as CSV with the same JSON in ``<out>.lineage.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mega_trading.core.errors import ConfigError, DataError
from mega_trading.core.lineage import atomic_path, write_json_atomic

LINEAGE_KEY = b"mega_trading"


# --- tokens -> events -------------------------------------------------------------------

@dataclass(frozen=True)
class DecodedRollouts:
    """Generated tokens decoded to events: every array is [B, n] (one row per rollout)."""

    tokens: np.ndarray
    fields: dict[str, np.ndarray]  # ``Tokenizer.decode_fields``: specials give zeros
    price: np.ndarray  # compounded from the start price
    time_us: np.ndarray  # summed from the start time (int64)
    quote_qty: np.ndarray  # exp(log_size) x size level; NaN off events or without a level


def decode_rollouts(tokens_new, tokenizer, start_price, start_time_us, size_level=None,
                    decode_seed: int = 0, decode_mode: str = "in_bin",
                    context_tokens=None, rng=None) -> DecodedRollouts:
    """THE decoding of rollouts, for the rollouts file and the rollout service alike.

    start_price, start_time_us and size_level are scalars or one value per rollout. Tokens
    decode inside their bins (seeded with ``decode_seed``), or to the bin medians with
    ``decode_mode="median"``. Each rollout is one decoding stream (the move is decoded in
    context, ``binning.MoveMemory``); ``context_tokens`` [B, P] or [P] (its prompt) are
    decoded first, so the context is known from the first new event. ``rng`` (default: a
    generator seeded with ``decode_seed``): where the in-bin draws come from.
    """
    if isinstance(tokens_new, torch.Tensor):
        tokens_new = tokens_new.detach().to("cpu").numpy()
    tokens = np.asarray(tokens_new, dtype=np.int64)
    if tokens.ndim != 2:
        raise ConfigError(f"tokens_new must be [B, n], got shape {tokens.shape}")
    n_roll = tokens.shape[0]
    if isinstance(context_tokens, torch.Tensor):
        context_tokens = context_tokens.detach().to("cpu").numpy()
    context = (np.zeros((n_roll, 0), dtype=np.int64) if context_tokens is None
               else np.asarray(context_tokens, dtype=np.int64))
    context = np.broadcast_to(np.atleast_2d(context), (n_roll, context.shape[-1]))
    stream = np.concatenate([context, tokens], axis=1)
    # refuses ids outside the vocabulary
    decoded = tokenizer.decode_fields(stream.reshape(-1), mode=decode_mode, seed=decode_seed,
                                      rng=rng, streams=np.repeat(np.arange(n_roll), stream.shape[1]))
    fields = {k: np.asarray(v).reshape(n_roll, -1)[:, context.shape[1]:] for k, v in decoded.items()}

    def per_rollout(value, dtype) -> np.ndarray:
        return np.broadcast_to(np.asarray(value, dtype=dtype), (n_roll,))[:, None]

    price = per_rollout(start_price, np.float64) * np.cumprod(
        1.0 + fields["move_bps"].astype(np.float64) / 1e4, axis=1)
    time_us = per_rollout(start_time_us, np.int64) + np.cumsum(
        fields["dt_us"].astype(np.int64), axis=1)
    level = np.nan if size_level is None else size_level
    quote_qty = np.where(fields["is_event"],
                         np.exp(fields["log_size"].astype(np.float64)) * per_rollout(level, np.float64),
                         np.nan)
    return DecodedRollouts(tokens, fields, price, time_us, quote_qty)


def rollouts_to_events(tokens_new, tokenizer, start_price, start_time_us, symbol,
                       size_level=None, decode_seed: int = 0,
                       decode_mode: str = "in_bin", context_tokens=None) -> pl.DataFrame:
    """Generated tokens [B, n] -> one row per token (layout in the module docstring), as
    ``decode_rollouts`` decodes them; without size_level, quote_qty is null."""
    out = decode_rollouts(tokens_new, tokenizer, start_price, start_time_us, size_level,
                          decode_seed, decode_mode, context_tokens)
    n_roll, n_step = out.tokens.shape
    flat = {k: v.reshape(-1) for k, v in out.fields.items()}
    symbols = np.broadcast_to(np.asarray(symbol, dtype=object), (n_roll,))
    frame = pl.DataFrame({
        "rollout": np.repeat(np.arange(n_roll, dtype=np.int64), n_step),
        "step": np.tile(np.arange(n_step, dtype=np.int64), n_roll),
        "symbol": pl.Series(np.repeat(symbols, n_step).tolist(), dtype=pl.Utf8),
        "token": out.tokens.reshape(-1),
        "is_event": flat["is_event"],
        "segment_start": out.tokens.reshape(-1) == tokenizer.seg_id,
    })
    return pl.concat([frame, tokenizer.fields_frame(flat).drop("is_event")],
                     how="horizontal").with_columns(
        time_us=pl.Series(out.time_us.reshape(-1), dtype=pl.Int64),
        price=pl.Series(out.price.reshape(-1)),
        quote_qty=pl.Series(out.quote_qty.reshape(-1)).fill_nan(None),
    )



# --- the rollouts file -------------------------------------------------------------------

def write_rollouts(frame: pl.DataFrame, path: str | Path, lineage: dict[str, Any]) -> Path:
    """Atomically write rollouts: Parquet with lineage in its metadata, or (for a .csv
    path) CSV plus `<path>.lineage.json`."""

    path = Path(path)
    if path.suffix.lower() == ".csv":
        with atomic_path(path) as tmp:
            frame.write_csv(tmp)
        write_json_atomic(path.with_name(path.name + ".lineage.json"), lineage)
        return path
    import pyarrow.parquet as pq

    table = frame.to_arrow()
    metadata = {**(table.schema.metadata or {}),
                LINEAGE_KEY: json.dumps(lineage, sort_keys=True, default=str).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp, compression="zstd")
    return path


def read_rollouts(path: str | Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """(rollouts, lineage) from a file written by `write_rollouts`."""
    path = Path(path)
    if not path.is_file():
        raise DataError("rollouts file does not exist", path)
    if path.suffix.lower() == ".csv":
        sidecar = path.with_name(path.name + ".lineage.json")
        lineage = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        return pl.read_csv(path), lineage
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    lineage = json.loads(metadata[LINEAGE_KEY]) if LINEAGE_KEY in metadata else {}
    return pl.read_parquet(path), lineage


