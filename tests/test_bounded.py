"""Bounded memory: facts read a seeded stratified sample of real windows when a split is
larger than `facts.max_real_events`, and on the demo data the bounded figures stay within
the full computation's CIs (the backtest's streamed sums are checked against the
per-position computation in test_backtest.py)."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest

from mega_trading.data.bundled import bundled_dir
from mega_trading.data.parts import expand_inputs
from mega_trading.data.prepare import PrepareConfig, prepare
from mega_trading.data.shards import ShardSet
from mega_trading.data.windows import window_plan
from mega_trading.eval.hawkes import CompoundHawkes
from mega_trading.eval.scorecard import scorecard
from mega_trading.eval.statistics import DISTRIBUTIONS, FactsConfig

WINDOW = 64


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo's real trades (bundled sample + demo folders), prepared as the demo does."""
    out = tmp_path_factory.mktemp("bounded") / "data"
    inputs = expand_inputs([bundled_dir("sample"), bundled_dir("demo")])
    prepare(inputs, out, PrepareConfig(block_size=128, stride=64, workers=1, kind="trades"))
    return ShardSet.open(out)


def test_a_split_that_fits_is_read_whole(demo_data):
    events, info = demo_data.sample_events("backtest", 10**9, WINDOW)
    whole = pl.concat([demo_data.events("backtest", s) for s in demo_data.symbols("backtest")])
    assert info["complete"] and info["events"] == whole.height == info["events_in_split"]
    assert events.equals(whole.select(events.columns))


def test_stratified_windows_are_real_contiguous_rows(demo_data):
    total = sum(demo_data.n_events("train", s) for s in demo_data.symbols("train"))
    cap = total // 5
    events, info = demo_data.sample_events("train", cap, WINDOW, seed=7)
    assert not info["complete"] and info["windows"] >= cap // WINDOW
    assert events.height <= cap + WINDOW * len(demo_data.symbols("train"))
    # every symbol is drawn, in proportion to its events (within one window per stratum)
    for symbol in demo_data.symbols("train"):
        share = demo_data.n_events("train", symbol) / total
        got = events.filter(pl.col("symbol") == symbol).height
        assert got >= min(WINDOW, demo_data.n_events("train", symbol))
        assert abs(got - share * events.height) <= 2 * WINDOW + 0.05 * events.height
    # the sample is exactly the planned windows, each a stretch of the real rows
    ranges = {s: tuple(demo_data.manifest["shards"]["train"][s]["rows"])
              for s in demo_data.symbols("train")}
    plan = window_plan(ranges, cap, WINDOW, seed=7)
    assert len(plan) == info["windows"]
    columns = ["symbol", "side", "move_bps", "log_size", "dt_us", "time_us"]
    pieces = []
    for symbol, start, stop in plan:
        lo, hi = ranges[symbol]
        assert lo <= start < stop <= hi and stop - start <= WINDOW
        pieces.append(demo_data.events("train", symbol).slice(start - lo, stop - start))
    assert pl.concat(pieces).select(columns).equals(events.select(columns))
    starts = sorted((s, a, b) for s, a, b in plan)
    assert all(p[0] != q[0] or p[2] <= q[1] for p, q in itertools.pairwise(starts))  # no overlap
    # no segment id spans two windows: the segment count is at least the window count
    assert events["segment"].n_unique() >= info["windows"]
    again, _ = demo_data.sample_events("train", cap, WINDOW, seed=7)
    other, _ = demo_data.sample_events("train", cap, WINDOW, seed=8)
    assert again.equals(events) and not other.equals(events)


def test_bounded_facts_stay_within_the_full_computations_cis(demo_data):
    """Facts of a Hawkes 'model' against real data, once on the whole splits and once on a
    half-size sample of windows: for every distance the bounded run's CI overlaps the full
    run's. Both CIs are moving-block bootstraps (64 events), which respect the serial
    dependence of order flow; an i.i.d. bootstrap would be falsely narrow for a windowed
    sample. (At a quarter-size sample the log-size Wasserstein distance drifts out: 0.167
    against 0.054 [0.048, 0.086]; the default cap, 200k events, keeps samples far larger.)"""
    cfg = FactsConfig(n_boot=100, on_degenerate="flag", block_len=64)
    full_real, _ = demo_data.sample_events("backtest", 10**9, 256)
    full_floor, _ = demo_data.sample_events("train", 10**9, 256)
    model = CompoundHawkes.fit(full_floor).sample(8000, np.random.default_rng(0))
    full = scorecard(full_real, full_floor, model, cfg=cfg, seed=0)
    real, info = demo_data.sample_events("backtest", full_real.height // 2, 256, seed=1)
    floor, _ = demo_data.sample_events("train", full_floor.height // 2, 256, seed=2)
    assert not info["complete"] and real.height < 0.6 * full_real.height
    bounded = scorecard(real, floor, model, cfg=cfg, seed=0)
    for name in DISTRIBUTIONS:
        for metric in ("ks", "wasserstein", "l1_bins"):
            whole = full["distances"][name]["model"][metric]
            part = bounded["distances"][name]["model"][metric]
            overlap = part["ci_low"] <= whole["ci_high"] and whole["ci_low"] <= part["ci_high"]
            assert overlap, (name, metric, part, whole)


def test_event_at_token_reads_the_same_row_as_the_whole_split(demo_data):
    """Prompts are anchored on the last real event of their window, read alone; it must be
    the row the whole split's table gives for that token position."""
    rng = np.random.default_rng(0)
    for symbol in demo_data.symbols("backtest"):
        full = demo_data.events("backtest", symbol).sort("token_pos").drop("segment")
        token_pos = full["token_pos"].to_numpy()
        segs = demo_data.seg_positions("backtest", symbol)
        n_tokens = demo_data.n_tokens("backtest", symbol)
        assert len(segs) + full.height == n_tokens
        for position in [*rng.integers(int(token_pos[0]), n_tokens, 25), n_tokens - 1, *segs[1:3]]:
            expected = full.row(int(np.searchsorted(token_pos, position, side="right")) - 1,
                                named=True)
            expected.pop("token")
            got = demo_data.event_at_token("backtest", symbol, int(position), segs).drop(
                "segment").row(0, named=True)
            assert got == expected, (symbol, position)


def test_events_between_tokens_reads_the_rows_of_the_whole_table(demo_data):
    """The report's real continuation of a prompt is read alone; it equals the whole
    split's rows in that token range and the n_after after it."""
    rng = np.random.default_rng(1)
    for symbol in demo_data.symbols("backtest"):
        full = demo_data.events("backtest", symbol).sort("token_pos").drop("token", "segment")
        token_pos = full["token_pos"].to_numpy()
        n_tokens = demo_data.n_tokens("backtest", symbol)
        for lo in [0, *rng.integers(0, n_tokens - 40, 10)]:
            got = demo_data.events_between_tokens("backtest", symbol, int(lo), int(lo) + 32, 20)
            first = int(np.searchsorted(token_pos, lo, side="left"))
            stop = int(np.searchsorted(token_pos, lo + 32, side="left")) + 20
            assert got.drop("segment").equals(full.slice(first, stop - first)), (symbol, lo)
