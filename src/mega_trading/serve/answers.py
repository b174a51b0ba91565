"""Answers: generated tokens decoded (in context, after their prompt) to JSON-ready
rollout columns on numpy, anchored at the prompt's last real trade."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("mega_trading.serve")


# --- the run: model, tokenizer, data, prompts, answers ---------------------------------------

@dataclass(frozen=True)
class Anchor:
    """Where a prompt leaves off: the rollout's price / time start and size level."""

    source: str
    price: float
    time_us: int
    size_level: float | None = None
    split: str | None = None
    symbol: str | None = None
    start: int | None = None



def rollout_columns(tokenizer, new_tokens: np.ndarray, anchor: Anchor, decode_seed: int,
                    context_tokens: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Tokens [n, length] -> one ``Rollout`` body per row, as JSON-ready lists.

    The values of ``generate.rollouts_to_events`` (tokens decoded inside their bins from
    PCG64(decode_seed), price compounded from the anchor, time summed from it, quote size
    from the size level; specials and non-finite numbers null; a test holds the two equal),
    built on numpy arrays: a polars frame per answer cost ~1.5 ms, which the worker's next
    batch waited for.
    """
    tokens = np.asarray(new_tokens, dtype=np.int64)
    n, length = tokens.shape
    # Each rollout is one decoding stream, its prompt (the same for every row) decoded
    # first so the move's context is known from the first new event.
    context = (np.zeros((n, 0), dtype=np.int64) if context_tokens is None
               else np.broadcast_to(np.asarray(context_tokens, dtype=np.int64).reshape(1, -1),
                                    (n, np.asarray(context_tokens).size)))
    stream = np.concatenate([context, tokens], axis=1)
    decoded = tokenizer.decode_fields(stream.reshape(-1), seed=decode_seed,
                                      streams=np.repeat(np.arange(n), stream.shape[1]))
    fields = {k: np.asarray(v).reshape(n, -1)[:, context.shape[1]:].reshape(-1)
              for k, v in decoded.items()}
    is_event = fields["is_event"].reshape(n, length)
    price = anchor.price * np.cumprod(1.0 + fields["move_bps"].reshape(n, length) / 1e4, axis=1)
    time_us = anchor.time_us + np.cumsum(fields["dt_us"].astype(np.int64).reshape(n, length),
                                         axis=1)
    level = np.nan if anchor.size_level is None else anchor.size_level
    quote_qty = np.where(is_event, np.exp(fields["log_size"].reshape(n, length)) * level, np.nan)

    def grid(name: str) -> np.ndarray:
        return fields[name].reshape(n, length)

    columns = {
        "tokens": (tokens, None),
        "is_event": (is_event, None),
        "segment_start": (tokens == tokenizer.seg_id, None),
        "side": (grid("side"), is_event),
        "move_bps": (grid("move_bps"), is_event),
        "log_size": (grid("log_size"), is_event),
        "dt_us": (grid("dt_us"), is_event),
        "time_us": (time_us, None),
        "price": (price, np.ones_like(is_event)),
        "quote_qty": (quote_qty, is_event),
    }
    rollouts = [{"index": i} for i in range(n)]
    for name, (values, shown) in columns.items():
        for i, row in enumerate(_json_rows(values, shown)):
            rollouts[i][name] = row
    return rollouts


def _json_rows(values: np.ndarray, shown: np.ndarray | None) -> list[list[Any]]:
    """values [n, length] as lists; null where `shown` is False or a float is not finite."""
    rows = values.tolist()
    if shown is None:
        return rows
    if values.dtype.kind == "f":
        shown = shown & np.isfinite(values)
    for i in np.flatnonzero(~shown.all(axis=1)):
        rows[i] = ([v if keep else None for v, keep in zip(rows[i], shown[i].tolist())]
                   if shown[i].any() else [None] * len(rows[i]))
    return rows


