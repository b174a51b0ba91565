"""Stylized facts of order flow, and how far generated flow is from real flow.

Everything is computed by ONE code path for every source (real backtest events, real
training events, model rollouts, baseline rollouts), on the columns of the event table
(docs/CONTRACTS.md) that generated rollouts share: ``side``, ``move_bps``, ``log_size``,
``dt_us`` and, when present, ``time_us``, ``symbol``, ``rollout``, ``segment``,
``segment_start``, ``is_event``.

Input handling (``prepare_events``)
    * Series never cross a boundary: rows are grouped by the present columns among
      (``symbol``, ``rollout``, ``segment``); without ``segment`` but with
      ``segment_start``, segments are numbered from it. Rows keep their order inside a
      group (the table must be in event order per group, as events and rollouts are).
    * Dropped: special tokens (``is_event`` False), segment-start rows (their move and gap
      are 0 by construction, not observations) and rows with nulls.
    * Autocorrelations use the pooled mean/variance of the whole source and average the
      lagged products over the pairs that lie inside one group.

Degenerate returns guard
    A decoded rollout's ``move_bps`` takes one value per tokenizer bin. Tails, kurtosis
    and autocorrelations are meaningless on a variable with only a handful of values (a
    3-valued sign-of-move is not a return), so ``compute_facts`` raises
    ``DegenerateReturnsError`` when returns have fewer than
    ``FactsConfig.min_distinct_returns`` distinct values; with
    ``on_degenerate="flag"`` it computes them anyway and sets ``valid: false`` plus a
    warning.

Facts of one source (``compute_facts``), JSON-ready (NaN -> null). ``lags`` is 1..max_lag
and every ``*acf`` / ``response`` list is aligned with it::

    n_events, n_groups, valid, warnings, lags
    returns:       n_distinct, mean, std, skew, excess_kurtosis, share_zero      (bps)
    tail:          hill_index, hill_k, hill_fraction        (Hill estimator on |r|)
    return_acf:    [acf of r at each lag]
    abs_return_acf:[acf of |r|]                              (volatility clustering)
    aggregation:   event: {"h": {excess_kurtosis, n}}  sums of h consecutive events
                   wallclock_s: {"secs": {excess_kurtosis, n}}  sums per clock bucket
    inter_arrival: mean_dt_us, median_dt_us, cv, share_zero, acf (of dt)
    sign:          mean, acf, powerlaw: {gamma, amplitude, r2, n_points}
                   (fit log acf = log A - gamma log lag on the positive acf values)
    size:          mean, std, quantiles {"q": value}                  (of log_size)
    response:      [R(l)] with R(l) = E[s_t * (r_t + ... + r_{t+l-1})]   (bps)
                   R(1) is the same-trade term (impact + bid-ask bounce).

Distances (``distances(gen, real, cfg, rng)``), per distribution in ``DISTRIBUTIONS``
(``returns``, ``abs_returns``, ``log_size``, ``log1p_dt``)::

    {"n_gen", "n_real",
     "ks":          {"value", "ci_low", "ci_high"},   scipy.stats.ks_2samp statistic
     "wasserstein": {...},  W1 after standardizing both by the REAL mean and std
     "l1_bins":     {...}}  sum |p - q| over bins cut at the real quantiles (0..2)

Each sample is first capped at ``max_distance_samples`` (seeded draw) so sources of
different sizes are compared at the same sample size; the CI is the 2.5-97.5 % percentile
interval of ``n_boot`` bootstrap replicates that resample both samples (i.i.d., or moving
blocks of ``block_len`` events when ``block_len > 1``). Replicates are O(n) re-weightings
of one pooled sort (``_DistanceKit``), so 200 replicates cost about as much as a few sorts.
Resampling adds noise, so the replicates of a distance sit ABOVE the point estimate (for a
sample against itself the point is 0 and the interval is the resampling noise level): read
the interval as the spread to compare between sources, not as a bias-corrected interval.

Scorecard (``scorecard(...)``), the ``facts.json`` payload. Roles are the same in every
section: ``real`` = real BACKTEST events (the reference), ``noise_floor`` = real TRAINING
events (how far two real samples of the same market already are), ``model`` = model
rollouts (null when not given), ``baselines`` = {name: ...}::

    {"schema": "mega_trading.eval.facts/v1", "config": {...}, "seed": int,
     "facts":     {"real": F, "noise_floor": F, "model": F|null, "baselines": {name: F}},
     "distances": {dist: {"noise_floor": D, "model": D|null, "baselines": {name: D}}},
     "fact_gaps": {gap:  {"noise_floor": x, "model": x|null, "baselines": {name: x}}}}

``fact_gaps`` compares each source's facts with the real backtest facts: for the curves
(``return_acf``, ``abs_return_acf``, ``sign_acf``, ``dt_acf``, ``response``) the mean
absolute difference over lags; for scalars (``excess_kurtosis``, ``hill_index``,
``sign_gamma``, ``dt_share_zero``, ``dt_cv``, ``log_size_std``) the absolute difference.
A generator is as good as real data on a fact when its gap is near the noise floor's.

``summary_table(card)`` flattens the headline numbers into rows for a Rich table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import polars as pl
from pydantic import Field
from scipy import stats

from mega_trading.core.config import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
    to_dict,
)
from mega_trading.core.errors import DataError
from mega_trading.core.lineage import provenance, read_json, write_json_atomic

SCHEMA = "mega_trading.eval.facts/v1"
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


def _excess_kurtosis(x: np.ndarray) -> float:
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


# --- facts ----------------------------------------------------------------------------------

def compute_facts(events: pl.DataFrame, cfg: FactsConfig = FactsConfig()) -> dict[str, Any]:
    """Stylized facts of one event set (layout in the module docstring)."""
    ev = prepare_events(events)
    if ev.n < cfg.min_events:
        raise DataError(f"only {ev.n} usable events; stylized facts need at least {cfg.min_events}")
    warnings = _degenerate_warnings(ev, cfg)
    lags = np.arange(1, cfg.max_lag + 1)
    r = ev.returns
    hill, hill_k = hill_tail_index(np.abs(r), cfg.hill_fraction)
    sign_acf = grouped_acf(ev.sign, ev.group, cfg.max_lag)
    facts = {
        "n_events": ev.n,
        "n_groups": int(ev.group[-1] + 1),
        "valid": not warnings,
        "warnings": warnings,
        "lags": lags.tolist(),
        "returns": {
            "n_distinct": int(np.unique(r).size), "mean": float(r.mean()), "std": float(r.std()),
            "skew": float(stats.skew(r)) if r.std() > 0 else math.nan,
            "excess_kurtosis": _excess_kurtosis(r), "share_zero": float(np.mean(r == 0)),
        },
        "tail": {"hill_index": hill, "hill_k": hill_k, "hill_fraction": cfg.hill_fraction},
        "return_acf": grouped_acf(r, ev.group, cfg.max_lag).tolist(),
        "abs_return_acf": grouped_acf(np.abs(r), ev.group, cfg.max_lag).tolist(),
        "aggregation": _aggregation(ev, cfg),
        "inter_arrival": _inter_arrival(ev, cfg),
        "sign": {"mean": float(ev.sign.mean()), "acf": sign_acf.tolist(),
                 "powerlaw": powerlaw_fit(lags.astype(float), sign_acf)},
        "size": _size(ev, cfg),
        "response": response_curve(ev, cfg.max_lag).tolist(),
    }
    return _json_ready(facts)


def _degenerate_warnings(ev: PreparedEvents, cfg: FactsConfig) -> list[str]:
    n_distinct = int(np.unique(ev.returns).size)
    if n_distinct >= cfg.min_distinct_returns:
        return []
    message = (
        f"returns (move_bps) take only {n_distinct} distinct value(s) (< min_distinct_returns="
        f"{cfg.min_distinct_returns}): tails, kurtosis and autocorrelations of such a "
        "variable are not stylized facts of returns (is it a decoded sign / bin index?)"
    )
    if cfg.on_degenerate == "raise":
        raise DegenerateReturnsError(message)
    return [message]


def _aggregation(ev: PreparedEvents, cfg: FactsConfig) -> dict[str, dict[str, dict[str, float]]]:
    def entry(values: np.ndarray) -> dict[str, float]:
        return {"excess_kurtosis": _excess_kurtosis(values), "n": int(values.size)}

    return {
        "event": {str(h): entry(aggregated_returns_event(ev, h)) for h in cfg.event_horizons},
        "wallclock_s": {_num_key(s): entry(aggregated_returns_clock(ev, s))
                        for s in cfg.wallclock_horizons_s},
    }


def _inter_arrival(ev: PreparedEvents, cfg: FactsConfig) -> dict[str, Any]:
    dt = ev.dt_us
    mean = float(dt.mean())
    return {
        "mean_dt_us": mean, "median_dt_us": float(np.median(dt)),
        "cv": float(dt.std() / mean) if mean > 0 else math.nan,
        "share_zero": float(np.mean(dt == 0)),
        "acf": grouped_acf(dt, ev.group, cfg.max_lag).tolist(),
    }


def _size(ev: PreparedEvents, cfg: FactsConfig) -> dict[str, Any]:
    q = np.quantile(ev.log_size, cfg.size_quantiles)
    return {"mean": float(ev.log_size.mean()), "std": float(ev.log_size.std()),
            "quantiles": {_num_key(p): float(v) for p, v in zip(cfg.size_quantiles, q)}}


def _num_key(x: float) -> str:
    return f"{x:g}"


def _json_ready(obj: Any) -> Any:
    """Plain Python containers/numbers, NaN and inf as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --- distances ------------------------------------------------------------------------------

def distribution_values(ev: PreparedEvents) -> dict[str, np.ndarray]:
    return {
        "returns": ev.returns,
        "abs_returns": np.abs(ev.returns),
        "log_size": ev.log_size,
        "log1p_dt": np.log1p(np.maximum(ev.dt_us, 0.0)),
    }


def _draw_indices(n: int, size: int, rng: np.random.Generator, block_len: int) -> np.ndarray:
    """``size`` indices into range(n): i.i.d., or moving blocks of ``block_len``."""
    if block_len <= 1 or n <= block_len:
        return rng.integers(0, n, size=size)
    n_blocks = -(-size // block_len)
    starts = rng.integers(0, n - block_len + 1, size=n_blocks)
    return (starts[:, None] + np.arange(block_len)[None, :]).ravel()[:size]


def _cap(x: np.ndarray, cap: int, rng: np.random.Generator, block_len: int) -> np.ndarray:
    if x.size <= cap:
        return x
    if block_len <= 1:
        return x[rng.choice(x.size, size=cap, replace=False)]
    return x[_draw_indices(x.size, cap, rng, block_len)]


class _DistanceKit:
    """KS, standardized W1 and binned L1 of two fixed samples under any resampling weights.

    A bootstrap replicate only re-weights the original points (how often each one was
    drawn), so the pooled sample is sorted ONCE and every replicate is an O(n) weighted
    ECDF difference: no sort per replicate. With uniform weights it equals
    ``scipy.stats.ks_2samp`` / ``wasserstein_distance``, which give the point estimates.
    """

    def __init__(self, gen: np.ndarray, real: np.ndarray, n_bins: int):
        mean, std = float(real.mean()), float(real.std())
        scale = std if std > 0 else 1.0
        self.gen, self.real = (gen - mean) / scale, (real - mean) / scale
        inner = np.quantile(self.real, np.linspace(0, 1, n_bins + 1)[1:-1])
        self.edges = np.unique(inner)
        self.gen_bins = np.searchsorted(self.edges, self.gen, side="right")
        self.real_bins = np.searchsorted(self.edges, self.real, side="right")
        pooled = np.concatenate([self.gen, self.real])
        self.order = np.argsort(pooled, kind="stable")
        xs = pooled[self.order]
        self.run_end = np.r_[xs[1:] != xs[:-1], True]  # last position of each distinct value
        self.steps = np.diff(xs[self.run_end])

    def point(self) -> tuple[float, float, float]:
        ks = float(stats.ks_2samp(self.gen, self.real).statistic)
        w1 = float(stats.wasserstein_distance(self.gen, self.real))
        return ks, w1, self._l1(np.ones(self.gen.size), np.ones(self.real.size))

    def weighted(self, gen_counts: np.ndarray, real_counts: np.ndarray) -> tuple[float, float, float]:
        """Distances when point i of each sample is drawn ``counts[i]`` times."""
        signed = np.concatenate([gen_counts / gen_counts.sum(), -real_counts / real_counts.sum()])
        ecdf_gap = np.cumsum(signed[self.order])[self.run_end]
        ks = float(np.max(np.abs(ecdf_gap)))
        w1 = float(np.sum(np.abs(ecdf_gap[:-1]) * self.steps))
        return ks, w1, self._l1(gen_counts, real_counts)

    def _l1(self, gen_counts: np.ndarray, real_counts: np.ndarray) -> float:
        n_bins = self.edges.size + 1
        p = np.bincount(self.gen_bins, weights=gen_counts, minlength=n_bins) / gen_counts.sum()
        q = np.bincount(self.real_bins, weights=real_counts, minlength=n_bins) / real_counts.sum()
        return float(np.abs(p - q).sum())


def _counts(n: int, rng: np.random.Generator, block_len: int) -> np.ndarray:
    return np.bincount(_draw_indices(n, n, rng, block_len), minlength=n).astype(np.float64)


def _distance_with_ci(gen: np.ndarray, real: np.ndarray, cfg: FactsConfig,
                      rng: np.random.Generator) -> dict[str, Any]:
    gen = _cap(gen, cfg.max_distance_samples, rng, cfg.block_len)
    real = _cap(real, cfg.max_distance_samples, rng, cfg.block_len)
    kit = _DistanceKit(gen, real, cfg.n_bins)
    point = kit.point()
    replicates = np.array([
        kit.weighted(_counts(gen.size, rng, cfg.block_len), _counts(real.size, rng, cfg.block_len))
        for _ in range(cfg.n_boot)
    ]).reshape(cfg.n_boot, 3)
    out: dict[str, Any] = {"n_gen": int(gen.size), "n_real": int(real.size)}
    for j, name in enumerate(("ks", "wasserstein", "l1_bins")):
        low, high = (np.percentile(replicates[:, j], [2.5, 97.5]) if cfg.n_boot
                     else (math.nan, math.nan))
        out[name] = {"value": point[j], "ci_low": float(low), "ci_high": float(high)}
    return out


def distances(gen: pl.DataFrame, real: pl.DataFrame, cfg: FactsConfig = FactsConfig(),
              rng: np.random.Generator | None = None) -> dict[str, Any]:
    """KS, standardized W1 and binned L1 of each distribution, with bootstrap 95 % CIs."""
    rng = rng if rng is not None else np.random.default_rng(0)
    gen_values = distribution_values(prepare_events(gen))
    real_values = distribution_values(prepare_events(real))
    out = {}
    for name in DISTRIBUTIONS:
        g, r = gen_values[name], real_values[name]
        if g.size < 2 or r.size < 2:
            raise DataError(f"too few events to compare the '{name}' distribution")
        out[name] = _distance_with_ci(g, r, cfg, rng)
    return _json_ready(out)


# --- scorecard ------------------------------------------------------------------------------

_CURVE_GAPS = {
    "return_acf": ("return_acf",), "abs_return_acf": ("abs_return_acf",),
    "sign_acf": ("sign", "acf"), "dt_acf": ("inter_arrival", "acf"), "response": ("response",),
}
_SCALAR_GAPS = {
    "excess_kurtosis": ("returns", "excess_kurtosis"), "hill_index": ("tail", "hill_index"),
    "sign_gamma": ("sign", "powerlaw", "gamma"), "dt_share_zero": ("inter_arrival", "share_zero"),
    "dt_cv": ("inter_arrival", "cv"), "log_size_std": ("size", "std"),
}


def _get(facts: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = facts
    for part in path:
        node = node[part]
    return node


def _gap(facts: Mapping[str, Any], real: Mapping[str, Any], name: str) -> float | None:
    if name in _CURVE_GAPS:
        a = np.array(_get(facts, _CURVE_GAPS[name]), dtype=float)  # None -> nan
        b = np.array(_get(real, _CURVE_GAPS[name]), dtype=float)
        ok = np.isfinite(a) & np.isfinite(b)
        return float(np.mean(np.abs(a[ok] - b[ok]))) if ok.any() else None
    a, b = _get(facts, _SCALAR_GAPS[name]), _get(real, _SCALAR_GAPS[name])
    return None if a is None or b is None else abs(float(a) - float(b))


def fact_gaps(facts: Mapping[str, Any], real: Mapping[str, Any]) -> dict[str, float | None]:
    return {name: _gap(facts, real, name) for name in (*_CURVE_GAPS, *_SCALAR_GAPS)}


def scorecard(
    real_backtest: pl.DataFrame,
    real_train: pl.DataFrame,
    model_rollouts: pl.DataFrame | None = None,
    baselines: Mapping[str, pl.DataFrame] | None = None,
    cfg: FactsConfig = FactsConfig(),
    seed: int = 0,
) -> dict[str, Any]:
    """Facts of every source, distances to the real backtest, and the noise floor beside them."""
    baselines = dict(baselines or {})
    generated: dict[str, pl.DataFrame | None] = {"noise_floor": real_train, "model": model_rollouts}
    facts: dict[str, Any] = {"real": compute_facts(real_backtest, cfg)}
    for role, frame in generated.items():
        facts[role] = compute_facts(frame, cfg) if frame is not None else None
    facts["baselines"] = {name: compute_facts(frame, cfg) for name, frame in baselines.items()}

    rng = np.random.default_rng(seed)
    by_role: dict[str, Any] = {
        role: distances(frame, real_backtest, cfg, rng) if frame is not None else None
        for role, frame in generated.items()
    }
    by_baseline = {name: distances(frame, real_backtest, cfg, rng) for name, frame in baselines.items()}
    dist_section = {
        name: {**{role: (d[name] if d else None) for role, d in by_role.items()},
               "baselines": {b: d[name] for b, d in by_baseline.items()}}
        for name in DISTRIBUTIONS
    }

    gaps_by_source = {role: fact_gaps(facts[role], facts["real"]) if facts[role] else None
                      for role in generated}
    gaps_by_baseline = {b: fact_gaps(f, facts["real"]) for b, f in facts["baselines"].items()}
    gap_section = {
        name: {**{role: (g[name] if g else None) for role, g in gaps_by_source.items()},
               "baselines": {b: g[name] for b, g in gaps_by_baseline.items()}}
        for name in (*_CURVE_GAPS, *_SCALAR_GAPS)
    }
    from mega_trading.eval.realism import realism_block

    realism = realism_block(_json_ready(gap_section), {"model": model_rollouts, **baselines},
                            facts["real"], cfg, cfg.realism_boot, cfg.realism_block_events, seed)
    return _json_ready({"schema": SCHEMA, "config": to_dict(cfg), "seed": seed,
                        "facts": facts, "distances": dist_section, "fact_gaps": gap_section,
                        "realism": realism})


def write_scorecard(path: str | Path, card: Mapping[str, Any], **lineage: Any) -> None:
    """Write ``facts.json`` atomically with a provenance block (``lineage`` adds run ids etc.)."""
    write_json_atomic(path, {**card, "provenance": provenance(**lineage)})


# --- summary table --------------------------------------------------------------------------

_SUMMARY_FACTS = (
    ("events", ("n_events",)),
    ("return excess kurtosis", ("returns", "excess_kurtosis")),
    ("Hill tail index |r|", ("tail", "hill_index")),
    ("return acf lag 1", ("return_acf", 0)),
    ("|r| acf lag 1", ("abs_return_acf", 0)),
    ("|r| acf lag 10", ("abs_return_acf", 9)),
    ("kurtosis, 64-event sums", ("aggregation", "event", "64", "excess_kurtosis")),
    ("sign acf lag 1", ("sign", "acf", 0)),
    ("sign acf power-law gamma", ("sign", "powerlaw", "gamma")),
    ("share of zero gaps", ("inter_arrival", "share_zero")),
    ("dt coefficient of variation", ("inter_arrival", "cv")),
    ("log size std", ("size", "std")),
    ("response R(1) bps", ("response", 0)),
    ("response R(max lag) bps", ("response", -1)),
)


def lookup(node: Any, path: tuple[Any, ...]) -> Any:
    """node[p0][p1]... or None where any step is missing."""
    for part in path:
        if node is None:
            return None
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _fmt_distance(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "—"
    return f"{_fmt(d['value'])} [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]"


def summary_table(card: Mapping[str, Any]) -> list[dict[str, str]]:
    """Rows {"metric", "real", "noise_floor", "model", <baseline>...} of formatted strings."""
    facts = card["facts"]
    baselines = list(facts["baselines"])
    sources = {"real": facts["real"], "noise_floor": facts["noise_floor"], "model": facts["model"],
               **{b: facts["baselines"][b] for b in baselines}}
    rows = []
    for label, path in _SUMMARY_FACTS:
        rows.append({"metric": label, **{s: _fmt(lookup(f, path)) for s, f in sources.items()}})
    rows.append({"metric": "valid", **{s: _fmt(f["valid"]) if f else "—" for s, f in sources.items()}})
    for name, section in card["distances"].items():
        for stat in ("ks", "wasserstein"):
            row = {"metric": f"{stat} {name}", "real": "—"}
            row["noise_floor"] = _fmt_distance(lookup(section, ("noise_floor", stat)))
            row["model"] = _fmt_distance(lookup(section, ("model", stat)))
            for b in baselines:
                row[b] = _fmt_distance(lookup(section, ("baselines", b, stat)))
            rows.append(row)
    return rows



# --- the facts stage: real vs rollouts vs baseline generators --------------------------------

def tokenized_real(tokenizer: Any, events: pl.DataFrame) -> pl.DataFrame:
    """Real events passed through the tokenizer and decoded back (the quantization floor).

    Model rollouts are decoded tokens, so part of their distance from real flow is just the
    bins; this source shows how much, so the model is not blamed for the tokenizer. Each
    (symbol, segment) is decoded as its own stream, in order, like a rollout is.
    """
    keys = [c for c in ("symbol", "segment") if c in events.columns]
    streams = (events.select(pl.struct(keys).rank("dense")).to_series().to_numpy()
               if keys else None)
    decoded = tokenizer.decode(tokenizer.encode(events), streams=streams)
    return events.select("symbol", "time_us", "segment", "segment_start").hstack(
        decoded.select("side", "move_bps", "log_size", "dt_us"))


def baseline_rollouts(shards: Any, gen_cfg: Any, n_events: int, seed: int,
                      trained: Any = None, train_events: pl.DataFrame | None = None,
                      ) -> dict[str, pl.DataFrame]:
    """Markov-3 continuations of the model's own prompts, and a compound Hawkes process,
    both fitted on the train split of ``trained`` (default: ``shards`` itself); Hawkes on
    `train_events` when given (the bounded sample of that split)."""
    trained = trained or shards
    from mega_trading.eval.backtest import fit_train_baselines
    from mega_trading.eval.hawkes import CompoundHawkes
    from mega_trading.generation.generate import make_prompts, rollouts_to_events

    markov = fit_train_baselines(trained)["markov3"]
    prompts, info = make_prompts(shards, gen_cfg, np.random.default_rng(gen_cfg.seed))
    tokens = markov.generate_batch(prompts.numpy(), gen_cfg.length, np.random.default_rng(seed))
    markov_events = rollouts_to_events(
        tokens[:, prompts.shape[1]:], shards.tokenizer, info["last_price"].to_numpy(),
        info["last_time_us"].to_numpy(), info["symbol"].to_list(), info["size_level"].to_numpy(),
        context_tokens=prompts.numpy())
    hawkes = CompoundHawkes.fit(train_events if train_events is not None
                                else trained.all_events("train"))
    hawkes_events = hawkes.sample(n_events, np.random.default_rng(seed + 1))
    return {"markov3": markov_events, "compound_hawkes": hawkes_events}


def run_facts(data_dir: str | Path, rollouts_path: str | Path | None, out: str | Path,
              cfg: FactsConfig = FactsConfig(on_degenerate="flag"), seed: int = 0,
              gen_cfg: Any = None) -> dict[str, Any]:
    """facts.json: real backtest vs real train (noise floor) vs model rollouts vs baselines."""
    from mega_trading.data.shards import ShardSet
    from mega_trading.generation.generate import GenerateConfig, read_rollouts

    shards = ShardSet.open(data_dir)
    model_events, lineage = (None, {})
    if rollouts_path is not None:
        model_events, lineage = read_rollouts(rollouts_path)
        if lineage.get("tokenizer_hash") not in (None, shards.tokenizer_hash):
            raise DataError("rollouts were made with another tokenizer than this data's", rollouts_path)
    if gen_cfg is None:
        from mega_trading.core.config import from_dict

        gen_cfg = from_dict(GenerateConfig, lineage["config"]) if "config" in lineage else GenerateConfig()
    n_events = int(model_events["is_event"].sum()) if model_events is not None else gen_cfg.n * gen_cfg.length
    # Data encoded with a reused tokenizer has no train split of its own: the baselines and
    # the noise floor come from the data the run was trained on.
    run_config = Path(lineage.get("run") or "/nonexistent") / "config.json"
    trained = shards.training_data(read_json(run_config) if run_config.is_file() else None)
    window = cfg.real_window_events or gen_cfg.length
    real, real_sample = shards.sample_events("backtest", cfg.max_real_events, window, seed)
    floor, floor_sample = trained.sample_events("train", cfg.max_real_events, window, seed + 1)
    baselines = baseline_rollouts(shards, gen_cfg, n_events, seed, trained, floor)
    baselines["tokenized_real"] = tokenized_real(shards.tokenizer, real)
    card = scorecard(real, floor, model_events, baselines, cfg, seed)
    card["real_sample"] = {"real": real_sample, "noise_floor": floor_sample}
    card["sampling"] = lineage.get("sampling")  # which sampling produced the model rollouts
    write_scorecard(out, card, stage="facts", tokenizer_hash=shards.tokenizer_hash,
                    manifest_hash=shards.manifest_hash,
                    rollouts=str(rollouts_path) if rollouts_path else None,
                    rollouts_lineage={k: lineage.get(k) for k in ("run", "step", "seed", "sampling")
                                      if k in lineage})
    return card
