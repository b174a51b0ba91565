"""Stylized facts on series with known properties, distances, the guard, the real scorecard."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from scipy import stats

from mega_trading.core.errors import MegaTradingError
from mega_trading.core.lineage import read_json
from mega_trading.eval.distances import _DistanceKit, distances
from mega_trading.eval.facts import compute_facts
from mega_trading.eval.scorecard import scorecard, summary_table, write_scorecard
from mega_trading.eval.statistics import (
    DISTRIBUTIONS,
    DegenerateReturnsError,
    FactsConfig,
    aggregated_returns_clock,
    aggregated_returns_event,
    powerlaw_fit,
    prepare_events,
)

N = 20_000


def event_frame(returns, side=None, seed: int = 0, **extra) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(returns)
    side = rng.choice([-1, 1], n) if side is None else side
    dt = rng.exponential(2000.0, n).astype(np.int64)
    return pl.DataFrame({
        "side": pl.Series(side, dtype=pl.Int8), "move_bps": np.asarray(returns, dtype=float),
        "log_size": rng.normal(size=n), "dt_us": dt, "time_us": np.cumsum(dt), **extra,
    })


def garch(n: int, seed: int, omega=0.05, a=0.1, b=0.85) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    r, var = np.empty(n), omega / (1 - a - b)
    for t in range(n):
        r[t] = np.sqrt(var) * z[t]
        var = omega + a * r[t] ** 2 + b * var
    return r


def test_iid_gaussian_has_no_excess_kurtosis_and_no_memory():
    facts = compute_facts(event_frame(np.random.default_rng(1).normal(size=N)))
    assert abs(facts["returns"]["excess_kurtosis"]) < 0.15
    assert abs(facts["returns"]["skew"]) < 0.1
    for curve in (facts["return_acf"], facts["abs_return_acf"], facts["sign"]["acf"]):
        assert len(curve) == 50 and max(abs(v) for v in curve) < 0.04
    assert abs(facts["aggregation"]["event"]["16"]["excess_kurtosis"]) < 0.6
    assert max(abs(v) for v in facts["response"]) < 0.1  # returns ignore the signs


def test_student_t3_has_fat_tails_and_hill_index_near_three():
    returns = np.random.default_rng(2).standard_t(3, size=N)
    facts = compute_facts(event_frame(returns), FactsConfig(hill_fraction=0.02))
    assert facts["returns"]["excess_kurtosis"] > 5
    assert facts["tail"]["hill_index"] == pytest.approx(3.0, abs=0.6)
    assert facts["tail"]["hill_k"] == int(0.02 * N)
    agg = facts["aggregation"]["event"]
    assert agg["1"]["excess_kurtosis"] == pytest.approx(facts["returns"]["excess_kurtosis"])
    assert agg["64"]["excess_kurtosis"] < agg["4"]["excess_kurtosis"] < agg["1"]["excess_kurtosis"]
    assert agg["64"]["n"] == N // 64


def test_persistent_sign_process_has_geometric_sign_acf():
    rng = np.random.default_rng(3)
    stay = 0.8  # P(s_t = s_{t-1}): acf(l) = (2 * stay - 1) ** l
    flips = rng.random(N) > stay
    side = np.where(np.cumsum(flips) % 2 == 0, 1, -1)
    facts = compute_facts(event_frame(rng.normal(size=N), side=side))
    acf = facts["sign"]["acf"]
    assert acf[0] == pytest.approx(0.6, abs=0.03)
    assert acf[1] == pytest.approx(0.36, abs=0.04)
    assert abs(facts["return_acf"][0]) < 0.04
    assert facts["sign"]["powerlaw"]["gamma"] > 0


def test_powerlaw_fit_recovers_exponent_and_ignores_nonpositive_lags():
    lags = np.arange(1, 51, dtype=float)
    acf = 0.4 * lags**-0.6
    acf[[10, 20]] = [-0.01, np.nan]
    fit = powerlaw_fit(lags, acf)
    assert fit["gamma"] == pytest.approx(0.6, abs=1e-9)
    assert fit["amplitude"] == pytest.approx(0.4, rel=1e-9)
    assert fit["n_points"] == 48 and fit["r2"] == pytest.approx(1.0)


def test_garch_shows_volatility_clustering_that_iid_does_not():
    clustered = compute_facts(event_frame(garch(N, seed=4)))
    iid = compute_facts(event_frame(np.random.default_rng(4).normal(size=N)))
    assert clustered["abs_return_acf"][0] > 0.08
    assert np.mean(clustered["abs_return_acf"][:10]) > 0.05
    assert abs(np.mean(iid["abs_return_acf"][:10])) < 0.02
    assert abs(clustered["return_acf"][0]) < 0.05
    assert clustered["returns"]["excess_kurtosis"] > 0.5


def test_response_curve_measures_signed_impact():
    rng = np.random.default_rng(5)
    side = rng.choice([-1, 1], N)
    returns = 0.5 * side + rng.normal(size=N)  # each trade moves the price 0.5 bps its way
    facts = compute_facts(event_frame(returns, side=side))
    assert facts["response"][0] == pytest.approx(0.5, abs=0.04)
    assert facts["response"][9] == pytest.approx(0.5, abs=0.15)  # no further drift


def test_autocorrelations_never_cross_segment_boundaries():
    n = 400
    side = np.r_[np.ones(n // 2), -np.ones(n // 2)].astype(int)
    returns = np.random.default_rng(6).normal(size=n)
    by_segment = event_frame(returns, side=side, segment=np.repeat([0, 1], n // 2))
    assert compute_facts(by_segment)["sign"]["acf"] == pytest.approx([1.0] * 50)
    # rollout layout: a SEG special row (is_event False, nulls) opens the second segment
    rows = by_segment.drop("segment").with_columns(is_event=pl.lit(True), segment_start=pl.lit(False))
    special = rows.head(1).with_columns(
        side=None, move_bps=None, log_size=None, dt_us=None, is_event=False, segment_start=True)
    rollout = pl.concat([rows.head(n // 2), special, rows.tail(n // 2)])
    facts = compute_facts(rollout.with_columns(rollout=pl.lit(0)))
    assert facts["n_events"] == n and facts["n_groups"] == 2
    assert facts["sign"]["acf"] == pytest.approx([1.0] * 50)
    assert compute_facts(rows)["sign"]["acf"][0] < 0.999  # one group: the boundary pair counts


def test_segment_start_rows_are_not_observations():
    frame = event_frame(np.random.default_rng(7).normal(size=300))
    frame = frame.with_columns(segment_start=pl.Series(np.arange(300) % 100 == 0))
    prepared = prepare_events(frame)
    assert prepared.n == 297 and prepared.group.max() == 2


def test_aggregation_blocks_stay_inside_groups():
    n = 100
    frame = event_frame(np.ones(n), segment=np.repeat([0, 1], n // 2))
    frame = frame.with_columns(time_us=pl.Series(np.arange(n) * 100_000))  # 10 trades / s
    prepared = prepare_events(frame)
    np.testing.assert_array_equal(aggregated_returns_event(prepared, 16), np.full(6, 16.0))
    np.testing.assert_array_equal(aggregated_returns_clock(prepared, 1.0), np.full(10, 10.0))
    assert aggregated_returns_clock(prepared, 3.0).sum() == n


def test_three_valued_returns_are_refused_or_flagged():
    values = np.random.default_rng(8).choice([-1.0, 0.0, 1.0], size=2000)
    with pytest.raises(DegenerateReturnsError, match="3 distinct") as info:
        compute_facts(event_frame(values))
    assert isinstance(info.value, MegaTradingError)
    flagged = compute_facts(event_frame(values), FactsConfig(on_degenerate="flag"))
    assert flagged["valid"] is False and "distinct" in flagged["warnings"][0]
    five = np.random.default_rng(8).choice([-2.0, -1.0, 0.0, 1.0, 2.0], size=2000)
    assert compute_facts(event_frame(five))["valid"] is True


def test_too_few_events_or_missing_columns_are_refused():
    with pytest.raises(MegaTradingError, match="usable events"):
        compute_facts(event_frame(np.arange(10.0)))
    with pytest.raises(MegaTradingError, match="lacks column"):
        compute_facts(event_frame(np.arange(100.0)).drop("dt_us"))


def test_bootstrap_replicates_match_scipy_at_uniform_weights():
    rng = np.random.default_rng(9)
    for gen, real in ((rng.normal(size=700), rng.normal(0.3, 1.4, size=500)),
                      (np.round(rng.normal(size=700)), np.round(rng.normal(0.4, 1, size=300)))):
        kit = _DistanceKit(gen, real, n_bins=20)
        ks, w1, l1 = kit.weighted(np.ones(gen.size), np.ones(real.size))
        assert ks == pytest.approx(stats.ks_2samp(gen, real).statistic, abs=1e-12)
        assert w1 == pytest.approx(kit.point()[1], rel=1e-9)
        assert l1 == pytest.approx(kit.point()[2]) and 0 < l1 <= 2


def test_distances_to_itself_are_zero_and_to_a_shift_are_larger():
    cfg = FactsConfig(n_boot=50)
    base = event_frame(np.random.default_rng(10).normal(size=5000), seed=10)
    same = distances(base, base, cfg, np.random.default_rng(0))
    shifted = distances(base.with_columns(pl.col("move_bps") + 0.5), base, cfg, np.random.default_rng(0))
    assert set(same) == set(DISTRIBUTIONS)
    # resampling noise alone: ~1/sqrt(n) for KS and W1, ~sqrt(bins/n) for the binned L1
    for stat, noise in (("ks", 0.05), ("wasserstein", 0.08), ("l1_bins", 0.2)):
        assert same["returns"][stat]["value"] == pytest.approx(0.0, abs=1e-12)
        assert 0 < same["returns"][stat]["ci_high"] < noise
        assert shifted["returns"][stat]["value"] > 2 * same["returns"][stat]["ci_high"]
        assert shifted["log_size"][stat]["value"] == pytest.approx(0.0, abs=1e-12)
    assert shifted["returns"]["wasserstein"]["value"] == pytest.approx(0.5, abs=0.02)
    again = distances(base.with_columns(pl.col("move_bps") + 0.5), base, cfg, np.random.default_rng(0))
    assert again == shifted


def test_block_bootstrap_and_sample_cap():
    base = event_frame(garch(3000, seed=11), seed=11)
    cfg = FactsConfig(n_boot=30, block_len=25, max_distance_samples=1000)
    out = distances(base.tail(1500), base.head(1500), cfg, np.random.default_rng(1))
    returns = out["returns"]
    assert returns["n_gen"] == returns["n_real"] == 1000
    assert 0 < returns["ks"]["ci_low"] <= returns["ks"]["ci_high"] < 1


def _sample_events():
    """Real events from the bundled BTCUSDT 2024-08-08 and ETHUSDT 2024-08-08 files."""
    from mega_trading.data.bundled import sample_files
    from mega_trading.data.events import compute_events
    from mega_trading.data.ingest.reader import read_trades

    files = {p.name.split("-")[0] + p.name[-14:-4]: p for p in sample_files("trades")}
    btc = compute_events(read_trades(files["BTCUSDT2024-08-08"]))
    eth = compute_events(read_trades(files["ETHUSDT2024-08-08"]))
    return btc, eth


def test_scorecard_on_real_sample_is_json_with_noise_floor(tmp_path):
    from mega_trading.eval.hawkes import CompoundHawkes

    btc, eth = _sample_events()
    cut = int(btc.height * 0.6)
    train, backtest = btc.head(cut), btc.tail(btc.height - cut)
    hawkes = CompoundHawkes.fit(train).sample(3000, np.random.default_rng(0), start_time_us=0)
    cfg = FactsConfig(n_boot=20)
    card = scorecard(backtest, train, model_rollouts=eth, baselines={"hawkes": hawkes}, cfg=cfg, seed=3)

    text = json.dumps(card, allow_nan=False)
    assert json.loads(text) == card
    assert set(card["facts"]) == {"real", "noise_floor", "model", "baselines"}
    assert card["facts"]["real"]["n_events"] == backtest.height
    assert card["facts"]["noise_floor"]["n_events"] == train.height - 1  # segment start dropped
    for name in DISTRIBUTIONS:
        section = card["distances"][name]
        assert section["noise_floor"]["ks"]["value"] >= 0
        assert set(section["baselines"]) == {"hawkes"}
    gaps = card["fact_gaps"]["sign_acf"]
    # real trades come in same-side runs; i.i.d. resampled marks forget them
    assert card["facts"]["real"]["sign"]["acf"][0] > 0.2
    assert gaps["baselines"]["hawkes"] > gaps["noise_floor"]
    assert card == scorecard(backtest, train, model_rollouts=eth, baselines={"hawkes": hawkes},
                             cfg=cfg, seed=3)

    rows = summary_table(card)
    assert rows and all(set(r) == {"metric", "real", "noise_floor", "model", "hawkes"} for r in rows)
    write_scorecard(tmp_path / "facts.json", card, run="test")
    stored = read_json(tmp_path / "facts.json")
    assert stored["provenance"]["run"] == "test" and stored["schema"] == card["schema"]


def test_scorecard_without_model_keeps_the_layout():
    btc, _ = _sample_events()
    cfg = FactsConfig(n_boot=5, max_lag=10)
    card = scorecard(btc.tail(3000), btc.head(3000), cfg=cfg)
    assert card["facts"]["model"] is None and card["facts"]["baselines"] == {}
    assert card["distances"]["returns"]["model"] is None
    assert card["fact_gaps"]["response"]["model"] is None
    assert card["fact_gaps"]["response"]["noise_floor"] is not None
    json.dumps(card, allow_nan=False)
