"""Per-episode execution metrics and their distributions over episodes (bootstrap CIs).

Implementation shortfall, sign-adjusted so that a cost is positive for both sides::

    IS_bps = side * 1e4 * (sum_i q_i p_i + (Q - filled) * p_end - Q * p_0) / (Q * p_0)

with p_0 the arrival price (last trade before the start), fills (q_i, p_i), target Q and
p_end the tape price when the episode completed (the unfilled rest is valued there:
opportunity cost). The impact path at event lag k is ``side * 1e4 * (p_k / p_0 - 1)``
with p_k the tape price k market events after completion (k = 0: at completion).

Episodes are independent draws, so CIs are percentile bootstraps of the mean that
resample whole episodes (seeded).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from mega_trading.simulate.market import Episode

SUMMARY_METRICS = ("shortfall_bps", "fill_ratio", "time_to_complete_s", "n_fills",
                   "final_impact_bps")
QUANTILES = {"p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95}


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def shortfall_bps(ep: Episode) -> float:
    paid = math.fsum(f.qty * f.price for f in ep.fills)
    filled = math.fsum(f.qty for f in ep.fills)
    end_price = ep.end_price if ep.end_price is not None else ep.last_price
    value = paid + (ep.target - filled) * end_price
    return ep.side * 1e4 * (value - ep.target * ep.arrival_price) / (ep.target * ep.arrival_price)


def impact_path(ep: Episode) -> list[float | None]:
    path = [ep.side * 1e4 * (p / ep.arrival_price - 1.0) for p in ep.lag_prices]
    return path + [None] * (ep.lags + 1 - len(path))


def episode_row(ep: Episode, index: int) -> dict:
    filled = math.fsum(f.qty for f in ep.fills)
    full = ep.remaining == 0 and bool(ep.fills)
    last_fill_us = ep.fills[-1].time_us if ep.fills else 0
    path = impact_path(ep)
    return {
        "episode": index,
        "symbol": ep.start.symbol,
        "start_row": ep.start.row,
        "start_time_us": ep.start_us,
        "start_vol_bps": _finite(ep.start.vol_bps),
        "side": "buy" if ep.side > 0 else "sell",
        "target_qty": ep.target,
        "arrival_price": ep.arrival_price,
        "filled_qty": filled,
        "fill_ratio": filled / ep.target,
        "avg_fill_price": math.fsum(f.qty * f.price for f in ep.fills) / filled if filled else None,
        "end_price": ep.end_price,
        "shortfall_bps": shortfall_bps(ep),
        "completed": full,
        "time_to_complete_s": (last_fill_us - ep.start_us) / 1e6 if full else None,
        "ended_after_s": (ep.completed_us - ep.start_us) / 1e6 if ep.completed else None,
        "market_events": ep.market_events,
        "n_fills": len(ep.fills),
        "n_market_fills": sum(f.kind == "market" for f in ep.fills),
        "n_limit_fills": sum(f.kind == "limit" for f in ep.fills),
        "n_inserted": len(ep.prints),
        "final_impact_bps": path[-1],
        "impact_bps": path,
        "truncated": ep.truncated,
        "fills": [{"t_s": (f.time_us - ep.start_us) / 1e6, "qty": f.qty, "price": f.price,
                   "kind": f.kind, "market_volume": f.market_volume} for f in ep.fills],
    }


def bootstrap_mean_ci(values: np.ndarray, samples: int, seed: int,
                      level: float = 0.95) -> list[float | None]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return [None, None]
    rng = np.random.default_rng([seed, 2])
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def distribution(values: list, samples: int, seed: int) -> dict:
    """n, mean with a bootstrap 95% CI, std and quantiles of the finite values."""
    array = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    finite = array[np.isfinite(array)]
    out: dict = {"n": len(finite)}
    if len(finite) == 0:
        return {**out, "mean": None, "ci95": [None, None], "std": None,
                **{k: None for k in QUANTILES}}
    out["mean"] = float(finite.mean())
    out["ci95"] = bootstrap_mean_ci(finite, samples, seed)
    out["std"] = float(finite.std(ddof=1)) if len(finite) > 1 else 0.0
    out.update({k: float(np.quantile(finite, q)) for k, q in QUANTILES.items()})
    return out


def summarize(rows: list[dict], samples: int, seed: int) -> dict:
    summary = {name: distribution([r[name] for r in rows], samples, seed)
               for name in SUMMARY_METRICS}
    summary["episodes"] = len(rows)
    summary["truncated"] = sum(r["truncated"] is not None for r in rows)
    return summary


def impact_curve(rows: list[dict], lags: int, samples: int, seed: int) -> dict:
    """Mean impact path over episodes per event lag, with bootstrap 95% CIs."""
    paths = np.array([[np.nan if v is None else v for v in r["impact_bps"]] for r in rows],
                     dtype=np.float64).reshape(len(rows), lags + 1)
    counts = np.isfinite(paths).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN lags
        mean = np.nanmean(paths, axis=0) if len(rows) else np.full(lags + 1, np.nan)
        if len(rows):
            rng = np.random.default_rng([seed, 3])
            boot = np.nanmean(paths[rng.integers(0, len(rows), size=(samples, len(rows)))], axis=1)
            lo, hi = np.nanquantile(boot, [0.025, 0.975], axis=0)
        else:
            lo = hi = np.full(lags + 1, np.nan)
    return {
        "lags": list(range(lags + 1)),
        "mean_bps": [_finite(v) for v in mean],
        "ci95_lo_bps": [_finite(v) for v in lo],
        "ci95_hi_bps": [_finite(v) for v in hi],
        "n": [int(c) for c in counts],
    }
