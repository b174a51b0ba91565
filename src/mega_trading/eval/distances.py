"""Distribution distances (Wasserstein-1 and binned L1) between a generated and a real
sample, with block-bootstrap CIs, drawn with the same capped sample sizes for every source."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from mega_trading.core.errors import DataError
from mega_trading.eval.facts import json_ready
from mega_trading.eval.statistics import DISTRIBUTIONS, FactsConfig, PreparedEvents, prepare_events

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
    return json_ready(out)


