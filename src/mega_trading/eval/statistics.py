"""The facts' settings, the one input preparation every source goes through, and the
elementary statistics (grouped ACFs, Hill tail index, power-law fit, aggregated returns,
the response function) the facts are built from."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import polars as pl
from pydantic import Field
from scipy import stats

from mega_trading.core.config import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
)
from mega_trading.core.errors import DataError

DISTRIBUTIONS = ("returns", "abs_returns", "log_size", "log1p_dt")
REQUIRED_COLUMNS = ("side", "move_bps", "log_size", "dt_us")
_GROUP_CANDIDATES = ("symbol", "rollout", "segment")


class DegenerateReturnsError(DataError):
    """Returns with too few distinct values for tail / moment / correlation facts."""


@config_dataclass
class FactsConfig:
    max_lag: PositiveInt = 50
    event_horizons: tuple[PositiveInt, ...] = (1, 4, 16, 64)
    wallclock_horizons_s: tuple[PositiveFloat, ...] = (1.0, 10.0, 60.0)
    hill_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    size_quantiles: tuple[Annotated[float, Field(ge=0, le=1)], ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
    min_distinct_returns: int = 5
    on_degenerate: Literal["raise", "flag"] = "raise"
    min_events: int = 50
    n_boot: NonNegativeInt = 200
    block_len: PositiveInt = 1
    n_bins: Annotated[int, Field(ge=2)] = 50
    max_distance_samples: Annotated[int, Field(ge=10)] = 20000
    # Real data read per split (backtest = the target, train = the noise floor and Hawkes):
    # all of it up to this many events, else a seeded stratified sample of windows.
    max_real_events: Annotated[int, Field(ge=100)] = 200_000
    real_window_events: NonNegativeInt = 0  # sampled window length; 0: the rollout length
    realism_boot: NonNegativeInt = 50  # block-bootstrap replicates of each source's realism score (realism.py)
    realism_block_events: PositiveInt = 256  # events per resampled block



# --- input preparation ----------------------------------------------------------------------

@dataclass(frozen=True)
class PreparedEvents:
    """Numpy views of one source, rows grouped contiguously, boundaries never crossed."""

    returns: np.ndarray   # move_bps, float64
    sign: np.ndarray      # ±1, float64
    log_size: np.ndarray
    dt_us: np.ndarray     # float64
    time_us: np.ndarray   # int64
    group: np.ndarray     # int64 group id, non-decreasing

    @property
    def n(self) -> int:
        return int(self.returns.size)


def prepare_events(events: pl.DataFrame) -> PreparedEvents:
    missing = [c for c in REQUIRED_COLUMNS if c not in events.columns]
    if missing:
        raise DataError(f"event table lacks column(s) {missing}; has {events.columns}")
    frame = events
    keys = [c for c in _GROUP_CANDIDATES if c in frame.columns]
    if "segment" not in frame.columns and "segment_start" in frame.columns:
        outer = [c for c in keys if c != "segment"]
        seg = pl.col("segment_start").fill_null(False).cast(pl.Int64).cum_sum()
        frame = frame.with_columns(segment=seg.over(outer) if outer else seg)
        keys.append("segment")
    if "time_us" not in frame.columns:
        clock = pl.col("dt_us").cum_sum()
        frame = frame.with_columns(time_us=clock.over(keys) if keys else clock)
    if "is_event" in frame.columns:
        frame = frame.filter(pl.col("is_event").fill_null(False))
    if "segment_start" in frame.columns:
        frame = frame.filter(~pl.col("segment_start").fill_null(False))
    frame = frame.drop_nulls([*REQUIRED_COLUMNS, "time_us"])
    if keys:
        frame = frame.with_row_index("_order").sort([*keys, "_order"])
    group = np.zeros(frame.height, dtype=np.int64)
    if keys and frame.height:
        changed = np.zeros(frame.height, dtype=bool)
        for key in keys:
            values = frame[key].to_numpy()
            changed[1:] |= values[1:] != values[:-1]
        group = np.cumsum(changed)
    return PreparedEvents(
        returns=frame["move_bps"].cast(pl.Float64).to_numpy(),
        sign=np.sign(frame["side"].cast(pl.Float64).to_numpy()),
        log_size=frame["log_size"].cast(pl.Float64).to_numpy(),
        dt_us=frame["dt_us"].cast(pl.Float64).to_numpy(),
        time_us=frame["time_us"].cast(pl.Int64).to_numpy(),
        group=group,
    )


# --- elementary statistics ------------------------------------------------------------------

def grouped_acf(x: np.ndarray, group: np.ndarray, max_lag: int) -> np.ndarray:
    """Autocorrelation at lags 1..max_lag over pairs inside one group (NaN if undefined)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.full(max_lag, np.nan)
    if x.size < 2:
        return out
    centred = x - x.mean()
    var = float(np.mean(centred**2))
    if var <= 0:
        return out
    for lag in range(1, min(max_lag, x.size - 1) + 1):
        same = group[lag:] == group[:-lag]
        count = int(same.sum())
        if count:
            products = centred[lag:] * centred[:-lag]
            out[lag - 1] = float(products[same].sum()) / count / var
    return out


def hill_tail_index(abs_values: np.ndarray, fraction: float) -> tuple[float, int]:
    """Hill estimator 1/mean(log(x_(i)/x_(k+1))) on the top ``fraction`` of |values|."""
    x = np.sort(np.asarray(abs_values, dtype=np.float64))[::-1]
    k = int(fraction * x.size)
    if k < 2 or x[k] <= 0:
        return math.nan, k
    mean_log_excess = float(np.mean(np.log(x[:k] / x[k])))
    return (1.0 / mean_log_excess if mean_log_excess > 0 else math.nan), k


def powerlaw_fit(lags: np.ndarray, acf: np.ndarray) -> dict[str, float]:
    """Least squares of log acf = log A − gamma log lag over the positive, finite acf values."""
    ok = np.isfinite(acf) & (acf > 0)
    if ok.sum() < 3:
        return {"gamma": math.nan, "amplitude": math.nan, "r2": math.nan, "n_points": int(ok.sum())}
    log_lag, log_acf = np.log(lags[ok]), np.log(acf[ok])
    slope, intercept = np.polyfit(log_lag, log_acf, 1)
    residual = log_acf - (slope * log_lag + intercept)
    total = np.sum((log_acf - log_acf.mean()) ** 2)
    r2 = 1.0 - float(np.sum(residual**2) / total) if total > 0 else math.nan
    return {"gamma": float(-slope), "amplitude": float(np.exp(intercept)), "r2": r2,
            "n_points": int(ok.sum())}


def excess_kurtosis(x: np.ndarray) -> float:
    if x.size < 4 or np.std(x) == 0:
        return math.nan
    return float(stats.kurtosis(x, fisher=True, bias=True))


def _block_sums(values: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of runs of equal (non-decreasing) keys."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return np.add.reduceat(values, starts), np.diff(np.r_[starts, keys.size])


def _group_starts(group: np.ndarray) -> np.ndarray:
    """Index of the first row of each row's group."""
    first = np.r_[True, group[1:] != group[:-1]]
    return np.maximum.accumulate(np.where(first, np.arange(group.size), 0))


def aggregated_returns_event(ev: PreparedEvents, horizon: int) -> np.ndarray:
    """Sums of ``horizon`` consecutive returns inside a group (complete blocks only)."""
    if ev.n == 0:
        return np.empty(0)
    position = np.arange(ev.n) - _group_starts(ev.group)
    keys = ev.group * (ev.n + 1) + position // horizon
    sums, counts = _block_sums(ev.returns, keys)
    return sums[counts == horizon]


def aggregated_returns_clock(ev: PreparedEvents, seconds: float) -> np.ndarray:
    """Sums of returns per wall-clock bucket of ``seconds`` inside a group (buckets with trades)."""
    if ev.n == 0:
        return np.empty(0)
    width = max(round(seconds * 1e6), 1)
    bucket = ev.time_us // width
    bucket = bucket - bucket[_group_starts(ev.group)]
    keys = ev.group * (int(bucket.max()) + 1) + bucket
    sums, _ = _block_sums(ev.returns, keys)
    return sums


def response_curve(ev: PreparedEvents, max_lag: int) -> np.ndarray:
    """R(l) = E[s_t (r_t + ... + r_{t+l-1})] over t whose window stays inside one group."""
    out = np.full(max_lag, np.nan)
    cumulative = np.r_[0.0, np.cumsum(ev.returns)]
    for lag in range(1, min(max_lag, ev.n) + 1):
        t = np.arange(ev.n - lag + 1)
        inside = ev.group[t + lag - 1] == ev.group[t]
        if inside.any():
            t = t[inside]
            out[lag - 1] = float(np.mean(ev.sign[t] * (cumulative[t + lag] - cumulative[t])))
    return out


