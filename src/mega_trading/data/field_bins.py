"""One field's bins: edges at training quantiles (a signed-zero layout for moves, open
outlier bins at the tails), the bin index of a value, bin bounds, and each bin's
representative value (its training median)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from mega_trading.data.binning import (
    DEFAULT_N_QUANTILES,
    BinTail,
    bin_quantiles,
    fit_tail,
)

LOG_TAIL_FIELDS = ("move",)  # Pareto tail in |move|; size and dt are log values already


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
    quantiles: tuple[tuple[float, ...], ...] = ()  # per bin, for in-bin decoding
    tail_low: BinTail | None = None  # bin 0 when it is open-ended below
    tail_high: BinTail | None = None  # the last bin (always open-ended above)
    # move only: per tick class 1..n, per bin, a quantile table (() = use ``quantiles``)
    context_quantiles: tuple[tuple[tuple[float, ...], ...], ...] = ()
    # move and dt: per tick class 0..n, per bin, how many TRAINING events fell in the bin
    # at that tick class (the support of tick-consistent sampling; () = not counted)
    context_counts: tuple[tuple[int, ...], ...] = ()

    @property
    def low_open(self) -> bool:
        """Bin 0 has no lower edge (signed fields, and fields without a zero bin)."""
        return self.has_negative or not self.zero_bin

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

    @functools.cached_property
    def context_tables(self) -> tuple[tuple[tuple[float, ...], ...], np.ndarray]:
        """Every move table in one tuple, so that a decode step draws all its moves at once:
        the plain tables (bins 0..n-1), then tick class c's table of bin b at c * n_bins + b
        (a (0.0,) stand-in where it has none); and which entries are real tables. Built once
        rather than at every decode step."""
        own = [table for tables in self.context_quantiles for table in tables]
        return (tuple(self.quantiles) + tuple(t if t else (0.0,) for t in own),
                np.array([True] * len(self.quantiles) + [bool(t) for t in own]))

    @functools.cached_property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) per bin: bin b holds lower[b] <= value < upper[b]."""
        edges = self._all_edges
        return np.r_[-np.inf, edges], np.r_[edges, np.inf]


def quantile_edges(values: np.ndarray, n_bins: int, tail_quantile: float) -> tuple[float, ...]:
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


def representatives(bins: FieldBins, ordered: np.ndarray, idx: np.ndarray) -> tuple[float, ...]:
    """Training median inside each bin; for a bin no training value fell in, some value
    that the bin itself maps back to (so decode -> encode is the identity)."""
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


def fit_signed_zero_field(name: str, values: np.ndarray, per_side: int, tail: float,
                           n_quantiles: int) -> FieldBins:
    neg = -values[values < 0]
    pos = values[values > 0]
    # Negative edges mirror the quantiles of |negative moves|, listed in increasing order.
    neg_edges = tuple(sorted(-e for e in quantile_edges(neg, per_side, tail)))
    bins = FieldBins(
        name=name, pos_edges=quantile_edges(pos, per_side, tail), neg_edges=neg_edges,
        zero_bin=True, has_negative=True,
    )
    return with_reps(bins, values, n_quantiles)


def quantile_edges_two_tailed(values: np.ndarray, n_bins: int, tail: float) -> tuple[float, ...]:
    """Inner edges for n_bins bins with an outlier bin below 1 - tail and above tail."""
    levels = np.linspace(1.0 - tail, tail, n_bins - 1)
    edges = np.unique(np.quantile(values, levels, method="inverted_cdf"))
    return tuple(float(e) for e in edges[edges > values.min()])


def positive_log_dt(dt_us: np.ndarray) -> np.ndarray:
    """log(dt) for dt > 0 and exactly 0 for dt == 0 (the zero bin).

    A 1 us gap has log 0 too; it is nudged above 0 so it never lands in the zero bin.
    """
    dt_us = np.asarray(dt_us, dtype=np.float64)
    return np.where(dt_us > 0, np.maximum(np.log(np.maximum(dt_us, 1.0)), 1e-9), 0.0)


def with_reps(bins: FieldBins, values: np.ndarray,
               n_quantiles: int = DEFAULT_N_QUANTILES) -> FieldBins:
    """Representatives, per-bin quantile tables and outlier tails from training values."""
    # One sort gives every bin's values contiguous and ordered (bins are value intervals).
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    idx = bins.index(ordered)
    reps = representatives(bins, ordered, idx)
    table = bin_quantiles(ordered, idx, bins.n_bins, n_quantiles, reps)
    log_tail = bins.name in LOG_TAIL_FIELDS
    high = ordered[idx == bins.n_bins - 1]
    low = ordered[idx == 0]
    return FieldBins(**{
        **{k: v for k, v in bins.__dict__.items() if not k.startswith("_") and k != "bounds"},
        "representatives": reps, "quantiles": table,
        "tail_high": fit_tail(high, table[-1], upper=True, log_tail=log_tail),
        "tail_low": fit_tail(low, table[0], upper=False, log_tail=log_tail) if bins.low_open else None,
    })


