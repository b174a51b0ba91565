"""Events -> one integer per event, and back.

Four fields, each cut into bins fitted on TRAINING events only:

* ``side``  2 bins (sell, buy).
* ``move``  price move in bps: a bin for exactly 0 (most trades do not move the price),
            quantile bins for falling and for rising moves, and an outlier bin at each tail.
* ``size``  log size relative to the causal level: quantile bins with outlier tails.
* ``dt``    elapsed time: a bin for exactly 0 (one taker order filling several makers
            shares a timestamp), quantile bins of log-time, and an outlier tail.

The fields combine in mixed radix, side most significant::

    token = ((side * n_move + move) * n_size + size) * n_dt + dt

followed by the special tokens (PAD, then SEG = segment start). Every token in the
vocabulary is a trade event or one of two specials: no vocabulary is spent on event types
trades never have. ``decode`` maps a token to values of its bins, either (``mode="in_bin"``,
the default) drawn, seeded, from the TRAINING values inside each bin through a compact
per-bin quantile table with heavy-tailed outlier bins (``binning.py``), or
(``mode="median"``) the training median of each bin. The move is decoded in context
(``binning.MoveMemory``): from the table of training moves made at the stream's tick class
(the smallest move bin seen recently: a market's tick size), and snapped to a recently
visited price level when one lies inside the token's bin (the bid-ask bounce). In-bin
draws re-encode to the same token, so decoding never moves an event to another bin.

The move and gap fields also count, per tick class, the training events of each bin
(``tick_support``): one vocabulary serves markets whose ticks and paces differ by orders of
magnitude, and sampling may be restricted to the bins a market of the stream's tick class
ever showed in training (``generation.support``).

The artifact is a versioned JSON file (``tokenizer@4``: the per-tick-class bin counts are
new; ``@1`` / ``@2`` / ``@3`` artifacts are refused, prepare the data again);
its content hash (``Tokenizer.hash``) is recorded by every downstream artifact and checked
when a checkpoint is loaded.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import polars as pl
from pydantic import Field

from mega_trading.core.config import NonNegativeInt, PositiveInt, config_dataclass
from mega_trading.core.errors import ConfigError, DataError
from mega_trading.core.lineage import json_hash, write_text_atomic
from mega_trading.data.binning import (
    DEFAULT_N_QUANTILES,
    BinTail,
    MoveMemory,
    draw_in_bins,
    move_ranks,
)
from mega_trading.data.field_bins import (
    LOG_TAIL_FIELDS,
    FieldBins,
    fit_signed_zero_field,
    positive_log_dt,
    quantile_edges,
    quantile_edges_two_tailed,
    with_reps,
)
from mega_trading.data.tick_context import contiguous_sample, fit_tick_context

FORMAT = "mega-trading/tokenizer@4"
OLD_FORMATS = {"mega-trading/tokenizer@1": "no per-bin quantile tables for in-bin decoding",
               "mega-trading/tokenizer@2": "no per-tick-class move tables for context decoding",
               "mega-trading/tokenizer@3": "no per-tick-class bin counts for tick-consistent sampling"}
DECODE_MODES = ("in_bin", "median")
FIELD_NAMES = ("side", "move", "size", "dt")
SPECIAL_TOKENS = ("PAD", "SEG")


@config_dataclass
class TokenizerConfig:
    move_bins_per_side: PositiveInt = 7  # quantile bins for falling (and for rising) moves, tail included
    size_bins: PositiveInt = 8
    dt_bins: Annotated[int, Field(ge=2)] = 8  # including the zero bin
    tail_quantile: Annotated[float, Field(gt=0.5, lt=1)] = 0.995  # beyond it (and below 1 - it): the outlier bins
    fit_sample: PositiveInt = 500_000  # fit quantiles on at most this many training events (seeded sample)
    n_quantiles: Annotated[int, Field(ge=3)] = DEFAULT_N_QUANTILES  # per-bin quantile table for in-bin decoding
    # context-aware move decoding (binning.MoveMemory); 0 turns a part off
    tick_window: NonNegativeInt = 64  # events looked back for the stream's smallest move bin (tick class)
    tick_classes: Annotated[int, Field(ge=1, le=16)] = 4  # move-bin distances from zero told apart
    level_memory: NonNegativeInt = 4  # recent distinct price levels a move may snap back to (chosen on validation, BENCHMARKS.md)


def _round_floats(obj):
    if isinstance(obj, float):
        return float(f"{obj:.12g}")
    if isinstance(obj, dict):
        return {k: _round_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round_floats(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Tokenizer:
    side: FieldBins
    move: FieldBins
    size: FieldBins
    dt: FieldBins  # fitted on log(dt_us) for dt > 0; exact 0 is its own bin
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    # --- vocabulary -------------------------------------------------------------------
    field_names = FIELD_NAMES

    @functools.cached_property  # frozen fields; read ~10 times per decode call
    def field_sizes(self) -> dict[str, int]:
        return {name: getattr(self, name).n_bins for name in FIELD_NAMES}

    @property
    def n_event_tokens(self) -> int:
        return math.prod(self.field_sizes.values())

    @property
    def pad_id(self) -> int:
        return self.n_event_tokens

    @property
    def seg_id(self) -> int:
        return self.n_event_tokens + 1

    @property
    def vocab_size(self) -> int:
        return self.n_event_tokens + len(SPECIAL_TOKENS)

    # --- fit ----------------------------------------------------------------------------
    @classmethod
    def fit(cls, train_events: pl.DataFrame, cfg: TokenizerConfig = TokenizerConfig()) -> Tokenizer:
        """Fit bins on TRAINING events only (the caller guarantees the split)."""
        if train_events.height == 0:
            raise DataError("cannot fit a tokenizer on zero training events")
        ordered_events = contiguous_sample(train_events, cfg.fit_sample)
        if train_events.height > cfg.fit_sample:
            train_events = train_events.sample(n=cfg.fit_sample, seed=0)
        move = train_events["move_bps"].to_numpy().astype(np.float64)
        size = train_events["log_size"].to_numpy().astype(np.float64)
        dt = train_events["dt_us"].to_numpy().astype(np.float64)
        log_dt = positive_log_dt(dt)
        tail, nq = cfg.tail_quantile, cfg.n_quantiles
        size_edges = quantile_edges_two_tailed(size, cfg.size_bins, tail)
        side = FieldBins(name="side", pos_edges=(0.0,), representatives=(-1.0, 1.0))
        tok = cls(
            side=side,
            move=fit_signed_zero_field("move", move, cfg.move_bins_per_side, tail, nq),
            size=with_reps(FieldBins(name="size", pos_edges=size_edges), size, nq),
            dt=with_reps(
                FieldBins(
                    name="dt", pos_edges=quantile_edges(log_dt[dt > 0], cfg.dt_bins - 1, tail),
                    zero_bin=True,
                ),
                positive_log_dt(dt), nq,
            ),
            config={"move_bins_per_side": cfg.move_bins_per_side, "size_bins": cfg.size_bins,
                    "dt_bins": cfg.dt_bins, "tail_quantile": cfg.tail_quantile,
                    "n_quantiles": nq, "tick_window": cfg.tick_window,
                    "tick_classes": cfg.tick_classes, "level_memory": cfg.level_memory},
        )
        tok = tok._with_move_context(ordered_events)
        tokens = tok.encode(train_events)
        return tok._with_stats(tokens, n_train_events=train_events.height)

    def _with_move_context(self, events: pl.DataFrame) -> Tokenizer:
        """The tick-class context fitted on TRAINING events in stream order
        (``tick_context.fit_tick_context``)."""
        if self.config.get("tick_window", 0) <= 0:
            return self
        move_bins, dt_bins = fit_tick_context(self.move, self.dt, events, self.decode_memory(),
                                              int(self.config.get("n_quantiles",
                                                                  DEFAULT_N_QUANTILES)))
        return Tokenizer(self.side, move_bins, self.size, dt_bins, self.config, self.stats)

    def tick_support(self) -> np.ndarray:
        """[tick class 0..n, event token] bool: the tokens whose move AND gap bins occurred
        in training at that tick class (class 0, no tick seen yet: every token)."""
        n_classes = int(self.config.get("tick_classes", 1))
        allowed = np.ones((n_classes + 1, self.n_event_tokens), dtype=bool)
        if not self.move.context_counts or not self.dt.context_counts:
            return allowed
        idx = self.field_indices(np.arange(self.n_event_tokens))
        moves = np.asarray(self.move.context_counts)
        gaps = np.asarray(self.dt.context_counts)
        allowed[1:] = (moves[1:, idx["move"]] > 0) & (gaps[1:, idx["dt"]] > 0)
        return allowed

    def decode_memory(self) -> MoveMemory:
        """A fresh per-stream state for context-aware move decoding (``decode_fields``)."""
        return MoveMemory(int(self.config.get("tick_window", 0)),
                          int(self.config.get("tick_classes", 1)),
                          int(self.config.get("level_memory", 0)))

    def _with_stats(self, tokens: np.ndarray, n_train_events: int) -> Tokenizer:
        counts = np.bincount(tokens, minlength=self.n_event_tokens)
        p = counts[counts > 0] / counts.sum()
        stats = {
            "n_fit_events": int(n_train_events),
            "realized_vocab": int((counts > 0).sum()),
            "effective_vocab": float(np.exp(-(p * np.log(p)).sum())),
            "field_sizes": self.field_sizes,
            "vocab_size": self.vocab_size,
        }
        return Tokenizer(self.side, self.move, self.size, self.dt, self.config, stats)

    # --- encode / decode ----------------------------------------------------------------
    def field_indices_from_events(self, events: pl.DataFrame) -> dict[str, np.ndarray]:
        dt = events["dt_us"].to_numpy().astype(np.float64)
        return {
            "side": (events["side"].to_numpy() > 0).astype(np.int64),
            "move": self.move.index(events["move_bps"].to_numpy()),
            "size": self.size.index(events["log_size"].to_numpy()),
            "dt": self.dt.index(positive_log_dt(dt)),
        }

    def encode(self, events: pl.DataFrame) -> np.ndarray:
        """One event token per row (int64); a missing or non-finite feature is an error."""
        for column in ("move_bps", "log_size", "dt_us"):
            values = events[column].cast(pl.Float64).to_numpy()
            bad = ~np.isfinite(values)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DataError(f"event row {row} has a missing or non-finite {column}")
        idx = self.field_indices_from_events(events)
        sizes = self.field_sizes
        token = idx["side"]
        for name in FIELD_NAMES[1:]:
            token = token * sizes[name] + idx[name]
        return token.astype(np.int64)

    def check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        bad = (tokens < 0) | (tokens >= self.vocab_size)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"token {int(tokens.flat[first])} at position {first} is outside the vocabulary "
                f"[0, {self.vocab_size}) of tokenizer {self.hash[:12]}"
            )
        return tokens.astype(np.int64)

    def field_indices(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Bin index of each field for EVENT tokens (specials give -1)."""
        tokens = self.check_tokens(tokens)
        is_event = tokens < self.n_event_tokens
        rest = np.where(is_event, tokens, 0)
        out: dict[str, np.ndarray] = {}
        for name in reversed(FIELD_NAMES):
            size = self.field_sizes[name]
            out[name] = np.where(is_event, rest % size, -1)
            rest = rest // size
        return {name: out[name] for name in FIELD_NAMES}

    def decode_fields(self, tokens: np.ndarray, mode: str = "in_bin", seed: int = 0,
                      rng: np.random.Generator | None = None, streams: np.ndarray | None = None,
                      memory: MoveMemory | None = None) -> dict[str, np.ndarray]:
        """Decoded values per token as arrays: side (+-1), move_bps, log_size, log_dt
        (0 for the zero-gap bin), dt_us, is_event; specials give side 0 and zeros.

        mode "in_bin" draws each field inside its bin (``binning.py``) from ``rng`` (default:
        a PCG64 seeded with ``seed``), the move in context: ``streams`` (default: one
        stream) says which stream each token continues, in order; a SEG token starts a new
        segment of its stream; ``memory`` (default: fresh) carries the streams' state from
        an earlier call (step-by-step decoding). "median" gives each bin's training median.
        """
        if mode not in DECODE_MODES:
            raise ConfigError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
        tokens = self.check_tokens(np.asarray(tokens).reshape(-1))
        idx = self.field_indices(tokens)
        is_event = idx["side"] >= 0
        rng = rng if rng is not None else np.random.default_rng(seed)

        def values(bins: FieldBins, i: np.ndarray) -> np.ndarray:
            i = np.maximum(i, 0)
            if mode == "median" or not bins.quantiles:
                return np.asarray(bins.representatives, dtype=np.float64)[i]
            tails = {0: (bins.tail_low, False), bins.n_bins - 1: (bins.tail_high, True)}
            return draw_in_bins(i, bins.quantiles, rng, tails, bins.name in LOG_TAIL_FIELDS)

        if mode == "median" or not self.move.quantiles:
            move = values(self.move, idx["move"])
        else:
            streams = (np.zeros(tokens.size, dtype=np.int64) if streams is None
                       else np.asarray(streams, dtype=np.int64).reshape(-1))
            move = self._decode_moves(idx["move"], tokens == self.seg_id, streams,
                                      memory or self.decode_memory(), rng)
        size, dt_log = values(self.size, idx["size"]), values(self.dt, idx["dt"])
        # floor (not round): an in-bin draw below the bin's largest training gap (an
        # integer number of us) must not round up into the next bin
        dt_us = np.where(idx["dt"] == 0, 0, np.floor(np.exp(dt_log) + 1e-6)).astype(np.int64)
        zero = ~is_event
        return {"side": np.where(zero, 0, np.where(idx["side"] == 1, 1, -1)).astype(np.int8),
                "move_bps": np.where(zero, 0.0, move), "log_size": np.where(zero, 0.0, size),
                "log_dt": np.where(zero, 0.0, dt_log), "dt_us": np.where(zero, 0, dt_us),
                "is_event": is_event}

    def _decode_moves(self, move_index: np.ndarray, reset: np.ndarray, streams: np.ndarray,
                      memory: MoveMemory, rng: np.random.Generator) -> np.ndarray:
        """In-bin moves drawn from the stream's tick-class table, then level memory."""
        bins = self.move
        i = np.maximum(move_index, 0)
        u, v = rng.random(i.shape), rng.random(i.shape)  # two uniforms per token, as draw_in_bins
        ranks = move_ranks(move_index, bins.n_neg, memory.n_classes)
        classes = memory.tick_classes(ranks, streams, reset)
        tails = {0: (bins.tail_low, False), bins.n_bins - 1: (bins.tail_high, True)}
        # one draw for all: tick class c's table of bin b where it has one (a (class, bin)
        # with too few training moves, or no class, keeps the plain table and its tails)
        tables, has_table = bins.context_tables
        n_contexts = len(bins.context_quantiles)
        at = np.where((classes >= 1) & (classes <= n_contexts), classes * bins.n_bins + i, i)
        at = np.where(has_table[at], at, i)
        move = draw_in_bins(at, tables, None, tails, True, uniforms=(u, v))
        move = np.where(move_index < 0, 0.0, move)
        lower, upper = bins.bounds
        snapped, _ = memory.snap_to_levels(move, lower[i], upper[i], streams, reset)
        return snapped

    def decode(self, tokens: np.ndarray, mode: str = "in_bin", seed: int = 0,
               rng: np.random.Generator | None = None, streams: np.ndarray | None = None,
               memory: MoveMemory | None = None) -> pl.DataFrame:
        """Event features per token (see ``decode_fields``); specials give nulls and
        is_event=False."""
        return self.fields_frame(self.decode_fields(tokens, mode, seed, rng, streams, memory))

    @staticmethod
    def fields_frame(fields: dict[str, np.ndarray]) -> pl.DataFrame:
        """``decode_fields`` output (flat arrays) as a frame; specials give nulls."""
        frame = pl.DataFrame({"side": fields["side"], "move_bps": fields["move_bps"],
                              "log_size": fields["log_size"], "dt_us": fields["dt_us"],
                              "is_event": fields["is_event"]})
        cols = ["side", "move_bps", "log_size", "dt_us"]
        return frame.with_columns(
            [pl.when(pl.col("is_event")).then(pl.col(c)).otherwise(None).alias(c) for c in cols]
        )

    # --- artifact ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        def bins(b: FieldBins) -> dict:
            return {"pos_edges": list(b.pos_edges), "neg_edges": list(b.neg_edges),
                    "zero_bin": b.zero_bin, "has_negative": b.has_negative,
                    "representatives": list(b.representatives), "n_bins": b.n_bins,
                    "quantiles": [list(q) for q in b.quantiles],
                    "tail_low": b.tail_low.to_list() if b.tail_low else None,
                    "tail_high": b.tail_high.to_list() if b.tail_high else None,
                    **({"context_quantiles": [[list(t) for t in c] for c in b.context_quantiles]}
                       if b.context_quantiles else {}),
                    **({"context_counts": [list(c) for c in b.context_counts]}
                       if b.context_counts else {})}

        return {
            "format": FORMAT,
            "fields": {name: bins(getattr(self, name)) for name in FIELD_NAMES},
            "field_order": list(FIELD_NAMES),
            "special_tokens": {"PAD": self.pad_id, "SEG": self.seg_id},
            "vocab_size": self.vocab_size,
            "n_event_tokens": self.n_event_tokens,
            "config": self.config,
        }

    @property
    def hash(self) -> str:
        """Content hash of the bins (stats and provenance excluded: same bins, same hash).

        Floats enter the hash at 12 significant digits, so float noise (a rolling mean
        summed in another order) does not make a "different" tokenizer.
        """
        return json_hash(_round_floats(self.to_dict()))

    def save(self, path: str | Path, **lineage: object) -> Path:
        doc = {**self.to_dict(), "hash": self.hash, "stats": self.stats, "lineage": lineage}
        return write_text_atomic(path, json.dumps(doc, indent=2, default=str) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read tokenizer artifact ({exc})", path) from exc
        if doc.get("format") in OLD_FORMATS:
            old = doc["format"].rsplit("/", 1)[-1]
            raise DataError(f"{old} artifact has {OLD_FORMATS[doc['format']]} (this code reads "
                            f"{FORMAT}): run `mega-trading prepare` again", path)
        if doc.get("format") != FORMAT:
            raise DataError(f"not a {FORMAT} artifact (format={doc.get('format')!r})", path)

        def tail(value) -> BinTail | None:
            return BinTail(*value) if value else None

        def bins(name: str) -> FieldBins:
            b = doc["fields"][name]
            return FieldBins(name=name, pos_edges=tuple(b["pos_edges"]),
                             neg_edges=tuple(b["neg_edges"]), zero_bin=b["zero_bin"],
                             has_negative=b["has_negative"],
                             representatives=tuple(b["representatives"]),
                             quantiles=tuple(tuple(q) for q in b.get("quantiles", [])),
                             tail_low=tail(b.get("tail_low")), tail_high=tail(b.get("tail_high")),
                             context_quantiles=tuple(tuple(tuple(t) for t in c)
                                                     for c in b.get("context_quantiles", [])),
                             context_counts=tuple(tuple(int(n) for n in c)
                                                  for c in b.get("context_counts", [])))

        tok = cls(*(bins(n) for n in FIELD_NAMES), config=doc.get("config", {}),
                  stats=doc.get("stats", {}))
        if "hash" in doc and doc["hash"] != tok.hash:
            raise DataError(f"tokenizer content does not match its recorded hash {doc['hash'][:12]}", path)
        return tok
