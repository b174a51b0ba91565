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
trades never have. ``decode`` maps a token to representative values: the TRAINING median
of the raw values inside each bin, so decoded prices move by realistic amounts.

The artifact is a versioned JSON file; its content hash (``Tokenizer.hash``) is recorded
by every downstream artifact and checked when a checkpoint is loaded.
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

from mega_trading.config import PositiveInt, config_dataclass
from mega_trading.errors import DataError
from mega_trading.lineage import json_hash, write_text_atomic

FORMAT = "mega-trading/tokenizer@1"
FIELD_NAMES = ("side", "move", "size", "dt")
SPECIAL_TOKENS = ("PAD", "SEG")


@config_dataclass
class TokenizerConfig:
    move_bins_per_side: PositiveInt = 7  # quantile bins for falling (and for rising) moves, tail included
    size_bins: PositiveInt = 8
    dt_bins: Annotated[int, Field(ge=2)] = 8  # including the zero bin
    tail_quantile: Annotated[float, Field(gt=0.5, lt=1)] = 0.995  # beyond it (and below 1 - it): the outlier bins
    fit_sample: PositiveInt = 500_000  # fit quantiles on at most this many training events (seeded sample)


@dataclass(frozen=True)
class FieldBins:
    """Bins of one field: inner edges plus optional exact-zero bin, with representatives.

    With ``zero_bin``, values < 0 use ``neg_edges`` (len = n_neg - 1), exactly 0 has its own
    bin, values > 0 use ``pos_edges``. Without it, all values use ``pos_edges``.
    """

    name: str
    pos_edges: tuple[float, ...]
    neg_edges: tuple[float, ...] = ()
    zero_bin: bool = False
    has_negative: bool = False
    representatives: tuple[float, ...] = ()

    @property
    def n_neg(self) -> int:
        return len(self.neg_edges) + 1 if self.has_negative else 0

    @property
    def n_bins(self) -> int:
        return self.n_neg + int(self.zero_bin) + len(self.pos_edges) + 1

    def index(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        return np.searchsorted(self._all_edges, values, side="right")

    @functools.cached_property
    def _all_edges(self) -> np.ndarray:
        """Every bin's lower edge but the first, in bin order, so one `searchsorted` (the
        count of edges <= value) is the bin index: negative edges, then 0 (the zero bin
        holds exactly 0, after the negative bins), then the smallest positive double (the
        first positive bin), then the positive edges. Without negative bins, values <= 0
        all land in the zero bin."""
        if not self.zero_bin:
            return np.asarray(self.pos_edges, dtype=np.float64)
        smallest_positive = np.nextafter(0.0, 1.0)
        lower = [*self.neg_edges, 0.0] if self.has_negative else []
        return np.asarray([*lower, smallest_positive, *self.pos_edges], dtype=np.float64)


def _quantile_edges(values: np.ndarray, n_bins: int, tail_quantile: float) -> tuple[float, ...]:
    """Inner edges for n_bins bins: n_bins-1 quantile bins up to the tail, then a tail bin."""
    if values.size == 0 or n_bins <= 1:
        return ()
    levels = np.linspace(0.0, tail_quantile, n_bins)[1:]
    # inverted_cdf quantiles are observed values, so every bin [e_i, e_i+1) holds data;
    # an edge at the minimum would leave the bin below it empty.
    edges = np.unique(np.quantile(values, levels, method="inverted_cdf"))
    edges = edges[edges > values.min()]
    if edges.size == 0:
        return ()
    # Discrete prices make quantiles repeat or nearly repeat (one tick at two price
    # levels); such an edge would make an empty or meaningless bin, so keep an edge only
    # when it is at least 5 % above the previous one.
    kept = [float(edges[0])]
    for edge in edges[1:]:
        if edge - kept[-1] > 0.05 * max(abs(kept[-1]), 1e-12):
            kept.append(float(edge))
    return tuple(kept)


def _representatives(bins: FieldBins, values: np.ndarray) -> tuple[float, ...]:
    """Training median inside each bin; for a bin no training value fell in, some value
    that the bin itself maps back to (so decode -> encode is the identity)."""
    # One sort gives every bin's values contiguous and ordered (bins are value intervals).
    ordered = np.sort(values)
    idx = bins.index(ordered)
    starts = np.searchsorted(idx, np.arange(bins.n_bins), side="left")
    ends = np.searchsorted(idx, np.arange(bins.n_bins), side="right")
    edges = np.array(sorted({*bins.neg_edges, *bins.pos_edges, 0.0}))
    candidates = np.concatenate([edges, edges + 1e-9 * (1 + abs(edges)),
                                 (edges[1:] + edges[:-1]) / 2, [edges[0] - 1.0, edges[-1] + 1.0]])
    candidate_bins = bins.index(candidates)
    reps = []
    for b, (lo, hi) in enumerate(zip(starts, ends)):
        if hi > lo:
            reps.append(float(np.median(ordered[lo:hi])))
        else:
            reps.append(float(candidates[np.flatnonzero(candidate_bins == b)[0]]))
    return tuple(reps)


def _fit_signed_zero_field(name: str, values: np.ndarray, per_side: int, tail: float) -> FieldBins:
    neg = -values[values < 0]
    pos = values[values > 0]
    # Negative edges mirror the quantiles of |negative moves|, listed in increasing order.
    neg_edges = tuple(sorted(-e for e in _quantile_edges(neg, per_side, tail)))
    bins = FieldBins(
        name=name, pos_edges=_quantile_edges(pos, per_side, tail), neg_edges=neg_edges,
        zero_bin=True, has_negative=True,
    )
    return _with_reps(bins, values)


def _quantile_edges_two_tailed(values: np.ndarray, n_bins: int, tail: float) -> tuple[float, ...]:
    """Inner edges for n_bins bins with an outlier bin below 1 - tail and above tail."""
    levels = np.linspace(1.0 - tail, tail, n_bins - 1)
    edges = np.unique(np.quantile(values, levels, method="inverted_cdf"))
    return tuple(float(e) for e in edges[edges > values.min()])


def _round_floats(obj):
    if isinstance(obj, float):
        return float(f"{obj:.12g}")
    if isinstance(obj, dict):
        return {k: _round_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round_floats(v) for v in obj]
    return obj


def _positive_log_dt(dt_us: np.ndarray) -> np.ndarray:
    """log(dt) for dt > 0 and exactly 0 for dt == 0 (the zero bin).

    A 1 us gap has log 0 too; it is nudged above 0 so it never lands in the zero bin.
    """
    dt_us = np.asarray(dt_us, dtype=np.float64)
    return np.where(dt_us > 0, np.maximum(np.log(np.maximum(dt_us, 1.0)), 1e-9), 0.0)


def _with_reps(bins: FieldBins, values: np.ndarray) -> FieldBins:
    return FieldBins(**{**bins.__dict__, "representatives": _representatives(bins, values)})


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

    @property
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
        if train_events.height > cfg.fit_sample:
            train_events = train_events.sample(n=cfg.fit_sample, seed=0)
        move = train_events["move_bps"].to_numpy().astype(np.float64)
        size = train_events["log_size"].to_numpy().astype(np.float64)
        dt = train_events["dt_us"].to_numpy().astype(np.float64)
        log_dt = _positive_log_dt(dt)
        tail = cfg.tail_quantile
        size_edges = _quantile_edges_two_tailed(size, cfg.size_bins, tail)
        side = FieldBins(name="side", pos_edges=(0.0,), representatives=(-1.0, 1.0))
        tok = cls(
            side=side,
            move=_fit_signed_zero_field("move", move, cfg.move_bins_per_side, tail),
            size=_with_reps(FieldBins(name="size", pos_edges=size_edges), size),
            dt=_with_reps(
                FieldBins(
                    name="dt", pos_edges=_quantile_edges(log_dt[dt > 0], cfg.dt_bins - 1, tail),
                    zero_bin=True,
                ),
                _positive_log_dt(dt),
            ),
            config={"move_bins_per_side": cfg.move_bins_per_side, "size_bins": cfg.size_bins,
                    "dt_bins": cfg.dt_bins, "tail_quantile": cfg.tail_quantile},
        )
        tokens = tok.encode(train_events)
        return tok._with_stats(tokens, n_train_events=train_events.height)

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
            "dt": self.dt.index(_positive_log_dt(dt)),
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

    def decode(self, tokens: np.ndarray) -> pl.DataFrame:
        """Representative event features per token; specials give nulls, is_event=False."""
        idx = self.field_indices(tokens)
        is_event = idx["side"] >= 0

        def rep(bins: FieldBins, i: np.ndarray) -> np.ndarray:
            return np.asarray(bins.representatives, dtype=np.float64)[np.maximum(i, 0)]

        dt_log = rep(self.dt, idx["dt"])
        dt_us = np.where(idx["dt"] == 0, 0, np.rint(np.exp(dt_log))).astype(np.int64)
        frame = pl.DataFrame({
            "side": np.where(idx["side"] == 1, 1, -1).astype(np.int8),
            "move_bps": rep(self.move, idx["move"]),
            "log_size": rep(self.size, idx["size"]),
            "dt_us": dt_us,
            "is_event": is_event,
        })
        cols = ["side", "move_bps", "log_size", "dt_us"]
        return frame.with_columns(
            [pl.when(pl.col("is_event")).then(pl.col(c)).otherwise(None).alias(c) for c in cols]
        )

    # --- artifact ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        def bins(b: FieldBins) -> dict:
            return {"pos_edges": list(b.pos_edges), "neg_edges": list(b.neg_edges),
                    "zero_bin": b.zero_bin, "has_negative": b.has_negative,
                    "representatives": list(b.representatives), "n_bins": b.n_bins}

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
        if doc.get("format") != FORMAT:
            raise DataError(f"not a {FORMAT} artifact (format={doc.get('format')!r})", path)

        def bins(name: str) -> FieldBins:
            b = doc["fields"][name]
            return FieldBins(name=name, pos_edges=tuple(b["pos_edges"]),
                             neg_edges=tuple(b["neg_edges"]), zero_bin=b["zero_bin"],
                             has_negative=b["has_negative"],
                             representatives=tuple(b["representatives"]))

        tok = cls(*(bins(n) for n in FIELD_NAMES), config=doc.get("config", {}),
                  stats=doc.get("stats", {}))
        if "hash" in doc and doc["hash"] != tok.hash:
            raise DataError(f"tokenizer content does not match its recorded hash {doc['hash'][:12]}", path)
        return tok
