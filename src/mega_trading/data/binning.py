"""In-bin decoding: draw a field's value inside its bin from the TRAINING distribution.

Decoding every token to its bin's median puts generated sizes and gaps on a handful of
values (spiky histograms, absurd tail indices), and even real events passed through the
tokenizer and back ("tokenized real") then sit outside the noise floor of every binned
distance. So the tokenizer stores, per field and bin, a compact quantile table of the
training values that fell in the bin, and ``draw_in_bins`` samples by inverse-CDF
interpolation between those quantiles:

* an inner bin's draws stay within [its smallest, its largest] training value, so they lie
  inside the bin and re-encode to the same token;
* a bin that is a mass point (exact-zero move or gap) has all its quantiles equal;
* an open-ended outlier bin (the lowest / highest bin of a field) keeps a heavy tail: the
  top (bottom) ``1 / (n_quantiles - 1)`` of its mass is drawn from an exponential tail
  beyond its second-to-last quantile, in "tail space" (log |x| for the move in bps, i.e.
  a Pareto tail; the value itself for the log-size and log-gap fields, i.e. Pareto in size
  and time). The tail's scale is the mean excess of the bin's outer half beyond its median
  (the exponential maximum-likelihood fit, the Hill estimator for Pareto); draws are capped at twice the largest training excess, so one draw never leaves the market.

Pure numpy; the tokenizer keeps the tables in its artifact (``tokenizer@2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_N_QUANTILES = 33  # 32 intervals per bin: ~1 kB of floats for the whole vocabulary
TAIL_CAP = 1.5  # a tail draw is at most this many times the bin's most extreme training value
LOG_TAIL_CAP = float(np.log(TAIL_CAP))  # the same, for fields that are logs (size, gap)


@dataclass(frozen=True)
class BinTail:
    """Exponential tail (in tail space) of one open-ended bin beyond ``threshold``."""

    threshold: float  # the bin's quantile the tail starts from (field units)
    scale: float  # mean excess beyond it, in tail space (>= 0)
    max_excess: float  # largest training excess beyond the bin's median, in tail space (info)

    def to_list(self) -> list[float]:
        return [self.threshold, self.scale, self.max_excess]


def bin_quantiles(ordered: np.ndarray, bin_of: np.ndarray, n_bins: int, n_quantiles: int,
                  fallback: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """Per bin, ``n_quantiles`` evenly spaced quantiles (0 and 1 included) of the sorted
    values ``ordered`` that fell in it (``bin_of``, non-decreasing); an empty bin gets its
    fallback representative alone."""
    levels = np.linspace(0.0, 1.0, n_quantiles)
    starts = np.searchsorted(bin_of, np.arange(n_bins), side="left")
    ends = np.searchsorted(bin_of, np.arange(n_bins), side="right")
    out = []
    for b, (lo, hi) in enumerate(zip(starts, ends)):
        if hi > lo:
            # "linear" interpolates between observed values: still inside the bin
            out.append(tuple(float(v) for v in np.quantile(ordered[lo:hi], levels)))
        else:
            out.append((float(fallback[b]),))
    return tuple(out)


def _tail_space(values: np.ndarray, log_tail: bool) -> np.ndarray:
    return np.log(np.maximum(np.abs(values), 1e-300)) if log_tail else np.asarray(values, float)


def fit_tail(values: np.ndarray, quantiles: tuple[float, ...], upper: bool,
             log_tail: bool) -> BinTail | None:
    """Tail of an open-ended bin from its training values (None: too few to fit).

    The exponential is memoryless, so its scale is fitted on the outer HALF of the bin
    (mean excess beyond the bin's median: enough points even in a small outlier bin) and
    applied beyond the second-to-last quantile, where the draws leave the table.
    """
    if len(quantiles) < 3:
        return None
    threshold = quantiles[-2] if upper else quantiles[1]
    middle = float(np.median(values)) if values.size else 0.0
    beyond = values[values > middle] if upper else values[values < middle]
    if beyond.size < 2 or (log_tail and middle == 0):
        return None
    excess = np.abs(_tail_space(beyond, log_tail) - _tail_space(np.array([middle]), log_tail)[0])
    if excess.max() <= 0:
        return None
    return BinTail(threshold=float(threshold), scale=float(excess.mean()),
                   max_excess=float(excess.max()))


def draw_in_bins(bin_index: np.ndarray, quantiles: tuple[tuple[float, ...], ...],
                 rng: np.random.Generator, tails: dict[int, tuple[BinTail, bool]] | None = None,
                 log_tail: bool = False) -> np.ndarray:
    """One value per entry of ``bin_index`` drawn from that bin's quantile table.

    ``tails``: {bin: (tail, upper)} for the open-ended bins. Every entry consumes exactly
    two uniforms from ``rng`` (so the same seed gives the same draws whatever the bins).
    """
    bin_index = np.asarray(bin_index, dtype=np.int64)
    u = rng.random(bin_index.shape)
    v = rng.random(bin_index.shape)
    out = np.empty(bin_index.shape, dtype=np.float64)
    for b in np.unique(bin_index):
        rows = bin_index == b
        table = np.asarray(quantiles[b], dtype=np.float64)
        if table.size == 1:
            out[rows] = table[0]
            continue
        levels = np.linspace(0.0, 1.0, table.size)
        values = np.clip(np.interp(u[rows], levels, table), table[0], table[-1])
        tail, upper = (tails or {}).get(int(b), (None, True))
        if tail is not None:
            in_tail = u[rows] > levels[-2] if upper else u[rows] < levels[1]
            drawn = _tail_draw(tail, upper, v[rows][in_tail], log_tail)
            extreme = table[-1] if upper else table[0]
            if log_tail:  # |value| at most TAIL_CAP x the most extreme training |value|
                limit = np.abs(extreme) * TAIL_CAP
                drawn = np.sign(drawn) * np.minimum(np.abs(drawn), limit)
            else:
                drawn = (np.minimum(drawn, extreme + LOG_TAIL_CAP) if upper
                         else np.maximum(drawn, extreme - LOG_TAIL_CAP))
            values[in_tail] = drawn
        out[rows] = values
    return out


def _tail_draw(tail: BinTail, upper: bool, v: np.ndarray, log_tail: bool = False) -> np.ndarray:
    excess = -np.log1p(-v) * tail.scale
    if log_tail:  # Pareto in |x|: the sign of the threshold is kept
        return np.sign(tail.threshold) * np.abs(tail.threshold) * np.exp(excess)
    return tail.threshold + excess if upper else tail.threshold - excess
