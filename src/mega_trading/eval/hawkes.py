"""Compound Hawkes baseline generator: self-exciting arrivals with i.i.d. resampled marks.

This is the classical point-process baseline a generative order-flow model is compared
against (TradeFM's "compound Hawkes"): *when* trades happen follows a univariate Hawkes
process, *what* each trade is (side, price move, size) is drawn independently from the
training data. It reproduces the clustering of arrivals and the marginal distributions of
the marks, and nothing else (no sign memory, no price response, no volatility clustering),
which is exactly what makes it a useful yardstick in the stylized-facts scorecard.

Arrival model. Intensity of an exponential-kernel Hawkes process

    λ(t) = μ + Σ_{t_i < t} α β exp(−β (t − t_i)),      μ > 0, 0 < α < 1, β > 0,

where α is the branching ratio (each event triggers α children on average; α < 1 keeps
the process stationary with mean rate μ / (1 − α)) and 1/β the memory in seconds.

* ``hawkes_loglik``: exact log-likelihood on [t_1, T] of one or several independent
  sequences. The usual O(n) recursion A_i = e^{−β Δt_i} (1 + A_{i−1}) is evaluated in
  vectorized form, A_i = exp(logcumsumexp_{j<i}(β t_j) − β t_i), with
  ``np.logaddexp.accumulate`` (a single C pass, no overflow: the running log-sum stays
  within a few units of β t).
* ``fit_hawkes``: maximum likelihood with ``scipy.optimize.minimize`` (L-BFGS-B) over an
  unconstrained reparametrization μ = e^a, α = sigmoid(b), β = e^c, so positivity and
  stationarity hold by construction; a few starting memories are tried, the best is kept.
* ``simulate_hawkes``: Ogata thinning with a seeded ``numpy.random.Generator``. For the
  exponential kernel the intensity only decays between events, so the intensity just after
  the current time is a valid upper bound for the next candidate.

Simultaneous trades. Binance prints many trades with the same timestamp (one taker order
filling several makers; ms-stamped files make it worse): 30-70 % of the gaps are zero in
the bundled sample. A simple point process has no ties, so ``CompoundHawkes`` fits the
Hawkes process on the DISTINCT timestamps of each (symbol, segment) and treats the number
of trades sharing a timestamp (the *batch size*) as one more mark, resampled i.i.d. from
the training batches. Sampled times are floored to the training data's clock resolution
(1 ms when every training gap is a whole number of ms, else 1 µs), so the generated gaps
look like the real ones (batches that fall in the same tick merge, as they do in the data).

Marks. Each generated trade takes the (side, move_bps, log_size) of a training row drawn
uniformly with replacement (segment-start rows, whose move and gap are 0 by construction,
are left out of the pool).

Library check. ``tick`` (0.8.0.2) has a cp311 wheel and installs, and its simulator runs,
but its learner ``HawkesExpKern`` fails at construction on this stack (numpy 2.4:
"object has no settable attribute 'events'") and in any case only fits μ and α for a FIXED
decay β. The other PyPI packages (``hawkes``, ``hawkeslib``, ...) are unmaintained since
2019-2021. The ~100 lines here are therefore our own and need nothing beyond numpy/scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import optimize
from scipy.special import expit

from mega_trading.core.errors import DataError

# Added to β·t between independent sequences so that exp(-(gap)) == 0 in float64: the
# vectorized recursion then never lets one sequence excite the next.
_SEQUENCE_GAP = 1000.0


@dataclass(frozen=True)
class HawkesParams:
    """Exponential-kernel Hawkes parameters: baseline rate μ (1/s), branching ratio α, decay β (1/s)."""

    mu: float
    alpha: float
    beta: float

    def __post_init__(self) -> None:
        if not (self.mu > 0 and self.beta > 0 and 0 <= self.alpha < 1):
            raise ValueError(f"need mu > 0, beta > 0, 0 <= alpha < 1; got {self}")

    @property
    def mean_rate(self) -> float:
        """Stationary events per second, μ / (1 − α)."""
        return self.mu / (1.0 - self.alpha)


def _as_sequences(times_s: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(times_s, np.ndarray) and times_s.ndim == 1:
        seqs = [times_s]
    else:
        seqs = [np.asarray(s, dtype=np.float64) for s in times_s]
    out = []
    for raw in seqs:
        seq = np.asarray(raw, dtype=np.float64)
        if seq.size == 0:
            continue
        if np.any(np.diff(seq) < 0) or not np.all(np.isfinite(seq)):
            raise DataError("Hawkes event times must be finite and non-decreasing")
        out.append(seq - seq[0])  # each sequence is observed on [its first event, its last]
    return out


@dataclass(frozen=True)
class _Stacked:
    """Several sequences laid end to end for vectorized likelihood evaluation."""

    local: np.ndarray      # time since the sequence's first event (s)
    offset: np.ndarray     # cumulative duration of the earlier sequences (s)
    index: np.ndarray      # sequence number of each event
    remaining: np.ndarray  # T_seq − t_i: time from each event to its sequence's end (s)
    total_time: float      # Σ T_seq


def _stack(seqs: list[np.ndarray], ends: Sequence[float] | None = None) -> _Stacked:
    durations = np.array([s[-1] for s in seqs]) if ends is None else np.asarray(ends, float)
    starts = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
    index = np.concatenate([np.full(len(s), k) for k, s in enumerate(seqs)])
    local = np.concatenate(seqs)
    return _Stacked(local=local, offset=starts[index], index=index,
                    remaining=durations[index] - local, total_time=float(durations.sum()))


def _loglik_stacked(data: _Stacked, mu: float, alpha: float, beta: float) -> float:
    x = beta * (data.local + data.offset) + _SEQUENCE_GAP * data.index
    running = np.logaddexp.accumulate(x)
    previous = np.concatenate([[-np.inf], running[:-1]])
    excitation = np.exp(previous - x)  # A_i = Σ_{j<i, same sequence} e^{−β (t_i − t_j)}
    log_terms = np.log(mu + alpha * beta * excitation)
    compensator = mu * data.total_time + alpha * np.sum(-np.expm1(-beta * data.remaining))
    return float(np.sum(log_terms) - compensator)


def hawkes_loglik(
    params: HawkesParams, times_s: np.ndarray | Sequence[np.ndarray],
    end_s: Sequence[float] | None = None,
) -> float:
    """Log-likelihood of one sequence (1-D array) or several independent ones.

    Each sequence is observed from its first event to ``end_s`` (relative to that first
    event; default: its last event).
    """
    seqs = _as_sequences(times_s)
    if not seqs:
        raise DataError("no events to evaluate a Hawkes likelihood on")
    return _loglik_stacked(_stack(seqs, end_s), params.mu, params.alpha, params.beta)


def hawkes_loglik_naive(params: HawkesParams, times_s: np.ndarray, end_s: float | None = None) -> float:
    """O(n²) textbook log-likelihood of one sequence (reference for tests)."""
    t = np.asarray(times_s, dtype=np.float64)
    t = t - t[0]
    end = t[-1] if end_s is None else end_s
    total = 0.0
    for i in range(len(t)):
        lam = params.mu + sum(
            params.alpha * params.beta * math.exp(-params.beta * (t[i] - t[j])) for j in range(i)
        )
        total += math.log(lam)
    compensator = params.mu * end + params.alpha * sum(1 - math.exp(-params.beta * (end - tj)) for tj in t)
    return total - compensator


def _unpack(z: np.ndarray) -> tuple[float, float, float]:
    return float(np.exp(z[0])), float(expit(z[1])), float(np.exp(z[2]))


def fit_hawkes(times_s: np.ndarray | Sequence[np.ndarray]) -> HawkesParams:
    """Maximum-likelihood (μ, α, β) from event times in seconds.

    ``times_s`` is one non-decreasing array, or a list of them (independent sequences,
    e.g. one per data segment, fitted jointly with shared parameters). Pass distinct
    timestamps: see the module docstring on ties.
    """
    seqs = [s for s in _as_sequences(times_s) if len(s) >= 2]
    n_events = sum(len(s) for s in seqs)
    if n_events < 10:
        raise DataError(f"need at least 10 event times to fit a Hawkes process, got {n_events}")
    data = _stack(seqs)
    if data.total_time <= 0:
        raise DataError("all Hawkes event times are equal: nothing to fit")
    rate = n_events / data.total_time

    def objective(z: np.ndarray) -> float:
        value = _loglik_stacked(data, *_unpack(z))
        return -value / n_events if np.isfinite(value) else 1e300

    best = None
    for memory_in_gaps in (0.3, 3.0, 30.0):  # starting 1/β, in mean inter-event gaps
        start = np.array([math.log(0.5 * rate), 0.0, math.log(rate / memory_in_gaps)])
        result = optimize.minimize(objective, start, method="L-BFGS-B")
        if best is None or result.fun < best.fun:
            best = result
    mu, alpha, beta = _unpack(best.x)
    return HawkesParams(mu=mu, alpha=min(alpha, 1 - 1e-9), beta=beta)


def simulate_hawkes(
    params: HawkesParams, rng: np.random.Generator, *,
    n_events: int | None = None, horizon_s: float | None = None,
) -> np.ndarray:
    """Event times (s, from 0) by Ogata thinning, until ``n_events`` or ``horizon_s``."""
    if (n_events is None) == (horizon_s is None):
        raise ValueError("give exactly one of n_events or horizon_s")
    limit = n_events if n_events is not None else math.inf
    horizon = horizon_s if horizon_s is not None else math.inf
    mu, jump, beta = params.mu, params.alpha * params.beta, params.beta
    times: list[float] = []
    t, excitation = 0.0, 0.0
    block = 4096  # random numbers are drawn in blocks: a scalar draw per step is slow
    exps, unis, k = rng.standard_exponential(block), rng.random(block), 0
    while len(times) < limit:
        if k == block:
            exps, unis, k = rng.standard_exponential(block), rng.random(block), 0
        bound = mu + excitation
        wait = exps[k] / bound
        t += wait
        if t > horizon:
            break
        excitation *= math.exp(-beta * wait)
        if unis[k] * bound <= mu + excitation:
            times.append(t)
            excitation += jump
        k += 1
    return np.asarray(times, dtype=np.float64)


def _group_columns(events: pl.DataFrame) -> list[str]:
    return [c for c in ("symbol", "segment") if c in events.columns]


def _batch_sequences(batches: pl.DataFrame, groups: list[str], max_pause_s: float) -> list[np.ndarray]:
    """Distinct timestamps (s) cut into sequences at group changes and long pauses."""
    times = batches["time_us"].to_numpy()
    new_sequence = np.ones(len(times), dtype=bool)
    new_sequence[1:] = np.diff(times) > max_pause_s * 1e6
    for column in groups:
        values = batches[column].to_numpy()
        new_sequence[1:] |= values[1:] != values[:-1]
    cuts = np.flatnonzero(new_sequence)[1:]
    return [seq / 1e6 for seq in np.split(times, cuts)]


def _clock_resolution_us(dt_us: np.ndarray) -> int:
    positive = dt_us[dt_us > 0]
    return 1000 if positive.size and np.all(positive % 1000 == 0) else 1


@dataclass
class CompoundHawkes:
    """Hawkes arrivals of trade batches + i.i.d. batch sizes + i.i.d. (side, move, size) marks."""

    params: HawkesParams
    batch_sizes: np.ndarray    # trades per distinct timestamp, one entry per training batch
    marks: pl.DataFrame        # pool of training (side, move_bps, log_size) rows
    resolution_us: int

    @classmethod
    def fit(cls, train_events: pl.DataFrame, max_pause_s: float = 60.0) -> CompoundHawkes:
        """Fit on training events; a pause over ``max_pause_s`` also ends a sequence.

        The pause rule mirrors the events stage's segmentation and guards against tables
        whose segment ids repeat (e.g. several files concatenated): one sequence spanning a
        hole of hours would drive the fitted baseline rate μ to zero.
        """
        required = {"side", "move_bps", "log_size", "time_us"}
        missing = required - set(train_events.columns)
        if missing:
            raise DataError(f"training events lack column(s) {sorted(missing)}")
        groups = _group_columns(train_events)
        batches = train_events.group_by([*groups, "time_us"], maintain_order=True).agg(n=pl.len())
        batches = batches.sort([*groups, "time_us"], maintain_order=True)
        params = fit_hawkes(_batch_sequences(batches, groups, max_pause_s))
        pool = train_events
        if "segment_start" in pool.columns:
            pool = pool.filter(~pl.col("segment_start"))
        pool = pool.select(["side", "move_bps", "log_size"]).drop_nulls()
        if pool.height == 0:
            raise DataError("no training rows to draw marks from")
        dt = train_events["dt_us"].to_numpy() if "dt_us" in train_events.columns else np.diff(
            train_events["time_us"].to_numpy())
        return cls(params=params, batch_sizes=batches["n"].to_numpy().astype(np.int64),
                   marks=pool, resolution_us=_clock_resolution_us(dt))

    def sample(self, n_events: int, rng: np.random.Generator, start_time_us: int = 0) -> pl.DataFrame:
        """``n_events`` synthetic trades in the event-table layout, one segment."""
        if n_events <= 0:
            raise ValueError("n_events must be positive")
        sizes = self._draw_batch_sizes(n_events, rng)
        arrivals = simulate_hawkes(self.params, rng, n_events=len(sizes))
        offsets_us = np.floor(arrivals * 1e6 / self.resolution_us).astype(np.int64) * self.resolution_us
        time_us = (start_time_us + np.repeat(offsets_us, sizes))[:n_events]
        dt_us = np.diff(time_us, prepend=time_us[0])
        rows = rng.integers(0, self.marks.height, size=n_events)
        marks = self.marks[rows]
        return pl.DataFrame({
            "side": marks["side"].cast(pl.Int8),
            "move_bps": marks["move_bps"].cast(pl.Float64),
            "log_size": marks["log_size"].cast(pl.Float64),
            "dt_us": pl.Series(dt_us, dtype=pl.Int64),
            "time_us": pl.Series(time_us, dtype=pl.Int64),
            "segment": pl.Series(np.zeros(n_events, dtype=np.int32)),
            "segment_start": pl.Series(np.arange(n_events) == 0),
        })

    def _draw_batch_sizes(self, n_events: int, rng: np.random.Generator) -> np.ndarray:
        mean = float(self.batch_sizes.mean())
        chunks, total = [], 0
        while total < n_events:
            chunk = rng.choice(self.batch_sizes, size=int(n_events / mean) + 16)
            chunks.append(chunk)
            total += int(chunk.sum())
        sizes = np.concatenate(chunks)
        n_batches = int(np.searchsorted(np.cumsum(sizes), n_events) + 1)
        return sizes[:n_batches]

    def summary(self) -> dict:
        return {
            "mu": self.params.mu, "alpha": self.params.alpha, "beta": self.params.beta,
            "mean_rate_per_s": self.params.mean_rate,
            "mean_batch_size": float(self.batch_sizes.mean()),
            "n_batches": int(self.batch_sizes.size), "n_marks": int(self.marks.height),
            "resolution_us": self.resolution_us,
        }
