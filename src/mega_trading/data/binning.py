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
  (the exponential maximum-likelihood fit, the Hill estimator for Pareto); a draw is capped
  at ``TAIL_CAP`` (1.5) times the bin's most extreme training value, so one draw never
  leaves the market.

Context-aware move decoding (``MoveMemory``, since ``tokenizer@3``). Measured on the demo, iid
in-bin draws of the price move broke the response function R(l) (37x the noise floor),
kurtosis and the |return| ACF of tokenized real flow, for two reasons:

* the move bins are shared by every market, but a tick is 0.002 bps on BTCUSDT and 8 bps
  on NEXOUSDT, so one bin (e.g. [0.18, 8.2) bps) holds BTC book walks of ~0.3 bps AND
  NEXO one-tick moves of ~8.1 bps; a BTC move drawn from that bin is 8 bps half the time.
  The market's tick is visible in the token history: the smallest non-zero move bin seen
  in the stream's last ``tick_window`` events (its "tick class", 1..``n_classes``, 0 =
  none seen). The tokenizer stores, per tick class and bin, the quantile table of the
  training moves made in that context, and the decoder draws from it (a context with
  fewer than ``MIN_CONTEXT_VALUES`` training moves borrows the nearest tick class's table;
  context tables stay within their training values: no extrapolated tail, which the
  plain tables keep for a stream with no tick class yet);
* real prices bounce between a few levels (bid, ask), so consecutive moves cancel
  exactly; independent draws turn the bounce into a random walk. The decoder keeps the
  last ``n_levels`` distinct price levels of each stream (log price, bps) and, when one of
  them lies at a move from the current price inside the token's move bin, snaps to the
  most recent such level instead of drawing ("level memory"). The snapped move is in its
  bin by construction, so re-encoding still gives the same token.

Both read only the stream's own past (causal) and are deterministic given the tokens and
the seed; the state lives in a ``MoveMemory`` that a step-by-step caller (the simulator)
carries across calls. Pure numpy and Python loops over events (a few us per event).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

MIN_CONTEXT_VALUES = 16  # fewer training moves in a (tick class, bin): borrow a neighbour's table
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


@functools.lru_cache(maxsize=64)
def _levels(n: int) -> np.ndarray:
    """The quantile levels of an n-entry table (cached: the simulator draws every step)."""
    levels = np.linspace(0.0, 1.0, n)
    levels.flags.writeable = False
    return levels


@dataclass(frozen=True)
class QuantileArrays:
    """A field's per-bin quantile tables as flat arrays: bin b's table at b * width onwards
    (padded with its last value), and the slope ``np.interp`` takes on each interval."""

    values: np.ndarray  # [n_bins * width] float64
    slopes: np.ndarray  # [n_bins * width]: (t[k+1] - t[k]) / (level[k+1] - level[k]) at k
    size: np.ndarray  # [n_bins] entries of each bin's table
    width: int
    sizes: tuple[int, ...]  # the distinct table lengths (in practice 1 and n_quantiles)
    finite: bool  # every value and slope finite: the interpolation below is numpy's

    @classmethod
    def of(cls, quantiles: tuple[tuple[float, ...], ...]) -> QuantileArrays:
        size = np.array([len(t) for t in quantiles], dtype=np.int64)
        width = max(int(size.max(initial=1)), 1)
        values, slopes = np.zeros((len(quantiles), width)), np.zeros((len(quantiles), width))
        for b, table in enumerate(quantiles):
            if table:
                values[b, :len(table)], values[b, len(table):] = table, table[-1]
                slopes[b, :len(table) - 1] = np.diff(table) / np.diff(_levels(len(table)))
        finite = bool(np.isfinite(values).all() and np.isfinite(slopes).all())
        values, slopes = values.reshape(-1), slopes.reshape(-1)
        values.flags.writeable = slopes.flags.writeable = False
        return cls(values, slopes, size, width, tuple(int(n) for n in np.unique(size)), finite)


_ARRAYS: dict[int, tuple[tuple, QuantileArrays]] = {}


def quantile_arrays(quantiles: tuple[tuple[float, ...], ...]) -> QuantileArrays:
    """`QuantileArrays` of a tables tuple, built once per tuple: the simulator draws at every
    step and the service for every answer, always from the tokenizer's same tuples. Keyed by
    id, the tuple kept alive beside its arrays so that its id cannot be reused."""
    hit = _ARRAYS.get(id(quantiles))
    if hit is not None and hit[0] is quantiles:
        return hit[1]
    if len(_ARRAYS) >= 64:
        _ARRAYS.clear()
    arrays = QuantileArrays.of(quantiles)
    _ARRAYS[id(quantiles)] = (quantiles, arrays)
    return arrays


def interp_clip(u: np.ndarray, base: np.ndarray, arrays: QuantileArrays, n: int) -> np.ndarray:
    """``np.clip(np.interp(u[i], linspace(0, 1, n), table_i), table_i[0], table_i[-1])``
    for every i at once, table_i the n entries at ``base[i]``, bit for bit: numpy's
    interval, slope and arithmetic (the left value at an exact knot; tests/test_binning.py
    checks it against np.interp). Uniforms outside [0, 1) (or NaN), or non-finite tables,
    go through np.interp itself."""
    levels = _levels(n)
    j = levels.searchsorted(u, side="right") - 1  # levels[j] <= u < levels[j + 1]
    if not arrays.finite or (j.size and (j.min() < 0 or j.max() > n - 2)):
        value = np.array([np.interp(x, levels, arrays.values[at:at + n])
                          for x, at in zip(u.tolist(), base.tolist())], dtype=np.float64)
    else:
        at, x0 = base + j, levels[j]
        lo = arrays.values[at]
        value = np.where(u == x0, lo, arrays.slopes[at] * (u - x0) + lo)
    # np.clip with a table's ends as scalars: a value equal to an end is kept as it is
    # (np.clip with array bounds returns the bound, which differs for -0.0 vs 0.0)
    first, last = arrays.values[base], arrays.values[base + (n - 1)]
    return np.where(value < first, first, np.where(value > last, last, value))


def draw_in_bins(bin_index: np.ndarray, quantiles: tuple[tuple[float, ...], ...],
                 rng: np.random.Generator | None,
                 tails: dict[int, tuple[BinTail, bool]] | None = None,
                 log_tail: bool = False,
                 uniforms: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """One value per entry of ``bin_index`` drawn from that bin's quantile table.

    ``tails``: {bin: (tail, upper)} for the open-ended bins. Every entry consumes exactly
    two uniforms from ``rng`` (so the same seed gives the same draws whatever the bins),
    or takes them from ``uniforms`` (u, v) when given. All entries at once, one pass per
    table length (`interp_clip`): a pass per distinct bin cost ~15 us each, and the
    simulator draws ~10 bins of each field at every step.
    """
    bin_index = np.asarray(bin_index, dtype=np.int64)
    shape = bin_index.shape
    if uniforms is None:
        u = rng.random(shape)
        v = rng.random(shape)
    else:
        u, v = uniforms
    bins, u, v = bin_index.reshape(-1), np.asarray(u).reshape(-1), np.asarray(v).reshape(-1)
    arrays = quantile_arrays(quantiles)
    base = bins * arrays.width
    out = arrays.values[base]  # a one-entry table (a mass point) gives its value
    for n in arrays.sizes:
        rows = slice(None) if len(arrays.sizes) == 1 else arrays.size[bins] == n
        if n == 0 and bins[rows].size:
            raise ValueError("a bin without a quantile table")
        if n >= 2:
            out[rows] = interp_clip(u[rows], base[rows], arrays, n)
    for b, (tail, upper) in (tails or {}).items():
        rows = bins == b
        if tail is None or not rows.any() or arrays.size[b] < 2:
            continue
        table = arrays.values[b * arrays.width:b * arrays.width + arrays.size[b]]
        out[rows] = _with_tail(out[rows], u[rows], v[rows], tail, upper, table, log_tail)
    return out.reshape(shape)


def _with_tail(values: np.ndarray, u: np.ndarray, v: np.ndarray, tail: BinTail, upper: bool,
               table: np.ndarray, log_tail: bool) -> np.ndarray:
    """An open-ended bin's values, those drawn beyond its second-to-last quantile taken
    from its tail instead (capped: module docstring)."""
    levels = _levels(table.size)
    in_tail = u > levels[-2] if upper else u < levels[1]
    drawn = _tail_draw(tail, upper, v[in_tail], log_tail)
    extreme = table[-1] if upper else table[0]
    if log_tail:  # |value| at most TAIL_CAP x the most extreme training |value|
        limit = np.abs(extreme) * TAIL_CAP
        drawn = np.sign(drawn) * np.minimum(np.abs(drawn), limit)
    else:
        drawn = (np.minimum(drawn, extreme + LOG_TAIL_CAP) if upper
                 else np.maximum(drawn, extreme - LOG_TAIL_CAP))
    values[in_tail] = drawn
    return values


def _tail_draw(tail: BinTail, upper: bool, v: np.ndarray, log_tail: bool = False) -> np.ndarray:
    excess = -np.log1p(-v) * tail.scale
    if log_tail:  # Pareto in |x|: the sign of the threshold is kept
        return np.sign(tail.threshold) * np.abs(tail.threshold) * np.exp(excess)
    return tail.threshold + excess if upper else tail.threshold - excess


# --- context-aware move decoding -------------------------------------------------------------

def move_ranks(move_index: np.ndarray, zero_bin: int, n_classes: int) -> np.ndarray:
    """Distance of each move bin from the zero bin, capped at ``n_classes`` (0: zero move or
    not an event): 1 = the smallest non-zero moves."""
    move_index = np.asarray(move_index, dtype=np.int64)
    rank = np.minimum(np.abs(move_index - zero_bin), n_classes)
    return np.where(move_index < 0, 0, rank).astype(np.int64)


class MoveMemory:
    """Per-stream state of context-aware move decoding (module docstring): when each tick
    class was last seen, and the recent distinct price levels. Streams are integer ids; a
    segment start (``reset``) forgets a stream's past."""

    def __init__(self, tick_window: int, n_classes: int, n_levels: int):
        self.tick_window, self.n_classes, self.n_levels = tick_window, n_classes, n_levels
        self._seen: dict[int, list[int]] = {}  # stream -> [step, last step of class 1..n]
        self._levels: dict[int, list[float]] = {}  # stream -> [current, ..., older] levels

    def copy(self) -> MoveMemory:
        """An independent copy (each stream's small lists copied; far cheaper than deepcopy,
        which the simulator would pay at every step)."""
        twin = MoveMemory(self.tick_window, self.n_classes, self.n_levels)
        twin._seen = {stream: list(seen) for stream, seen in self._seen.items()}
        twin._levels = {stream: list(levels) for stream, levels in self._levels.items()}
        return twin

    def copy_stream(self, other: MoveMemory, stream: int) -> None:
        """Take one stream's state from ``other`` (the rest stays)."""
        for mine, theirs in ((self._seen, other._seen), (self._levels, other._levels)):
            if stream in theirs:
                mine[stream] = list(theirs[stream])
            else:
                mine.pop(stream, None)

    def tick_classes(self, ranks: np.ndarray, streams: np.ndarray, reset: np.ndarray) -> np.ndarray:
        """Tick class of each event from the events BEFORE it in its stream, then records
        the event's own rank. ``reset``: entries that start a new segment (class 0)."""
        out = np.zeros(len(ranks), dtype=np.int64)
        if self.tick_window <= 0:
            return out
        never = -(1 << 40)
        for i, (rank, stream, fresh) in enumerate(zip(ranks.tolist(), streams.tolist(),
                                                     reset.tolist())):
            seen = self._seen.get(stream)
            if seen is None or fresh:
                seen = self._seen[stream] = [0] + [never] * self.n_classes
            step = seen[0]
            for c in range(1, self.n_classes + 1):
                if step - seen[c] <= self.tick_window:
                    out[i] = c
                    break
            if rank > 0:
                seen[rank] = step
            seen[0] = step + 1
        return out

    def snap_to_levels(self, moves: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                       streams: np.ndarray, reset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Moves (bps) with level memory applied, and which were snapped. Entry i's move must
        stay in [lower[i], upper[i]) (its bin); a zero move keeps the level."""
        out = np.asarray(moves, dtype=np.float64).copy()
        snapped = np.zeros(out.size, dtype=bool)
        if self.n_levels <= 0:
            return out, snapped
        for i, (move, lo, hi, stream, fresh) in enumerate(zip(
                out.tolist(), lower.tolist(), upper.tolist(), streams.tolist(), reset.tolist())):
            levels = self._levels.get(stream)
            if levels is None or fresh:
                levels = self._levels[stream] = [0.0]
            if move == 0.0:
                continue
            current = levels[0]
            new_level = None
            for level in levels[1:]:  # most recent first
                candidate = math.expm1((level - current) / 1e4) * 1e4
                if lo <= candidate < hi and candidate != 0.0:
                    out[i], snapped[i], new_level = candidate, True, level
                    break
            if new_level is None:
                new_level = current + math.log1p(move / 1e4) * 1e4
            if new_level in levels:
                levels.remove(new_level)
            levels.insert(0, new_level)
            del levels[self.n_levels + 1:]
        return out, snapped


def context_quantiles(values: np.ndarray, bin_index: np.ndarray, classes: np.ndarray,
                      n_bins: int, n_classes: int, n_quantiles: int
                      ) -> tuple[tuple[tuple[float, ...], ...], ...]:
    """Per tick class 1..n_classes and bin, the quantile table of the training values seen
    in that context. A (class, bin) with fewer than MIN_CONTEXT_VALUES training values takes
    the table of the nearest class that has enough (the finer tick first on a tie: a market
    never seen at this tick is more like its nearest neighbours than like the pooled bin,
    which mixes every market's scale); () where no class has enough (the plain table)."""
    levels = np.linspace(0, 1, n_quantiles)
    own = []
    for c in range(1, n_classes + 1):
        rows = classes == c
        tables = []
        for b in range(n_bins):
            picked = values[rows & (bin_index == b)]
            tables.append(tuple(float(v) for v in np.quantile(picked, levels))
                          if picked.size >= MIN_CONTEXT_VALUES else ())
        own.append(tables)
    out = []
    for c in range(n_classes):
        order = sorted(range(n_classes), key=lambda k: (abs(k - c), k))
        out.append(tuple(next((own[k][b] for k in order if own[k][b]), ())
                         for b in range(n_bins)))
    return tuple(out)
