"""Answers: generated tokens decoded (in context, after their prompt) to JSON-ready
rollout columns on numpy, anchored at the prompt's last real trade."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mega_trading.generation.rollouts import decode_rollouts


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

    ``generate.decode_rollouts`` (the rollouts file's decoding) anchored at the prompt,
    turned into lists on numpy (specials and non-finite numbers null): a polars frame per
    answer cost ~1.5 ms, which the worker's next batch waited for.
    """
    out = decode_rollouts(new_tokens, tokenizer, anchor.price, anchor.time_us,
                          anchor.size_level, decode_seed, context_tokens=context_tokens)
    tokens, fields, is_event = out.tokens, out.fields, out.fields["is_event"]
    n = tokens.shape[0]

    columns = {
        "tokens": (tokens, None),
        "is_event": (is_event, None),
        "segment_start": (tokens == tokenizer.seg_id, None),
        "side": (fields["side"], is_event),
        "move_bps": (fields["move_bps"], is_event),
        "log_size": (fields["log_size"], is_event),
        "dt_us": (fields["dt_us"], is_event),
        "time_us": (out.time_us, None),
        "price": (out.price, np.ones_like(is_event)),
        "quote_qty": (out.quote_qty, is_event),
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


