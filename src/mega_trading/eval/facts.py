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

    {"schema": "mega_trading.facts/v1", "config": {...}, "seed": int,
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
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from mega_trading.core.errors import DataError
from mega_trading.eval.statistics import (
    DegenerateReturnsError,
    FactsConfig,
    PreparedEvents,
    aggregated_returns_clock,
    aggregated_returns_event,
    excess_kurtosis,
    grouped_acf,
    hill_tail_index,
    powerlaw_fit,
    prepare_events,
    response_curve,
)

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
            "excess_kurtosis": excess_kurtosis(r), "share_zero": float(np.mean(r == 0)),
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
    return json_ready(facts)


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
        return {"excess_kurtosis": excess_kurtosis(values), "n": int(values.size)}

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


def json_ready(obj: Any) -> Any:
    """Plain Python containers/numbers, NaN and inf as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj



CURVE_GAPS = {
    "return_acf": ("return_acf",), "abs_return_acf": ("abs_return_acf",),
    "sign_acf": ("sign", "acf"), "dt_acf": ("inter_arrival", "acf"), "response": ("response",),
}
SCALAR_GAPS = {
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
    if name in CURVE_GAPS:
        a = np.array(_get(facts, CURVE_GAPS[name]), dtype=float)  # None -> nan
        b = np.array(_get(real, CURVE_GAPS[name]), dtype=float)
        ok = np.isfinite(a) & np.isfinite(b)
        return float(np.mean(np.abs(a[ok] - b[ok]))) if ok.any() else None
    a, b = _get(facts, SCALAR_GAPS[name]), _get(real, SCALAR_GAPS[name])
    return None if a is None or b is None else abs(float(a) - float(b))


def fact_gaps(facts: Mapping[str, Any], real: Mapping[str, Any]) -> dict[str, float | None]:
    return {name: _gap(facts, real, name) for name in (*CURVE_GAPS, *SCALAR_GAPS)}


