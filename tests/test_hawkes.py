"""Compound Hawkes baseline: likelihood, MLE recovery, thinning simulation, mark sampler."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mega_trading.core.errors import DataError
from mega_trading.eval.hawkes import (
    CompoundHawkes,
    HawkesParams,
    fit_hawkes,
    hawkes_loglik,
    hawkes_loglik_naive,
    simulate_hawkes,
)

TRUE = HawkesParams(mu=0.5, alpha=0.6, beta=2.0)


@pytest.fixture(scope="module")
def real_events() -> pl.DataFrame:
    from mega_trading.data.bundled import sample_files
    from mega_trading.data.events import compute_events
    from mega_trading.data.ingest.reader import read_trades

    path = next(p for p in sample_files("trades") if "BTCUSDT-trades-2024-08-08" in p.name)
    return compute_events(read_trades(path))


def test_fit_recovers_known_parameters():
    times = simulate_hawkes(TRUE, np.random.default_rng(7), horizon_s=4000.0)
    assert 4000 < times.size < 6500  # mean rate mu / (1 - alpha) = 1.25 / s
    fitted = fit_hawkes(times)
    assert abs(fitted.mu - TRUE.mu) < 0.1
    assert abs(fitted.alpha - TRUE.alpha) < 0.07
    assert abs(fitted.beta - TRUE.beta) < 0.45
    assert hawkes_loglik(fitted, times) >= hawkes_loglik(TRUE, times)


def test_loglik_matches_naive_quadratic_formula():
    times = simulate_hawkes(TRUE, np.random.default_rng(3), n_events=150) + 12.5
    for params in (TRUE, HawkesParams(mu=2.0, alpha=0.2, beta=15.0)):
        assert hawkes_loglik(params, times) == pytest.approx(hawkes_loglik_naive(params, times), rel=1e-9)
        end = times[-1] - times[0] + 3.0
        assert hawkes_loglik(params, times, end_s=[end]) == pytest.approx(
            hawkes_loglik_naive(params, times, end_s=end), rel=1e-9)


def test_independent_sequences_add_up_and_never_excite_each_other():
    times = simulate_hawkes(TRUE, np.random.default_rng(4), n_events=120)
    first, second = times[:70], times[70:]
    joint = hawkes_loglik(TRUE, [first, second])
    assert joint == pytest.approx(hawkes_loglik_naive(TRUE, first) + hawkes_loglik_naive(TRUE, second),
                                  rel=1e-9)
    assert joint != pytest.approx(hawkes_loglik(TRUE, times), rel=1e-6)


def test_simulation_is_seeded_and_stationary():
    a = simulate_hawkes(TRUE, np.random.default_rng(11), n_events=3000)
    b = simulate_hawkes(TRUE, np.random.default_rng(11), n_events=3000)
    c = simulate_hawkes(TRUE, np.random.default_rng(12), n_events=3000)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.size == 3000 and np.all(np.diff(a) >= 0)
    long = simulate_hawkes(TRUE, np.random.default_rng(5), horizon_s=20000.0)
    assert long[-1] <= 20000.0
    assert long.size / 20000.0 == pytest.approx(TRUE.mean_rate, rel=0.1)


def test_bad_inputs_are_refused():
    with pytest.raises(DataError):
        fit_hawkes(np.array([0.0, 1.0, 2.0]))
    with pytest.raises(DataError):
        fit_hawkes(np.array([0.0, 2.0, 1.0] + list(range(3, 20))))
    with pytest.raises(ValueError):
        HawkesParams(mu=1.0, alpha=1.0, beta=1.0)  # not stationary
    with pytest.raises(ValueError):
        simulate_hawkes(TRUE, np.random.default_rng(0))


def test_compound_fit_cuts_sequences_at_long_pauses():
    times = simulate_hawkes(TRUE, np.random.default_rng(8), n_events=800)
    shifted = times + times[-1] + 10_000.0  # same segment id, a pause of hours
    frame = pl.DataFrame({
        "time_us": np.round(np.r_[times, shifted] * 1e6).astype(np.int64),
        "side": pl.Series([1] * 1600, dtype=pl.Int8), "move_bps": 0.5, "log_size": 0.0,
        "dt_us": 0, "segment": 0,
    })
    model = CompoundHawkes.fit(frame)
    expected = fit_hawkes([np.round(times * 1e6) / 1e6, np.round(shifted * 1e6) / 1e6])
    assert model.params.mu == pytest.approx(expected.mu, rel=1e-3)
    assert model.params.mu > 0.1  # one sequence across the pause would push mu towards 0


def test_compound_sampler_marks_come_from_training(real_events):
    model = CompoundHawkes.fit(real_events)
    assert 0 < model.params.alpha < 1 and model.resolution_us == 1000  # ms-stamped file
    assert model.batch_sizes.sum() == real_events.height
    sample = model.sample(4000, np.random.default_rng(1), start_time_us=1_700_000_000_000_000)
    again = model.sample(4000, np.random.default_rng(1), start_time_us=1_700_000_000_000_000)
    assert sample.equals(again)
    assert sample.schema["side"] == pl.Int8 and sample.schema["dt_us"] == pl.Int64
    assert sample.height == 4000

    training = real_events.filter(~pl.col("segment_start")).select("side", "move_bps", "log_size")
    seen = set(training.iter_rows())
    assert all(row in seen for row in sample.select("side", "move_bps", "log_size").iter_rows())
    assert sample["side"].mean() == pytest.approx(training["side"].cast(pl.Float64).mean(), abs=0.05)

    time_us, dt_us = sample["time_us"].to_numpy(), sample["dt_us"].to_numpy()
    assert time_us[0] >= 1_700_000_000_000_000 and np.all(np.diff(time_us) >= 0)
    np.testing.assert_array_equal(dt_us[1:], np.diff(time_us))
    assert np.all(dt_us % 1000 == 0)
    real_zero_share = (real_events["dt_us"] == 0).mean()
    assert (sample["dt_us"] == 0).mean() == pytest.approx(real_zero_share, abs=0.08)
